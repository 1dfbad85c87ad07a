"""Linear probes per layer on frozen features (DeepCluster paper Table 1, VISSL benchmarks).

Three protocols share one implementation: ``linear`` (any labelled ImageFolder with train/
and val/ splits), ``imagenet-linear`` (ImageNet, 1000 classes) and ``places-linear``
(Places205, 205 classes). Semantics follow ../shared/PROTOCOLS.md, "Linear probes per layer":

- the backbone is frozen in eval mode; ALL requested taps are probed in ONE run, sharing each
  batch's frozen forward pass; after training, its weights AND BatchNorm buffers must equal
  the snapshot taken before training (RuntimeError otherwise);
- preset ``deepcluster``: AvgPool2d table, then Linear; SGD lr 0.01, momentum 0.9, wd 1e-7,
  lr_t = lr0 / sqrt(1 + lr0 * wd * t) with t the iteration, 90 epochs, batch 256;
- preset ``vissl``: VISSL's AvgPool2d table, then BatchNorm2d, then Linear; wd 5e-4 (none on
  BN), 28 epochs (places-linear: 14) with lr x0.1 at 8/16/24 (4/8/12), scaled to the same
  fractions when ``epochs`` is overridden;
- other input sizes / archs: adaptive average pooling to the preset's grid capped at the
  map size; ResNet taps use the ResNet-50 table at 224; any other tap a grid keeping about
  9k dims. The pooling of each tap is recorded in the result;
- train: Resize(s*256/224), CenterCrop(same), RandomCrop(s), flip; test: Resize then TenCrop(s)
  with softmax averaged over the crops (or the centre crop);
- ``cached=true``: pooled features are extracted once per split (centre crop, no
  augmentation) through the feature cache and the heads are trained on them;
- metrics: top-1 and top-5 per tap on val, at the last epoch (``selection="final"``) and at
  the best epoch by val top-1 (``selection="best"``, what the paper reports).

Public helpers reused by other protocols (SVM, kNN): :func:`probe_pooling`, :func:`resolve_taps`,
:func:`check_train_val`, :func:`center_transform`, :func:`center_transform_id`.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import math
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torchvision import transforms as T

from dcbench.data import DataError, SkipCounter, has_direct_images, image_folder, normalize, subfolders
from dcbench.data.transforms import eval_resize, eval_transform
from dcbench.errors import UsageError
from dcbench.features import (assert_unchanged, extract_features, forward_pooled, frozen, make_loader,
                              prepared_backbone, show_progress, tensor_digests)
from dcbench.data.layouts import check_train_val, train_val_fingerprint
from dcbench.data.transforms import (center_transform, center_transform_id, probe_train_transform,
                                     ten_crop_transform)
from dcbench.pooling import PoolPlan, probe_pooling, resolve_taps, tap_shapes
from dcbench.results import MetricRow
from dcbench.protocol import EvalContext, Protocol, ProtocolOutput, register_protocol

log = logging.getLogger("dcbench")

PRESET_WEIGHT_DECAY = {"deepcluster": 1e-7, "vissl": 5e-4}
VISSL_STEP_FRACTIONS = (8 / 28, 16 / 28, 24 / 28)  # 8/16/24 of 28 (Places: 4/8/12 of 14)
TEN_CROPS = 10


# ----------------------------------------------------------------------------- lr schedules
def deepcluster_lr(lr0: float, weight_decay: float, t: int) -> float:
    """DeepCluster's probe schedule: ``lr0 / sqrt(1 + lr0 * wd * t)``, t = iteration (from 0)."""
    return lr0 / math.sqrt(1.0 + lr0 * weight_decay * t)


def vissl_steps(epochs: int) -> list[int]:
    """Epochs at which the vissl preset multiplies lr by 0.1: 8/16/24 of 28, same fractions
    for other lengths (14 -> 4/8/12). Steps rounding to 0 are dropped (a step before the
    first epoch would just be a smaller lr0)."""
    return [s for s in (round(f * epochs) for f in VISSL_STEP_FRACTIONS) if s > 0]


def vissl_lr(lr0: float, epoch: int, steps: Sequence[int]) -> float:
    """lr at ``epoch`` (from 0): ``lr0 * 0.1 ** (number of steps <= epoch)``."""
    return lr0 * 0.1 ** sum(1 for s in steps if epoch >= s)


