"""Pascal VOC 2007 classification with linear SVMs on frozen features: per layer
(``voc07-svm``, Goyal et al., "Scaling and Benchmarking Self-Supervised Visual Representation
Learning", ICCV 2019) and low-shot (``voc07-lowshot``), as VISSL runs them
(facebookresearch/vissl, ``vissl/utils/svm_utils/svm_trainer.py`` and
``svm_low_shot_trainer.py``). The SVM library is :mod:`dcbench.svm` / :mod:`dcbench.lowshot`.

Labels come from ``ImageSets/Main/<cls>_<split>.txt``: 1 positive, -1 negative, 0 difficult.
Train on trainval and test on test (``train_split=train``: train -> val, for tuning).

``voc07-svm``: per tap, features of the whole image squashed to image_size x image_size
(VISSL's ``Resize 256``, ``Resize [224, 224]``; ``resize=crop``: Resize + centre crop), pooled as for
the linear probes (``preset``), L2-normalised ``x / (||x|| + 1e-5)``; per class a one-vs-rest
``LinearSVC(C, class_weight={1: 2, -1: 1}, squared hinge, L2, dual, tol 1e-4, max_iter 2000)``
for each C of the grid, C chosen by 3-fold (stratified) cross-validation on trainval scored by
average precision, refit on all of trainval; training counts difficult images as negatives,
the test leaves them out; AP = VOC all-points (area under the monotone precision envelope).
Classes are fitted in parallel threads; each finished (class, C) fit is kept in the feature-cache
folder (keyed by features, labels and SVM settings): an interrupted run does not refit it.

``voc07-lowshot``: for k in {1, 2, 4, 8, 16, 32, 64, 96} and 5 independent samples, each
class trains on k positives and (n_classes - 1) * k negatives drawn from trainval (difficult
images are never drawn), one SVM per C without cross-validation; test mAP per (k, sample, C).
As in VISSL, the reported C is the one with the best mean mAP over the samples (selected on
the test set; ``cost`` fixes it instead) and the rows are that C's mean / min / max / std
(population) over the samples.

Taps: every conv tap by default; on a ViT its ``cls`` token (as ``linear`` / ``knn``). Published
weights are read with their own mean, std and interpolation (``input_convention=weights``;
``resize=crop``: also their crop ratio; :func:`dcbench.data.transforms.resolve_convention`),
recorded in ``extra.input_convention``; other checkpoints with VISSL's view. Features come
through the run context (:meth:`RunContext.frozen_backbone`, :meth:`RunContext.extract`).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from dcbench.data.transforms import (ConventionMode, InputConvention, convention_center_id,
                                     convention_center_transform, convention_squash_id, convention_squash_transform,
                                     describe_applied, resolve_convention, resolve_uncropped_convention)
from dcbench.errors import UsageError
from dcbench.features import feature_key, key_hash, pool_id
from dcbench.lowshot import lowshot_sets, lowshot_summary, lowshot_tap
from dcbench.metrics.ap import mean_ap
from dcbench.pooling import probe_pooling, resolve_taps
from dcbench.protocol import (Deviation, EvalContext, FrozenFeatureSettings, Protocol, ProtocolOutput,
                              register_protocol, setting)
from dcbench.provenance import FROZEN_FEATURE_SOURCES
from dcbench.results import MetricRow, outcome_key
from dcbench.stats import map_outcomes
from dcbench.svm import (FitStore, SvmParams, array_digest, check_trainable, describe_results, fit_store_key,
                         l2_normalize, svm_tap)
from dcbench.voc_classification import VOC07_LAYOUT, VocData, ap_rows, check_classes, labels_of, load_voc_data

log = logging.getLogger("dcbench")

#: the C grid of VISSL's VOC07 SVM benchmark (its configs' SVM costs_list, read by svm_trainer.py)
COSTS = [0.01, 0.1, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 50.0, 100.0, 1000.0]
#: positives per class of VISSL's VOC07 low-shot benchmark
LOW_SHOT_KS = [1, 2, 4, 8, 16, 32, 64, 96]


# ============================================================================= settings
@dataclass
class _SvmCommon(FrozenFeatureSettings):
    """Settings shared by ``voc07-svm`` and ``voc07-lowshot``."""

    preset: Literal["vissl", "deepcluster"] = setting(
        "vissl", "pooling of each tap: the linear-probe table of this preset (VISSL's for the SVM benchmark)")
    costs: list[float] = setting(help="the grid of SVM costs C", factory=lambda: list(COSTS))
    # svm_trainer.py: LinearSVC(class_weight={1: 2, -1: 1}, tol=0.0001); max_iter 2000 from the benchmark config
    positive_weight: float = setting(2.0, "class_weight of the positives (negatives: 1)")
    max_iter: int = setting(2000, "liblinear iterations")
    tol: float = setting(1e-4, "liblinear stopping tolerance")
    image_size: int = setting(224, "input side in px (how the image gets there: resize)")
    # the benchmark configs' TRANSFORMS: Resize 256, Resize [224, 224] (the whole image, no crop)
    resize: Literal["squash", "crop"] = setting(
        "squash", "squash: the whole image resized to (s, s), no crop (VISSL; voc07-svm first resizes the short "
                  "side to round(s*256/224), as its configs); crop: Resize(round(s*256/224)) then CenterCrop(s)")
    input_convention: ConventionMode = setting(
        "weights", "weights: published weights (timm/tv/hf-hub) are read with their own mean, std and interpolation "
                   "(resize=crop: and crop ratio); preset: always ImageNet mean/std, bilinear (VISSL's)")
    batch_size: int = setting(256, "extraction batch size")
    train_split: Literal["trainval", "train"] = setting(
        "trainval", "trainval: train on trainval, test on test (report); train: train on train, test on val")
    classes: list[str] | None = setting(
        None, "classes to evaluate (default: the VOC classes whose ImageSets/Main files exist; all 20 on VOC2007)")
    jobs: int = setting(0, "parallel SVM fits (threads); 0 = auto: min(classes, CPU cores, what free memory allows)",
                        numbers=False)
    cache: bool = setting(
        True, "read/write features and finished SVM fits in the feature cache (resumes interrupted runs)",
        numbers=False)
    seed: int = setting(0, "seed of BN re-estimation, liblinear and low-shot sampling", numbers=False)
    bn_recalibrate: Literal["auto", "on", "off"] = setting(
        "auto", "re-estimate BatchNorm running stats on trainval on a copy before extracting; "
                "auto = on for random inits")

    def validate(self) -> None:
        """Raise UsageError for impossible values."""
        super().validate()
        if self.max_iter < 1:
            raise UsageError(f"bad value {self.max_iter} for max_iter: must be at least 1")
        if not self.costs or any(c <= 0 for c in self.costs):
            raise UsageError(f"bad value {self.costs} for costs: give positive numbers")
        if self.positive_weight <= 0 or self.tol <= 0:
            raise UsageError("bad value: positive_weight and tol must be positive")
        if self.jobs < 0:
            raise UsageError(f"bad value {self.jobs} for jobs: 0 (auto) or a positive count")
        check_classes(self.classes)


@dataclass
class VocSvmSettings(_SvmCommon):
    """Settings of ``voc07-svm`` (defaults: VISSL's VOC07 SVM benchmark)."""

    # svm_trainer.py: cross_val_score(cv=cross_val_folds), 3 in the benchmark config
    cv_folds: int = setting(3, "cross-validation folds choosing C per class")

    def validate(self) -> None:
        """Raise UsageError for impossible values."""
        super().validate()
        if self.cv_folds < 2:
            raise UsageError(f"bad value {self.cv_folds} for cv_folds: at least 2")


@dataclass
class VocLowShotSettings(_SvmCommon):
    """Settings of ``voc07-lowshot`` (defaults: VISSL's VOC07 low-shot benchmark)."""

    ks: list[int] = setting(help="positives per class in each low-shot training set (capped at what the class has)",
                            factory=lambda: list(LOW_SHOT_KS))
    samples: int = setting(5, "independent samples per k")
    cost: float | None = setting(
        None, "fixed C; default (VISSL): per k, the C of the grid with the best mean test mAP over the samples")

    def validate(self) -> None:
        """Raise UsageError for impossible values."""
        super().validate()
        if not self.ks or any(k < 1 for k in self.ks):
            raise UsageError(f"bad value {self.ks} for ks: give positive integers, e.g. [1,2,4]")
        if self.samples < 1:
            raise UsageError(f"bad value {self.samples} for samples: at least 1")
        if self.cost is not None and self.cost <= 0:
            raise UsageError(f"bad value {self.cost} for cost: must be positive")


# ============================================================================= features
@dataclass
class _Features:
    """Extracted features of both splits for every tap, and how they were made."""

    train: Any  # ExtractedFeatures
    test: Any
    pooling: dict[str, Any]
    pool_ids: dict[str, str]
    sha: str
    bn_info: dict[str, Any] | None
    transform_id: str
    fingerprints: tuple[str, str]  # train, test datasets
    device: Any = "cpu"  # the extraction device: its numerics are part of the key (as the feature cache's)
    convention: dict[str, Any] | None = None  # the input convention used (extra.input_convention)

    def key(self, tap: str, split: int = 0) -> dict[str, Any]:
        """The feature-cache key of ``tap`` on the train (0) or test (1) split (also keys the SVM fits)."""
        return feature_key(self.sha, tap, self.transform_id, self.fingerprints[split], self.pool_ids[tap],
                           device=self.device)


def voc_view(image_size: int, resize: str, pre_resize: bool,
             convention: InputConvention | None = None) -> tuple[Any, str]:
    """The image transform of ``resize`` (squash: with/without VISSL's Resize 256 first; crop:
    Resize + centre crop) and its feature-cache id, with ``convention``'s filter and
    normalisation (default: the preset's, ImageNet mean/std, bilinear; the crop ratio only
    matters to ``crop``: a squash keeps the whole image)."""
    convention = convention or InputConvention()
    if resize == "squash":
        return (convention_squash_transform(image_size, pre_resize, convention),
                convention_squash_id(image_size, pre_resize, convention))
    return convention_center_transform(image_size, convention), convention_center_id(image_size, convention)


def voc_convention(backbone: Any, settings: _SvmCommon) -> InputConvention:
    """The input convention of the VOC view (:func:`dcbench.data.transforms.resolve_convention`;
    a squash never crops, so the weights' crop mode cannot be refused there)."""
    if settings.resize == "squash":
        return resolve_uncropped_convention(backbone, settings.input_convention)
    return resolve_convention(backbone, settings.input_convention)


def describe_convention(convention: InputConvention, resize: str) -> dict[str, Any]:
    """The result's ``extra.input_convention``: the convention and which parts the view used."""
    if resize == "squash":
        return describe_applied(convention, "mean, std, interpolation (whole image squashed: no crop ratio)")
    return describe_applied(convention, "mean, std, interpolation, crop ratio")


def extract_voc_features(ckpt: Any, data: VocData, taps: list[str], settings: _SvmCommon,
                         ctx: EvalContext, pre_resize: bool = True) -> _Features:
    """Pooled features of train and test splits (transform: :func:`voc_view`), through the run
    context (BN re-estimation on the training images and the feature cache, per the settings)."""
    plans = probe_pooling(ckpt.backbone, taps, settings.image_size, settings.preset)
    pools = {t: p.module() for t, p in plans.items()}
    convention = voc_convention(ckpt.backbone, settings)
    transform, transform_id = voc_view(settings.image_size, settings.resize, pre_resize, convention)
    datasets = [split.dataset(transform) for split in (data.train, data.test)]
    with ctx.frozen_backbone(ckpt, datasets[0]) as (backbone, sha):
        train, test = [ctx.extract(backbone, sha, ds, taps, pools, transform_id) for ds in datasets]
    return _Features(train, test, {t: p.describe() for t, p in plans.items()},
                     {t: pool_id(pools[t]) for t in taps}, sha, ctx.bn_info, transform_id,
                     (datasets[0].fingerprint(), datasets[1].fingerprint()), ctx.device,
                     describe_convention(convention, settings.resize))


def _svm_extra(feats: _Features, params: SvmParams, settings: _SvmCommon, data: VocData) -> dict[str, Any]:
    return {**data.describe(), "pooling": feats.pooling, "preset": settings.preset, "svm": params.describe(),
            "ap_rule": "VOC all-points (area under the monotone precision envelope), difficult excluded",
            "train_labels": "difficult counted as negative", "resize": settings.resize,
            "crops": "whole image squashed to a square" if settings.resize == "squash" else "center",
            "input_convention": feats.convention, "taps": list(feats.pool_ids),
            "bn_recalibrate": feats.bn_info,
            "skipped_images": {data.train.split: len(data.train) - len(feats.train.indices),
                               data.test.split: len(data.test) - len(feats.test.indices)},
            "fit_store": "feature cache" if settings.cache else "off", "costs": list(settings.costs)}


# ============================================================================= provenance
_VISSL = "facebookresearch/vissl"
_SVM_CFG = (f"{_VISSL} configs/config/benchmark/linear_image_classification/voc07/"
            "eval_alexnet_8gpu_transfer_voc07_svm.yaml")
_LOWSHOT_CFG = (f"{_VISSL} configs/config/benchmark/low_shot_transfer/voc07/"
                "eval_resnet_8gpu_transfer_voc07_low_shot_svm.yaml")
_TRAINER = f"{_VISSL} vissl/utils/svm_utils/svm_trainer.py"
SVM_SOURCES = {**FROZEN_FEATURE_SOURCES,
    "seed": "dcbench choice: seeds BN re-estimation, liblinear and low-shot sampling; cannot be a deviation",
    "batch_size": "dcbench choice: extraction batch (VISSL BATCHSIZE_PER_REPLICA 32); moves only BN re-estimation "
                  "of random inits",
    "taps": f"{_SVM_CFG} MODEL.EVAL_FEATURES conv1..conv5 (ResNets: conv1, res2..res5); dcbench's default: every "
            "conv tap, the cls token on ViTs (as linear / knn)",
    "input_convention": "dcbench choice (issue 19): published weights (timm pretrained_cfg, torchvision "
                        "weights.transforms()) are read with their own mean, std and interpolation (and crop ratio "
                        "with resize=crop; a squash keeps the whole image); random inits and dcbench/DeepCluster "
                        "checkpoints have no convention of their own and get VISSL's (ImageNet mean/std, bilinear)",
    "image_size": f"{_SVM_CFG} TRANSFORMS Resize [224, 224]",
    "cache": "dcbench choice: the feature cache and finished fits; cannot move the numbers",
    "preset": f"vissl: the pooling table of {_SVM_CFG} MODEL.TRUNK.LINEAR_FEAT_POOL_OPS (ResNets: "
              "LINEAR_EVAL_FEAT_POOL_OPS_MAP); deepcluster: eval_linear.py's pools (a dcbench option)",
    "costs": f"{_SVM_CFG} SVM.costs.costs_list",
    "positive_weight": f"{_TRAINER} LinearSVC(class_weight={{1: 2, -1: 1}})",
    "max_iter": f"{_SVM_CFG} SVM.max_iter 2000",
    "tol": f"{_TRAINER} LinearSVC(tol=0.0001); SVM.loss squared_hinge, penalty l2, dual True, normalize True",
    "resize": f"{_SVM_CFG} DATA.TRAIN/TEST.TRANSFORMS: Resize 256, Resize [224, 224] (the whole image, no crop)",
    "train_split": "Goyal et al., ICCV 2019 paper: VOC07 SVMs trained on trainval, tested on test",
    "classes": "dcbench choice: the VOC classes whose ImageSets/Main files exist (all 20 on VOC2007)",
    "jobs": "dcbench choice: parallel fits; cannot move the numbers",
    "cv_folds": f"{_SVM_CFG} SVM.cross_val_folds 3 ({_TRAINER} cross_val_score, scoring average precision)",
}
LOWSHOT_SOURCES = {
    **SVM_SOURCES,
    "taps": f"{_LOWSHOT_CFG} evaluates res4, res5 of ResNet-50; dcbench: every conv tap (per-tap numbers "
            "unchanged), the cls token on ViTs",
    "image_size": f"{_LOWSHOT_CFG} TRANSFORMS Resize [224, 224]",
    "resize": f"{_LOWSHOT_CFG} DATA.TRAIN/TEST.TRANSFORMS: Resize [224, 224] (the whole image, no crop)",
    "costs": f"{_LOWSHOT_CFG} SVM.costs.costs_list",
    "ks": f"{_LOWSHOT_CFG} SVM.low_shot.k_values",
    "samples": f"{_LOWSHOT_CFG} SVM.low_shot.sample_inds [1, 2, 3, 4, 5]",
    "cost": f"{_VISSL} vissl/utils/svm_utils/svm_low_shot_trainer.py: per k, the cost with the best mean test mAP",
    "cv_folds": "not used: low-shot SVMs are trained without cross-validation",
}


class _VocSvmProtocol(Protocol):
    """What both SVM protocols share: the layout, the data check, the features."""

    #: 2: images squashed to image_size x image_size (VISSL), was Resize + centre crop.
    #: 3: published weights are read with their own input convention (input_convention=weights); ViTs default to the cls tap
    version: ClassVar[str] = "3"
    data_layout: ClassVar[str] = VOC07_LAYOUT
    #: VISSL's SVM configs resize to 256 before squashing; its low-shot config does not
    squash_pre_resize: ClassVar[bool] = True
    sources: ClassVar[dict[str, str]] = SVM_SOURCES
    #: difficult images are training negatives (VISSL svm_trainer.py); low-shot draws from -1 only
    difficult_negative: ClassVar[bool] = True

    def check_data(self, root: Path, settings: _SvmCommon) -> None:
        """Read the image sets, check the JPEGs exist and every class can be fitted (cheap)."""
        data = load_voc_data(Path(root), settings.train_split, settings.classes, warn=False)
        check_trainable(np.asarray(data.train.labels), data.classes, data.train.split, self.difficult_negative)

    def features(self, ckpt: Any, settings: _SvmCommon, root: Path,
                 ctx: EvalContext) -> tuple[VocData, list[str], _Features, np.ndarray, np.ndarray]:
        """The data, the taps, their features and the label rows of the extracted images."""
        data = load_voc_data(Path(root), settings.train_split, settings.classes)
        taps = resolve_taps(ckpt.backbone, settings.taps, image_feature=True)  # a ViT: its cls token
        feats = extract_voc_features(ckpt, data, taps, settings, ctx, self.squash_pre_resize)
        train_labels = labels_of(data.train, feats.train.indices)  # again: unreadable images were skipped
        check_trainable(train_labels, data.classes, data.train.split, self.difficult_negative)
        return data, taps, feats, train_labels, labels_of(data.test, feats.test.indices)

    @staticmethod
    def params(settings: _SvmCommon, cv_folds: int) -> SvmParams:
        """The liblinear settings of every fit (0 folds: no cross-validation)."""
        return SvmParams(settings.positive_weight, settings.max_iter, settings.tol, cv_folds, settings.seed)

    @staticmethod
    def store(ctx: EvalContext, settings: _SvmCommon, feats: _Features, key: dict[str, Any]) -> FitStore:
        """The fit store of ``key`` beside the cached features (nothing persisted with ``cache`` off)."""
        return FitStore.for_key(ctx.cache_dir if settings.cache else None, feats.sha, key)


# ============================================================================= protocols
@register_protocol
class VocSvm(_VocSvmProtocol):
    """``voc07-svm``: linear SVMs per tap on frozen features (Goyal et al. / VISSL)."""

    name: ClassVar[str] = "voc07-svm"
    description: ClassVar[str] = "Pascal VOC07 classification with linear SVMs per layer on frozen features (VISSL)"
    Settings: ClassVar[type] = VocSvmSettings
    #: liblinear's coordinate order follows the seed, but the SVM problem is strictly convex: the
    #: seed moves the weights only within the stopping tolerance. BatchNorm re-estimation of a
    #: random init does use it (run())
    seed_dependent: ClassVar[bool] = False
    headline_metrics: ClassVar[tuple[str, ...]] = ("mAP",)

    def run(self, ckpt: Any, settings: VocSvmSettings, root: Path, ctx: EvalContext) -> ProtocolOutput:
        """Extract (or read) features, fit the SVMs of every class and tap, score the test split."""
        started = time.perf_counter()
        data, taps, feats, train_labels, test_labels = self.features(ckpt, settings, root, ctx)
        params = self.params(settings, settings.cv_folds)
        rows, per_tap, outcomes = [], {}, {}
        for tap in taps:
            key = fit_store_key("voc07-svm", feats.key(tap), feats.train.indices, train_labels, params)
            store = self.store(ctx, settings, feats, key)
            aps, results = svm_tap(feats.train.features[tap], train_labels, feats.test.features[tap], test_labels,
                                   data.classes, settings.costs, params, store, settings.jobs)
            tap_rows, per_class = ap_rows(aps, data.classes, tap, data.test.split, settings.seed)
            rows += tap_rows
            if tap_rows:  # per-image scores and labels for the paired bootstrap of the mAP (dcbench.stats)
                x_test = l2_normalize(feats.test.features[tap])  # as svm_tap scores them
                scores = np.stack([x_test @ r.coef + r.intercept for r in results], axis=1)
                outcomes[outcome_key("mAP", tap)] = map_outcomes(scores, test_labels, "all-points")
            per_tap[tap] = {"ap": per_class, **describe_results(results, len(settings.costs))}
            log.info("voc07-svm %s: mAP %.2f", tap, 100.0 * mean_ap(aps))
        extra = {**_svm_extra(feats, params, settings, data), "per_tap": per_tap,
                 "svm_wall_s": round(time.perf_counter() - started, 3),
                 "seed_dependent": bool((feats.bn_info or {}).get("ran"))}
        return ProtocolOutput(rows, data.fingerprint(), extra, outcomes=outcomes)


@register_protocol
class VocLowShot(_VocSvmProtocol):
    """``voc07-lowshot``: low-shot linear SVMs per tap (VISSL)."""

    name: ClassVar[str] = "voc07-lowshot"
    description: ClassVar[str] = "Pascal VOC07 low-shot SVMs per layer (k positives per class, VISSL)"
    Settings: ClassVar[type] = VocLowShotSettings
    #: the low-shot training sets are drawn from the seed: a trial per seed (seed_dependent stays True)
    headline_metrics: ClassVar[tuple[str, ...]] = (r"mAP_k\d+_mean",)
    squash_pre_resize: ClassVar[bool] = False
    difficult_negative: ClassVar[bool] = False
    sources: ClassVar[dict[str, str]] = {k: v for k, v in LOWSHOT_SOURCES.items() if k != "cv_folds"}
    known_deviations: ClassVar[tuple[Deviation, ...]] = (
        Deviation("low-shot training sets drawn by dcbench's seeded sampler",
                  "VISSL reads sample files written by extra_scripts/create_voc07_low_shot_samples.py: same "
                  "rule, other draws, so per-k numbers differ by sampling noise"),)

    def run(self, ckpt: Any, settings: VocLowShotSettings, root: Path, ctx: EvalContext) -> ProtocolOutput:
        """Sample the low-shot sets, fit every (k, sample, class, C), report per k."""
        started = time.perf_counter()
        if settings.cost is not None and settings.cost not in settings.costs:
            raise UsageError(f"cost={settings.cost} is not in costs {settings.costs}; add it to the grid")
        data, taps, feats, train_labels, test_labels = self.features(ckpt, settings, root, ctx)
        params = self.params(settings, 0)
        sets = lowshot_sets(train_labels, settings.ks, settings.samples, settings.seed)
        rows, per_tap = [], {}
        for tap in taps:
            extra_key = {"test_features": key_hash(feats.key(tap, 1)), "test_labels": array_digest(test_labels),
                         "seed": settings.seed}
            key = fit_store_key("voc07-lowshot", feats.key(tap), feats.train.indices, train_labels, params, extra_key)
            store = self.store(ctx, settings, feats, key)
            ap, computed = lowshot_tap(feats.train.features[tap], train_labels, feats.test.features[tap], test_labels,
                                       sets, data.classes, settings.costs, params, store, settings.jobs)
            chosen = {}
            for k, cost, stats in lowshot_summary(ap, settings.ks, settings.costs, settings.cost):
                chosen[str(k)] = cost
                rows += [MetricRow(f"mAP_k{k}_{stat}", value, tap, data.test.split, None, settings.seed)
                         for stat, value in stats.items()]
            per_tap[tap] = {"chosen_cost": chosen, "fits_computed": computed}
        extra = {**_svm_extra(feats, params, settings, data), "per_tap": per_tap, "samples": settings.samples,
                 "cost_selection": ("fixed" if settings.cost is not None
                                    else "VISSL: per k, the C with the best mean test mAP over the samples"),
                 "min_positives_drawn": {str(k): min(int((train_labels[picked, c] == 1).sum())
                                                     for c, picked in enumerate(sets[(k, 0)]))
                                         for k in dict.fromkeys(settings.ks)},
                 "lowshot_wall_s": round(time.perf_counter() - started, 3)}
        return ProtocolOutput(rows, data.fingerprint(), extra)
