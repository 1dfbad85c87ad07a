"""Semantic-segmentation metrics from a confusion matrix (mIoU, per-class IoU, pixel accuracy).

Conventions (Pascal VOC, mmsegmentation's ``IoUMetric``): pixels whose target is
``ignore_index`` (255: VOC's object boundaries and difficult regions) are left out of every
count; the IoU of class c is ``TP / (TP + FP + FN)`` over all evaluated pixels of all images
(one confusion matrix for the whole set, not a mean over images); a class that appears in
neither target nor prediction has IoU NaN and is left out of the mean. A class predicted but
absent from the target has IoU 0 and counts. Values are fractions in [0, 1].
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

ArrayLike = np.ndarray | Sequence[np.ndarray]


def _as_int(array: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype.kind not in "iu":
        if array.dtype.kind == "b" or not np.all(np.equal(np.mod(array, 1), 0)):
            raise ValueError(f"{what} must hold integer class indices, got dtype {array.dtype}")
        array = array.astype(np.int64)
    return array.astype(np.int64, copy=False)


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """``num_classes x num_classes`` int64 counts: row = target class, column = predicted class.

    Pixels with ``target == ignore_index`` are skipped. Raises ValueError for arrays of different
    shapes, a target label outside ``[0, num_classes)`` (other than the ignore label) or a
    prediction outside ``[0, num_classes)`` at an evaluated pixel.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    pred, target = _as_int(pred, "pred"), _as_int(target, "target")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {pred.shape} vs {target.shape}")
    keep = target != ignore_index
    p, t = pred[keep].ravel(), target[keep].ravel()
    for name, values in (("target", t), ("pred", p)):
        bad = (values < 0) | (values >= num_classes)
        if bad.any():
            raise ValueError(f"{name} holds label {int(values[bad][0])}, outside [0, {num_classes}) "
                             f"and not the ignore label {ignore_index}")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_from_confusion(cm: np.ndarray) -> np.ndarray:
    """Per-class IoU ``TP / (TP + FP + FN)`` (float64; NaN where the union is empty)."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    union = cm.sum(axis=0) + cm.sum(axis=1) - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, tp / np.where(union > 0, union, 1.0), np.nan)


def pixel_accuracy(cm: np.ndarray) -> float:
    """Share of evaluated pixels predicted correctly (mmseg's ``aAcc``); NaN without pixels."""
    cm = np.asarray(cm, dtype=np.float64)
    total = cm.sum()
    return float(np.trace(cm) / total) if total > 0 else float("nan")


def mean_of(values: np.ndarray) -> float:
    """Mean over the non-NaN entries (NaN when all are NaN), without a RuntimeWarning."""
    values = np.asarray(values, dtype=np.float64)
    valid = values[~np.isnan(values)]
    return float(valid.mean()) if valid.size else float("nan")


def mean_iou(pred: ArrayLike, target: ArrayLike, num_classes: int,
             ignore_index: int = 255) -> tuple[float, np.ndarray]:
    """Mean IoU and per-class IoU of predicted label maps against target label maps.

    Args:
        pred: predicted class indices, one array (any shape; a CPU tensor works too) or a
            sequence of arrays (images of different sizes); ints in ``[0, num_classes)``.
        target: the ground truth, same shapes as ``pred``; ``ignore_index`` marks pixels left
            out (VOC: 255 on object boundaries).
        num_classes: number of classes (VOC: 21, background included).
        ignore_index: the target label that is not evaluated.

    Returns:
        ``(miou, iou)``: ``iou`` is a float64 array of ``num_classes`` per-class IoUs, NaN for
        classes absent from both target and prediction; ``miou`` is the mean of the non-NaN
        entries (NaN if none). Both are fractions in [0, 1], computed from one confusion matrix
        accumulated over all images.
    """
    # one array (numpy, or anything with a shape such as a CPU tensor) or a sequence of them
    preds = [pred] if hasattr(pred, "shape") else list(pred)
    targets = [target] if hasattr(target, "shape") else list(target)
    if len(preds) != len(targets):
        raise ValueError(f"got {len(preds)} predictions for {len(targets)} targets")
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    for p, t in zip(preds, targets):
        cm += confusion_matrix(p, t, num_classes, ignore_index)
    iou = iou_from_confusion(cm)
    return mean_of(iou), iou


__all__ = ["confusion_matrix", "iou_from_confusion", "mean_iou", "mean_of", "pixel_accuracy"]


def weighted_mean_iou(confusions: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mean IoU (as :func:`mean_of` of :func:`iou_from_confusion`, in [0, 1]) of the summed
    per-image confusion matrices under each row of image ``weights`` (resamples x images):
    one bootstrap resample of the evaluation images per row. ``confusions``: images x C x C
    (or images x C*C)."""
    per_image = np.asarray(confusions, dtype=np.float64).reshape(len(confusions), -1)
    c = math.isqrt(per_image.shape[1])
    if c * c != per_image.shape[1]:
        raise ValueError(f"per-image confusion matrices must be square, got {per_image.shape[1]} entries")
    summed = (np.asarray(weights, dtype=np.float64) @ per_image).reshape(-1, c, c)
    tp = np.diagonal(summed, axis1=1, axis2=2)
    union = summed.sum(axis=1) + summed.sum(axis=2) - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / np.where(union > 0, union, 1.0), np.nan)
    counted = (~np.isnan(iou)).sum(axis=1)
    return np.where(counted > 0, np.nansum(iou, axis=1) / np.maximum(counted, 1), np.nan)
