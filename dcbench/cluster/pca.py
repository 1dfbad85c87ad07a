"""PCA-whitening + L2 normalisation: the one implementation, for the trainer and retrieval.

Two numerical recipes, each kept exactly as its caller has always computed it (the numbers
of both are pinned by tests), chosen with two parameters of :class:`PCAWhitening`:

* ``precision="float32"`` (the trainer, DeepCluster's clustering features; large N x 4096):
  chunked float32 covariance and the top ``dim`` eigenpairs only, see below;
* ``precision="float64"`` (retrieval's R-MAC regions; D <= 2048): uncentred Gram matrix
  accumulated in float64 over ``chunk_rows`` chunks of each block, full eigendecomposition.

``eps_rule`` says how small eigenvalues are kept from blowing the whitening up:
``"additive"`` divides by ``sqrt(eigenvalue + eps)`` (the trainer, with ``eps=0`` as faiss's
``PCAMatrix(eigen_power=-0.5)``: components of exactly zero eigenvalue are dropped), ``"relative_floor"``
raises every eigenvalue to at least ``eps * largest`` before dividing by its square root
(DeepCluster's retrieval code).

DeepCluster's clustering code used ``faiss.PCAMatrix(d, 256, eigen_power=-0.5)`` on the full
in-memory matrix: an uncentred covariance of every row, then a *full* double-precision eigen
decomposition (LAPACK ``dsyev``; ~70 s for d=4096 on 2 cores). The float32 recipe instead:

* the covariance is accumulated over row chunks (never a float copy of the whole matrix)
  with a rank-k update (BLAS ``ssyrk``, half the flops of a GEMM) written in place;
* only the top ``dim`` eigenpairs are computed (LAPACK ``ssyevr`` with an index range);
* the transform writes straight into the output (x @ P - mean @ P, the same bias trick as
  faiss), so the only large allocation is the N x dim result.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import scipy.linalg
from scipy.linalg import blas

try:  # a scikit-learn dependency; only used to pin the eigensolver to one BLAS thread
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None

# Chunks are also capped in bytes: 8192 rows of 4096 floats would be 128 MiB per copy.
_MAX_CHUNK_BYTES = 32 * 2**20

#: eigenvalues at most this share of the largest are zero (float32 rounding: 16 x machine epsilon)
_ZERO_EIGENVALUE = 16 * float(np.finfo(np.float32).eps)

EpsRule = Literal["additive", "relative_floor"]
Precision = Literal["float32", "float64"]


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


#: (rows, mean (float64), covariance with the 1/rows normalisation (float32, full symmetric))
Moments = tuple[int, np.ndarray, np.ndarray]


def scatter_moments(x, chunk_rows: int = 8192) -> Moments:
    """Every row's share of the PCA fit, in D + D x D numbers: for torchrun, where gathering the
    rows themselves (N x 4096 on ImageNet) to one rank would not fit in memory."""
    x = _as_matrix(x)
    mean, upper = _covariance(x, None, _chunk_len(chunk_rows, x.shape[1]))
    full = np.triu(upper) + np.triu(upper, 1).T
    return x.shape[0], mean, full


def combine_moments(parts: Sequence[Moments]) -> Moments:
    """The moments of the union of the shards' rows (Chan et al.'s pairwise update, 1979)."""
    n = sum(p[0] for p in parts)
    mean = sum(p[0] * p[1] for p in parts) / n
    cov = np.zeros_like(parts[0][2], dtype=np.float64)
    for rows, part_mean, part_cov in parts:
        shift = part_mean - mean
        cov += rows * (part_cov.astype(np.float64) + np.outer(shift, shift))
    return n, mean, (cov / n).astype(np.float32)


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
    return np.maximum(values, 0.0), _fix_signs(vectors)


def _fix_signs(vectors: np.ndarray) -> np.ndarray:
    """Each component's largest-magnitude entry made positive, so outputs are reproducible.

    A negation is exact in floating point, so this never changes an inner product."""
    pivot = np.abs(vectors).argmax(axis=0)
    signs = np.sign(vectors[pivot, np.arange(vectors.shape[1])])
    signs[signs == 0] = 1
    return vectors * signs


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
    return mean, values, _fix_signs(vectors)


def _float64_eigen(blocks: Sequence[np.ndarray], chunk_rows: int, eps: float,
                   dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """The float64 recipe: ``(mean, eigenvalues, eigenvectors, kept energy)``, eps floor applied.

    Sums and the uncentred Gram matrix over chunks of exactly ``chunk_rows`` rows of each block
    (the chunking is part of the numbers), ``cov = G / n - mean mean^T``, every eigenpair with
    ``np.linalg.eigh``; eigenvalues are raised to ``eps * largest`` (relative floor) before the
    top ``dim`` are chosen, and the kept energy is their share of the floored total.
    """
    n = sum(len(b) for b in blocks)
    d = blocks[0].shape[1]
    total, gram = np.zeros(d), np.zeros((d, d))
    for block in blocks:
        for start in range(0, len(block), chunk_rows):
            chunk = np.asarray(block[start:start + chunk_rows], dtype=np.float64)
            total += chunk.sum(axis=0)
            gram += chunk.T @ chunk
    mean = total / n
    values, vectors = np.linalg.eigh(gram / n - np.outer(mean, mean))
    values = np.maximum(values, values.max() * eps)
    order = np.argsort(values)[::-1][:dim]
    return mean, values[order], _fix_signs(vectors[:, order]), float(values[order].sum() / values.sum())


class PCAWhitening:
    """PCA to ``dim`` dimensions with whitening (DeepCluster's ``PCAMatrix(eigen_power=-0.5)``).

    Each output component is divided by the square root of its eigenvalue, made safe by
    ``eps`` as ``eps_rule`` says (see the module docstring); the covariance uses the 1/n
    normalisation (as faiss). ``precision`` picks the numerical recipe: "float32" (the
    trainer: chunked float32 BLAS/LAPACK, top eigenpairs only; not ``faiss.PCAMatrix``, see
    the module docstring for why) or "float64" (retrieval: float64 Gram, every eigenpair).

    Callers pass their rule explicitly: the trainer ``eps=0, eps_rule="additive"`` (faiss's
    ``PCAMatrix(d, dim, eigen_power=-0.5)``, whose ``epsilon`` defaults to 0; DeepCluster's
    ``clustering.py`` never sets it), retrieval ``eps=1e-5, eps_rule="relative_floor",
    precision="float64"``.
    """

    def __init__(self, dim: int = 256, eps: float = 0.0, eps_rule: EpsRule = "additive",
                 precision: Precision = "float32") -> None:
        if eps_rule not in ("additive", "relative_floor"):
            raise ValueError(f"eps_rule must be 'additive' or 'relative_floor', got {eps_rule!r}")
        if precision not in ("float32", "float64"):
            raise ValueError(f"precision must be 'float32' or 'float64', got {precision!r}")
        self.dim = dim
        self.eps = eps
        self.eps_rule = eps_rule
        self.precision = precision
        self.mean_: np.ndarray | None = None         # (D,) float64
        self.eigenvalues_: np.ndarray | None = None  # (dim,) float64, decreasing (floored: relative_floor)
        self.components_: np.ndarray | None = None   # (D, dim) float32 eigenvectors
        self.projection_: np.ndarray | None = None   # (D, dim) float32, whitening included
        self.bias_: np.ndarray | None = None         # (dim,) float32 = mean @ projection
        self.kept_energy_: float | None = None       # share of the variance kept (float64 recipe only)

    def fit(self, x, sample_size: int | None = None, seed: int = 0,
            chunk_rows: int = 8192) -> "PCAWhitening":
        """Fit on ``x`` (N x D array or memmap, or for "float64" a list of such blocks, whose
        rows are used together without a concatenated copy).

        "float32": on every row (as faiss), or on a random sample of ``sample_size`` rows if
        N is larger (faster, but the whitened geometry moves: see tests/test_cluster.py); peak extra memory
        one D x D float32 covariance plus one chunk buffer (<= 32 MiB). "float64": every row
        (``sample_size`` is ignored), read ``chunk_rows`` rows at a time. Raises ValueError if
        ``dim > min(N, D)`` (or exceeds the number of sampled rows).
        """
        if self.precision == "float64":
            return self._fit_float64(x, chunk_rows)
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
        self._set(mean, values, vectors)
        return self

    def fit_moments(self, moments: "Moments") -> "PCAWhitening":
        """Fit from :func:`scatter_moments` (possibly :func:`combine_moments` of several shards:
        torchrun ranks each summarise their rows, rank 0 fits), "float32" recipe only."""
        n, mean, cov = moments
        _check_dim(self.dim, n, cov.shape[0], n)
        values, vectors = _top_eigen(np.asfortranarray(cov, dtype=np.float32), self.dim)
        self._set(mean, values, vectors)
        return self

    def _fit_float64(self, x, chunk_rows: int) -> "PCAWhitening":
        blocks = [_as_matrix(b) for b in (x if isinstance(x, (list, tuple)) else [x])]
        n, d = sum(len(b) for b in blocks), blocks[0].shape[1]
        _check_dim(self.dim, n, d, n)
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        eps = self.eps if self.eps_rule == "relative_floor" else 0.0
        mean, values, vectors, self.kept_energy_ = _float64_eigen(blocks, chunk_rows, eps, self.dim)
        self._set(mean, values, vectors)
        return self

    def _set(self, mean: np.ndarray, values: np.ndarray, vectors: np.ndarray) -> None:
        """Store the fit; the projection divides by sqrt(eigenvalue) made safe by the eps rule."""
        values = values.astype(np.float64)
        if self.precision == "float32" and values.size:
            # zero to float32 precision: a direction the rows do not span comes out of the float32
            # solver as +-1e-7 of the largest eigenvalue, not as 0; whitening it would multiply
            # rounding noise by ~3,000 (faiss's float64 solver gets 1e-16 and amplifies it further)
            values = np.where(values <= values.max() * _ZERO_EIGENVALUE, 0.0, values)
        if self.eps_rule == "relative_floor":  # idempotent where the float64 recipe floored already
            values = np.maximum(values, values.max() * self.eps)
        root = np.sqrt(values if self.eps_rule == "relative_floor" else values + self.eps)
        # float64 divides (retrieval's numbers), float32 multiplies by the inverse (the trainer's).
        # With eps=0 (faiss PCAMatrix's own rule: no epsilon) an eigenvalue of exactly zero (a
        # direction the fitted rows do not span) would give inf; its component is dropped instead.
        with np.errstate(divide="ignore"):
            inverse = np.where(root > 0, 1.0 / root, 0.0)
        whitened = vectors / np.where(root > 0, root, np.inf) if self.precision == "float64" else vectors * inverse
        self.mean_, self.eigenvalues_ = mean, values
        self.components_ = vectors.astype(np.float32)
        self.projection_ = whitened.astype(np.float32)
        # einsum, not @: keeps numpy's own BLAS thread pool out of the fit (see _project).
        self.bias_ = np.einsum("d,dk->k", mean, whitened).astype(np.float32)

    def transform(self, x, chunk_rows: int = 8192, l2_normalize: bool = True) -> np.ndarray:
        """Project ``x`` (N x D) to N x dim float32 whitened components, rows L2-normalised if asked.

        "float64": rows are centred in float64, then projected in float32 (one block: callers
        chunk); "float32": chunked, ``x @ P - mean @ P`` written into the output.
        """
        if self.projection_ is None:
            raise RuntimeError("PCAWhitening.transform called before fit")
        x = _as_matrix(x)
        if x.shape[1] != self.projection_.shape[0]:
            raise ValueError(f"features have dimension {x.shape[1]}, PCA was fitted on {self.projection_.shape[0]}")
        if self.precision == "float64":
            out = (np.asarray(x, dtype=np.float64) - self.mean_).astype(np.float32) @ self.projection_
            return l2_normalize_rows(out) if l2_normalize else out
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


def l2_normalize_rows(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` divided by their L2 norm (at least 1e-12), as a new float32 array.

    The division runs in ``x``'s precision (float64 input: before the cast), as retrieval
    has always computed its descriptors; all-zero rows stay zero.
    """
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def preprocess_features(x, dim: int = 256, sample_size: int | None = None, seed: int = 0,
                        chunk_rows: int = 8192, eps: float = 0.0) -> np.ndarray:
    """PCA-whiten to ``dim`` then L2-normalise rows (DeepCluster's ``clustering.preprocess_features``:
    faiss ``PCAMatrix(d, dim, eigen_power=-0.5)`` fitted on every row, no epsilon, then L2).

    Output N x dim float32; peak extra memory ~ N*dim*4 + D*D*4 bytes (+ one <= 32 MiB chunk).
    """
    pca = PCAWhitening(dim=dim, eps=eps, eps_rule="additive").fit(x, sample_size=sample_size, seed=seed,
                                                                    chunk_rows=chunk_rows)
    return pca.transform(x, chunk_rows=chunk_rows, l2_normalize=True)
