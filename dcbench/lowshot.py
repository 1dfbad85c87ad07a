"""Low-shot linear SVMs (VISSL's VOC07 low-shot benchmark) on top of :mod:`dcbench.svm`.

For each k and each of several independent samples, every class trains on k positives and
(n_classes - 1) * k negatives drawn from the training split (difficult images are never
drawn), one SVM per C of the grid without cross-validation; the test AP of every
(k, sample, class, C) is kept. As in VISSL, the reported C per k is the one with the best
mean mAP over the samples (selected on the test set) unless a C is fixed, and the reported
numbers are that C's mean / min / max / std (population) over the samples.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from dcbench.metrics.ap import voc_class_ap
from dcbench.parallel import split_map
from dcbench.svm import FitStore, SvmParams, fit_svm, l2_normalize, run_parallel, svm_jobs, svm_targets


def lowshot_sample(labels: np.ndarray, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Per class, the rows of one low-shot training set (VISSL): ``k`` positives and
    ``(n_classes - 1) * k`` negatives (label -1; difficult never drawn), each capped at what
    the class has."""
    n_classes = labels.shape[1]
    out = []
    for c in range(n_classes):
        pos, neg = np.flatnonzero(labels[:, c] == 1), np.flatnonzero(labels[:, c] == -1)
        chosen = [rng.choice(pos, size=min(k, len(pos)), replace=False),
                  rng.choice(neg, size=min((n_classes - 1) * k, len(neg)), replace=False)]
        out.append(np.sort(np.concatenate(chosen)))
    return out


def lowshot_sets(labels: np.ndarray, ks: Sequence[int], samples: int, seed: int) -> dict[tuple[int, int], list]:
    """``{(k, sample): per-class rows}`` for every distinct k (in order) and sample; each set
    draws from its own generator seeded ``[seed, k, sample]`` (reproducible one by one)."""
    return {(k, s): lowshot_sample(labels, k, np.random.default_rng([seed, k, s]))
            for k in dict.fromkeys(ks) for s in range(samples)}


def lowshot_unit(x_train: np.ndarray, y: np.ndarray, x_test: np.ndarray, test_labels: np.ndarray,
                 name: str, costs: Sequence[float], params: SvmParams, store: FitStore) -> dict[str, Any]:
    """Test AP of one (k, sample, class) for every C; each finished C is persisted at once."""
    record = store.load_json(name)
    aps = dict(record.get("aps", {}))
    fitted = 0
    for cost in costs:
        key = repr(float(cost))
        if key in aps:
            continue
        fit = fit_svm(x_train, y, cost, params, cross_validate=False)
        ap = voc_class_ap(x_test @ fit["coef"] + fit["intercept"], test_labels)
        aps[key] = None if math.isnan(ap) else ap
        fitted += 1
        store.save_json(name, {"aps": aps})
    return {"aps": [aps[repr(float(c))] for c in costs], "fitted": fitted}


def lowshot_stats(ap: np.ndarray, costs: Sequence[float], fixed_cost: float | None) -> tuple[float, dict[str, float]]:
    """``ap``: samples x costs mAP (fractions). The reported C (VISSL: best mean over the
    samples, else ``fixed_cost``) and its mean / min / max / std (population) x100."""
    if fixed_cost is not None:
        col = list(costs).index(fixed_cost)
    else:
        col = int(np.nanargmax(np.nanmean(ap, axis=0)))
    values = 100.0 * ap[:, col]
    return float(costs[col]), {"mean": float(np.mean(values)), "min": float(np.min(values)),
                               "max": float(np.max(values)), "std": float(np.std(values))}


def lowshot_tap(x_train: np.ndarray, train_labels: np.ndarray, x_test: np.ndarray, test_labels: np.ndarray,
                sets: dict[tuple[int, int], list], classes: Sequence[str], costs: Sequence[float],
                params: SvmParams, store: FitStore, jobs: int) -> tuple[np.ndarray, int]:
    """Every (k, sample, class, C) of one tap (features normalised here): the test APs as an
    array k x samples x classes x costs (NaN where undefined; ks in the order of ``sets``) and
    the number of fits computed now (the others came from ``store``)."""
    x_train, x_test = l2_normalize(x_train), l2_normalize(x_test)
    tasks, names = [], []
    for (k, s), per_class in sets.items():
        for c, cls in enumerate(classes):
            rows = per_class[c]
            tasks.append((x_train[rows], svm_targets(train_labels[rows, c]), x_test, test_labels[:, c],
                          f"k{k}_s{s}_{cls}", costs, params, store))
            names.append((k, s, c))
    rows = max(len(t[0]) for t in tasks)
    # under torchrun each rank runs a share of the units, results gathered (dcbench.parallel.split_map)
    results = split_map(lambda share: run_parallel(lowshot_unit, share, svm_jobs(jobs, len(share), rows,
                                                                                  x_train.shape[1])), tasks)
    k_index = {k: i for i, k in enumerate(dict.fromkeys(k for k, _ in sets))}
    samples = 1 + max(s for _, s in sets)
    ap = np.full((len(k_index), samples, len(classes), len(costs)), np.nan)
    for (k, s, c), res in zip(names, results):
        ap[k_index[k], s, c] = [np.nan if v is None else v for v in res["aps"]]
    return ap, sum(r["fitted"] for r in results)


def lowshot_summary(ap: np.ndarray, ks: Sequence[int], costs: Sequence[float],
                    fixed_cost: float | None) -> list[tuple[int, float, dict[str, float]]]:
    """Per k (distinct, in order) with a test positive in some class: ``(k, reported C,
    stats)`` from :func:`lowshot_tap`'s array (mAP over the classes, then
    :func:`lowshot_stats` over the samples)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN classes (no test positive)
        sample_map = np.nanmean(ap, axis=2)  # k x samples x costs: mAP over the classes
    out = []
    for i, k in enumerate(dict.fromkeys(ks)):
        if np.isnan(sample_map[i]).all():
            continue  # no class has a test positive
        cost, stats = lowshot_stats(sample_map[i], costs, fixed_cost)
        out.append((k, cost, stats))
    return out
