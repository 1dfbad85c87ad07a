"""DeepCluster's uniform sampler over pseudo-labels (``util.UnifLabelSampler``), shardable."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch.utils.data


def _cluster_members(assignments: np.ndarray) -> list[np.ndarray]:
    """Indices of each non-empty cluster (ids >= 0), in increasing cluster id."""
    valid = np.flatnonzero(assignments >= 0)
    labels = assignments[valid]
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    cuts = np.flatnonzero(np.diff(sorted_labels)) + 1
    return np.split(valid[order], cuts) if valid.size else []


class UniformClusterSampler(torch.utils.data.Sampler[int]):
    """DeepCluster's sampler: every non-empty cluster is drawn equally often.

    Per non-empty cluster draw ``int(num_samples / n_nonempty) + 1`` indices (with replacement
    only if the cluster is smaller than that; the original code also used replacement when
    equal), concatenate, shuffle, truncate to ``num_samples``. Points with assignment -1
    (unreadable images) are never drawn. Deterministic given ``seed`` (+ ``set_epoch``).

    With ``world_size > 1`` every rank builds the same list (same seed), pads it by repeating
    its head to a multiple of ``world_size`` and takes ``indices[rank::world_size]``;
    ``len()`` is the per-rank length.
    """

    def __init__(self, assignments: np.ndarray, num_samples: int | None = None, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        assignments = np.asarray(assignments).astype(np.int64, copy=False).ravel()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.members = _cluster_members(assignments)
        if not self.members:
            raise ValueError("no point has a cluster assignment (all are -1): nothing to sample")
        self.num_samples = len(assignments) if num_samples is None else int(num_samples)
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reseed with ``seed + epoch`` for the next ``__iter__``."""
        self.epoch = epoch

    def full_indices(self) -> np.ndarray:
        """The whole (unsharded) index list of the current epoch, length ``num_samples``."""
        rng = np.random.default_rng(self.seed + self.epoch)
        per_cluster = int(self.num_samples / len(self.members)) + 1
        draws = [rng.choice(m, per_cluster, replace=len(m) < per_cluster) for m in self.members]
        indices = np.concatenate(draws)
        rng.shuffle(indices)
        return indices[: self.num_samples]

    def __iter__(self) -> Iterator[int]:
        indices = self.full_indices()
        total = len(self) * self.world_size
        if total > indices.size:  # pad so every rank gets the same number of samples
            indices = np.concatenate([indices, np.resize(indices, total - indices.size)])
        return iter(indices[self.rank::self.world_size].tolist())

    def __len__(self) -> int:
        return -(-self.num_samples // self.world_size)
