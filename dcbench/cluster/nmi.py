"""Cluster statistics logged every epoch."""
from __future__ import annotations

import numpy as np


def nmi(a, b) -> float:
    """Normalised mutual information of two labelings (scikit-learn, arithmetic mean of entropies)."""
    # imported here: scikit-learn costs ~0.6 s at start-up and only this function needs it
    from sklearn.metrics import normalized_mutual_info_score  # noqa: PLC0415

    return float(normalized_mutual_info_score(np.asarray(a).ravel(), np.asarray(b).ravel(),
                                              average_method="arithmetic"))


def cluster_sizes(assignments: np.ndarray, k: int) -> np.ndarray:
    """Number of points per cluster id 0..k-1 (int64, length k); ids < 0 (unassigned) are ignored."""
    a = np.asarray(assignments).astype(np.int64, copy=False).ravel()
    a = a[a >= 0]
    if a.size and a.max() >= k:
        raise ValueError(f"cluster id {int(a.max())} out of range for k={k}")
    return np.bincount(a, minlength=k).astype(np.int64)
