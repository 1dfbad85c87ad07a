"""Average precision as Pascal VOC defines it, plus the per-class helpers of the VOC protocols.

Two rules integrate a precision/recall curve (``recall`` non-decreasing, as produced by
walking a ranking from the highest score down):

- VOC07 11-point (``use_07_metric=True``): the mean over t in ``np.arange(0.0, 1.1, 0.1)``
  of the interpolated precision ``max(precision[recall >= t])`` (0 where no point reaches t),
  summed as ``ap += p / 11``: py-faster-rcnn's ``voc_eval.py`` ``voc_ap`` and detectron2's
  ``pascal_voc_evaluation.py`` ``voc_ap``, the code behind published VOC07 detection numbers.
  Those thresholds are not the exact tenths: the float ``np.arange`` makes 0.3, 0.6 and 0.7
  slightly larger (0.30000000000000004, 0.6000000000000001, 0.7000000000000001), so a recall of
  exactly 0.3 / 0.6 / 0.7 does not reach that point (up to 1/11 of a class's AP).
- all-points (VOC2010+, VISSL's SVM benchmark): the area under the monotone precision
  envelope, ``sum over recall steps of (r_i - r_{i-1}) * max(precision[recall >= r_i])``.

Label convention of the per-class helpers (VOC ``ImageSets/Main/<cls>_<split>.txt``):
1 positive, -1 negative, 0 difficult. All values are fractions in [0, 1]; protocols report
them x100.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["voc_ap", "precision_recall", "voc_class_ap", "finetune_class_ap", "mean_ap", "weighted_class_ap",
           "weighted_map"]

#: the paper's fine-tune evaluation subtracts this times the label from each score, so that a
#: positive tied with a negative ranks below it (a pessimistic, deterministic tie rule)
TIE_EPS = 1e-5


def _as_1d(name: str, values: Sequence[float] | np.ndarray) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    return array


def voc_ap(recall: Sequence[float] | np.ndarray, precision: Sequence[float] | np.ndarray,
           use_07_metric: bool = False) -> float:
    """Average precision of a precision/recall curve, by the VOC07 11-point or all-points rule.

    Args:
        recall: recall after each ranked item, non-decreasing, in [0, 1].
        precision: precision after each ranked item, same length.
        use_07_metric: True for the VOC07 11-point rule, False (default) for all-points.

    Returns:
        AP in [0, 1]; 0.0 for an empty curve.
    """
    rec, prec = _as_1d("recall", recall), _as_1d("precision", precision)
    if rec.shape != prec.shape:
        raise ValueError(f"recall and precision differ in length ({rec.size} vs {prec.size})")
    if rec.size == 0:
        return 0.0
    if use_07_metric:
        return _eleven_point(rec, prec)
    return _all_points(rec, prec)


#: the 11 recall points of the VOC07 rule, as py-faster-rcnn / detectron2 spell them (see the
#: module docstring: 0.3, 0.6 and 0.7 are slightly above k / 10)
ELEVEN_POINTS = np.arange(0.0, 1.1, 0.1)


def _eleven_point(rec: np.ndarray, prec: np.ndarray) -> float:
    ap = 0.0
    for t in ELEVEN_POINTS:
        reached = rec >= t
        ap += (float(prec[reached].max()) if reached.any() else 0.0) / 11.0  # the reference's summation order
    return ap


def _all_points(rec: np.ndarray, prec: np.ndarray) -> float:
    # sentinels: recall 0 -> 1, precision 0 at both ends (as in the devkit)
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    # the monotone envelope: precision at r = best precision at any recall >= r
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def precision_recall(scores: Sequence[float] | np.ndarray,
                     positives: Sequence[bool] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) after each item of the ranking by decreasing score.

    Ties keep the input order (a stable sort), so the result is deterministic. ``positives``
    marks the relevant items; recall is NaN everywhere when there is none.
    """
    s = _as_1d("scores", scores)
    pos = np.asarray(positives, dtype=bool)
    if pos.shape != s.shape:
        raise ValueError(f"scores and labels differ in length ({s.size} vs {pos.size})")
    order = np.argsort(-s, kind="stable")
    tp = np.cumsum(pos[order], dtype=np.float64)
    fp = np.cumsum(~pos[order], dtype=np.float64)
    n_pos = float(pos.sum())
    recall = tp / n_pos if n_pos > 0 else np.full_like(tp, np.nan)
    return recall, tp / (tp + fp)  # tp + fp = rank >= 1


def _check_labels(labels: Sequence[int] | np.ndarray, n: int) -> np.ndarray:
    lab = np.asarray(labels)
    if lab.shape != (n,):
        raise ValueError(f"labels must be 1-D with {n} entries, got shape {lab.shape}")
    bad = ~np.isin(lab, (1, -1, 0))
    if bad.any():
        raise ValueError(f"labels must be 1 (positive), -1 (negative) or 0 (difficult), got {lab[bad][0]!r}")
    return lab


