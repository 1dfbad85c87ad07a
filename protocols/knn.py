"""Weighted k-nearest-neighbour classification on frozen features.

Source: facebookresearch/dino ``eval_knn.py`` (cosine on L2-normalised features, T = 0.07,
k in {10, 20, 100, 200}, votes weighted ``exp(sim / T)``; images ``Resize(256, interpolation=3)``
(bicubic), ``CenterCrop(224)``), the vote itself in :mod:`dcbench.knn`.
Memory bank: the pooled features of ROOT/train; queries: those of ROOT/val; top-1 and top-5 per
tap and k. A class no neighbour voted for is never a hit (DINO counts its top ``min(5, k)``
predictions; beyond the voted classes its order is that of tied zeros) and tied votes rank the
lower class index first (:func:`dcbench.knn.vote_correct`). Default taps: every conv tap,
globally averaged; on a ViT its ``cls`` token (DINO's feature). Published weights (timm /
torchvision / hf-hub) are read with their own input convention (mean, std, interpolation, crop
ratio: ``input_convention=weights``, see
:func:`dcbench.data.transforms.resolve_convention`); other checkpoints with DINO's.
Features go through the feature cache, so re-running with other ``ks`` or
``temperature`` costs no forward pass, and kNN shares extractions with the other
frozen-feature protocols. The result does not depend on the seed (no seed trials needed),
except for a random init whose BatchNorm statistics were re-estimated (shuffled, seeded
batches): such a result says ``seed_dependent`` in its record. Per-image top-1/top-5
correctness per tap and k is kept for the paired bootstrap over val images.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from torch import nn

from dcbench.data import image_folder
from dcbench.data.layouts import check_train_val, train_val_fingerprint
from dcbench.data.transforms import (ConventionMode, convention_center_id, convention_center_transform,
                                     resolve_convention)
from dcbench.errors import UsageError
from dcbench.features import ExtractedFeatures
from dcbench.knn import GlobalAvgPool, knn_correct, min_temperature
from dcbench.metrics import hits_of
from dcbench.pooling import probe_pooling, resolve_taps
from dcbench.protocol import FrozenFeatureSettings, Protocol, ProtocolOutput, RunContext, register_protocol, setting
from dcbench.provenance import FROZEN_FEATURE_SOURCES
from dcbench.results import MetricRow, outcome_key


@dataclass
class KnnSettings(FrozenFeatureSettings):
    """Settings of the ``knn`` protocol (defaults: DINO eval_knn.py, see the module docstring)."""

    pool: Literal["global", "preset"] = setting(
        "global", "global: global average pooling (C dims); preset: the deepcluster linear-probe pooling (~9k dims)")
    ks: list[int] = setting(help="numbers of neighbours (each capped at the number of training images)",
                            factory=lambda: [10, 20, 100, 200])
    temperature: float = setting(0.07, "T in the vote weight exp(cosine / T)")
    image_size: int = setting(224, "centre-crop side in px; images are resized to round(s*256/224) first")
    interpolation: Literal["bicubic", "bilinear"] = setting(
        "bicubic", "resampling of the resize before the centre crop (DINO: bicubic; published weights: their own "
                   "unless input_convention=preset)")
    input_convention: ConventionMode = setting(
        "weights", "weights: published weights (timm/tv/hf-hub) are read with their own mean, std, interpolation and "
                   "crop ratio; preset: always ImageNet mean/std, Resize(s*256/224) with `interpolation`, CenterCrop")
    batch_size: int = setting(256, "extraction batch size")
    seed: int = setting(0, "seed of BN re-estimation (kNN itself is deterministic)", numbers=False)
    bn_recalibrate: Literal["auto", "on", "off"] = setting(
        "auto", "re-estimate BatchNorm running stats on train images on a copy before extracting; "
        "auto = on for random inits")

    def validate(self) -> None:
        """Raise UsageError for impossible values."""
        super().validate()
        if not self.ks or any(k < 1 for k in self.ks):
            raise UsageError(f"bad value {self.ks} for ks: give positive integers, e.g. [10,20,100,200]")
        lowest = min_temperature(max(self.ks))
        if self.temperature < lowest:
            raise UsageError(f"bad value {self.temperature} for temperature: give at least {lowest:.4f} with ks up to "
                             f"{max(self.ks)}; below it the vote weights exp(cosine / T) overflow float32 (DINO: 0.07)")


_DINO = "facebookresearch/dino eval_knn.py"
KNN_SOURCES = {**FROZEN_FEATURE_SOURCES,
    "seed": "dcbench choice: seeds BN re-estimation only (kNN is deterministic); cannot be a deviation",
    "batch_size": f"dcbench choice: extraction batch ({_DINO} --batch_size_per_gpu 128); moves only BN "
                  "re-estimation of random inits",
    "taps": f"{_DINO} uses the model's output feature (ViTs: the CLS token, tap cls; torchvision ResNets: fc = "
            "Identity, the 2048-d average, tap avgpool); dcbench's default: cls on ViTs, every conv tap (globally "
            "averaged) on other architectures",
    "input_convention": "dcbench choice (issue 19): published weights are read the way they were trained (timm "
                        "pretrained_cfg, torchvision weights.transforms()); random inits and dcbench/DeepCluster "
                        f"checkpoints have no convention of their own and get {_DINO}'s (ImageNet mean/std)",
    "image_size": f"{_DINO} transform: Resize(256, interpolation=3), CenterCrop(224)",
    "pool": f"{_DINO}: one global feature per image (global: the spatial average of a map tap)",
    "ks": f"{_DINO} --nb_knn [10, 20, 100, 200]",
    "temperature": f"{_DINO} --temperature 0.07 (knn_classifier: votes exp(sim / T))",
    "interpolation": f"{_DINO} transform: Resize(256, interpolation=3) (bicubic)",
}


@register_protocol
class Knn(Protocol):
    """Weighted kNN (cosine, T = 0.07, k in 10/20/100/200) per tap."""

    name: ClassVar[str] = "knn"
    description: ClassVar[str] = "weighted kNN (cosine, exp(sim/0.07) votes) per layer on frozen features"
    #: 2: images resized bicubically (DINO's eval_knn.py), was bilinear
    #: 3: neighbours tied at the k-th similarity are broken by the lower bank row (was torch.topk's
    #: unspecified order) and similarities come from fixed-shape tiles (bank moved in chunks);
    #: ViTs default to the cls tap; published weights are read with their own input convention
    #: 4: a class no neighbour voted for is never a top-1/top-5 hit and vote ties go to the lower
    #: class index (was torch.topk's arbitrary order among tied, e.g. zero, votes: top5_k1 was 100
    #: on 4 classes where DINO's eval_knn.py counts min(5, k) predictions)
    version: ClassVar[str] = "4"
    Settings: ClassVar[type] = KnnSettings
    #: the vote is deterministic; only BatchNorm re-estimation of random inits uses the seed (run())
    seed_dependent: ClassVar[bool] = False
    #: DINO reports k = 20 (the first pattern that matches a metric of the result wins)
    headline_metrics: ClassVar[tuple[str, ...]] = ("top1_k20", r"top1_k\d+")
    sources: ClassVar[dict[str, str]] = KNN_SOURCES
    data_layout: ClassVar[str] = """\
