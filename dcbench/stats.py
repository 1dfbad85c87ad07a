"""Statistics for result tables: per-cell summaries and paired comparisons of checkpoints.

A *cell* is the trials (seeds) of one comparability key (see :mod:`dcbench.results`).

- :func:`summarize`: n, mean, sample std and a Student-t confidence interval (n >= 2);
  with per-image outcomes and a single trial, :func:`bootstrap_interval` gives the interval
  over evaluation images instead.
- :func:`compare_trials`: the difference between two checkpoints on one setup, tested in the
  way that is valid for what was stored:

  1. per-image outcomes on both sides (same evaluation images): a seeded paired bootstrap over
     the images (:func:`paired_bootstrap`; the same resampled images on both sides), combined
     with the seeds (resampled too) when the protocol has trial randomness;
  2. otherwise, seed trials on both sides with at least two common seeds: a paired t-test
     over the common seeds (:func:`paired_t`); when only one side depends on the seed, its
     trials (two or more) are paired with the other side's single trial (a one-sample t-test);
  3. otherwise, at least two trials on each side but no common seed: Welch's t-test
     (:func:`welch_t`);
  4. otherwise no test (``method="none"``): e.g. one trial each of a seed-independent
     protocol without stored outcomes.

Per-image outcomes come in two forms. A 1-D array (0/1 per image for accuracies, one AP per
query for retrieval mAP) whose mean times :data:`PERCENT` is the metric. Or an
:class:`ImageOutcomes` for metrics that are not means over images (VOC mAP: per-image scores
and labels; mIoU: per-image confusion matrices): its ``statistic`` recomputes the metric from
the image weights of a bootstrap draw (AP re-ranked, confusion re-summed on every resample).

Tests are two-sided at level ``alpha`` (default 0.05). :func:`holm` adjusts the p-values of a
family of comparisons (Holm 1979, step-down Bonferroni); the tables apply it to the
comparisons against a reference (see :func:`dcbench.table.analyze`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats as _sps

from dcbench.metrics.ap import RULES as AP_RULES
from dcbench.metrics.ap import weighted_map
from dcbench.metrics.segmentation import weighted_mean_iou

__all__ = ["ALPHA", "CONFIDENCE", "RESAMPLES", "Comparison", "ImageOutcomes", "Summary", "Trials",
           "bootstrap_interval", "compare_trials", "holm", "map_outcomes", "miou_outcomes", "paired_bootstrap",
           "paired_t", "summarize", "welch_t"]

CONFIDENCE = 0.95
ALPHA = 0.05
RESAMPLES = 2000  # bootstrap resamples (>= 1000 for a stable 95% percentile interval)
BOOTSTRAP_SEED = 0
PERCENT = 100.0
_CHUNK_ELEMENTS = 4_000_000  # multinomial counts drawn per chunk (bounds memory)


@dataclass(frozen=True)
class Summary:
    """One cell: ``n`` trials, their mean, sample std (None for n = 1) and a confidence interval
    (None when there is none); ``method`` says where the interval comes from."""

    n: int
    mean: float
    std: float | None
    ci_low: float | None = None
    ci_high: float | None = None
    method: str = "none"  # "t" (over seeds) | "bootstrap" (over images) | "none"


@dataclass(frozen=True)
class Comparison:
    """``a - b``: the difference, its confidence interval and two-sided p-value (None when
    untestable), the number of paired trials and the test used."""

    diff: float
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    n: int
    method: str  # "paired-bootstrap" | "paired-t" | "welch-t" | "none"
    #: ``p_value`` adjusted for the family of comparisons it was made in (:func:`holm`); None
    #: when it was made alone. :meth:`significant` uses it when set.
    p_adjusted: float | None = None

    def significant(self, alpha: float = ALPHA) -> bool:
        """Whether the difference is significant at level ``alpha`` (False when untestable),
        judged on the adjusted p-value when there is one."""
        p = self.p_adjusted if self.p_adjusted is not None else self.p_value
        return p is not None and not math.isnan(p) and p < alpha

    @property
    def tested(self) -> bool:
        """Whether a test could be made at all."""
        return self.method != "none"


@dataclass(frozen=True)
class ImageOutcomes:
    """Per-image data of one trial for a metric that is not a mean over images.

    ``data`` has one row per evaluation image (in dataset order, the same on both sides of a
    comparison); ``statistic`` names the function in :data:`STATISTICS` that computes the
    metric (a fraction; x :data:`PERCENT` is the stored value) from image weights, one row of
    weights per bootstrap resample. Build them with :func:`map_outcomes` / :func:`miou_outcomes`.
    """

    statistic: str
    data: np.ndarray

    def __post_init__(self) -> None:
        if self.statistic not in STATISTICS:
            raise ValueError(f"unknown outcome statistic {self.statistic!r}; known: {sorted(STATISTICS)}")
        if np.asarray(self.data).ndim != 2:
            raise ValueError(f"ImageOutcomes data must be images x columns, got shape {np.shape(self.data)}")

    def __len__(self) -> int:
        return len(self.data)

    def value(self, weights: np.ndarray) -> np.ndarray:
        """The metric (a fraction) under each row of ``weights`` (resamples x images)."""
        return STATISTICS[self.statistic](np.asarray(self.data), weights)


def _map_statistic(rule: str) -> Any:
    def statistic(data: np.ndarray, weights: np.ndarray) -> np.ndarray:
        classes = data.shape[1] // 2
        return weighted_map(data[:, :classes], data[:, classes:], weights, rule)
    return statistic


#: statistic name -> f(data, weights) -> metric per resample (a fraction)
STATISTICS: dict[str, Any] = {f"map-{rule}": _map_statistic(rule) for rule in AP_RULES}
STATISTICS["miou"] = weighted_mean_iou


def map_outcomes(scores: np.ndarray, labels: np.ndarray, rule: str) -> ImageOutcomes:
    """Outcomes of a VOC classification mAP: images x classes ``scores`` and 1/-1/0 ``labels``;
    ``rule`` as :func:`dcbench.metrics.ap.weighted_class_ap` ("voc07", "all-points", "finetune")."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    if scores.shape != labels.shape or scores.ndim != 2:
        raise ValueError(f"scores and labels must both be images x classes, got {scores.shape} and {labels.shape}")
    return ImageOutcomes(f"map-{rule}", np.concatenate([scores, labels], axis=1))