# ----------------------------------------------------------------------------- settings
def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class LinearSettings:
    """Settings of the linear-probe protocols (defaults = PROTOCOLS.md)."""

    preset: Literal["deepcluster", "vissl"] = field(default="deepcluster", metadata=_help(
        "deepcluster: AvgPool table + Linear, 1/sqrt lr decay, wd 1e-7, 90 epochs; "
        "vissl: VISSL AvgPool table + BatchNorm + Linear, lr x0.1 steps, wd 5e-4, 28 epochs (Places205: 14)"))
    taps: list[str] | None = field(default=None, metadata=_help(
        "taps to probe, all in one run sharing each forward pass (default: every conv tap)"))
    image_size: int = field(default=224, metadata=_help(
        "crop side in px; images are resized to round(s*256/224) first"))
    batch_size: int = field(default=256, metadata=_help(
        "training batch size (TenCrop val batches hold batch_size/10 images)"))
    epochs: int | None = field(default=None, metadata=_help(
        "training epochs (default: the preset's, 90 deepcluster / 28 vissl / 14 vissl on Places205)"))
    lr: float = field(default=0.01, metadata=_help("initial learning rate of the heads (SGD)"))
    weight_decay: float | None = field(default=None, metadata=_help(
        "weight decay of the Linear heads (default: the preset's, 1e-7 deepcluster / 5e-4 vissl; never on BN)"))
    momentum: float = field(default=0.9, metadata=_help("SGD momentum"))
    crops: Literal["tencrop", "center"] = field(default="tencrop", metadata=_help(
        "val evaluation: TenCrop with softmax averaged, or the centre crop (cached=true always uses center)"))
    cached: bool = field(default=False, metadata=_help(
        "train on pooled features extracted once per split (centre crop, no augmentation) instead of "
        "augmented crops; much faster, not the paper's protocol"))
    cache: bool = field(default=True, metadata=_help(
        "with cached=true, read/write the extracted features in the feature cache (shared with other runs)"))
    seed: int = field(default=0, metadata=_help("seed of head init, shuffling, augmentation and BN re-estimation"))
    workers: int = field(default=4, metadata=_help("DataLoader worker processes"))
    bn_recalibrate: Literal["auto", "on", "off"] = field(default="auto", metadata=_help(
        "re-estimate BatchNorm running stats on train images (train-mode forwards, no grad, at most "
        "200 batches) on a copy of the backbone before probing; auto = on for random inits"))

    def validate(self) -> None:
        """Raise UsageError for impossible values (taps are checked against the backbone in run)."""
        positive = {"image_size": self.image_size, "batch_size": self.batch_size, "epochs": self.epochs}
        for name, value in positive.items():
            if value is not None and value < 1:
                raise UsageError(f"bad value {value} for {name}: must be at least 1")
        if self.lr <= 0:
            raise UsageError(f"bad value {self.lr} for lr: must be positive")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise UsageError(f"bad value {self.weight_decay} for weight_decay: must be >= 0")
        if not 0 <= self.momentum < 1:
            raise UsageError(f"bad value {self.momentum} for momentum: must be in [0, 1)")
        if self.workers < 0:
            raise UsageError(f"bad value {self.workers} for workers: must be >= 0")
        if self.taps is not None and not self.taps:
            raise UsageError("taps is empty: name at least one tap, or leave it unset for every conv tap")


# ----------------------------------------------------------------------------- heads
class ProbeHead(nn.Module):
    """[BatchNorm2d over the pooled C x g x g map] then Linear, on a flat pooled feature."""

    def __init__(self, plan: PoolPlan, n_classes: int, batchnorm: bool, init_std: float | None) -> None:
        super().__init__()
        self.shape = (plan.channels, *plan.grid)
        self.bn = nn.BatchNorm2d(plan.channels) if batchnorm else None
        self.linear = nn.Linear(plan.dim, n_classes)
        if init_std is not None:  # VISSL's MLP init; DeepCluster's RegLog keeps torch's default
            nn.init.normal_(self.linear.weight, 0.0, init_std)
            nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn is not None:
            x = self.bn(x.view(-1, *self.shape)).flatten(1)
        return self.linear(x)


