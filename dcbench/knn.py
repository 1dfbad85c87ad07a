"""Weighted k-nearest-neighbour classification of frozen features (DINO's ``eval_knn.py`` vote).

Similarity is the cosine (dot product of L2-normalised rows); each of the k nearest bank rows
votes for its class with weight ``exp(sim / T)``, votes are summed per class and the classes
ranked by their sums (equal sums: the lower class index first; a class without a vote is never
a top-1/top-5 hit, :func:`vote_correct`).

Memory is bounded on both axes, whatever the sizes of the bank and the query set:

- the bank goes to the device in chunks of at most :data:`BANK_CHUNK_BYTES` (float32), never
  whole (one ImageNet conv layer is ~47 GB: 1.28M x 9216 floats), and every query keeps a
  running top-k across the chunks;
- queries go in blocks so that at most :data:`SIM_BLOCK_ELEMENTS` similarities exist at once.

Neighbour order (the tie-break): by similarity, highest first, and among equal similarities
the lower bank row first. ``torch.topk`` leaves the order of equal values unspecified, so
:func:`top_rows` enforces this rule explicitly.

Same bits however the bank is chunked: BLAS libraries choose kernels, hence summation orders,
by matrix shape (measured with torch's CPU BLAS: a similarity computed in a 1-row product
differs in the last bit from the same one inside a larger product), so every similarity is
computed by a product of one shape, ``tq x D`` times ``D x tb``, on zero-padded tiles that
start at multiples of the tile sizes; ``tq`` and ``tb`` depend only on the numbers of queries
and bank rows (at most :data:`QUERY_TILE` and :data:`BANK_TILE`, balanced so that padding
wastes little), never on the memory bound. With the tie-break rule, the k neighbours, their
order and the summed votes are then the same bits for every chunk size and memory bound
(tested). Against dcbench <= this change the neighbours can differ only where several bank
rows tie at the k-th place (``topk`` chose among them arbitrarily) and, for banks larger than
one tile, in the last bit of similarities (other product shapes than the old query blocks).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from dcbench.metrics.classification import hits_of

#: bound on query x bank similarities held at once (float32: 64 MiB)
SIM_BLOCK_ELEMENTS = 1 << 24
#: bound on the (normalised, float32) bank rows held on the device at once: 1 GiB
BANK_CHUNK_BYTES = 1 << 30
#: the largest shape of a similarity product in :func:`nearest` (see the module docstring):
#: 1024 x 16384 float32 similarities = 64 MiB
QUERY_TILE = 1024
BANK_TILE = 16384

Neighbours = tuple[torch.Tensor, torch.Tensor]  # (similarities, bank rows), n x k each


def min_temperature(k: int) -> float:
    """The smallest temperature whose summed vote weights (k of ``exp(cosine / T)``) stay finite in
    float32, DINO's type, with a factor e to spare: below it near-duplicate neighbours weigh inf,
    and classes with inf votes tie (0.0118 for k = 20, 0.0121 for k = 200)."""
    return 1.0 / (math.log(float(np.finfo(np.float32).max)) - math.log(max(int(k), 1)) - 1.0)


class GlobalAvgPool(nn.Module):
    """Mean over the spatial dims (N x C x H x W -> N x C x 1 x 1); 2-D taps pass through."""

    pool_id = "global-avg"  # the feature-cache id (stable across torch versions)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1), keepdim=True) if x.dim() == 4 else x


# ----------------------------------------------------------------------------- neighbours
def _lex_order(sims: torch.Tensor, rows: torch.Tensor) -> Neighbours:
    """Each row's candidates sorted by similarity (highest first), ties by bank row (lowest first)."""
    by_row = rows.argsort(dim=1)  # bank rows are unique within a row of candidates
    sims, rows = sims.gather(1, by_row), rows.gather(1, by_row)
    by_sim = sims.argsort(dim=1, descending=True, stable=True)  # stable: equal sims keep row order
    return sims.gather(1, by_sim), rows.gather(1, by_sim)


def top_rows(sims: torch.Tensor, k: int, offset: int = 0) -> Neighbours:
    """The ``k`` nearest columns of each row of ``sims`` (queries x bank chunk) under the module's
    rule (similarity desc, then bank row asc), as ``(similarities, offset + column)``.

    ``topk`` picks any of several equal values at the k-th place. It is asked for one value
    more: where the (k+1)-th equals the k-th it had such a choice, and only those rows are
    redone with a stable sort (rare: duplicate or all-zero features).
    """
    extra = int(k < sims.shape[1])
    vals, cols = sims.topk(k + extra, dim=1)
    if extra:
        ambiguous = (vals[:, k] == vals[:, k - 1]).nonzero().squeeze(1)
        vals, cols = vals[:, :k], cols[:, :k]
        if len(ambiguous):
            ordered = torch.sort(sims[ambiguous], dim=1, descending=True, stable=True)
            vals[ambiguous], cols[ambiguous] = ordered.values[:, :k], ordered.indices[:, :k]
    return _lex_order(vals, cols + offset)


