"""Instance-retrieval metrics with revisitop's conventions (Radenovic et al., CVPR 2018).

``ranks`` is an ``n_db x n_queries`` integer array: column ``q`` lists database indices by
decreasing similarity to query ``q`` (a truncated ranking, fewer rows, is accepted). ``gnd``
holds one dict per query with ``ok`` (positive database indices) and optionally ``junk``
(indices that neither help nor hurt).

Average precision follows revisitop's ``compute_map`` exactly:

* junk images are removed from the ranking first (each positive moves up by the number of
  junk images ranked before it);
* the precision-recall curve is integrated with the trapezoid rule: the positive found ``j``
  (0-based) at rank ``r`` (0-based, junk removed) adds ``(p0 + p1) / 2 / npos`` with
  ``p0 = j / r`` (1 when ``r == 0``) and ``p1 = (j + 1) / (r + 1)``; ``npos`` is the size of
  the ``ok`` list, so positives missing from the ranking count as never found;
* precision at ``k`` is ``#positives within the first kq / kq`` with ``kq = min(k, rank of
  the last positive found)`` (1-based, junk removed), revisitop's definition;
* a query without positives gets NaN and is left out of the means.

The revisited benchmark has three setups built from ``easy``/``hard``/``junk`` lists
(:func:`revisited_gnd`); the original Oxford/Paris protocol counts ``good`` and ``ok`` as
positives and ignores ``junk`` (:func:`old_protocol_gnd`), scored with the same AP.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

__all__ = ["MapResult", "REVISITED_SETUPS", "average_precision", "old_protocol_gnd", "old_protocol_map",
           "revisited_gnd", "revisited_map", "revisited_setups"]

#: the three setups of the revisited protocol, in reporting order
REVISITED_SETUPS = ("easy", "medium", "hard")


class MapResult(NamedTuple):
    """What :func:`revisited_map` returns (unpacks like revisitop's ``map, aps, pr, prs``)."""

    map: float  # mean AP over queries with positives (NaN when no query has one)
    aps: np.ndarray  # AP per query (NaN for a query without positives)
    mpr: np.ndarray  # mean precision at each kappa
    prs: np.ndarray  # n_queries x len(kappas) precision at each kappa (NaN rows: no positives)


def _ids(values: Any) -> np.ndarray:
    """A gnd list (list, tuple, array, or None) as a flat int64 array."""
    if values is None:
        return np.zeros(0, dtype=np.int64)
    return np.asarray(values, dtype=np.int64).reshape(-1)


def _positions_without_junk(ranking: np.ndarray, ok: np.ndarray, junk: np.ndarray) -> np.ndarray:
    """0-based ranks of the positives found in ``ranking``, after junk images are removed.

    Each positive moves up by the number of junk images ranked strictly before it (an image
    listed both as positive and junk does not shift itself, as in revisitop's loop).
    """
    pos = np.flatnonzero(np.isin(ranking, ok))
    if junk.size == 0 or pos.size == 0:
        return pos
    junk_pos = np.flatnonzero(np.isin(ranking, junk))
    return pos - np.searchsorted(junk_pos, pos, side="left")


def average_precision(positions: np.ndarray, npos: int) -> float:
    """Trapezoid-rule AP of positives found at 0-based ``positions`` (sorted, junk removed).

    ``npos`` is the number of positives of the query (those never found count as recall not
    reached). Returns 0.0 when nothing was found.
    """
    positions = np.asarray(positions, dtype=np.float64)
    if positions.size == 0:
        return 0.0
    j = np.arange(positions.size, dtype=np.float64)
    safe = np.where(positions == 0, 1.0, positions)  # avoids 0/0; that entry is replaced by 1
    p0 = np.where(positions == 0, 1.0, j / safe)
    p1 = (j + 1.0) / (positions + 1.0)
    return float(((p0 + p1) / 2.0).sum() / npos)


def _precision_at(positions: np.ndarray, kappas: Sequence[int]) -> np.ndarray:
    """revisitop's precision at each kappa: ``kq = min(k, last found rank)`` (1-based)."""
    if positions.size == 0:
        return np.zeros(len(kappas))
    one_based = positions + 1
    last = int(one_based.max())
    out = np.empty(len(kappas))
    for i, k in enumerate(kappas):
        kq = min(last, int(k))
        out[i] = np.count_nonzero(one_based <= kq) / kq
    return out


def revisited_map(ranks: Any, gnd: Sequence[Mapping[str, Any]],
                  kappas: Iterable[int] = (1, 5, 10)) -> MapResult:
    """mAP and mean precision@k of a ranking, with revisitop's ``compute_map`` conventions.

    Args:
        ranks: ``n_db x n_queries`` database indices, most similar first, per column (a
            truncated ranking with fewer rows is accepted).
        gnd: one dict per query: ``ok`` (positive database indices) and optionally ``junk``.
        kappas: the cut-offs k of precision@k.

    Returns:
        ``MapResult(map, aps, mpr, prs)`` as fractions in [0, 1]. Queries without positives
        have NaN AP and precisions and are left out of ``map`` and ``mpr`` (NaN when no
        query has a positive). A query whose positives are all missing from the ranking has
        AP 0 and precision 0.
    """
    ranks = np.asarray(ranks)
    kappas = [int(k) for k in kappas]
    if ranks.ndim != 2:
        raise ValueError(f"ranks must be a 2-D n_db x n_queries array, got shape {ranks.shape}")
    if ranks.shape[1] != len(gnd):
        raise ValueError(f"ranks has {ranks.shape[1]} query columns but gnd has {len(gnd)} entries; "
                         f"ranks must be n_db x n_queries (transpose it?)")
    if any(k < 1 for k in kappas):
        raise ValueError(f"kappas must be positive, got {kappas}")
    n_queries = len(gnd)
    aps = np.full(n_queries, np.nan)
    prs = np.full((n_queries, len(kappas)), np.nan)
    for q, entry in enumerate(gnd):
        ok = _ids(entry.get("ok"))
        if ok.size == 0:
            continue  # no positive: left out of the mean, as revisitop
        positions = _positions_without_junk(ranks[:, q], ok, _ids(entry.get("junk")))
        aps[q] = average_precision(positions, ok.size)
        prs[q] = _precision_at(positions, kappas)
    valid = ~np.isnan(aps)
    if not valid.any():
        return MapResult(float("nan"), aps, np.full(len(kappas), np.nan), prs)
    return MapResult(float(aps[valid].mean()), aps, prs[valid].mean(axis=0), prs)


def revisited_gnd(gnd: Sequence[Mapping[str, Any]], setup: str) -> list[dict[str, np.ndarray]]:
    """The ``ok``/``junk`` ground truth of one revisited setup from ``easy``/``hard``/``junk``.

    - ``easy``: positives easy; junk = junk + hard;
    - ``medium``: positives easy + hard; junk = junk;
    - ``hard``: positives hard; junk = junk + easy.
    """
    parts = {"easy": (("easy",), ("junk", "hard")),
             "medium": (("easy", "hard"), ("junk",)),
             "hard": (("hard",), ("junk", "easy"))}
    if setup not in parts:
        raise ValueError(f"unknown revisited setup {setup!r}; choose one of {', '.join(REVISITED_SETUPS)}")
    positive, junk = parts[setup]
    return [{"ok": np.concatenate([_ids(g.get(k)) for k in positive]),
             "junk": np.concatenate([_ids(g.get(k)) for k in junk])} for g in gnd]


def revisited_setups(ranks: Any, gnd: Sequence[Mapping[str, Any]],
                     kappas: Iterable[int] = (1, 5, 10)) -> dict[str, MapResult]:
    """:func:`revisited_map` for each of the Easy, Medium and Hard setups, keyed by name."""
    kappas = list(kappas)
    return {setup: revisited_map(ranks, revisited_gnd(gnd, setup), kappas) for setup in REVISITED_SETUPS}


def old_protocol_gnd(gnd: Sequence[Mapping[str, Any]]) -> list[dict[str, np.ndarray]]:
    """The original Oxford/Paris ground truth: ``good`` + ``ok`` positive, ``junk`` ignored."""
    return [{"ok": np.concatenate([_ids(g.get("good")), _ids(g.get("ok"))]), "junk": _ids(g.get("junk"))}
            for g in gnd]


def old_protocol_map(ranks: Any, gnd: Sequence[Mapping[str, Any]]) -> MapResult:
    """mAP of the original protocol (``gnd`` dicts with ``good``, ``ok``, ``junk`` lists).

    The AP is the one of Oxford's ``compute_ap`` program: trapezoid rule over the ranking
    with junk images skipped, which equals :func:`revisited_map` on :func:`old_protocol_gnd`.
    """
    return revisited_map(ranks, old_protocol_gnd(gnd), kappas=(1, 5, 10))