def voc_class_ap(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray,
                 use_07_metric: bool = False) -> float:
    """VOC AP of one class from image scores and 1/-1/0 labels; difficult (0) images are left out.

    Returns NaN when no positive remains (AP is undefined).
    """
    s = _as_1d("scores", scores)
    lab = _check_labels(labels, s.size)
    keep = lab != 0
    if not (lab[keep] == 1).any():
        return float("nan")
    recall, precision = precision_recall(s[keep], lab[keep] == 1)
    return voc_ap(recall, precision, use_07_metric)


def finetune_class_ap(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray,
                      tie_eps: float = TIE_EPS) -> float:
    """AP of one class as the DeepCluster fine-tune evaluation computes it.

    ``sklearn.metrics.average_precision_score`` on the non-difficult images, with
    ``score - tie_eps * is_positive`` so ties rank positives last. NaN without positives.
    """
    from sklearn.metrics import average_precision_score

    s = _as_1d("scores", scores)
    lab = _check_labels(labels, s.size)
    keep = lab != 0
    truth = (lab[keep] == 1).astype(np.float64)
    if truth.sum() == 0:
        return float("nan")
    return float(average_precision_score(truth, s[keep] - tie_eps * truth))


def mean_ap(aps: Sequence[float] | np.ndarray) -> float:
    """Mean of per-class APs, ignoring NaN (classes without positives); NaN if all are NaN."""
    values = np.asarray(aps, dtype=np.float64)
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


# ----------------------------------------------------------------------------- bootstrap
# A bootstrap resample of the evaluation images is a vector of integer weights (how often
# each image was drawn). The functions below compute the metric of many resamples at once
# (``weights``: resamples x images) without building the resampled lists: the ranking of the
# images does not change under resampling, only how much each contributes to the cumulative
# true / false positive counts. Equal to the metric of the explicitly repeated list (tested):
# a drawn image's copies tie with each other and carry one label, so for the VOC rules they
# add points that the precision envelope ignores, and for the fine-tune rule (scikit-learn)
# they fall into one threshold group anyway.

RULES = ("voc07", "all-points", "finetune")


def weighted_class_ap(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray, rule: str) -> np.ndarray:
    """AP of one class under each row of image ``weights`` (resamples x images), in [0, 1].

    ``labels`` use the VOC convention (1 / -1 / 0 difficult, left out); ``rule`` is "voc07"
    (:func:`voc_class_ap` with ``use_07_metric=True``), "all-points" (:func:`voc_class_ap`) or
    "finetune" (:func:`finetune_class_ap`). NaN for a resample without a positive.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    s, lab = _as_1d("scores", scores), _check_labels(labels, len(scores))
    keep = lab != 0
    s, pos = s[keep], lab[keep] == 1
    w = np.asarray(weights, dtype=np.float64)[:, keep]
    if not pos.any():
        return np.full(w.shape[0], np.nan)
    if rule == "finetune":
        s = s - TIE_EPS * pos
    order = np.argsort(-s, kind="stable")
    s, pos, w = s[order], pos[order], w[:, order]
    tp = np.cumsum(w * pos, axis=1)
    fp = np.cumsum(w * ~pos, axis=1)
    if rule == "finetune":  # scikit-learn: one point per distinct score (the end of each tie group)
        ends = np.flatnonzero(np.append(s[1:] != s[:-1], True))
        tp, fp = tp[:, ends], fp[:, ends]
    n_pos = tp[:, -1:]
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = tp / n_pos
        precision = np.where(tp + fp > 0, tp / np.where(tp + fp > 0, tp + fp, 1.0), 0.0)
    if rule == "voc07":
        ap = np.zeros(w.shape[0])
        for t in ELEVEN_POINTS:  # the reference's summation order, as _eleven_point
            ap += np.where(recall >= t, precision, 0.0).max(axis=1, initial=0.0) / 11.0
    else:
        if rule == "all-points":  # the monotone envelope
            precision = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
        steps = np.diff(np.concatenate([np.zeros((w.shape[0], 1)), recall], axis=1), axis=1)
        ap = np.nansum(steps * precision, axis=1)
    return np.where(n_pos[:, 0] > 0, ap, np.nan)


def weighted_map(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray, rule: str) -> np.ndarray:
    """Mean AP over classes (NaN classes left out, as :func:`mean_ap`) under each row of
    ``weights``; ``scores`` and ``labels`` are images x classes."""
    per_class = np.stack([weighted_class_ap(scores[:, c], labels[:, c], weights, rule)
                          for c in range(scores.shape[1])], axis=1)
    counted = (~np.isnan(per_class)).sum(axis=1)
    total = np.nansum(per_class, axis=1)
    return np.where(counted > 0, total / np.maximum(counted, 1), np.nan)
