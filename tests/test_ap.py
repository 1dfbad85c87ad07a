"""VOC average precision (dcbench.metrics.ap): both rules by hand, against an independent
implementation on random cases, and the per-class helpers of the VOC protocols."""
from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from dcbench.metrics.ap import finetune_class_ap, mean_ap, precision_recall, voc_ap, voc_class_ap


# ----------------------------------------------------------------------------- by hand
def test_hand_case_positive_negative_positive():
    # ranking P N P, 2 positives: recall .5 .5 1, precision 1 .5 2/3
    recall, precision = precision_recall([3.0, 2.0, 1.0], [True, False, True])
    np.testing.assert_allclose(recall, [0.5, 0.5, 1.0])
    np.testing.assert_allclose(precision, [1.0, 0.5, 2 / 3])
    # all-points: 0.5 * 1 (envelope at r=.5) + 0.5 * 2/3
    assert voc_ap(recall, precision) == pytest.approx(0.5 + 1 / 3)
    # 11-point: t = 0 .. 0.5 -> 1 (6 points), t = 0.6 .. 1 -> 2/3 (5 points)
    assert voc_ap(recall, precision, use_07_metric=True) == pytest.approx((6 + 5 * 2 / 3) / 11)


def test_hand_case_missed_positive():
    # ranking N P with 2 positives in truth (one never retrieved): recall 0 .5, precision 0 .5
    recall, precision = np.array([0.0, 0.5]), np.array([0.0, 0.5])
    assert voc_ap(recall, precision) == pytest.approx(0.25)  # 0.5 * 0.5, nothing above recall .5
    assert voc_ap(recall, precision, use_07_metric=True) == pytest.approx(6 * 0.5 / 11)


def test_hand_case_envelope_lifts_earlier_precision():
    # precision dips then recovers: the envelope takes the later, higher value
    recall = np.array([0.25, 0.25, 0.5, 0.75, 1.0])
    precision = np.array([1.0, 0.5, 0.4, 0.6, 0.8])
    # envelope at .25 -> 1, .5 -> .8, .75 -> .8, 1 -> .8
    assert voc_ap(recall, precision) == pytest.approx(0.25 * 1 + 0.75 * 0.8)
    # 11-point: t = 0, .1, .2 -> 1; t = .3 .. 1 -> .8
    assert voc_ap(recall, precision, use_07_metric=True) == pytest.approx((3 + 8 * 0.8) / 11)


def test_perfect_and_empty():
    recall, precision = precision_recall([0.9, 0.8, 0.1], [True, True, False])
    assert voc_ap(recall, precision) == 1.0 and voc_ap(recall, precision, True) == pytest.approx(1.0)
    assert voc_ap([], []) == 0.0 and voc_ap([], [], use_07_metric=True) == 0.0


def test_eleven_point_uses_the_np_arange_thresholds():
    # 10 positives, 3 retrieved first: recall reaches exactly 0.3. py-faster-rcnn / detectron2
    # threshold at np.arange(0.0, 1.1, 0.1), whose 0.30000000000000004 that recall does not reach:
    # only t = 0, 0.1, 0.2 count (3/11), not 4/11 as exact tenths would give.
    recall, precision = np.array([0.1, 0.2, 0.3]), np.ones(3)
    assert voc_ap(recall, precision, use_07_metric=True) == pytest.approx(3 / 11)
    # the same at 0.6 and 0.7 (0.6000000000000001, 0.7000000000000001); 0.5 and 1.0 are exact
    assert voc_ap(np.arange(1, 7) / 10, np.ones(6), use_07_metric=True) == pytest.approx(6 / 11)
    assert voc_ap(np.arange(1, 8) / 10, np.ones(7), use_07_metric=True) == pytest.approx(7 / 11)
    assert voc_ap(np.arange(1, 6) / 10, np.ones(5), use_07_metric=True) == pytest.approx(6 / 11)


