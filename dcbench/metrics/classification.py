"""Top-k classification metrics on score matrices (probes, kNN, any classifier)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # tensors are only duck-typed here: importing dcbench.metrics stays light
    import torch


def topk_correct(scores: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Per row of ``scores`` (n x classes): [top-1 correct, top-5 correct] as an n x 2 bool
    array (the per-image outcomes of the paired bootstrap); with fewer than 5 classes top-5
    ranks all of them."""
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices
    correct = top == labels[:, None]
    return np.stack([correct[:, 0].cpu().numpy(), correct.any(1).cpu().numpy()], axis=1)


def topk_hits(scores: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """[top-1 hits, top-5 hits] of ``scores`` (n x classes) against ``labels``.

    Counts, not percentages, so batches can be summed before dividing.
    """
    return hits_of(topk_correct(scores, labels))


def hits_of(correct: np.ndarray) -> np.ndarray:
    """[top-1 hits, top-5 hits] (int64 counts) of a :func:`topk_correct` array."""
    return correct.sum(axis=0, dtype=np.int64)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(top-1, top-5) in percent of ``scores`` (n x classes) against ``labels``."""
    top1, top5 = 100.0 * topk_hits(scores, labels) / max(len(labels), 1)
    return float(top1), float(top5)
