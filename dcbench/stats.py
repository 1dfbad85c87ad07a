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
     over the common seeds (:func:`paired_t`);
  3. otherwise, at least two trials on each side but no common seed: Welch's t-test
     (:func:`welch_t`);
  4. otherwise no test (``method="none"``): e.g. one trial each of a seed-independent
     protocol without stored outcomes.

Percent metrics are assumed (DESIGN.md): an outcome array's mean times :data:`PERCENT` is
the metric. Tests are two-sided at level ``alpha`` (default 0.05); no correction for
multiple comparisons is applied.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats as _sps

__all__ = ["ALPHA", "CONFIDENCE", "RESAMPLES", "Comparison", "Summary", "Trials", "bootstrap_interval",
           "compare_trials", "paired_bootstrap", "paired_t", "summarize", "welch_t"]

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

    def significant(self, alpha: float = ALPHA) -> bool:
        """Whether the difference is significant at level ``alpha`` (False when untestable)."""
        return self.p_value is not None and not math.isnan(self.p_value) and self.p_value < alpha

    @property
    def tested(self) -> bool:
        """Whether a test could be made at all."""
        return self.method != "none"


@dataclass
class Trials:
    """The trials of one cell: ``values[seed]`` (one per seed, re-runs already resolved), the
    per-image outcomes of some of them (``outcomes[seed]``, 1-D), and whether the protocol's
    result depends on the seed at all."""

    values: dict[Any, float]
    outcomes: dict[Any, np.ndarray] = field(default_factory=dict)
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
    """Percentile interval of ``scale * mean`` of per-image outcomes (one array per trial),
    resampling the images (and the trials, when several and ``resample_trials``)."""
    dist = _resampled_means(_stack(outcomes), resamples, np.random.default_rng(seed), resample_trials)
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
    both = _stack(list(a) + list(b))  # one length check for both sides: the same images
    diff = both[:len(a)] - both[len(a):]
    dist = scale * _resampled_means(diff, resamples, np.random.default_rng(seed), resample_trials)
    low, high = _percentile_interval(dist, confidence)
    below, above = int((dist <= 0).sum()), int((dist >= 0).sum())
    p = min(1.0, 2.0 * min(below + 1, above + 1) / (resamples + 1))
    return Comparison(float(scale * diff.mean()), low, high, p, len(a), "paired-bootstrap")


def _paired_keys(a: Trials, b: Trials) -> list[tuple[Any, Any]]:
    """Trials of ``a`` and ``b`` that pair: the common seeds, or the single trial of each side
    for a seed-independent protocol (its seed is irrelevant)."""
    if not (a.seed_dependent and b.seed_dependent):
        return [(next(reversed(a.values)), next(reversed(b.values)))] if a.values and b.values else []
    return [(s, s) for s in a.values if s in b.values]


def _constant(t: Trials) -> bool:
    return t.n >= 2 and len(set(t.values.values())) == 1


def compare_trials(a: Trials, b: Trials, confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                   seed: int = BOOTSTRAP_SEED) -> Comparison:
    """``a - b`` with the valid test for what is stored (see the module docstring). Two cells
    whose seeds all gave one value each behave as seed-independent: identical "trials" are not
    evidence (a t-test on them would call any difference significant)."""
    if a.seed_dependent and b.seed_dependent and _constant(a) and _constant(b):
        a, b = (Trials(t.values, t.outcomes, seed_dependent=False) for t in (a, b))
    pairs = _paired_keys(a, b)
    if pairs and all(ka in a.outcomes and kb in b.outcomes for ka, kb in pairs):
        try:
            boot = paired_bootstrap([a.outcomes[ka] for ka, _ in pairs], [b.outcomes[kb] for _, kb in pairs],
                                    confidence, resamples, seed,
                                    resample_trials=a.seed_dependent and b.seed_dependent)
        except ValueError:
            boot = None  # different evaluation images: fall through to the trial-level tests
        if boot is not None:
            diff = float(np.mean([a.values[ka] - b.values[kb] for ka, kb in pairs]))
            return Comparison(diff, boot.ci_low, boot.ci_high, boot.p_value, boot.n, boot.method)
    seeded = a.seed_dependent and b.seed_dependent
    if seeded and len(pairs) >= 2:
        return paired_t([a.values[k] for k, _ in pairs], [b.values[k] for _, k in pairs], confidence)
    if seeded and not pairs and a.n >= 2 and b.n >= 2:
        return welch_t(list(a.values.values()), list(b.values.values()), confidence)
    # untested: the difference of the cells' means, as the table shows them
    diff = float(np.mean(list(a.values.values())) - np.mean(list(b.values.values())))
    return Comparison(diff, None, None, None, len(pairs), "none")


def cell_summary(trials: Trials, confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                 seed: int = BOOTSTRAP_SEED) -> Summary:
    """:func:`summarize` over the trials; a single trial with per-image outcomes gets the
    bootstrap interval over images instead of none."""
    summary = summarize(list(trials.values.values()), confidence)
    if summary.n == 1 and trials.outcomes:
        (arr,) = list(trials.outcomes.values())[-1:]
        low, high = bootstrap_interval([arr], confidence, resamples, seed)
        return Summary(1, summary.mean, None, low, high, "bootstrap")
    return summary


