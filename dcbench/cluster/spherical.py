"""Spherical k-means on L2-normalised rows, as DeepCluster-v2 clusters its memory bank.

The algorithm of facebookresearch/swav ``main_deepclusterv2.py`` (``cluster_memory``), written
here from its description: centroids start as K distinct random rows; each iteration assigns
every row to the centroid of largest dot product (cosine: rows and centroids are unit vectors),
moves each non-empty centroid to the mean of its rows and L2-normalises all centroids (an
empty one keeps its previous position); after ``n_iter`` iterations one more assignment step
gives the result. Runs on the device of ``x`` (the original runs it on the GPU, distributed).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

#: rows per block of the assignment step (bounds the N x K score matrix in memory)
CHUNK_ROWS = 8192


@dataclass
class SphericalResult:
    """Outcome of one spherical k-means run."""

    assignments: np.ndarray  # int64, (N,), centroid of largest cosine per row
    centroids: torch.Tensor  # (K, d), unit rows, on the device of the input
    objective: float  # sum over rows of ||x - c||^2 = 2 - 2 cos(x, c) for the final assignment
    empty_clusters: int  # centroids no row is assigned to in the final assignment
    sizes: np.ndarray  # int64, (K,), rows per centroid


def _assign(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid by dot product, in row blocks: (best index, best score)."""
    best, score = [], []
    for start in range(0, len(x), CHUNK_ROWS):
        s, i = (x[start:start + CHUNK_ROWS] @ centroids.t()).max(dim=1)
        best.append(i)
        score.append(s)
    return torch.cat(best), torch.cat(score)


def spherical_kmeans(x: torch.Tensor, k: int, n_iter: int = 10, seed: int = 0) -> SphericalResult:
    """Cluster the unit rows of ``x`` (N x d) into ``k`` clusters (see the module doc).

    Deterministic given ``seed`` (the initial rows come from ``torch.randperm`` with a seeded
    generator). Raises ValueError when ``k`` exceeds the number of rows.
    """
    if x.ndim != 2:
        raise ValueError(f"k-means input must be a 2-D (N x d) tensor, got shape {tuple(x.shape)}")
    n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"cannot make k={k} clusters from {n} memory-bank rows; lower the number of prototypes")
    x = x.float()
    generator = torch.Generator().manual_seed(int(seed))
    centroids = x[torch.randperm(n, generator=generator)[:k].to(x.device)].clone()
    for _ in range(n_iter):
        assignments, _ = _assign(x, centroids)
        sums = torch.zeros(k, d, dtype=x.dtype, device=x.device).index_add_(0, assignments, x)
        counts = torch.bincount(assignments, minlength=k)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled].unsqueeze(1).to(x.dtype)
        centroids = F.normalize(centroids, dim=1, p=2)
    assignments, scores = _assign(x, centroids)
    sizes = torch.bincount(assignments, minlength=k).cpu().numpy().astype(np.int64)
    return SphericalResult(assignments=assignments.cpu().numpy().astype(np.int64), centroids=centroids,
                           objective=float((2 - 2 * scores.double()).sum()), empty_clusters=int((sizes == 0).sum()),
                           sizes=sizes)