def merge_top(a: Neighbours, b: Neighbours, k: int) -> Neighbours:
    """The ``k`` nearest of two candidate sets of the same queries, each in the module's order,
    every bank row of ``a`` below every one of ``b`` (chunks are visited in bank order): a stable
    sort by similarity of ``a`` then ``b`` is then the module's order."""
    sims, rows = torch.cat([a[0], b[0]], 1), torch.cat([a[1], b[1]], 1)
    order = sims.argsort(dim=1, descending=True, stable=True)[:, :k]
    return sims.gather(1, order), rows.gather(1, order)


def vote(neighbours: Neighbours, bank_labels: torch.Tensor, ks: Sequence[int], temperature: float,
         n_classes: int) -> dict[int, torch.Tensor]:
    """``{k: n x n_classes}`` summed ``exp(sim / T)`` of the first k ``neighbours`` per class
    (each k at most the neighbours' width)."""
    top_sims, top_rows_ = neighbours
    weights = (top_sims / temperature).exp()
    labels = bank_labels[top_rows_]
    out = {}
    for k in ks:
        votes = torch.zeros(len(top_sims), n_classes, dtype=weights.dtype, device=weights.device)
        out[k] = votes.scatter_add_(1, labels[:, :k], weights[:, :k])
    return out


def knn_scores(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, ks: Sequence[int],
               temperature: float, n_classes: int,
               block_elements: int = SIM_BLOCK_ELEMENTS) -> dict[int, torch.Tensor]:
    """Weighted kNN vote: ``{k: n_queries x n_classes}`` summed ``exp(sim / T)`` per class.

    ``bank`` and ``queries`` must be L2-normalised rows (cosine = dot product), on one device.
    Similarities are computed for blocks of queries holding at most ``block_elements``
    entries, never the whole ``n_queries x n_bank`` matrix. ``k`` larger than the bank is
    capped at its size.
    """
    ks = sorted({min(k, len(bank)) for k in ks})
    rows = max(1, block_elements // max(len(bank), 1))
    out: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for start in range(0, len(queries), rows):
        scores = vote(top_rows(queries[start:start + rows] @ bank.T, max(ks)), bank_labels, ks, temperature,
                      n_classes)
        for k in ks:
            out[k].append(scores[k])
    return {k: torch.cat(v) for k, v in out.items()}


def unit_rows(array: np.ndarray, device: str | torch.device) -> torch.Tensor:
    """Rows of a (possibly memory-mapped) array as float32 unit vectors on ``device``."""
    return F.normalize(torch.from_numpy(np.array(array, dtype=np.float32)).to(device), dim=1)


def nearest(bank: np.ndarray, queries: np.ndarray, k: int, device: str | torch.device = "cpu",
            bank_chunk_bytes: int = BANK_CHUNK_BYTES) -> Neighbours:
    """The ``k`` nearest bank rows (cosine) of every query, on ``device``: ``(sims, rows)``,
    ``n_queries x min(k, n_bank)``, in the module's neighbour order.

    The bank moves to ``device`` one chunk of at most ``bank_chunk_bytes`` (whole
    :data:`BANK_TILE` tiles, at least one) at a time, the outer loop, so each bank row is read
    and moved once; each query keeps a running top-k across the chunks. Queries are normalised
    once and kept on the device when they fit in ``bank_chunk_bytes``, else re-read per chunk.
    Similarities exist for one tile product at a time (at most ``QUERY_TILE x BANK_TILE``).
    """
    n_bank, n_queries = len(bank), len(queries)
    width = min(k, n_bank)
    if not n_bank or not n_queries:
        return torch.zeros(n_queries, width, device=device), torch.zeros(n_queries, width, dtype=torch.long,
                                                                          device=device)
    dim = int(np.prod(bank.shape[1:]))
    tb, tq = _tile(n_bank, BANK_TILE), _tile(n_queries, QUERY_TILE)
    chunk = max(1, int(bank_chunk_bytes) // (4 * dim * tb)) * tb
    starts = range(0, n_queries, tq)
    resident = [_padded(unit_rows(queries[s:s + tq], device), tq) for s in starts] \
        if n_queries * dim * 4 <= bank_chunk_bytes else None
    best: list[Neighbours | None] = [None] * len(starts)
    for offset in range(0, n_bank, chunk):
        part = unit_rows(bank[offset:offset + chunk], device)
        tiles = [_padded(part[t:t + tb], tb) for t in range(0, len(part), tb)]
        for b, s in enumerate(starts):
            q = resident[b] if resident is not None else _padded(unit_rows(queries[s:s + tq], device), tq)
            rows = min(tq, n_queries - s)
            for t, tile in enumerate(tiles):
                cols = min(tb, len(part) - t * tb)
                found = top_rows((q @ tile.T)[:rows, :cols], min(k, cols), offset + t * tb)
                best[b] = found if best[b] is None else merge_top(best[b], found, k)
        del part, tiles
    return torch.cat([b[0] for b in best]), torch.cat([b[1] for b in best])


def _tile(n: int, most: int) -> int:
    """Rows per tile for ``n`` rows: at most ``most``, as even as possible (little zero padding)."""
    return math.ceil(n / math.ceil(n / most))


def _padded(rows: torch.Tensor, tile: int) -> torch.Tensor:
    """``rows`` with zero rows appended up to ``tile`` (one matmul shape for every tile)."""
    if len(rows) == tile:
        return rows
    return torch.cat([rows, rows.new_zeros(tile - len(rows), *rows.shape[1:])])


def vote_correct(votes: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Per row of ``votes`` (n x classes, summed vote weights): [top-1 correct, top-5 correct]
    as an n x 2 bool array.

    The label's rank is the number of classes with more votes, plus those with as many votes and
    a lower class index (a deterministic tie rule: ``topk`` orders equal values arbitrarily). A
    class no neighbour voted for is never a hit: DINO's ``eval_knn.py`` counts the top
    ``min(5, k)`` predictions, so with k < 5 only voted classes can hit, and with k >= 5 its
    zero-vote "predictions" are whatever order its sort leaves tied zeros in. Where DINO's
    answer does not depend on that order the two agree (tested).
    """
    labels = labels.long()
    own = votes.gather(1, labels[:, None])
    classes = torch.arange(votes.shape[1], device=votes.device)
    ahead = (votes > own) | ((votes == own) & (classes[None, :] < labels[:, None]))
    rank = ahead.sum(dim=1)
    voted = own[:, 0] > 0
    return torch.stack([voted & (rank == 0), voted & (rank < 5)], dim=1).cpu().numpy()


def knn_correct(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray, query_labels: np.ndarray,
                ks: Sequence[int], temperature: float, n_classes: int, device: str | torch.device = "cpu",
                bank_chunk_bytes: int = BANK_CHUNK_BYTES) -> dict[int, np.ndarray]:
    """``{k: n_queries x 2 bool}``: per query, whether the weighted vote of ``bank`` ranks its
    label first (top-1) and among the first five (top-5), a label no neighbour voted for never
    counting (:func:`vote_correct`); the per-image outcomes of the paired bootstrap, in query order.

    Features are raw rows (normalised here, chunk by chunk: see :func:`nearest`, whose
    ``bank_chunk_bytes`` bounds the bank's memory on ``device``), so memory-mapped banks and
    query sets are never loaded whole. ``k`` above the bank size votes with the whole bank.
    """
    n_bank = len(bank_labels)
    capped = sorted({min(k, n_bank) for k in ks})
    if capped and temperature < min_temperature(capped[-1]):
        raise ValueError(f"temperature {temperature} overflows the float32 vote weights of {capped[-1]} neighbours; "
                         f"use at least {min_temperature(capped[-1]):.4f}")
    if not len(query_labels) or not n_bank:
        return {k: np.zeros((len(query_labels), 2), dtype=bool) for k in ks}
    neighbours = nearest(bank, queries, max(capped), device, bank_chunk_bytes)
    bank_labels_t = torch.from_numpy(np.asarray(bank_labels)).to(device)
    query_labels_t = torch.from_numpy(np.asarray(query_labels)).to(device)
    block = max(1, SIM_BLOCK_ELEMENTS // max(max(capped), n_classes))  # bounded vote tensors
    parts: dict[int, list[np.ndarray]] = {k: [] for k in ks}
    for start in range(0, len(query_labels), block):
        span = slice(start, start + block)
        scores = vote((neighbours[0][span], neighbours[1][span]), bank_labels_t, capped, temperature, n_classes)
        for k in parts:
            parts[k].append(vote_correct(scores[min(k, n_bank)], query_labels_t[span]))
    return {k: np.concatenate(v) for k, v in parts.items()}


def knn_hits(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray, query_labels: np.ndarray,
             ks: Sequence[int], temperature: float, n_classes: int,
             device: str | torch.device = "cpu") -> dict[int, np.ndarray]:
    """``{k: [top-1 hits, top-5 hits]}`` of the weighted vote (counts of :func:`knn_correct`)."""
    correct = knn_correct(bank, bank_labels, queries, query_labels, ks, temperature, n_classes, device)
    return {k: hits_of(c) for k, c in correct.items()}