def miou_outcomes(confusions: np.ndarray) -> ImageOutcomes:
    """Outcomes of an mIoU: one C x C confusion matrix (counts of pixels) per evaluation image."""
    confusions = np.asarray(confusions)
    return ImageOutcomes("miou", confusions.reshape(len(confusions), -1).astype(np.int64))


@dataclass
class Trials:
    """The trials of one cell: ``values[seed]`` (one per seed, re-runs already resolved), the
    per-image outcomes of some of them (``outcomes[seed]``: a 1-D array or
    :class:`ImageOutcomes`), and whether the protocol's result depends on the seed at all."""

    values: dict[Any, float]
    outcomes: dict[Any, np.ndarray | ImageOutcomes] = field(default_factory=dict)
    seed_dependent: bool = True

    @property
    def n(self) -> int:
        return len(self.values)


# ----------------------------------------------------------------------------- one cell
def _t_quantile(confidence: float, df: float) -> float:
    return float(_sps.t.ppf(0.5 + confidence / 2.0, df))


def summarize(values: Sequence[float], confidence: float = CONFIDENCE) -> Summary:
    """n, mean, sample std (ddof 1) and the Student-t interval mean +- t * std / sqrt(n)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("summarize: no values")
    mean = float(x.mean())
    if x.size == 1:
        return Summary(1, mean, None)
    std = float(x.std(ddof=1))
    half = _t_quantile(confidence, x.size - 1) * std / math.sqrt(x.size)
    return Summary(int(x.size), mean, std, mean - half, mean + half, "t")


def _resampled_means(diff: np.ndarray, resamples: int, rng: np.random.Generator,
                     resample_trials: bool) -> np.ndarray:
    """Bootstrap distribution of the mean over trials of the mean over images of ``diff``
    (trials x images): the same image draw for every trial of one resample (the images are
    shared), trials resampled with replacement when ``resample_trials``.

    Drawing n images with replacement only matters through how often each distinct column
    (one image's outcomes over the trials) is drawn, so each resample is one multinomial draw
    over the distinct columns: exact, and O(distinct) instead of O(images) (0/1 outcomes of
    T trials have at most 3^T distinct differences, whatever the size of the val set)."""
    t, n = diff.shape
    values, counts = np.unique(diff.T, axis=0, return_counts=True)  # K x t, K
    out = np.empty(resamples)
    chunk = max(1, _CHUNK_ELEMENTS // max(len(counts), 1))
    for start in range(0, resamples, chunk):
        m = min(chunk, resamples - start)
        draws = rng.multinomial(n, counts / n, size=m)  # m x K
        per_trial = draws @ values / n  # m x t
        if resample_trials and t > 1:
            pick = rng.integers(0, t, size=(m, t))
            per_trial = np.take_along_axis(per_trial, pick, axis=1)
        out[start:start + m] = per_trial.mean(axis=1)
    return out


def _resampled_statistics(a: Sequence[ImageOutcomes], b: Sequence[ImageOutcomes], resamples: int,
                          rng: np.random.Generator, resample_trials: bool) -> np.ndarray:
    """Bootstrap distribution of the mean over trials of ``a[k].value - b[k].value`` (``b``
    empty: of ``a[k].value``): the same image draw (a multinomial weight vector) for every trial
    and both sides of one resample; trials resampled when ``resample_trials``, as
    :func:`_resampled_means`."""
    n, t = len(a[0]), len(a)
    out = np.empty(resamples)
    chunk = max(1, _CHUNK_ELEMENTS // max(n, 1))
    uniform = np.full(n, 1.0 / n)
    for start in range(0, resamples, chunk):
        m = min(chunk, resamples - start)
        weights = rng.multinomial(n, uniform, size=m)  # m x n
        per_trial = np.stack([a[k].value(weights) - (b[k].value(weights) if b else 0.0) for k in range(t)],
                             axis=1)  # m x t
        if resample_trials and t > 1:
            pick = rng.integers(0, t, size=(m, t))
            per_trial = np.take_along_axis(per_trial, pick, axis=1)
        out[start:start + m] = per_trial.mean(axis=1)
    # a resample without any positive of a class / pixel of a class may leave no defined value
    return out[~np.isnan(out)]


def _image_outcomes(outcomes: Sequence[Any]) -> list[ImageOutcomes] | None:
    """The outcomes as ImageOutcomes of one statistic and one image count, or None when they are
    1-D arrays; ValueError when mixed or of different images."""
    structured = [isinstance(o, ImageOutcomes) for o in outcomes]
    if not any(structured):
        return None
    if not all(structured) or len({o.statistic for o in outcomes}) != 1:
        raise ValueError("outcomes mix statistics: not the same metric")
    if len({len(o) for o in outcomes}) != 1 or len({o.data.shape[1] for o in outcomes}) != 1:
        raise ValueError("outcome arrays differ in shape: not the same evaluation images")
    return list(outcomes)


def _percentile_interval(dist: np.ndarray, confidence: float) -> tuple[float, float]:
    lo, hi = np.quantile(dist, [0.5 - confidence / 2.0, 0.5 + confidence / 2.0])
    return float(lo), float(hi)


def _stack(arrays: Sequence[np.ndarray]) -> np.ndarray:
    lengths = {len(a) for a in arrays}
    if len(lengths) != 1:
        raise ValueError(f"outcome arrays differ in length ({sorted(lengths)}): not the same evaluation images")
    return np.stack([np.asarray(a, dtype=float) for a in arrays])


def bootstrap_interval(outcomes: Sequence[np.ndarray], confidence: float = CONFIDENCE,
                       resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED,
                       resample_trials: bool = True, scale: float = PERCENT) -> tuple[float, float]:
    """Percentile interval of the metric (``scale *`` the mean of 1-D per-image outcomes, or of
    the :class:`ImageOutcomes` statistic) over trials, resampling the images (and the trials,
    when several and ``resample_trials``)."""
    rng = np.random.default_rng(seed)
    structured = _image_outcomes(outcomes)
    if structured is not None:
        dist = _resampled_statistics(structured, [], resamples, rng, resample_trials)
    else:
        dist = _resampled_means(_stack(outcomes), resamples, rng, resample_trials)
    if not dist.size:
        raise ValueError("bootstrap_interval: no resample has a defined metric")
    return _percentile_interval(scale * dist, confidence)


# ----------------------------------------------------------------------------- two cells
def paired_t(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> Comparison:
    """Paired t-test of ``a[i] - b[i]`` (trials paired by seed). Zero variance of the
    differences: the interval is the difference itself and p is 0 (all differences equal and
    non-zero, as scipy) or 1 (all zero)."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if d.size < 2:
        return Comparison(float(d.mean()) if d.size else math.nan, None, None, None, int(d.size), "none")
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0.0:
        return Comparison(mean, mean, mean, 0.0 if mean != 0.0 else 1.0, int(d.size), "paired-t")
    se = sd / math.sqrt(d.size)
    half = _t_quantile(confidence, d.size - 1) * se
    p = float(2.0 * _sps.t.sf(abs(mean / se), d.size - 1))
    return Comparison(mean, mean - half, mean + half, p, int(d.size), "paired-t")


def welch_t(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> Comparison:
    """Welch's unequal-variance t-test of mean(a) - mean(b) (unpaired trials)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = float(x.mean() - y.mean()) if x.size and y.size else math.nan
    if x.size < 2 or y.size < 2:
        return Comparison(diff, None, None, None, 0, "none")
    vx, vy = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    se = math.sqrt(vx + vy)
    if se == 0.0:
        return Comparison(diff, diff, diff, 0.0 if diff != 0.0 else 1.0, 0, "welch-t")
    df = (vx + vy) ** 2 / (vx ** 2 / (x.size - 1) + vy ** 2 / (y.size - 1))
    half = _t_quantile(confidence, df) * se
    p = float(2.0 * _sps.t.sf(abs(diff / se), df))
    return Comparison(diff, diff - half, diff + half, p, 0, "welch-t")


def paired_bootstrap(a: Sequence[np.ndarray], b: Sequence[np.ndarray], confidence: float = CONFIDENCE,
                     resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED, resample_trials: bool = True,
                     scale: float = PERCENT) -> Comparison:
    """Paired bootstrap of ``scale * (mean(a) - mean(b))`` over evaluation images.

    ``a[k]`` and ``b[k]`` are the per-image outcomes of trial ``k`` (same seed) on the same
    images in the same order. Each resample draws the images with replacement (the same draw
    for both sides and every trial) and, when ``resample_trials`` and there are several,
    the trials too. Interval: percentiles; p-value: two-sided, ``2 * min(P(d <= 0), P(d >= 0))``
    with the +1 correction (never exactly 0)."""
    if len(a) != len(b) or not len(a):
        raise ValueError("paired_bootstrap: a and b need the same, non-zero number of trials")
    rng = np.random.default_rng(seed)
    structured = _image_outcomes(list(a) + list(b))  # one check for both sides: the same images
    if structured is not None:
        sa, sb = structured[:len(a)], structured[len(a):]
        full = np.ones((1, len(sa[0])))
        point = float(np.mean([x.value(full)[0] - y.value(full)[0] for x, y in zip(sa, sb)]))
        dist = scale * _resampled_statistics(sa, sb, resamples, rng, resample_trials)
    else:
        both = _stack(list(a) + list(b))
        diff = both[:len(a)] - both[len(a):]
        point = float(diff.mean())
        dist = scale * _resampled_means(diff, resamples, rng, resample_trials)
    if not dist.size:
        raise ValueError("paired_bootstrap: no resample has a defined metric")
    low, high = _percentile_interval(dist, confidence)
    below, above = int((dist <= 0).sum()), int((dist >= 0).sum())
    p = min(1.0, 2.0 * min(below + 1, above + 1) / (dist.size + 1))
    return Comparison(scale * point, low, high, p, len(a), "paired-bootstrap")


def _paired_keys(a: Trials, b: Trials) -> list[tuple[Any, Any]]:
    """Trials of ``a`` and ``b`` that pair: the common seeds; the single trial of each side when
    neither depends on the seed; every trial of the seed-dependent side against the single
    trial of the other when only one does (e.g. a random init whose BatchNorm re-estimation
    makes a kNN run depend on the seed, against a trained checkpoint's one run): the fixed side
    is the same whatever the seed, so the difference is over all of the varying side's trials,
    as the table's cells show them, and its spread over seeds counts."""
    if not a.values or not b.values:
        return []
    if a.seed_dependent and b.seed_dependent:
        return [(s, s) for s in a.values if s in b.values]
    last_a, last_b = next(reversed(a.values)), next(reversed(b.values))
    if a.seed_dependent:
        return [(s, last_b) for s in a.values]
    if b.seed_dependent:
        return [(last_a, s) for s in b.values]
    return [(last_a, last_b)]


def _constant(t: Trials) -> bool:
    return t.n >= 2 and len(set(t.values.values())) == 1


def compare_trials(a: Trials, b: Trials, confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                   seed: int = BOOTSTRAP_SEED) -> Comparison:
    """``a - b`` with the valid test for what is stored (see the module docstring). Two cells
    whose seeds all gave one value each behave as seed-independent: identical "trials" are not
    evidence (a t-test on them would call any difference significant)."""
    # a side whose seeds all gave one value is one value: against a fixed side (or another such
    # side) its "trials" would make a zero-variance t-test call any difference significant
    if not (a.seed_dependent and b.seed_dependent) or (_constant(a) and _constant(b)):
        a, b = (Trials(t.values, t.outcomes, seed_dependent=False) if _constant(t) else t for t in (a, b))
    pairs = _paired_keys(a, b)
    # trials vary (and are resampled) when either side depends on the seed (see _paired_keys)
    seeded = a.seed_dependent or b.seed_dependent
    if pairs and all(ka in a.outcomes and kb in b.outcomes for ka, kb in pairs):
        try:
            boot = paired_bootstrap([a.outcomes[ka] for ka, _ in pairs], [b.outcomes[kb] for _, kb in pairs],
                                    confidence, resamples, seed, resample_trials=seeded)
        except ValueError:
            boot = None  # different evaluation images: fall through to the trial-level tests
        if boot is not None:
            diff = float(np.mean([a.values[ka] - b.values[kb] for ka, kb in pairs]))
            return Comparison(diff, boot.ci_low, boot.ci_high, boot.p_value, boot.n, boot.method)
    if seeded and len(pairs) >= 2:
        return paired_t([a.values[k] for k, _ in pairs], [b.values[k] for _, k in pairs], confidence)
    if a.seed_dependent and b.seed_dependent and not pairs and a.n >= 2 and b.n >= 2:
        return welch_t(list(a.values.values()), list(b.values.values()), confidence)
    # untested: the difference of the cells' means, as the table shows them
    diff = float(np.mean(list(a.values.values())) - np.mean(list(b.values.values())))
    return Comparison(diff, None, None, None, len(pairs), "none")


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (Holm 1979): the k-th smallest of m p-values times
    (m - k + 1), made monotone, capped at 1. Rejecting where the adjusted p < alpha controls the
    family-wise error rate at alpha for any dependence between the tests. None / NaN entries
    (untested comparisons) are not part of the family and stay as they are."""
    tested = [(p, i) for i, p in enumerate(p_values) if p is not None and not math.isnan(p)]
    out: list[float | None] = list(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(tested)):
        running = max(running, min(1.0, (len(tested) - rank) * p))
        out[i] = running
    return out


def cell_summary(trials: Trials, confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                 seed: int = BOOTSTRAP_SEED) -> Summary:
    """:func:`summarize` over the trials; a single trial with per-image outcomes gets the
    bootstrap interval over images instead of none."""
    summary = summarize(list(trials.values.values()), confidence)
    if summary.n == 1 and trials.outcomes:
        (arr,) = list(trials.outcomes.values())[-1:]
        try:
            low, high = bootstrap_interval([arr], confidence, resamples, seed)
        except ValueError:  # no resample defines the metric (e.g. a single positive): no interval
            return summary
        return Summary(1, summary.mean, None, low, high, "bootstrap")
    return summary


