"""Bootstrap of metrics that are not means over images (VOC mAP, mIoU) and Holm's adjustment.

The weighted metrics must equal the metric of the explicitly resampled (repeated) evaluation
set, for every AP rule the protocols use, including tied scores, difficult images and resamples
that drop every positive of a class.
"""
from __future__ import annotations

import numpy as np
import pytest

from dcbench.metrics.ap import finetune_class_ap, voc_class_ap, weighted_class_ap, weighted_map
from dcbench.metrics.segmentation import iou_from_confusion, mean_of, weighted_mean_iou
from dcbench.stats import (ImageOutcomes, Trials, bootstrap_interval, cell_summary, compare_trials, holm,
                           map_outcomes, miou_outcomes, paired_bootstrap)


def _reference_ap(scores, labels, rule):
    if rule == "finetune":
        return finetune_class_ap(scores, labels)
    return voc_class_ap(scores, labels, use_07_metric=rule == "voc07")


@pytest.mark.parametrize("rule", ["voc07", "all-points", "finetune"])
def test_weighted_ap_equals_ap_of_the_repeated_list(rule):
    rng = np.random.default_rng(0)
    for case in range(400):
        n = int(rng.integers(1, 25))
        # half the cases with few distinct scores: ties between positives and negatives
        scores = rng.integers(0, 4, n).astype(float) if case % 2 else rng.standard_normal(n)
        labels = rng.choice([1, -1, 0], n, p=[0.3, 0.6, 0.1])
        weights = rng.multinomial(n, np.full(n, 1 / n), size=4)
        got = weighted_class_ap(scores, labels, weights, rule)
        for k in range(4):
            rep = np.repeat(np.arange(n), weights[k])
            ref = _reference_ap(scores[rep], labels[rep], rule)
            if np.isnan(ref):
                assert np.isnan(got[k])
            else:
                assert got[k] == pytest.approx(ref, abs=1e-12)


def test_weighted_ap_unit_weights_by_hand():
    # ranking: +, -, +, - ; VOC07: recall 0.5 reached with precision 1, recall 1 with precision 2/3
    scores, labels = np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, -1, 1, -1])
    ones = np.ones((1, 4))
    eleven = (6 * 1.0 + 5 * (2 / 3)) / 11  # t = 0 .. 0.5 -> 1.0 ; t = 0.6 .. 1.0 -> 2/3
    assert weighted_class_ap(scores, labels, ones, "voc07")[0] == pytest.approx(eleven)
    assert weighted_class_ap(scores, labels, ones, "all-points")[0] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # a resample without the positives: AP undefined
    assert np.isnan(weighted_class_ap(scores, labels, np.array([[0, 2, 0, 2]]), "voc07")[0])


def test_weighted_map_ignores_classes_without_positives():
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.3]])
    labels = np.array([[1, -1], [-1, -1], [-1, -1]])  # class 1 has no positive
    assert weighted_map(scores, labels, np.ones((1, 3)), "voc07")[0] == pytest.approx(1.0)


def test_weighted_mean_iou_equals_miou_of_summed_confusions():
    rng = np.random.default_rng(1)
    conf = rng.integers(0, 5, size=(30, 4, 4))
    conf[:, 3, :] = 0  # class 3 never in the labels ...
    conf[:, :, 3] = 0  # ... nor predicted: left out of the mean, as mean_of(iou_from_confusion)
    weights = rng.multinomial(30, np.full(30, 1 / 30), size=6)
    got = weighted_mean_iou(conf, weights)
    for k in range(6):
        ref = mean_of(iou_from_confusion(np.tensordot(weights[k], conf, axes=1)))
        assert got[k] == pytest.approx(ref, abs=1e-12)


def test_paired_bootstrap_on_map_outcomes():
    rng = np.random.default_rng(2)
    labels = np.where(rng.random((300, 5)) < 0.3, 1, -1)
    truth = (labels == 1).astype(float)
    good = map_outcomes(truth + rng.normal(0, 0.5, truth.shape), labels, "voc07")
    bad = map_outcomes(truth + rng.normal(0, 3.0, truth.shape), labels, "voc07")
    cmp = paired_bootstrap([good], [bad], resamples=500)
    full = np.ones((1, 300))
    assert cmp.diff == pytest.approx(100 * (good.value(full)[0] - bad.value(full)[0]))
    assert cmp.method == "paired-bootstrap" and cmp.ci_low < cmp.diff < cmp.ci_high
    assert cmp.diff > 10 and cmp.significant()
    same = paired_bootstrap([good], [good], resamples=200)
    assert same.diff == 0 and same.p_value == 1.0 and not same.significant()
    low, high = bootstrap_interval([good], resamples=300)
    assert low < 100 * good.value(full)[0] < high


