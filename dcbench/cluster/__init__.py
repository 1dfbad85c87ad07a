"""Clustering engine: PCA-whitening + L2, faiss k-means, PIC, uniform cluster sampler, NMI,
spherical k-means (DeepCluster-v2's memory bank)."""
from .kmeans import ClusterResult, faiss_has_gpu, run_kmeans
from .nmi import cluster_sizes, nmi
from .pca import PCAWhitening, preprocess_features
from .pic import run_pic
from .sampler import UniformClusterSampler
from .spherical import SphericalResult, spherical_kmeans

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