def _seeded_head(plan: PoolPlan, n_classes: int, vissl: bool, seed: int) -> ProbeHead:
    """A head initialised from its own seed (run seed + tap name) without touching the global
    RNG, so a tap's result does not depend on which other taps share the run."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(f"{seed}:{plan.tap}".encode()))
        return ProbeHead(plan, n_classes, vissl, 0.01 if vissl else None)


class ProbeSet:
    """Every tap's head, one SGD optimiser over all of them, and the preset's lr schedule.

    The heads are independent, so summing their losses and stepping one optimiser gives each
    head exactly the update it would get alone.
    """

    def __init__(self, plans: dict[str, PoolPlan], n_classes: int, preset: str, lr: float,
                 weight_decay: float, momentum: float, steps: list[int], device: str | torch.device,
                 seed: int = 0) -> None:
        self.taps = list(plans)
        vissl = preset == "vissl"
        self.heads = nn.ModuleList(_seeded_head(plans[t], n_classes, vissl, seed) for t in self.taps).to(device)
        bn_params = [p for h in self.heads if h.bn is not None for p in h.bn.parameters()]
        linear_params = [p for h in self.heads for p in h.linear.parameters()]
        groups = [{"params": linear_params, "weight_decay": weight_decay}]
        if bn_params:
            groups.append({"params": bn_params, "weight_decay": 0.0})  # no wd on BN (VISSL)
        self.optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum)
        self.preset, self.lr0, self.steps = preset, lr, steps
        self.n_classes = n_classes
        self.has_bn = bool(bn_params)

    def can_step(self, batch: int) -> bool:
        """BatchNorm heads need 2+ samples for batch statistics; a lone last sample is skipped."""
        return batch >= 2 or not self.has_bn

    def set_lr(self, epoch: int, iteration: int) -> None:
        """Apply the schedule before the step of ``iteration`` (global, from 0) in ``epoch``."""
        for group in self.optimizer.param_groups:
            if self.preset == "vissl":
                group["lr"] = vissl_lr(self.lr0, epoch, self.steps)
            else:
                group["lr"] = deepcluster_lr(self.lr0, group["weight_decay"], iteration)

    def step(self, pooled: dict[str, torch.Tensor], targets: torch.Tensor) -> float:
        """One SGD step of every head on its tap's pooled features; returns the summed loss."""
        self.heads.train()
        loss = sum(F.cross_entropy(head(pooled[t]), targets) for t, head in zip(self.taps, self.heads))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    @torch.no_grad()
    def hits(self, pooled: dict[str, torch.Tensor], targets: torch.Tensor, n_crops: int = 1) -> dict[str, np.ndarray]:
        """Top-1 and top-5 hits per tap; with crops, softmax averaged over the ``n_crops`` rows
        of each image (rows are image-major)."""
        self.heads.eval()
        k = min(5, self.n_classes)
        out = {}
        for tap, head in zip(self.taps, self.heads):
            probs = F.softmax(head(pooled[tap]), dim=1).view(len(targets), n_crops, -1).mean(1)
            top = probs.topk(k, dim=1).indices
            correct = top == targets[:, None]
            out[tap] = np.array([int(correct[:, 0].sum()), int(correct.any(1).sum())])
        return out


# ----------------------------------------------------------------------------- the run
@dataclass
class _Run:
    """Everything resolved before training (recorded in ``extra``)."""

    preset: str
    taps: list[str]
    plans: dict[str, PoolPlan]
    epochs: int
    weight_decay: float
    steps: list[int]
    mode: str
    crops: str
    n_classes: int


def _accuracy(totals: dict[str, np.ndarray], n: int) -> dict[str, tuple[float, float]]:
    return {t: (100.0 * float(v[0]) / max(n, 1), 100.0 * float(v[1]) / max(n, 1)) for t, v in totals.items()}


def _add(totals: dict[str, np.ndarray], hits: dict[str, np.ndarray]) -> None:
    for tap, value in hits.items():
        totals[tap] = totals.get(tap, 0) + value