def test_compare_trials_uses_structured_outcomes_and_refuses_mixed_images():
    rng = np.random.default_rng(3)
    conf_a = rng.integers(0, 20, size=(40, 3, 3)) + np.eye(3, dtype=int) * 30
    conf_b = rng.integers(0, 20, size=(40, 3, 3))
    a, b = miou_outcomes(conf_a), miou_outcomes(conf_b)
    full = np.ones((1, 40))
    ta = Trials({0: 100 * a.value(full)[0]}, {0: a}, seed_dependent=True)
    tb = Trials({0: 100 * b.value(full)[0]}, {0: b}, seed_dependent=True)
    cmp = compare_trials(ta, tb, resamples=300)
    assert cmp.method == "paired-bootstrap" and cmp.significant()
    other = Trials({0: tb.values[0]}, {0: miou_outcomes(conf_b[:30])}, seed_dependent=True)
    assert compare_trials(ta, other, resamples=100).method == "none"  # not the same images: untested
    summary = cell_summary(ta, resamples=200)
    assert summary.method == "bootstrap" and summary.ci_low < summary.mean < summary.ci_high


def test_image_outcomes_validation():
    with pytest.raises(ValueError, match="unknown outcome statistic"):
        ImageOutcomes("median", np.zeros((3, 2)))
    with pytest.raises(ValueError, match="images x columns"):
        ImageOutcomes("miou", np.zeros(3))
    with pytest.raises(ValueError, match="images x classes"):
        map_outcomes(np.zeros((3, 2)), np.zeros((3, 3)), "voc07")


def test_holm_by_hand_and_untested_entries():
    # sorted 0.01, 0.02, 0.04 with m = 3: 0.03, 0.04, 0.04 (monotone), in the original order
    assert holm([0.04, 0.01, None, 0.02]) == pytest.approx([0.04, 0.03, None, 0.04])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []
    assert holm([0.03]) == pytest.approx([0.03])


def test_table_differences_to_the_reference_are_holm_adjusted():
    from dcbench.table import Cell, Table, analyze

    def cells(col, diffs):
        base = [10.0, 10.0, 10.0]
        a = [x + d for x, d in zip(base, diffs)]
        return {("a", col): Cell(float(np.mean(a)), None, 3, values=dict(enumerate(a))),
                ("b", col): Cell(10.0, None, 3, values=dict(enumerate(base)))}

    # alone: paired t p = 0.022 (significant); in a family with two null columns Holm gives 0.067
    alone = analyze(Table(columns=["c1"], rows=["a", "b"], cells=cells("c1", [2.0, 2.6, 3.4])), reference="b")
    assert alone.diffs[("a", "c1")].p_value == pytest.approx(0.02235, abs=1e-4)
    assert alone.family_size == 1 and alone.significant("a", "c1")
    family = {**cells("c1", [2.0, 2.6, 3.4]), **cells("c2", [-1.0, 0.0, 1.0]), **cells("c3", [0.5, -0.5, 0.0])}
    three = analyze(Table(columns=["c1", "c2", "c3"], rows=["a", "b"], cells=family), reference="b")
    raw = [three.diffs[("a", c)].p_value for c in ("c1", "c2", "c3")]
    assert three.family_size == 3
    assert [three.diffs[("a", c)].p_adjusted for c in ("c1", "c2", "c3")] == pytest.approx(holm(raw))
    assert three.diffs[("a", "c1")].p_adjusted == pytest.approx(3 * raw[0])
    assert not three.significant("a", "c1")  # 0.022 * 3 = 0.067: not a finding once 3 were tested
    import json

    from dcbench.render import render
    items = {(i["checkpoint"], i["column"]): i for i in json.loads(render(three.table, "json", reference="b"))}
    c1 = items[("a", "c1")]
    assert c1["p_value"] == pytest.approx(raw[0]) and c1["p_adjusted"] == pytest.approx(3 * raw[0])
    assert c1["significant"] is False
    assert "Holm-adjusted over the 3 tested differences" in render(three.table, "md", reference="b")