ROOT/train/CLASS/*.jpg (memory bank) and ROOT/val/CLASS/*.jpg (queries), same class folders
Class indices follow the sorted class folder names. Unreadable images are skipped (counted).
"""

    def check_data(self, root: Path, settings: Any) -> None:
        """Fast layout check (folder listings): DataError naming the problem and the layout."""
        check_train_val(Path(root), self.name, self.data_layout.strip().splitlines()[0])

    def run(self, ckpt: Any, settings: KnnSettings, root: Path, ctx: RunContext) -> ProtocolOutput:
        """Extract (or read) the features of both splits, then vote per tap and k."""
        started = time.perf_counter()
        convention = resolve_convention(ckpt.backbone, settings.input_convention, settings.interpolation)
        transform = convention_center_transform(settings.image_size, convention)
        train_ds = image_folder(root / "train", transform=transform)
        val_ds = image_folder(root / "val", transform=transform)
        taps = resolve_taps(ckpt.backbone, settings.taps, image_feature=True)  # settings errors before expensive work
        pools, pooling = self._pools(ckpt.backbone, taps, settings)
        transform_id = convention_center_id(settings.image_size, convention)
        with ctx.frozen_backbone(ckpt, train_ds) as (backbone, sha):
            train = ctx.extract(backbone, sha, train_ds, taps, pools, transform_id)
            val = ctx.extract(backbone, sha, val_ds, taps, pools, transform_id)
        rows, outcomes = self._vote(train, val, taps, settings, len(train_ds.classes), ctx.device)
        extra = {"pooling": pooling, "ks": [min(k, len(train.labels)) for k in settings.ks],
                 "temperature": settings.temperature, "similarity": "cosine on L2-normalised features",
                 "vote": "sum of exp(sim / T) per class over the k nearest", "crops": "center",
                 "interpolation": convention.interpolation, "input_convention": convention.describe(),
                 "taps": taps,
                 "bank_size": len(train.labels), "queries": len(val.labels), "classes": len(train_ds.classes),
                 "skipped_images": {"train": len(train_ds) - len(train.labels),
                                    "val": len(val_ds) - len(val.labels)},
                 "knn_wall_s": round(time.perf_counter() - started, 3),
                 # the seeded re-estimation of a random init's BatchNorm makes this run seed-dependent
                 "seed_dependent": bool((ctx.bn_info or {}).get("ran"))}
        return ProtocolOutput(rows, train_val_fingerprint(train_ds.fingerprint(), val_ds.fingerprint()), extra,
                              outcomes)

    @staticmethod
    def _pools(backbone: nn.Module, taps: list[str],
               settings: KnnSettings) -> tuple[dict[str, nn.Module], dict[str, Any]]:
        """Pooling modules per tap and their description for the record."""
        if settings.pool == "global":
            return {t: GlobalAvgPool() for t in taps}, {t: {"kind": "global-avg"} for t in taps}
        plans = probe_pooling(backbone, taps, settings.image_size, "deepcluster")
        return {t: p.module() for t, p in plans.items()}, {t: p.describe() for t, p in plans.items()}

    @staticmethod
    def _vote(train: ExtractedFeatures, val: ExtractedFeatures, taps: list[str], settings: KnnSettings,
              n_classes: int, device: str) -> tuple[list[MetricRow], dict[str, np.ndarray]]:
        """top-1/top-5 rows per tap and k (each k once, in the order given) and their per-image
        outcomes (0/1 per val image in dataset order, named by :func:`outcome_key`)."""
        rows, outcomes = [], {}
        for tap in taps:
            correct = knn_correct(train.features[tap], train.labels, val.features[tap], val.labels, settings.ks,
                                  settings.temperature, n_classes, device)
            for k in dict.fromkeys(settings.ks):
                top1, top5 = 100.0 * hits_of(correct[k]) / max(len(val.labels), 1)
                for metric, value, column in ((f"top1_k{k}", top1, 0), (f"top5_k{k}", top5, 1)):
                    rows.append(MetricRow(metric, float(value), tap, "val", None, settings.seed))
                    outcomes[outcome_key(metric, tap)] = correct[k][:, column].astype(np.uint8)
        return rows, outcomes
