"""PCA-whitening + L2 normalisation of clustering features (DeepCluster's preprocessing).

The original code used ``faiss.PCAMatrix(d, 256, eigen_power=-0.5)`` on the full in-memory
matrix: an uncentred covariance of every row, then a *full* double-precision eigen
decomposition (LAPACK ``dsyev``; ~70 s for d=4096 on 2 cores). Here:

* the covariance is accumulated over row chunks (never a float copy of the whole matrix)
  with a rank-k update (BLAS ``ssyrk``, half the flops of a GEMM) written in place;
* only the top ``dim`` eigenpairs are computed (LAPACK ``ssyevr`` with an index range);
* the transform writes straight into the output (x @ P - mean @ P, the same bias trick as
  faiss), so the only large allocation is the N x dim result.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import scipy.linalg
from scipy.linalg import blas

try:  # a scikit-learn dependency; only used to pin the eigensolver to one BLAS thread
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None

# Chunks are also capped in bytes: 8192 rows of 4096 floats would be 128 MiB per copy.
_MAX_CHUNK_BYTES = 32 * 2**20


def _as_matrix(x) -> np.ndarray:
    """View ``x`` as a 2-D ndarray without copying (np.memmap stays a memmap)."""
    arr = x if isinstance(x, np.ndarray) else np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"features must be a 2-D (N x D) array, got shape {arr.shape}")
    return arr


def _chunk_len(chunk_rows: int, n_cols: int) -> int:
    """Rows per chunk: at most ``chunk_rows`` and at most ~32 MiB of float32."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    return max(1, min(chunk_rows, _MAX_CHUNK_BYTES // (4 * max(n_cols, 1))))


def _sample_rows(n: int, sample_size: int | None, seed: int) -> np.ndarray | None:
    """Sorted random row indices (sorted: sequential reads of a memmap), or None for all rows."""
    if sample_size is None or n <= sample_size:
        return None
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=sample_size, replace=False))


def _iter_chunks(x: np.ndarray, rows: np.ndarray | None, step: int,
                 buffer: np.ndarray) -> Iterator[np.ndarray]:
    """Yield float32 C-contiguous chunks of ``x`` (or of its ``rows``), ``step`` rows at a time.

    A chunk is a view of ``x`` when possible (float32 rows read in order: no copy), else
    rows are gathered / converted into ``buffer`` (step x D float32), reused for every chunk
    so that no fresh memory is faulted in per chunk.
    """
    total = x.shape[0] if rows is None else rows.shape[0]
    direct = rows is None and x.dtype == np.float32 and x.flags.c_contiguous
    for start in range(0, total, step):
        stop = min(start + step, total)
        if direct:
            yield np.asarray(x[start:stop])
            continue
        out = buffer[: stop - start]
        if rows is None:
            out[...] = x[start:stop]
        elif x.dtype == np.float32:
            np.take(x, rows[start:stop], axis=0, out=out)
        else:
            out[...] = x[rows[start:stop]]
        yield out


def _check_dim(dim: int, n: int, d: int, n_fit: int) -> None:
    if dim < 1:
        raise ValueError(f"PCA dimension must be >= 1, got {dim}")
    if dim > min(n, d):
        raise ValueError(
            f"cannot reduce {n} features of dimension {d} to {dim} dims with PCA: "
            f"the dimension must be <= min(number of points, feature dimension) = {min(n, d)}; "
            f"use a smaller PCA dimension or more images"
        )
    if dim > n_fit:
        raise ValueError(
            f"PCA to {dim} dims needs at least {dim} fitting rows, but sample_size gives {n_fit}; "
            f"raise sample_size or lower the PCA dimension"
        )


