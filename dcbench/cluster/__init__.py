"""Clustering engine: PCA-whitening + L2, faiss k-means, PIC, uniform cluster sampler, NMI,
spherical k-means (DeepCluster-v2's memory bank)."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# eager: numpy only, and the function ``nmi`` must shadow the submodule of the same name
from .nmi import cluster_sizes, nmi

if TYPE_CHECKING:
    from .kmeans import ClusterResult, faiss_has_gpu, run_kmeans
    from .pca import PCAWhitening, preprocess_features
    from .pic import run_pic
    from .sampler import UniformClusterSampler
    from .spherical import SphericalResult, spherical_kmeans

#: public name -> submodule, imported on first use: the metrics and the results tables import
#: ``nmi`` without torch and faiss, which the other submodules need
_HOMES = {"ClusterResult": "kmeans", "faiss_has_gpu": "kmeans", "run_kmeans": "kmeans",
          "PCAWhitening": "pca", "preprocess_features": "pca", "run_pic": "pic",
          "UniformClusterSampler": "sampler", "SphericalResult": "spherical", "spherical_kmeans": "spherical"}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)


__all__ = [
    "ClusterResult",
    "PCAWhitening",
    "SphericalResult",
    "UniformClusterSampler",
    "cluster_sizes",
    "faiss_has_gpu",
    "nmi",
    "preprocess_features",
    "run_kmeans",
    "run_pic",
    "spherical_kmeans",
]
