"""Power Iteration Clustering, DeepCluster's alternative to k-means (``clustering.PIC``).

Vectorised with scipy.sparse: O(N * n_neighbors) memory and work per iteration (the kNN
search itself is faiss's exact brute force).
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .kmeans import ClusterResult, make_flat_l2_index


def knn_graph(x: np.ndarray, n_neighbors: int) -> tuple[np.ndarray, np.ndarray]:
    """Each point's ``n_neighbors`` nearest other points (ids, squared L2 distances), nearest first."""
    n = x.shape[0]
    index = make_flat_l2_index(x.shape[1])
    index.add(x)
    dist, ids = index.search(x, n_neighbors + 1)
    # Drop the point itself; with duplicate points it may not come first, so remove it by
    # id and drop the farthest hit for the rows where it is missing.
    keep = ids != np.arange(n)[:, None]
    no_self = keep.all(axis=1)
    keep[no_self, -1] = False
    return ids[keep].reshape(n, n_neighbors), dist[keep].reshape(n, n_neighbors)


def pic_graph(ids: np.ndarray, dist: np.ndarray, sigma: float) -> sp.csr_matrix:
    """Symmetrised weight matrix W = A + A^T with A_ij = exp(-d_ij / sigma^2) for j in kNN(i)."""
    n, nn = ids.shape
    weights = np.exp(-dist.astype(np.float64) / sigma**2)
    indptr = np.arange(n + 1) * nn
    adj = sp.csr_matrix((weights.ravel(), ids.ravel(), indptr), shape=(n, n))
    return (adj + adj.T).tocsr()


def power_iterations(w: sp.csr_matrix, alpha: float, n_iter: int) -> np.ndarray:
    """``n_iter`` steps of v <- alpha W^T v + (1 - alpha)/n, L1-normalised, from v = 1/n."""
    n = w.shape[0]
    wt = w.T.tocsr()
    v = np.full(n, 1.0 / n)
    for _ in range(n_iter):
        v = alpha * (wt @ v) + (1.0 - alpha) / n
        v /= v.sum()
    return v


def _pointers(w: sp.csr_matrix, v: np.ndarray) -> np.ndarray:
    """Each node points to the neighbour j maximising W_ij (v_j - v_i) when that is > 0, else itself.

    Ties go to the first neighbour in CSR order, as the original loop (strict >).
    """
    n = w.shape[0]
    rows = np.repeat(np.arange(n), np.diff(w.indptr))
    score = w.data * (v[w.indices] - v[rows])
    order = np.lexsort((-score, rows))  # stable: per row, best score first, CSR order among ties
    pointers = np.arange(n)
    has_edges = np.diff(w.indptr) > 0
    best = order[w.indptr[:-1][has_edges]]
    positive = score[best] > 0
    pointers[np.flatnonzero(has_edges)[positive]] = w.indices[best[positive]]
    return pointers


def _follow_to_roots(pointers: np.ndarray) -> np.ndarray:
    """Root (local maximum) reached from every node; v strictly increases, so no cycles."""
    roots = pointers.copy()
    while True:
        nxt = roots[roots]
        if np.array_equal(nxt, roots):
            return roots
        roots = nxt


def _absorb_singletons(labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Each singleton joins the cluster of its nearest kNN neighbour that is not a singleton.

    One pass with the sizes before any move, as the original; a singleton whose neighbours
    are all singletons stays alone.
    """
    sizes = np.bincount(labels)
    singles = np.flatnonzero(sizes[labels] == 1)
    if singles.size == 0:
        return labels
    neigh_labels = labels[ids[singles]]
    ok = sizes[neigh_labels] != 1
    has = ok.any(axis=1)
    first = ok.argmax(axis=1)
    out = labels.copy()
    out[singles[has]] = neigh_labels[has, first[has]]
    return out


def run_pic(x: np.ndarray, n_neighbors: int = 5, sigma: float = 0.2, alpha: float = 0.001,
            n_iter: int = 200, seed: int = 0) -> ClusterResult:
    """Power Iteration Clustering on (PCA-whitened, L2-normalised) features, as DeepCluster.

    kNN graph (faiss, exact, squared L2 distances d), weights exp(-d / sigma^2), symmetrised;
    ``n_iter`` power iterations; each node points to the neighbour maximising W_ij (v_j - v_i)
    if positive; local maxima are the clusters; singletons join their nearest non-singleton
    neighbour's cluster. Cluster ids are renumbered 0..n_clusters-1 (in order of the local
    maxima's index). ``seed`` is accepted for API symmetry: the algorithm is deterministic.
    """
    del seed  # deterministic: nothing random in PIC
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = x.shape[0]
    if n <= n_neighbors:
        raise ValueError(f"PIC needs more points ({n}) than neighbours per point ({n_neighbors})")
    ids, dist = knn_graph(x, n_neighbors)
    w = pic_graph(ids, dist, sigma)
    v = power_iterations(w, alpha, n_iter)
    roots = _follow_to_roots(_pointers(w, v))
    _, labels = np.unique(roots, return_inverse=True)
    labels = _absorb_singletons(labels.astype(np.int64), ids)
    _, labels = np.unique(labels, return_inverse=True)
    n_clusters = int(labels.max()) + 1
    return ClusterResult(assignments=labels.astype(np.int64), objective=float("nan"),
                         empty_clusters=0, n_clusters=n_clusters)
