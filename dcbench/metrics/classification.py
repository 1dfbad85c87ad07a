"""Top-k classification metrics on score matrices (probes, kNN, any classifier)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # tensors are only duck-typed here: importing dcbench.metrics stays light
    import torch


def topk_hits(scores: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """[top-1 hits, top-5 hits] of ``scores`` (n x classes) against ``labels``.

    Counts, not percentages, so batches can be summed before dividing; with fewer than 5
    classes top-5 ranks all of them.
    """
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices
    correct = top == labels[:, None]
    return np.array([int(correct[:, 0].sum()), int(correct.any(1).sum())])


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(top-1, top-5) in percent of ``scores`` (n x classes) against ``labels``."""
    top1, top5 = 100.0 * topk_hits(scores, labels) / max(len(labels), 1)
    return float(top1), float(top5)
