"""Linear SVMs on frozen features, as VISSL's VOC07 SVM benchmark trains them (Goyal et al.
2019), with a persistent, resumable store of finished fits.

Per class a one-vs-rest ``LinearSVC(C, class_weight={1: w, -1: 1}, squared hinge, L2, dual,
tol, max_iter)`` is fitted for each C of a grid on L2-normalised features
``x / (||x|| + 1e-5)``; C is chosen by stratified k-fold cross-validation scored by average
precision (first of equals in grid order), then the model is refitted on all rows. Training
counts difficult images (label 0) as negatives; the test AP leaves them out (VOC
all-points). Classes are fitted in parallel threads (liblinear releases the GIL), and under
torchrun shared by the ranks (:func:`dcbench.parallel.split_map`), results gathered.

Every finished (class, C) fit is written to a :class:`FitStore` (one file per fit, atomic),
keyed by the training features, their rows and labels and the SVM settings, so an
interrupted run resumes without refitting them. Each file carries the sha256 of its content
(:func:`content_sha256`): a truncated or corrupted fit is reported in one warning line, refitted
and rewritten, never used.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dcbench.errors import DataError
from dcbench.features import key_hash
from dcbench.parallel import split_map
from dcbench.fileio import atomic_write_bytes
from dcbench.metrics.ap import voc_class_ap

log = logging.getLogger("dcbench")

#: C used when cross-validation is impossible (fewer than 2 positives or negatives)
FALLBACK_COST = 1.0
#: feature normalisation of VISSL: x / (||x|| + NORM_EPS)
NORM_EPS = 1e-5
#: bump when the persisted SVM fits change meaning (2: files carry a sha256 of their content;
#: version-1 stores are never matched)
FIT_STORE_VERSION = 2


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """VISSL's row normalisation ``x / (||x|| + 1e-5)``, in float64 (liblinear's type)."""
    x = np.asarray(x, dtype=np.float64)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + NORM_EPS)


def svm_targets(labels: np.ndarray) -> np.ndarray:
    """Training targets from 1/-1/0 labels: difficult (0) counts as negative (VISSL)."""
    return np.where(np.asarray(labels) == 1, 1, -1).astype(np.int64)


def check_trainable(labels: np.ndarray, classes: Sequence[str], split: str, difficult_negative: bool = True) -> None:
    """DataError naming the first class whose training labels (1 / -1 / 0) lack a positive or a
    negative: liblinear cannot fit a one-class problem. ``difficult_negative``: difficult (0)
    images count as negatives (voc07-svm); the low-shot sets draw negatives from -1 only."""
    labels = np.asarray(labels)
    for c, cls in enumerate(classes):
        column = labels[:, c] if labels.ndim == 2 and len(labels) else np.zeros(0)
        n_pos = int((column == 1).sum())
        n_neg = int(np.isin(column, (-1, 0) if difficult_negative else (-1,)).sum())
        if n_pos == 0 or n_neg == 0:
            kept = [k for k in classes if k != cls]
            hint = f"leave it out with --set classes=[{','.join(kept)}]" if kept else "add images of both kinds"
            kind = "positive" if n_pos == 0 else "negative"
            raise DataError(f"class {cls} has no {kind} image in {split}, so no SVM can be trained for it; "
                            f"check ImageSets/Main/{cls}_{split}.txt or {hint}")


@dataclass(frozen=True)
class SvmParams:
    """The liblinear settings of one fit (everything but C)."""

    positive_weight: float = 2.0
    max_iter: int = 2000
    tol: float = 1e-4
    cv_folds: int = 3
    random_state: int = 0

    def svc(self, cost: float) -> Any:
        """``LinearSVC`` as VISSL builds it."""
        from sklearn.svm import LinearSVC  # noqa: PLC0415 (heavy)

        return LinearSVC(C=cost, class_weight={1: self.positive_weight, -1: 1}, penalty="l2", loss="squared_hinge",
                         dual=True, tol=self.tol, max_iter=self.max_iter, intercept_scaling=1.0,
                         random_state=self.random_state)

    def describe(self) -> dict[str, Any]:
        """JSON-safe, part of the fit-store key and of the result."""
        return {"class_weight": {"1": self.positive_weight, "-1": 1}, "loss": "squared_hinge", "penalty": "l2",
                "dual": True, "tol": self.tol, "max_iter": self.max_iter, "cv_folds": self.cv_folds,
                "cv_scoring": "average_precision", "random_state": self.random_state,
                "normalisation": f"x / (||x|| + {NORM_EPS})"}


def fit_svm(x: np.ndarray, y: np.ndarray, cost: float, params: SvmParams, cross_validate: bool = True) -> dict:
    """One (class, C) fit: mean CV average precision (stratified folds; NaN when a class has
    fewer than 2 positives or negatives, or without CV), then a refit on all rows."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score  # noqa: PLC0415 (heavy)

    n_pos, n_neg = int((y == 1).sum()), int((y == -1).sum())
    folds = min(params.cv_folds, n_pos, n_neg) if cross_validate else 0
    cv_ap = float("nan")
    if folds >= 2:
        scores = cross_val_score(params.svc(cost), x, y, cv=StratifiedKFold(folds), scoring="average_precision")
        valid = scores[~np.isnan(scores)]  # a failed fold scores NaN
        cv_ap = float(valid.mean()) if valid.size else cv_ap
    clf = params.svc(cost).fit(x, y)
    return {"cv_ap": cv_ap, "coef": np.asarray(clf.coef_, dtype=np.float64).ravel(),
            "intercept": float(np.ravel(clf.intercept_)[0]), "n_iter": int(np.max(clf.n_iter_)), "folds": folds}