def _covariance(x: np.ndarray, rows: np.ndarray | None, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean (float64) and covariance (float32, Fortran order, upper triangle only) of the rows.

    Accumulated around a shift (the first chunk's mean) so that float32 sums do not suffer
    the cancellation of E[xx^T] - mu mu^T when features have a large common offset.
    """
    n_fit = x.shape[0] if rows is None else rows.shape[0]
    d = x.shape[1]
    cov = np.zeros((d, d), dtype=np.float32, order="F")
    total = np.zeros(d, dtype=np.float64)
    shift: np.ndarray | None = None
    alpha = 1.0 / n_fit
    buffer = np.empty((min(step, n_fit), d), dtype=np.float32)
    for chunk in _iter_chunks(x, rows, step, buffer):
        if shift is None:
            shift = chunk.mean(axis=0, dtype=np.float64).astype(np.float32)
        centred = np.subtract(chunk, shift, out=buffer[: chunk.shape[0]])
        total += centred.sum(axis=0, dtype=np.float64)
        # centred.T is a Fortran-ordered d x rows view: cov += alpha * centred.T @ centred, in place.
        cov = blas.ssyrk(alpha, centred.T, beta=1.0, c=cov, trans=0, lower=0, overwrite_c=1)
    delta = total / n_fit
    # cov -= delta delta^T (rank-1 update in place, upper triangle).
    cov = blas.ssyr(-1.0, delta.astype(np.float32), a=cov, lower=0, overwrite_a=1)
    return shift.astype(np.float64) + delta, cov


def _one_blas_thread() -> contextlib.AbstractContextManager:
    """One BLAS thread for LAPACK's tridiagonal reduction: it is a long chain of small level-2
    calls, and OpenBLAS's threads spent more time synchronising than computing (d=4096 on
    2 cores: 15-28 s with 2 threads, 3 s with 1)."""
    if threadpool_limits is None:  # pragma: no cover
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _top_eigen(cov: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``dim`` eigenpairs of the symmetric matrix (upper triangle), largest first."""
    d = cov.shape[0]
    with _one_blas_thread():
        values, vectors = scipy.linalg.eigh(
            cov, lower=False, subset_by_index=[d - dim, d - 1], driver="evr",
            overwrite_a=True, check_finite=False,
        )
    values, vectors = values[::-1], vectors[:, ::-1]
    # Fix each component's sign (largest-magnitude entry positive) so outputs are reproducible.
    pivot = np.abs(vectors).argmax(axis=0)
    signs = np.sign(vectors[pivot, np.arange(dim)])
    signs[signs == 0] = 1
    return np.maximum(values, 0.0), vectors * signs


_GRAM_MAX_BYTES = 512 * 2**20


def _gram_eigen(x: np.ndarray, rows: np.ndarray | None, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top eigenpairs of the covariance from the n x n Gram matrix, for n < D (small data).

    The covariance C = Xc^T Xc / n and the Gram matrix G = Xc Xc^T / n share their non-zero
    eigenvalues; an eigenvector u of G maps to Xc^T u / sqrt(n * lambda) of C. An n x n
    eigenproblem instead of D x D: at n=1,300, D=4,096 this is ~30x faster.
    """
    sample = np.asarray(x if rows is None else x[np.sort(rows)], dtype=np.float64)
    mean = sample.mean(axis=0)
    sample -= mean
    n = sample.shape[0]
    gram = sample @ sample.T / n
    values, u = scipy.linalg.eigh(gram, subset_by_index=[n - dim, n - 1], check_finite=False)
    values, u = np.maximum(values[::-1], 0.0), u[:, ::-1]
    vectors = sample.T @ u / np.sqrt(np.maximum(n * values, 1e-30))
    pivot = np.abs(vectors).argmax(axis=0)
    signs = np.sign(vectors[pivot, np.arange(dim)])
    signs[signs == 0] = 1
    return mean, values, vectors * signs


class PCAWhitening:
    """PCA to ``dim`` dimensions with whitening, as DeepCluster's ``PCAMatrix(eigen_power=-0.5)``.

    Each output component is divided by ``sqrt(eigenvalue + eps)``; the covariance uses the
    1/n normalisation (as faiss). Fitted with numpy/scipy BLAS+LAPACK in float32 over row
    chunks (not ``faiss.PCAMatrix``: see the module docstring for why).
    """

    def __init__(self, dim: int = 256, eps: float = 1e-5) -> None:
        self.dim = dim
        self.eps = eps
        self.mean_: np.ndarray | None = None         # (D,) float64
        self.eigenvalues_: np.ndarray | None = None  # (dim,) float64, decreasing
        self.components_: np.ndarray | None = None   # (D, dim) float32 eigenvectors
        self.projection_: np.ndarray | None = None   # (D, dim) float32, whitening included
        self.bias_: np.ndarray | None = None         # (dim,) float32 = mean @ projection

    def fit(self, x, sample_size: int | None = 100_000, seed: int = 0,
            chunk_rows: int = 8192) -> "PCAWhitening":
        """Fit on ``x`` (N x D array or memmap); on a random sample of ``sample_size`` rows if N is larger.

        Peak extra memory: one D x D float32 covariance plus one chunk buffer (<= 32 MiB).
        Raises ValueError if ``dim > min(N, D)`` (or exceeds the number of sampled rows).
        """
        x = _as_matrix(x)
        n, d = x.shape
        rows = _sample_rows(n, sample_size, seed)
        _check_dim(self.dim, n, d, n if rows is None else rows.shape[0])
        n_fit = n if rows is None else rows.shape[0]
        if n_fit < d and n_fit * d * 8 <= _GRAM_MAX_BYTES:
            mean, values, vectors = _gram_eigen(x, rows, self.dim)
        else:
            mean, cov = _covariance(x, rows, _chunk_len(chunk_rows, d))
            values, vectors = _top_eigen(cov, self.dim)
            del cov
        self.mean_ = mean
        self.eigenvalues_ = values.astype(np.float64)
        self.components_ = vectors.astype(np.float32)
        scale = 1.0 / np.sqrt(self.eigenvalues_ + self.eps)
        self.projection_ = (vectors * scale).astype(np.float32)
        # einsum, not @: keeps numpy's own BLAS thread pool out of the fit (see _project).
        self.bias_ = np.einsum("d,dk->k", mean, vectors * scale).astype(np.float32)
        return self

    def transform(self, x, chunk_rows: int = 8192, l2_normalize: bool = True) -> np.ndarray:
        """Project ``x`` (N x D) to N x dim float32 whitened components, rows L2-normalised if asked."""
        if self.projection_ is None:
            raise RuntimeError("PCAWhitening.transform called before fit")
        x = _as_matrix(x)
        if x.shape[1] != self.projection_.shape[0]:
            raise ValueError(f"features have dimension {x.shape[1]}, PCA was fitted on {self.projection_.shape[0]}")
        out = np.empty((x.shape[0], self.dim), dtype=np.float32)
        step = _chunk_len(chunk_rows, x.shape[1])
        direct = x.dtype == np.float32 and x.flags.c_contiguous
        buffer = np.empty((0 if direct else min(step, x.shape[0]), x.shape[1]), dtype=np.float32)
        start = 0
        for chunk in _iter_chunks(x, None, step, buffer):
            block = out[start:start + chunk.shape[0]]
            # (x - mean) @ P == x @ P - mean @ P: no centred copy of the chunk.
            _project(chunk, self.projection_, block)
            block -= self.bias_
            if l2_normalize:
                _l2_normalize_rows(block)
            start += chunk.shape[0]
        return out


def _project(chunk: np.ndarray, projection: np.ndarray, out: np.ndarray) -> None:
    """out = chunk @ projection, written in place with scipy's BLAS.

    Same BLAS library as the fit (numpy bundles another OpenBLAS; alternating between the two
    thread pools makes their idle-spinning threads fight for the cores). Computed transposed,
    out^T = P^T chunk^T, because every operand is then a Fortran-ordered view (no copies).
    """
    res = blas.sgemm(1.0, projection.T, chunk.T, beta=0.0, c=out.T, overwrite_c=1)
    if not np.shares_memory(res, out):  # pragma: no cover - f2py had to copy
        out[...] = res.T


def _l2_normalize_rows(block: np.ndarray) -> None:
    """In-place row L2 normalisation; all-zero rows stay zero instead of becoming NaN."""
    norms = np.sqrt(np.einsum("ij,ij->i", block, block))
    np.maximum(norms, np.finfo(np.float32).tiny, out=norms)
    block /= norms[:, None]


def preprocess_features(x, dim: int = 256, sample_size: int | None = 100_000, seed: int = 0,
                        chunk_rows: int = 8192) -> np.ndarray:
    """PCA-whiten to ``dim`` then L2-normalise rows (DeepCluster's preprocessing).

    Output N x dim float32; peak extra memory ~ N*dim*4 + D*D*4 bytes (+ one <= 32 MiB chunk).
    """
    pca = PCAWhitening(dim=dim).fit(x, sample_size=sample_size, seed=seed, chunk_rows=chunk_rows)
    return pca.transform(x, chunk_rows=chunk_rows, l2_normalize=True)