def _train_augmented(backbone: nn.Module, probes: ProbeSet, run: _Run, pools: dict[str, nn.Module],
                     train_ds: Any, val_ds: Any, settings: LinearSettings, ctx: EvalContext,
                     skipped: dict[str, int]) -> list[dict[str, tuple[float, float]]]:
    """Train on augmented crops, one shared frozen forward per batch; val every epoch."""
    device = ctx.device
    train_ds.transform = probe_train_transform(settings.image_size)
    tencrop = run.crops == "tencrop"
    val_ds.transform = ten_crop_transform(settings.image_size) if tencrop else center_transform(settings.image_size)
    n_crops = TEN_CROPS if tencrop else 1
    loader = make_loader(train_ds, settings.batch_size, settings.workers, device, shuffle=True,
                         seed=settings.seed, persistent=True)
    val_loader = make_loader(val_ds, max(1, settings.batch_size // n_crops), settings.workers, device,
                             persistent=True)
    counter = SkipCounter(train_ds)
    history, iteration = [], 0
    progress = show_progress(ctx.progress)
    for epoch in range(run.epochs):
        with frozen(backbone):
            for images, targets, idx, n_skipped in _bar(loader, f"epoch {epoch + 1}/{run.epochs}", progress):
                counter.update(idx, n_skipped)
                if not probes.can_step(len(idx)):
                    continue
                pooled = forward_pooled(backbone, images.to(device, non_blocking=True), run.taps, pools)
                probes.set_lr(epoch, iteration)
                # clone() turns inference tensors into ordinary ones the heads can train on
                probes.step({t: v.clone() for t, v in pooled.items()}, targets.to(device))
                iteration += 1
            skipped["train"] = counter.count
            first = epoch == 0  # one warning about unreadable images, not one per epoch
            if first:
                counter.report()
            counter.reset()
            history.append(_evaluate_stream(backbone, probes, run, pools, val_loader, val_ds, n_crops,
                                            device, skipped, progress, report=first))
        _log_epoch(epoch, run, history[-1])
    return history


def _evaluate_stream(backbone: nn.Module, probes: ProbeSet, run: _Run, pools: dict[str, nn.Module],
                     loader: Any, val_ds: Any, n_crops: int, device: str, skipped: dict[str, int],
                     progress: bool, report: bool) -> dict[str, tuple[float, float]]:
    """Val top-1/top-5 per tap, one shared frozen forward per batch (all crops of an image)."""
    totals: dict[str, np.ndarray] = {}
    counter, n = SkipCounter(val_ds), 0
    for images, targets, idx, n_skipped in _bar(loader, "val", progress):
        counter.update(idx, n_skipped)
        if len(idx) == 0:
            continue
        images = images.to(device, non_blocking=True)
        if n_crops > 1:  # B x crops x 3 x s x s -> (B*crops) x 3 x s x s, image-major
            images = images.flatten(0, 1)
        pooled = forward_pooled(backbone, images, run.taps, pools)
        _add(totals, probes.hits(pooled, targets.to(device), n_crops))
        n += len(idx)
    skipped["val"] = counter.count
    if report:
        counter.report()
    return _accuracy(totals, n)


def _train_cached(backbone: nn.Module, sha: str, probes: ProbeSet, run: _Run, pools: dict[str, nn.Module],
                  train_ds: Any, val_ds: Any, settings: LinearSettings, ctx: EvalContext,
                  skipped: dict[str, int]) -> list[dict[str, tuple[float, float]]]:
    """Extract pooled centre-crop features once per split (feature cache), train heads on them."""
    device = ctx.device
    cache_dir = ctx.cache_dir if settings.cache else None
    transform_id = center_transform_id(settings.image_size)
    feats = {}
    for split, ds in (("train", train_ds), ("val", val_ds)):
        ds.transform = center_transform(settings.image_size)
        feats[split] = extract_features(backbone, ds, run.taps, pools, transform_id, sha, cache_dir,
                                        settings.batch_size, settings.workers, device, ctx.progress, mmap=True)
        skipped[split] = len(ds) - len(feats[split].indices)
    train, val = feats["train"], feats["val"]
    y_train = torch.from_numpy(train.labels)
    rng = np.random.default_rng(settings.seed)
    history, iteration, n = [], 0, len(train.labels)
    for epoch in range(run.epochs):
        order = rng.permutation(n)
        for start in range(0, n, settings.batch_size):
            rows = np.sort(order[start:start + settings.batch_size])  # sorted: sequential reads of memmaps
            if not probes.can_step(len(rows)):
                continue
            batch = {t: _tensor(train.features[t][rows], device) for t in run.taps}
            probes.set_lr(epoch, iteration)
            probes.step(batch, y_train[rows].to(device))
            iteration += 1
        history.append(_evaluate_arrays(probes, run, val, settings.batch_size, device))
        _log_epoch(epoch, run, history[-1])
    return history


def _evaluate_arrays(probes: ProbeSet, run: _Run, val: Any, batch_size: int,
                     device: str) -> dict[str, tuple[float, float]]:
    totals: dict[str, np.ndarray] = {}
    n = len(val.labels)
    chunk = max(batch_size, 1024)
    for start in range(0, n, chunk):
        batch = {t: _tensor(val.features[t][start:start + chunk], device) for t in run.taps}
        _add(totals, probes.hits(batch, torch.from_numpy(val.labels[start:start + chunk]).to(device)))
    return _accuracy(totals, n)


def _tensor(rows: np.ndarray, device: str | torch.device) -> torch.Tensor:
    """Rows of a (possibly read-only, memory-mapped) array as a tensor on ``device`` (copied)."""
    return torch.from_numpy(np.array(rows, dtype=np.float32)).to(device)


def _bar(loader: Any, desc: str, progress: bool) -> Any:
    if not progress:
        return loader
    from tqdm import tqdm
    return tqdm(loader, desc=desc, unit="batch", leave=False)


def _log_epoch(epoch: int, run: _Run, acc: dict[str, tuple[float, float]]) -> None:
    log.info("epoch %d/%d val top-1: %s", epoch + 1, run.epochs,
             ", ".join(f"{t} {a[0]:.1f}" for t, a in acc.items()))


def _metric_rows(history: list[dict[str, tuple[float, float]]], taps: list[str],
                 seed: int) -> tuple[list[MetricRow], dict[str, int]]:
    """top1/top5 per tap at the final epoch and at the best epoch by val top-1."""
    rows, best_epochs = [], {}
    for tap in taps:
        top1 = [h[tap][0] for h in history]
        best = int(np.argmax(top1))  # first epoch reaching the maximum
        best_epochs[tap] = best + 1
        for selection, epoch in (("final", len(history) - 1), ("best", best)):
            t1, t5 = history[epoch][tap]
            rows.append(MetricRow("top1", t1, tap, "val", selection, seed))
            rows.append(MetricRow("top5", t5, tap, "val", selection, seed))
    return rows, best_epochs


class LinearProbe(Protocol):
    """Shared implementation of ``linear``, ``imagenet-linear`` and ``places-linear``."""

    version: ClassVar[str] = "1"
    Settings: ClassVar[type] = LinearSettings
    #: number of classes the dataset must have (None: any)
    expected_classes: ClassVar[int | None] = None
    dataset_name: ClassVar[str] = ""
    #: default epochs per preset
    preset_epochs: ClassVar[dict[str, int]] = {"deepcluster": 90, "vissl": 28}

    def check_data(self, root: Path, settings: Any) -> None:
        """Fast layout check (folder listings): DataError naming the problem and the layout."""
        layout = self.data_layout.strip().splitlines()[0]
        check_train_val(Path(root), self.name, layout, self.expected_classes, self.dataset_name)

    def resolve(self, settings: LinearSettings, backbone: nn.Module, n_classes: int = 0) -> _Run:
        """Effective taps, pooling, epochs, weight decay, lr steps, mode and crops (UsageError
        for unknown taps or an image size the taps cannot take)."""
        taps = resolve_taps(backbone, settings.taps)
        plans = probe_pooling(backbone, taps, settings.image_size, settings.preset)
        epochs = settings.epochs or self.preset_epochs[settings.preset]
        wd = settings.weight_decay if settings.weight_decay is not None else PRESET_WEIGHT_DECAY[settings.preset]
        steps = vissl_steps(epochs) if settings.preset == "vissl" else []
        crops = "center" if settings.cached else settings.crops
        return _Run(settings.preset, taps, plans, epochs, wd, steps, "cached" if settings.cached else "augmented",
                    crops, n_classes)

    def run(self, ckpt: Any, settings: LinearSettings, root: Path, ctx: EvalContext) -> ProtocolOutput:
        """Train one linear head per tap on the frozen backbone; see the module docstring."""
        root = Path(root)
        started = time.perf_counter()
        train_ds, val_ds = image_folder(root / "train"), image_folder(root / "val")
        if train_ds.classes != val_ds.classes:
            raise DataError(f"class folders differ between {root}/train and {root}/val; "
                            f"both splits need the same class folders")
        # settings errors before any expensive work (BN re-estimation, extraction)
        run = self.resolve(settings, ckpt.backbone, len(train_ds.classes))
        recal_ds = copy.copy(train_ds)  # same file list (no second scan), its own transform
        recal_ds.transform = center_transform(settings.image_size)
        with torch.random.fork_rng(devices=[]), prepared_backbone(
                ckpt, settings.bn_recalibrate, recal_ds, settings.batch_size, settings.workers, ctx.device,
                settings.seed, ctx.progress) as (backbone, sha, bn_info):
            torch.manual_seed(settings.seed)
            snapshot = tensor_digests(backbone)
            pools = {t: run.plans[t].module() for t in run.taps}
            probes = ProbeSet(run.plans, run.n_classes, run.preset, settings.lr, run.weight_decay,
                              settings.momentum, run.steps, ctx.device, settings.seed)
            skipped: dict[str, int] = {}
            if settings.cached:
                history = _train_cached(backbone, sha, probes, run, pools, train_ds, val_ds, settings, ctx, skipped)
            else:
                history = _train_augmented(backbone, probes, run, pools, train_ds, val_ds, settings, ctx, skipped)
            assert_unchanged(backbone, snapshot)
        rows, best_epochs = _metric_rows(history, run.taps, settings.seed)
        extra = self._extra(run, settings, bn_info, best_epochs, history, skipped, train_ds, val_ds, started)
        fingerprint = train_val_fingerprint(train_ds.fingerprint(), val_ds.fingerprint())
        return ProtocolOutput(rows, fingerprint, extra)

    def _extra(self, run: _Run, settings: LinearSettings, bn_info: dict, best_epochs: dict[str, int],
               history: list, skipped: dict[str, int], train_ds: Any, val_ds: Any, started: float) -> dict:
        schedule = (f"lr x0.1 at epochs {run.steps}" if run.preset == "vissl"
                    else "lr_t = lr0 / sqrt(1 + lr0 * wd * t), t = iteration")
        return {
            "mode": run.mode,
            "crops": run.crops,
            "crops_note": ("cached=true evaluates the centre crop"
                           if settings.cached and settings.crops != "center" else None),
            "selection": "final = last epoch; best = epoch with the highest val top-1 per tap (top-5 of that epoch)",
            "preset": run.preset,
            "taps": run.taps,
            "pooling": {t: p.describe() for t, p in run.plans.items()},
            "head": "AvgPool -> BatchNorm2d -> Linear" if run.preset == "vissl" else "AvgPool -> Linear",
            "epochs": run.epochs,
            "weight_decay": run.weight_decay,
            "lr_schedule": schedule,
            "lr_steps": run.steps,
            "best_epoch": best_epochs,
            "history_top1": [{t: round(a[0], 3) for t, a in h.items()} for h in history],
            "bn_recalibrate": bn_info,
            "frozen_check": "passed: backbone weights and BN buffers unchanged",
            "classes": run.n_classes,
            "images": {"train": len(train_ds), "val": len(val_ds)},
            "skipped_images": dict(skipped),
            "probe_wall_s": round(time.perf_counter() - started, 3),
        }


_LAYOUT = """\
ROOT/train/CLASS/*.jpg and ROOT/val/CLASS/*.jpg (ImageFolder; same class folders in both splits)
Class indices follow the sorted class folder names. Unreadable images are skipped (counted).
"""


@register_protocol
class Linear(LinearProbe):
    """Linear probes on any labelled ImageFolder with train/ and val/ splits."""

    name = "linear"
    description = "linear probe per layer (frozen backbone) on any labelled train/val ImageFolder"
    data_layout = _LAYOUT


@register_protocol
class ImageNetLinear(LinearProbe):
    """Linear probes on ImageNet (ILSVRC-2012): the paper's Table 1."""

    name = "imagenet-linear"
    description = "linear probe per layer on ImageNet (DeepCluster Table 1 / VISSL)"
    expected_classes = 1000
    dataset_name = "ImageNet"
    data_layout = """\
ROOT/train/nXXXXXXXX/*.JPEG and ROOT/val/nXXXXXXXX/*.JPEG (ILSVRC-2012, 1000 class folders each)
The official val/ is a flat folder of 50,000 images: sort it into class folders first (e.g.
with the usual valprep.sh). For ImageNet subsets use --protocol linear.
"""


@register_protocol
class PlacesLinear(LinearProbe):
    """Linear probes on Places205 (the paper's Table 1, right)."""

    name = "places-linear"
    description = "linear probe per layer on Places205 (DeepCluster Table 1 / VISSL)"
    expected_classes = 205
    dataset_name = "Places205"
    preset_epochs = {"deepcluster": 90, "vissl": 14}
    data_layout = """\
ROOT/train/CLASS/*.jpg and ROOT/val/CLASS/*.jpg (ImageFolder; 205 class folders each)
Places205 ships as images/<letter>/<class>/... plus trainvalsplit_places205/{train,val}_places205.csv;
dcbench reads the ImageFolder form only: link each CSV's files into train/ or val/ under a flat
class folder name (e.g. a/abbey -> a_abbey, f/field/wild -> f_field_wild).
"""