def choose_cost(cv_aps: Sequence[float], costs: Sequence[float]) -> float:
    """The C with the best CV AP (first of equals, grid order); :data:`FALLBACK_COST` when CV was impossible."""
    values = np.asarray(cv_aps, dtype=np.float64)
    if np.isnan(values).all():
        return FALLBACK_COST
    return float(costs[int(np.nanargmax(values))])


# ----------------------------------------------------------------------------- fit store
def array_digest(array: np.ndarray) -> str:
    """16 hex chars over the bytes of ``array`` (C order)."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def content_sha256(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every array, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _json_sha256(record: Any) -> str:
    """sha256 of ``record`` as canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def fit_store_key(kind: str, features_key: Mapping[str, Any], rows: np.ndarray, labels: np.ndarray,
                  params: SvmParams, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a stored fit depends on: the training features (their feature-cache key), their
    rows and labels, the SVM settings, and ``extra`` (what else the caller's fits depend on)."""
    return {"kind": kind, "version": FIT_STORE_VERSION, "features": key_hash(features_key),
            "rows": array_digest(rows), "labels": array_digest(labels), "svm": params.describe(), **(extra or {})}


class FitStore:
    """Finished SVM fits in one folder (None: nothing persisted). One file per unit of work,
    written atomically, so concurrent threads never share a file and no half-written fit
    survives an interruption."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def for_key(cache_dir: Path | None, ckpt_sha: str, key: dict[str, Any]) -> "FitStore":
        """The store of ``key`` under ``<cache_dir>/<sha[:16]>/svm/`` (beside the features)."""
        if cache_dir is None:
            return FitStore(None)
        folder = Path(cache_dir) / ckpt_sha[:16] / "svm" / key_hash(key)
        store = FitStore(folder)
        meta = folder / "key.json"
        if not meta.exists():
            atomic_write_bytes(meta, json.dumps(key, indent=1, sort_keys=True).encode())
        return store

    def _path(self, name: str, suffix: str) -> Path:
        safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)
        return self.folder / f"{safe}{suffix}"

    def load_fit(self, name: str) -> dict | None:
        """A fit saved by :meth:`save_fit`, or None (absent, unreadable or corrupted: refit it)."""
        path = self._path(name, ".npz") if self.folder is not None else None
        if path is None or not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as exc:  # noqa: BLE001 - a damaged zip raises BadZipFile, zlib.error, EOFError...
            log.warning("SVM fit %s is unreadable (%s); refitting it", path, exc)
            return None
        stored = str(arrays.pop("_sha256", ""))
        if stored != content_sha256(arrays):
            log.warning("SVM fit %s is corrupted (sha256 mismatch); refitting it", path)
            return None
        try:
            return {"cv_ap": float(arrays["cv_ap"]), "coef": arrays["coef"], "intercept": float(arrays["intercept"]),
                    "n_iter": int(arrays["n_iter"]), "folds": int(arrays["folds"])}
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("SVM fit %s is incomplete (%s); refitting it", path, exc)
            return None

    def save_fit(self, name: str, fit: dict) -> None:
        """Persist one fit (coef, intercept, CV AP) with the sha256 of its arrays."""
        if self.folder is None:
            return
        arrays = {k: np.asarray(v) for k, v in fit.items()}
        buf = io.BytesIO()
        np.savez(buf, **arrays, _sha256=np.asarray(content_sha256(arrays)))
        atomic_write_bytes(self._path(name, ".npz"), buf.getvalue())

    def load_json(self, name: str) -> dict:
        """A JSON record saved by :meth:`save_json` ({} when absent, unreadable or corrupted)."""
        path = self._path(name, ".json") if self.folder is not None else None
        if path is None or not path.exists():
            return {}
        try:
            wrapped = json.loads(path.read_text())
            record, stored = wrapped["record"], wrapped["sha256"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("SVM record %s is unreadable (%s); recomputing it", path, exc)
            return {}
        if not isinstance(record, dict) or stored != _json_sha256(record):
            log.warning("SVM record %s is corrupted (sha256 mismatch); recomputing it", path)
            return {}
        return record

    def save_json(self, name: str, record: dict) -> None:
        """Persist a small JSON record with its sha256."""
        if self.folder is not None:
            wrapped = {"record": record, "sha256": _json_sha256(record)}
            atomic_write_bytes(self._path(name, ".json"), json.dumps(wrapped, sort_keys=True).encode())

    def count(self) -> int:
        """Files stored (fits and records)."""
        if self.folder is None:
            return 0
        return sum(1 for p in self.folder.iterdir() if p.suffix in (".npz", ".json") and p.name != "key.json")


# ----------------------------------------------------------------------------- per class, per tap
@dataclass
class ClassResult:
    """The chosen fit of one class: C, its CV AP per C, and the weights."""

    cls: str
    cost: float
    cv_aps: list[float]
    coef: np.ndarray
    intercept: float
    fitted: int  # fits computed now (the others came from the store)
    not_converged: int


def train_class(x: np.ndarray, y: np.ndarray, cls: str, costs: Sequence[float], params: SvmParams,
                store: FitStore) -> ClassResult:
    """Every C of the grid for one class (stored fits reused), then the C chosen by CV."""
    fits, fitted = {}, 0
    for cost in costs:
        name = f"{cls}__C{float(cost)!r}"
        fit = store.load_fit(name)
        if fit is None:
            fit = fit_svm(x, y, cost, params)
            store.save_fit(name, fit)
            fitted += 1
        fits[cost] = fit
    cv_aps = [fits[c]["cv_ap"] for c in costs]
    cost = choose_cost(cv_aps, costs)
    best = fits.get(cost)
    if best is None:  # CV was impossible and the fallback C is not in the grid
        best = fit_svm(x, y, cost, params, cross_validate=False)
    return ClassResult(cls, cost, cv_aps, best["coef"], best["intercept"], fitted,
                       sum(1 for f in fits.values() if f["n_iter"] >= params.max_iter))


def svm_jobs(setting: int, n_tasks: int, n_rows: int, dim: int) -> int:
    """Threads for the fits: ``setting`` when positive; else min(tasks, cores, memory), where a
    fit holds about 24 bytes per feature value (a float64 fold copy plus liblinear's
    (index, value) nodes)."""
    if setting > 0:
        return max(1, min(setting, n_tasks))
    per_fit = max(1, n_rows * (dim + 2) * 24)
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        free = 0
    by_memory = max(1, int(0.5 * free // per_fit)) if free else n_tasks
    return max(1, min(n_tasks, os.cpu_count() or 1, by_memory))


def run_parallel(fn: Callable, tasks: Sequence[tuple], jobs: int) -> list:
    """``[fn(*t) for t in tasks]`` on ``jobs`` threads (liblinear releases the GIL). The
    ConvergenceWarning of liblinear is counted by the callers instead of printed per fit."""
    from joblib import Parallel, delayed  # noqa: PLC0415 (heavy)
    from sklearn.exceptions import ConvergenceWarning  # noqa: PLC0415

    with warnings.catch_warnings():  # set in this thread, before the workers start: no filter race
        warnings.simplefilter("ignore", ConvergenceWarning)
        if jobs <= 1:
            return [fn(*t) for t in tasks]
        return Parallel(n_jobs=jobs, prefer="threads")(delayed(fn)(*t) for t in tasks)


def svm_tap(x_train: np.ndarray, train_labels: np.ndarray, x_test: np.ndarray, test_labels: np.ndarray,
            classes: Sequence[str], costs: Sequence[float], params: SvmParams, store: FitStore,
            jobs: int) -> tuple[list[float], list[ClassResult]]:
    """One tap: per class the CV-chosen SVM, then its test AP (all-points, difficult
    excluded). Features are normalised here."""
    x_train, x_test = l2_normalize(x_train), l2_normalize(x_test)
    tasks = [(x_train, svm_targets(train_labels[:, c]), cls, costs, params, store) for c, cls in enumerate(classes)]
    # under torchrun each rank fits a share of the classes (every C of each; distinct fit files) and
    # the fits are gathered: the same deterministic liblinear fits as one process
    results = split_map(lambda share: run_parallel(train_class, share, svm_jobs(jobs, len(share), *x_train.shape)),
                        tasks)
    aps = [voc_class_ap(x_test @ r.coef + r.intercept, test_labels[:, c]) for c, r in enumerate(results)]
    return aps, results


def describe_results(results: Sequence[ClassResult], n_costs: int) -> dict[str, Any]:
    """The per-tap record of :func:`svm_tap`'s fits: chosen C and CV AP (x100) per class,
    fits computed now / reused from the store, fits that hit ``max_iter``."""
    computed = sum(r.fitted for r in results)
    return {"chosen_cost": {r.cls: r.cost for r in results},
            "cv_ap": {r.cls: [None if np.isnan(v) else round(100 * v, 3) for v in r.cv_aps] for r in results},
            "fits_computed": computed, "fits_reused": len(results) * n_costs - computed,
            "not_converged": sum(r.not_converged for r in results)}
