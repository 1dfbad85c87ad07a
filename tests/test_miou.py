"""dcbench.metrics.segmentation: mIoU / per-class IoU from a confusion matrix, checked against
hand-computed matrices, an independent per-class set formula on random cases, and mmseg's own
IoUMetric; the ignore label is respected everywhere."""
from __future__ import annotations

import math

import numpy as np
import pytest

from dcbench.metrics.segmentation import confusion_matrix, iou_from_confusion, mean_iou, pixel_accuracy


def test_hand_computed_confusion_matrix():
    target = np.array([[0, 0, 1, 1],
                       [0, 2, 2, 255],
                       [255, 2, 1, 0]])
    pred = np.array([[0, 1, 1, 1],
                     [0, 2, 0, 2],   # the 2 under the ignore label does not count
                     [1, 2, 2, 0]])  # nor does the 1 here
    cm = confusion_matrix(pred, target, 3)
    #                 pred 0  1  2          (rows: target)
    expected = np.array([[3, 1, 0],    # target 0: pixels (0,0) (0,1) (1,0) (2,3)
                         [0, 2, 1],    # target 1: (0,2) (0,3) (2,2)
                         [1, 0, 2]])   # target 2: (1,1) (1,2) (2,1)
    np.testing.assert_array_equal(cm, expected)
    # IoU_c = TP / (row + column - TP)
    iou = iou_from_confusion(cm)
    np.testing.assert_allclose(iou, [3 / (4 + 4 - 3), 2 / (3 + 3 - 2), 2 / (3 + 3 - 2)])
    miou, per_class = mean_iou(pred, target, 3)
    assert miou == pytest.approx((3 / 5 + 2 / 4 + 2 / 4) / 3)
    np.testing.assert_allclose(per_class, iou)
    assert pixel_accuracy(cm) == pytest.approx(7 / 10)


def test_absent_class_is_nan_and_a_false_positive_class_counts_as_zero():
    target = np.array([0, 0, 1, 1])
    pred = np.array([0, 0, 1, 3])  # class 3 predicted but never in the target; class 2 nowhere
    miou, iou = mean_iou(pred, target, 4)
    assert iou[0] == 1.0 and iou[1] == pytest.approx(0.5) and math.isnan(iou[2]) and iou[3] == 0.0
    assert miou == pytest.approx((1.0 + 0.5 + 0.0) / 3)


def test_ignore_label_is_never_evaluated_even_with_out_of_range_predictions():
    target = np.array([0, 1, 255, 255, 7])
    pred = np.array([0, 1, 200, 5, 1])  # predictions under the ignore label are not checked
    miou, iou = mean_iou(pred, target, 8, ignore_index=255)
    assert iou[0] == 1.0 and iou[1] == pytest.approx(0.5) and iou[7] == 0.0
    # another ignore value
    cm = confusion_matrix(np.array([1, 0]), np.array([-1, 0]), 2, ignore_index=-1)
    np.testing.assert_array_equal(cm, [[1, 0], [0, 0]])


def test_images_of_different_sizes_accumulate_one_matrix():
    a_t, a_p = np.zeros((2, 3), int), np.zeros((2, 3), int)
    b_t, b_p = np.array([[1], [1], [1], [255]]), np.array([[1], [1], [0], [0]])
    miou, iou = mean_iou([a_p, b_p], [a_t, b_t], 2)
    np.testing.assert_allclose(iou, [6 / 7, 2 / 3])
    assert miou == pytest.approx((6 / 7 + 2 / 3) / 2)


def _independent_iou(pred: np.ndarray, target: np.ndarray, n: int, ignore: int) -> list[float]:
    valid = target != ignore
    out = []
    for c in range(n):
        inter = np.sum((pred == c) & (target == c) & valid)
        union = np.sum(((pred == c) | (target == c)) & valid)
        out.append(inter / union if union else float("nan"))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_random_cases_match_an_independent_formula(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 22))
    shape = tuple(rng.integers(1, 40, size=2))
    target = rng.integers(0, n, size=shape)
    target[rng.random(shape) < 0.2] = 255
    pred = np.where(rng.random(shape) < 0.6, target, rng.integers(0, n, size=shape))
    pred[target == 255] = rng.integers(0, n, size=int((target == 255).sum()))
    miou, iou = mean_iou(pred, target, n)
    expected = _independent_iou(pred, target, n, 255)
    np.testing.assert_allclose(iou, expected, equal_nan=True)
    assert miou == pytest.approx(np.nanmean(expected))
    cm = confusion_matrix(pred, target, n)
    assert cm.sum() == int((target != 255).sum())


def test_agrees_with_mmseg_iou_metric():
    pytest.importorskip("mmseg")
    import torch

    from dcbench.compat import ensure_mmcv_ops

    ensure_mmcv_ops()
    from mmseg.evaluation.metrics import IoUMetric

    rng = np.random.default_rng(3)
    results = []
    preds, targets = [], []
    for _ in range(4):
        t = rng.integers(0, 5, size=(13, 17))
        t[rng.random(t.shape) < 0.1] = 255
        p = np.where(rng.random(t.shape) < 0.7, t, rng.integers(0, 5, size=t.shape))
        p[t == 255] = 0
        preds.append(p)
        targets.append(t)
        results.append(IoUMetric.intersect_and_union(torch.from_numpy(p), torch.from_numpy(t), 5, 255))
    inter, union = (sum(r[i] for r in results).numpy() for i in (0, 1))
    with np.errstate(invalid="ignore", divide="ignore"):
        mm_iou = inter / union
    miou, iou = mean_iou(preds, targets, 5)
    np.testing.assert_allclose(iou, mm_iou, equal_nan=True)
    assert miou == pytest.approx(np.nanmean(mm_iou))


def test_bad_inputs_are_errors():
    with pytest.raises(ValueError, match="shapes differ"):
        confusion_matrix(np.zeros((2, 2), int), np.zeros((2, 3), int), 2)
    with pytest.raises(ValueError, match="target holds label 5"):
        confusion_matrix(np.zeros(3, int), np.array([0, 5, 255]), 3)
    with pytest.raises(ValueError, match="pred holds label 3"):
        confusion_matrix(np.array([0, 3]), np.array([0, 1]), 3)
    with pytest.raises(ValueError, match="integer class indices"):
        confusion_matrix(np.array([0.5]), np.array([0]), 2)
    with pytest.raises(ValueError, match="predictions for"):
        mean_iou([np.zeros(2, int)], [np.zeros(2, int)] * 2, 2)
    miou, iou = mean_iou(np.zeros(2, int), np.full(2, 255), 3)  # nothing evaluated
    assert math.isnan(miou) and np.isnan(iou).all()
