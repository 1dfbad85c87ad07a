"""dcbench.stats: values computed by hand, agreement with scipy.stats on random cases, edge cases
(n = 1, zero variance, ties), and the paired bootstrap over evaluation images."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from dcbench.stats import (Trials, bootstrap_interval, cell_summary, compare_trials, paired_bootstrap, paired_t,
                           summarize, welch_t)

T975_2 = 4.302652729911275  # Student t quantile 0.975 with 2 degrees of freedom (tables)


# ----------------------------------------------------------------------------- by hand
def test_summary_by_hand():
    s = summarize([40.0, 41.0, 45.0])
    assert s.n == 3 and s.mean == pytest.approx(42.0)
    assert s.std == pytest.approx(math.sqrt(7.0))  # ((-2)^2 + (-1)^2 + 3^2) / 2 = 7
    half = T975_2 * math.sqrt(7.0) / math.sqrt(3.0)  # 6.5725...
    assert (s.ci_low, s.ci_high) == pytest.approx((42.0 - half, 42.0 + half))
    assert s.method == "t"


def test_paired_t_by_hand():
    # differences 2, 4, 6: mean 4, sd 2, se 2/sqrt(3), t = 2 sqrt(3) with 2 df
    cmp = paired_t([12.0, 14.0, 16.0], [10.0, 10.0, 10.0])
    assert cmp.diff == pytest.approx(4.0) and cmp.n == 3 and cmp.method == "paired-t"
    half = T975_2 * 2.0 / math.sqrt(3.0)
    assert (cmp.ci_low, cmp.ci_high) == pytest.approx((4.0 - half, 4.0 + half))
    # two-sided p for t = 2 sqrt(3) = 3.4641 with 2 df: 1 - t / sqrt(t^2 + 2) (closed form for df = 2)
    t = 2.0 * math.sqrt(3.0)
    assert cmp.p_value == pytest.approx(1.0 - t / math.sqrt(t * t + 2.0))
    assert cmp.significant(0.1) and not cmp.significant(0.05)  # p = 0.0742


# ----------------------------------------------------------------------------- scipy
@pytest.mark.parametrize("seed", range(8))
def test_agrees_with_scipy_on_random_cases(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 9))
    a = rng.normal(50, 5, n)
    b = a - rng.normal(1, 2, n)
    s = summarize(a)
    lo, hi = sps.t.interval(0.95, n - 1, loc=a.mean(), scale=sps.sem(a))
    assert (s.ci_low, s.ci_high) == pytest.approx((lo, hi))
    assert s.std == pytest.approx(np.std(a, ddof=1))
    cmp = paired_t(a, b)
    ref = sps.ttest_rel(a, b)
    assert cmp.p_value == pytest.approx(ref.pvalue)
    ci = ref.confidence_interval(0.95)
    assert (cmp.ci_low, cmp.ci_high) == pytest.approx((ci.low, ci.high))
    m = int(rng.integers(2, 7))
    c = rng.normal(48, 3, m)
    w = welch_t(a, c)
    ref = sps.ttest_ind(a, c, equal_var=False)
    assert w.p_value == pytest.approx(ref.pvalue)
    ci = ref.confidence_interval(0.95)
    assert (w.ci_low, w.ci_high) == pytest.approx((ci.low, ci.high))


# ----------------------------------------------------------------------------- edge cases
def test_single_value_has_no_spread_or_interval():
    s = summarize([33.3])
    assert (s.n, s.mean, s.std, s.ci_low, s.ci_high, s.method) == (1, 33.3, None, None, None, "none")
    with pytest.raises(ValueError):
        summarize([])
    assert paired_t([1.0], [0.0]).method == "none" and paired_t([1.0], [0.0]).p_value is None
    assert not paired_t([1.0], [0.0]).significant()
    assert welch_t([1.0], [0.0, 2.0]).method == "none"


def test_zero_variance():
    s = summarize([5.0, 5.0, 5.0])
    assert s.std == 0.0 and (s.ci_low, s.ci_high) == (5.0, 5.0)
    equal = paired_t([3.0, 4.0], [3.0, 4.0])  # ties on every seed
    assert equal.diff == 0.0 and equal.p_value == 1.0 and not equal.significant()
    shifted = paired_t([3.0, 4.0], [2.0, 3.0])  # a constant non-zero difference (scipy: t = inf, p = 0)
    assert shifted.p_value == 0.0 and (shifted.ci_low, shifted.ci_high) == (1.0, 1.0) and shifted.significant()
    assert welch_t([1.0, 1.0], [1.0, 1.0]).p_value == 1.0


# ----------------------------------------------------------------------------- bootstrap
def test_paired_bootstrap_is_seeded_and_finds_a_real_difference():
    rng = np.random.default_rng(0)
    b = (rng.random(500) < 0.6).astype(np.uint8)
    a = b.copy()
    flip = rng.choice(np.flatnonzero(b == 0), 60, replace=False)  # a is right on 60 more images
    a[flip] = 1
    cmp = paired_bootstrap([a], [b], resamples=1000)
    assert cmp.diff == pytest.approx(12.0) and cmp.method == "paired-bootstrap" and cmp.n == 1
    assert 8.0 < cmp.ci_low < 12.0 < cmp.ci_high < 16.0
    assert cmp.significant() and cmp.p_value == pytest.approx(2 / 1001)
    assert paired_bootstrap([a], [b], resamples=1000) == cmp  # same seed, same answer
    assert paired_bootstrap([a], [b], resamples=1000, seed=1) != cmp


def test_one_image_of_450_is_not_significant():
    b = np.zeros(450, dtype=bool)
    b[:300] = True
    a = b.copy()
    a[300] = True  # +0.2 points: the demo's old "exceeds the spread 0.0"
    cmp = paired_bootstrap([a], [b])
    assert cmp.diff == pytest.approx(100 / 450) and not cmp.significant()
    assert cmp.ci_low <= 0.0 <= cmp.ci_high


def test_identical_outcomes_are_a_tie():
    a = np.array([1, 0, 1, 1, 0], dtype=bool)
    cmp = paired_bootstrap([a], [a.copy()], resamples=1000)
    assert cmp.diff == 0.0 and (cmp.ci_low, cmp.ci_high) == (0.0, 0.0) and cmp.p_value == 1.0


def test_bootstrap_combines_seeds_and_checks_lengths():
    rng = np.random.default_rng(3)
    a = [(rng.random(200) < p).astype(float) for p in (0.7, 0.72, 0.69)]
    b = [(rng.random(200) < p).astype(float) for p in (0.5, 0.52, 0.51)]
    cmp = paired_bootstrap(a, b, resamples=1000)
    assert cmp.n == 3 and cmp.significant()
    assert cmp.diff == pytest.approx(100 * np.mean([x.mean() - y.mean() for x, y in zip(a, b)]))
    with pytest.raises(ValueError, match="same evaluation images"):
        paired_bootstrap([a[0]], [b[0][:100]])
    lo, hi = bootstrap_interval([a[0]], resamples=1000)
    assert lo < 100 * a[0].mean() < hi


# ----------------------------------------------------------------------------- choosing the test
def test_compare_trials_picks_the_valid_test():
    seeded_a, seeded_b = Trials({0: 41.0, 1: 42.0, 2: 44.0}), Trials({0: 40.0, 1: 40.5, 2: 41.0})
    assert compare_trials(seeded_a, seeded_b).method == "paired-t"
    unpaired = Trials({5: 40.0, 6: 41.0})
    assert compare_trials(seeded_a, unpaired).method == "welch-t"
    one = Trials({0: 40.0})
    untested = compare_trials(one, Trials({0: 38.0}))
    assert untested.method == "none" and untested.diff == 2.0 and not untested.significant()
    # seed-independent: the seeds do not pair, the single trials do; without outcomes: no test
    knn_a, knn_b = Trials({0: 33.5}, seed_dependent=False), Trials({3: 33.3}, seed_dependent=False)
    cmp = compare_trials(knn_a, knn_b)
    assert cmp.method == "none" and cmp.diff == pytest.approx(0.2) and cmp.n == 1
    # ... with per-image outcomes: the paired bootstrap over images
    o = np.zeros(450)
    o[:150] = 1
    knn_a.outcomes, knn_b.outcomes = {0: o}, {3: o}
    cmp = compare_trials(knn_a, knn_b)
    assert cmp.method == "paired-bootstrap" and not cmp.significant()


def test_identical_seeds_on_both_sides_are_not_evidence():
    # a protocol not (yet) flagged seed-independent: every seed gives the same number on each side
    cmp = compare_trials(Trials({0: 33.5, 1: 33.5, 2: 33.5}), Trials({0: 33.3, 1: 33.3, 2: 33.3}))
    assert cmp.method == "none" and not cmp.significant() and cmp.diff == pytest.approx(0.2)
    # one side constant is still a valid paired t
    assert compare_trials(Trials({0: 33.5, 1: 33.5}), Trials({0: 33.3, 1: 33.0})).method == "paired-t"


def test_cell_summary_uses_images_for_a_single_trial():
    o = np.r_[np.ones(60), np.zeros(40)]
    s = cell_summary(Trials({None: 60.0}, {None: o}, seed_dependent=False), resamples=1000)
    assert s.n == 1 and s.std is None and s.method == "bootstrap" and s.ci_low < 60.0 < s.ci_high
    assert cell_summary(Trials({0: 1.0, 1: 2.0})).method == "t"


def test_bootstrap_interval_matches_the_normal_approximation():
    # 0/1 outcomes, p = 0.5, n = 400: the mean's standard error is 100 * sqrt(0.25 / 400) = 2.5 points
    o = np.r_[np.ones(200), np.zeros(200)]
    lo, hi = bootstrap_interval([o], resamples=4000)
    assert (hi - lo) == pytest.approx(2 * 1.96 * 2.5, rel=0.08)
    assert (lo + hi) / 2 == pytest.approx(50.0, abs=0.5)
