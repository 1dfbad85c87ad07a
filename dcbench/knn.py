"""Weighted k-nearest-neighbour classification of frozen features (DINO's ``eval_knn.py`` vote).

Similarity is the cosine (dot product of L2-normalised rows); each of the k nearest bank rows
votes for its class with weight ``exp(sim / T)``, votes are summed per class and the classes
ranked by their sums. Queries go in blocks so that at most :data:`SIM_BLOCK_ELEMENTS`
similarities exist at once, whatever the sizes of the bank and the query set.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from dcbench.metrics.classification import hits_of, topk_correct

#: bound on query x bank similarities held at once (float32: 64 MiB)
SIM_BLOCK_ELEMENTS = 1 << 24


class GlobalAvgPool(nn.Module):
    """Mean over the spatial dims (N x C x H x W -> N x C x 1 x 1); 2-D taps pass through."""

    pool_id = "global-avg"  # the feature-cache id (stable across torch versions)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1), keepdim=True) if x.dim() == 4 else x


def knn_scores(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, ks: Sequence[int],
               temperature: float, n_classes: int,
               block_elements: int = SIM_BLOCK_ELEMENTS) -> dict[int, torch.Tensor]:
    """Weighted kNN vote: ``{k: n_queries x n_classes}`` summed ``exp(sim / T)`` per class.

    ``bank`` and ``queries`` must be L2-normalised rows (cosine = dot product). Similarities
    are computed for blocks of queries holding at most ``block_elements`` entries, never the
    whole ``n_queries x n_bank`` matrix. ``k`` larger than the bank is capped at its size.
    """
    ks = sorted({min(k, len(bank)) for k in ks})
    kmax = max(ks)
    rows = max(1, block_elements // max(len(bank), 1))
    out: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for start in range(0, len(queries), rows):
        sims = queries[start:start + rows] @ bank.T
        top_sims, top_idx = sims.topk(kmax, dim=1)  # sorted, most similar first
        weights = (top_sims / temperature).exp()
        labels = bank_labels[top_idx]
        for k in ks:
            votes = torch.zeros(len(sims), n_classes, dtype=weights.dtype, device=weights.device)
            out[k].append(votes.scatter_add_(1, labels[:, :k], weights[:, :k]))
    return {k: torch.cat(v) for k, v in out.items()}


def unit_rows(array: np.ndarray, device: str | torch.device) -> torch.Tensor:
    """Rows of a (possibly memory-mapped) array as float32 unit vectors on ``device``."""
    return F.normalize(torch.from_numpy(np.array(array, dtype=np.float32)).to(device), dim=1)


def knn_correct(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray, query_labels: np.ndarray,
                ks: Sequence[int], temperature: float, n_classes: int,
                device: str | torch.device = "cpu") -> dict[int, np.ndarray]:
    """``{k: n_queries x 2 bool}``: per query, whether the weighted vote of ``bank`` ranks its
    label first (top-1) and among the first five (top-5); the per-image outcomes of the paired
    bootstrap, in query order.

    Features are raw rows (normalised here); the queries are read in blocks, so a memory-mapped
    query set is never loaded whole. ``k`` above the bank size votes with the whole bank.
    """
    bank_t = unit_rows(bank, device)
    bank_labels_t = torch.from_numpy(bank_labels).to(device)
    query_labels_t = torch.from_numpy(query_labels).to(device)
    block = max(1, SIM_BLOCK_ELEMENTS // len(bank_t))  # queries per block: bounded memory
    parts: dict[int, list[np.ndarray]] = {k: [] for k in ks}
    for start in range(0, len(query_labels), block):
        block_queries = unit_rows(queries[start:start + block], device)
        scores = knn_scores(bank_t, bank_labels_t, block_queries, ks, temperature, n_classes)
        for k in parts:
            parts[k].append(topk_correct(scores[min(k, len(bank_t))], query_labels_t[start:start + block]))
    return {k: np.concatenate(v) if v else np.zeros((0, 2), dtype=bool) for k, v in parts.items()}


def knn_hits(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray, query_labels: np.ndarray,
             ks: Sequence[int], temperature: float, n_classes: int,
             device: str | torch.device = "cpu") -> dict[int, np.ndarray]:
    """``{k: [top-1 hits, top-5 hits]}`` of the weighted vote (counts of :func:`knn_correct`)."""
    correct = knn_correct(bank, bank_labels, queries, query_labels, ks, temperature, n_classes, device)
    return {k: hits_of(c) for k, c in correct.items()}