def test_bad_input():
    with pytest.raises(ValueError, match="differ in length"):
        voc_ap([0.1, 0.2], [1.0])
    with pytest.raises(ValueError, match="1-D"):
        voc_ap([[0.1]], [[1.0]])
    with pytest.raises(ValueError, match="labels must be"):
        voc_class_ap([0.1, 0.2], [1, 2])


# ----------------------------------------------------------------------------- independent implementation
def reference_all_points(recall: list[float], precision: list[float]) -> float:
    """Sum over each recall increase of (increase) x (best precision at this or any later point)."""
    total, previous = 0.0, 0.0
    for i, r in enumerate(recall):
        if r > previous:
            total += (r - previous) * max(precision[i:])
            previous = r
    return total


def reference_eleven_point(recall: list[float], precision: list[float]) -> float:
    """py-faster-rcnn's ``voc_eval.py`` ``voc_ap(rec, prec, use_07_metric=True)``, written out."""
    ap = 0.0
    for t in np.arange(0.0, 1.1, 0.1):
        reached = [p for r, p in zip(recall, precision) if r >= t]
        ap = ap + (max(reached) if reached else 0.0) / 11.0
    return ap


def random_ranking(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    n = int(rng.integers(1, 40))
    positives = rng.random(n) < rng.uniform(0.1, 0.9)
    if not positives.any():
        positives[rng.integers(0, n)] = True
    scores = np.round(rng.normal(size=n) + positives * rng.uniform(0, 2), 1)  # rounding: some ties
    return scores, positives


@pytest.mark.parametrize("seed", range(6))
def test_equals_reference_on_random_rankings(seed):
    rng = np.random.default_rng(seed)
    for _ in range(50):
        recall, precision = precision_recall(*random_ranking(rng))
        if rng.random() < 0.3:  # a truncated ranking: recall stops short of 1
            cut = int(rng.integers(1, len(recall) + 1))
            recall, precision = recall[:cut], precision[:cut]
        assert voc_ap(recall, precision) == pytest.approx(reference_all_points(list(recall), list(precision)),
                                                          abs=1e-12)
        assert voc_ap(recall, precision, True) == pytest.approx(
            reference_eleven_point(list(recall), list(precision)), abs=1e-12)


def test_equals_reference_on_arbitrary_curves():
    rng = np.random.default_rng(42)
    for _ in range(200):
        n = int(rng.integers(1, 25))
        recall = np.sort(rng.choice(np.arange(11) / 10.0, n) if rng.random() < 0.5 else rng.random(n))
        precision = rng.random(n)
        assert voc_ap(recall, precision) == pytest.approx(reference_all_points(list(recall), list(precision)),
                                                          abs=1e-12)
        assert voc_ap(recall, precision, True) == pytest.approx(
            reference_eleven_point(list(recall), list(precision)), abs=1e-12)


# ----------------------------------------------------------------------------- per-class helpers
def test_voc_class_ap_leaves_difficult_out():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    labels = np.array([1, 0, -1, 1, 0])  # difficult images ranked high must not count as false positives
    expected = voc_ap(*precision_recall([0.9, 0.7, 0.6], [True, False, True]))
    assert voc_class_ap(scores, labels) == pytest.approx(expected)
    assert voc_class_ap(scores, labels) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert math.isnan(voc_class_ap([0.1, 0.2], [-1, 0]))  # no positive: undefined


def test_finetune_class_ap_is_sklearn_on_non_difficult_with_pessimistic_ties():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=30)
    labels = rng.choice([1, -1, 0], size=30)
    keep = labels != 0
    assert finetune_class_ap(scores, labels) == pytest.approx(
        average_precision_score(labels[keep] == 1, scores[keep]), abs=1e-4)
    # a positive tied with a negative ranks below it: precision 1/2 at the only positive
    assert finetune_class_ap([0.0, 0.0], [1, -1]) == pytest.approx(0.5)
    assert math.isnan(finetune_class_ap([0.3, 0.1], [-1, -1]))


def test_mean_ap_ignores_undefined_classes():
    assert mean_ap([0.5, float("nan"), 1.0]) == pytest.approx(0.75)
    assert math.isnan(mean_ap([float("nan")]))
