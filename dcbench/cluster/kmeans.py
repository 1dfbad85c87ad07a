"""faiss k-means as in DeepCluster (``clustering.run_kmeans`` of the original code)."""
from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np


@dataclass
class ClusterResult:
    """Outcome of one clustering run."""

    assignments: np.ndarray  # int64, shape (N,), cluster id per point in [0, n_clusters)
    objective: float         # k-means: sum of squared distances of faiss's last iteration; PIC: nan
    empty_clusters: int      # clusters with no point in the final assignment
    n_clusters: int          # k (k-means) or number of clusters found (PIC)


def faiss_has_gpu() -> bool:
    """True when the installed faiss was built with GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _gpu_device() -> int:
    """The current CUDA device (one per rank under torchrun), 0 when torch has no CUDA."""
    try:
        import torch

        return torch.cuda.current_device() if torch.cuda.is_available() else 0
    except Exception:  # torch missing or CUDA unusable: faiss's own default device
        return 0


def make_flat_l2_index(d: int, use_gpu: bool | None = None) -> faiss.Index:
    """Exact L2 index: ``GpuIndexFlatL2`` when asked (or auto-detected), else ``IndexFlatL2``."""
    if use_gpu is None:
        use_gpu = faiss_has_gpu()
    if not use_gpu:
        return faiss.IndexFlatL2(d)
    if not faiss_has_gpu():
        raise RuntimeError(
            "use_gpu=True but faiss has no GPU support or sees no GPU; install faiss-gpu "
            "(instead of faiss-cpu) or run k-means on the CPU (use_gpu=False)"
        )
    config = faiss.GpuIndexFlatConfig()
    config.useFloat16 = False  # exact distances, as the original code
    config.device = _gpu_device()
    return faiss.GpuIndexFlatL2(_gpu_resources(config.device), d, config)


_GPU_RESOURCES: dict[int, "faiss.StandardGpuResources"] = {}


def _gpu_resources(device: int) -> "faiss.StandardGpuResources":
    """One StandardGpuResources per device, kept alive for the process (creating one per epoch
    costs time, and the index must not outlive it)."""
    if device not in _GPU_RESOURCES:
        _GPU_RESOURCES[device] = faiss.StandardGpuResources()
    return _GPU_RESOURCES[device]


def _clustering(d: int, k: int, n_iter: int, seed: int, verbose: bool) -> faiss.Clustering:
    clus = faiss.Clustering(d, k)
    clus.niter = n_iter
    clus.seed = seed
    clus.verbose = verbose
    clus.max_points_per_centroid = 10**7  # no subsampling, as the original
    clus.min_points_per_centroid = 1      # only silences faiss's "too few points" warning
    # Pin behaviours that newer faiss versions made configurable to the original ones.
    if hasattr(clus, "init_method") and hasattr(faiss, "ClusteringInitMethod_RANDOM"):
        clus.init_method = faiss.ClusteringInitMethod_RANDOM
    if hasattr(clus, "early_stop_threshold"):
        clus.early_stop_threshold = 0.0
    return clus


def _last_objective(clus: faiss.Clustering) -> float:
    stats = clus.iteration_stats
    return float(stats.at(stats.size() - 1).obj) if stats.size() else float("nan")


def run_kmeans(x: np.ndarray, k: int, n_iter: int = 20, seed: int = 0, use_gpu: bool | None = None,
               verbose: bool = False) -> ClusterResult:
    """Lloyd k-means with faiss, as DeepCluster: ``niter`` iterations, no subsampling, random init.

    Empty clusters: faiss's ``split_clusters`` (faiss/Clustering.cpp, run after every centroid
    update) implements the paper's rule. For each empty centroid it cycles through the clusters,
    accepting cluster j with probability (size_j - 1) / (N - k) (one uniform draw per visit,
    RNG seeded 1234), so the chosen cluster's probability is ~ proportional to its size and
    empty or singleton clusters are never chosen. The empty centroid becomes a copy of centroid
    j and both get a small symmetric perturbation (coordinates alternately scaled by
    1 + 1/1024 and 1 - 1/1024, with opposite signs for the two), so the next assignment step
    splits cluster j's points between them (faiss books half of j's size to each meanwhile).

    The final assignment is each point's nearest final centroid (``index.search``), and
    ``objective`` is the sum of squared distances of faiss's last iteration (computed before
    its last centroid update, as ``iteration_stats[-1].obj``). Raises ValueError if k > N.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"k-means input must be a 2-D (N x d) array, got shape {x.shape}")
    n, d = x.shape
    if k < 1:
        raise ValueError(f"the number of clusters must be >= 1, got k={k}")
    if k > n:
        raise ValueError(f"cannot make k={k} clusters from {n} points: k must be <= the number of points; "
                         f"lower k or use more images")
    clus = _clustering(d, k, n_iter, seed, verbose)
    index = make_flat_l2_index(d, use_gpu)
    clus.train(x, index)
    _, ids = index.search(x, 1)
    assignments = ids.ravel().astype(np.int64)
    sizes = np.bincount(assignments, minlength=k)
    return ClusterResult(assignments=assignments, objective=_last_objective(clus),
                         empty_clusters=int((sizes == 0).sum()), n_clusters=k)
