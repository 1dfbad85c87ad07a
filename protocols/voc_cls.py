"""Pascal VOC 2007 classification: fine-tuning (``voc07-cls``), linear SVMs per layer
(``voc07-svm``) and low-shot SVMs (``voc07-lowshot``). Semantics: ../shared/PROTOCOLS.md,
"Pascal VOC 2007 classification".

Labels come from ``ImageSets/Main/<cls>_<split>.txt``: 1 positive, -1 negative, 0 difficult.
Train on trainval and test on test (``train_split=train``: train -> val, for tuning).

``voc07-cls`` (the DeepCluster paper's Table 2, its ``eval_voc_classif.py``):

- the network is a deep COPY of the backbone (the checkpoint is never touched): its conv
  trunk, then fc6 and fc7 re-initialised N(0, 0.01) with bias 0.1 (fc6 rebuilt for the input
  size when needed), then a new ``Linear(4096, n_classes)`` (torch's default init, bias 0.1);
  for backbones without DeepCluster's ``features``/``classifier`` (timm, torchvision) the
  trunk is the backbone up to its last tap, globally average-pooled, and fc6-fc7 are a new
  ``Dropout, Linear(C, 4096), ReLU, Dropout, Linear(4096, 4096), ReLU`` (``head_dim``);
- ``mode=fc6-8``: the trunk is frozen, except the BatchNorm affine parameters when
  ``train_bn_affine`` (what produced the paper's 72.0; frozen gives 70.4, per the code's
  erratum); ``mode=all``: everything trains except the fixed Sobel filters. The released
  code re-initialised the convs in ``all`` mode, a bug its authors acknowledged
  (facebookresearch/deepcluster#16): here the convs keep their weights;
- the trunk stays in eval mode throughout (BatchNorm uses its running statistics, as the
  paper's ``model.features.eval()``); dropout is active in the head;
- SGD lr 0.003, momentum 0.9, wd 1e-6 on every trained parameter, batch 16, lr halved every
  5000 iterations, 80000 iterations, gradient norm clipped at 10, BCE-with-logits summed
  over classes and averaged over the batch, difficult labels masked out;
- train crops: RandomResizedCrop(image_size, scale 0.1-0.5, ratio 1) + flip; test: the sum
  of the logits of 10 such random crops (``test_crops=tencrop``: Resize + TenCrop instead);
- AP per class: ``sklearn.metrics.average_precision_score`` on the non-difficult test
  images, with the paper's tie rule (score - 1e-5 * label); mAP = mean over classes;
- the protocol checks itself that ``fc6-8`` left every trunk tensor unchanged (but the BN
  affine parameters it was allowed to train) and that ``all`` changed the trunk's weights.

``voc07-svm`` (Goyal et al. 2019, VISSL): per tap, features pooled as for the linear probes
(``preset``), L2-normalised ``x / (||x|| + 1e-5)``; per class a one-vs-rest
``LinearSVC(C, class_weight={1: 2, -1: 1}, squared hinge, L2, dual, tol 1e-4, max_iter 2000)``
for each C of the grid, C chosen by 3-fold (stratified) cross-validation on trainval scored by
average precision, refit on all of trainval; training counts difficult images as negatives,
the test leaves them out; AP = VOC all-points (area under the monotone precision envelope).
Classes are fitted in parallel threads (liblinear releases the GIL). Every finished
(class, C) fit is written to the feature-cache folder, keyed by the training features, the
labels and the SVM settings, so an interrupted run resumes without refitting them.

``voc07-lowshot`` (VISSL): for k in {1, 2, 4, 8, 16, 32, 64, 96} and 5 independent samples,
each class trains on k positives and (n_classes - 1) * k negatives drawn from trainval
(difficult images are never drawn), one SVM per C without cross-validation; test mAP per
(k, sample, C). As in VISSL, the reported C is the one with the best mean mAP over the
samples (selected on the test set; ``cost`` fixes it instead) and the rows are that C's
mean / min / max / std (population) over the samples.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torchvision import transforms as T

from dcbench.data import DataError, SkipCounter, normalize
from dcbench.data.voc import VOC_CLASSES, VOCSplit, available_classes, layout, load_voc_split
from dcbench.errors import UsageError
from dcbench.fileio import atomic_write_bytes
from dcbench.features import (assert_unchanged, extract_features, feature_key, key_hash, make_loader, pool_id,
                              prepared_backbone, show_progress, tensor_digests)
from dcbench.metrics.ap import finetune_class_ap, mean_ap, voc_class_ap
from dcbench.results import MetricRow
from dcbench.protocol import EvalContext, Protocol, ProtocolOutput, register_protocol
from dcbench.data.transforms import center_transform, center_transform_id, ten_crop_transform
from dcbench.pooling import probe_pooling, resolve_taps

log = logging.getLogger("dcbench")

#: the evaluated split for each training split
TEST_SPLIT = {"trainval": "test", "train": "val"}
COSTS = [0.01, 0.1, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 50.0, 100.0, 1000.0]
LOW_SHOT_KS = [1, 2, 4, 8, 16, 32, 64, 96]
#: C used when cross-validation is impossible (fewer than 2 positives or negatives)
FALLBACK_COST = 1.0
#: feature normalisation of VISSL: x / (||x|| + NORM_EPS)
NORM_EPS = 1e-5
#: bump when the persisted SVM fits change meaning
FIT_STORE_VERSION = 1


def _help(text: str) -> dict[str, str]:
    return {"help": text}


# ============================================================================= settings
@dataclass
class VocFinetuneSettings:
    """Settings of ``voc07-cls`` (defaults = PROTOCOLS.md / the paper's eval_voc_classif.py)."""

    mode: Literal["fc6-8", "all"] = field(default="fc6-8", metadata=_help(
        "fc6-8: convs frozen, fc6-fc8 trained; all: the whole network trained"))
    train_bn_affine: bool = field(default=True, metadata=_help(
        "fc6-8 only: also train the BatchNorm scale/shift of the frozen trunk (the paper's 72.0; "
        "false reproduces the erratum's 70.4)"))
    iterations: int = field(default=80000, metadata=_help("SGD iterations (batches)"))
    lr: float = field(default=0.003, metadata=_help("initial learning rate"))
    lr_step: int = field(default=5000, metadata=_help("the learning rate is halved every lr_step iterations"))
    momentum: float = field(default=0.9, metadata=_help("SGD momentum"))
    weight_decay: float = field(default=1e-6, metadata=_help("weight decay of every trained parameter"))
    batch_size: int = field(default=16, metadata=_help("training batch size"))
    clip_norm: float = field(default=10.0, metadata=_help("gradient-norm clipping threshold"))
    image_size: int = field(default=224, metadata=_help("crop side in px (train and test crops)"))
    crop_scale: list[float] = field(default_factory=lambda: [0.1, 0.5], metadata=_help(
        "RandomResizedCrop area range (ratio fixed at 1)"))
    test_crops: Literal["random10", "tencrop"] = field(default="random10", metadata=_help(
        "random10: sum of the logits of 10 random train-style crops (the paper); "
        "tencrop: Resize(s*256/224) + TenCrop(s), logits summed"))
    train_split: Literal["trainval", "train"] = field(default="trainval", metadata=_help(
        "trainval: train on trainval, test on test (report); train: train on train, test on val (tuning)"))
    classes: list[str] | None = field(default=None, metadata=_help(
        "classes to evaluate (default: the VOC classes whose ImageSets/Main files exist; all 20 on VOC2007)"))
    head_dim: int = field(default=4096, metadata=_help(
        "hidden width of the new fc6/fc7 for backbones without DeepCluster's classifier (timm, tv)"))
    seed: int = field(default=0, metadata=_help("seed of head init, shuffling, crops and BN re-estimation"))
    workers: int = field(default=4, metadata=_help("DataLoader worker processes"))
    bn_recalibrate: Literal["auto", "on", "off"] = field(default="auto", metadata=_help(
        "re-estimate BatchNorm running stats on trainval before fine-tuning; auto = on for random inits"))

    def validate(self) -> None:
        """Raise UsageError for impossible values."""
        _positive(self, ("iterations", "lr_step", "batch_size", "image_size", "head_dim"))
        if self.lr <= 0 or self.clip_norm <= 0:
            raise UsageError(f"bad value for {'lr' if self.lr <= 0 else 'clip_norm'}: must be positive")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise UsageError("bad value: weight_decay must be >= 0 and momentum in [0, 1)")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise UsageError(f"bad value {self.crop_scale} for crop_scale: give [min,max] with 0 < min <= max <= 1")
        _check_common(self)


@dataclass
class _SvmCommon:
    """Settings shared by ``voc07-svm`` and ``voc07-lowshot``."""

    taps: list[str] | None = field(default=None, metadata=_help(
        "taps to evaluate, all from one forward pass (default: every conv tap)"))
    preset: Literal["vissl", "deepcluster"] = field(default="vissl", metadata=_help(
        "pooling of each tap: the linear-probe table of this preset (VISSL's for the SVM benchmark)"))
    costs: list[float] = field(default_factory=lambda: list(COSTS), metadata=_help("the grid of SVM costs C"))
    positive_weight: float = field(default=2.0, metadata=_help("class_weight of the positives (negatives: 1)"))
    max_iter: int = field(default=2000, metadata=_help("liblinear iterations"))
    tol: float = field(default=1e-4, metadata=_help("liblinear stopping tolerance"))
    image_size: int = field(default=224, metadata=_help(
        "centre-crop side in px; images are resized to round(s*256/224) first"))
    batch_size: int = field(default=256, metadata=_help("extraction batch size"))
    train_split: Literal["trainval", "train"] = field(default="trainval", metadata=_help(
        "trainval: train on trainval, test on test (report); train: train on train, test on val"))
    classes: list[str] | None = field(default=None, metadata=_help(
        "classes to evaluate (default: the VOC classes whose ImageSets/Main files exist; all 20 on VOC2007)"))
    jobs: int = field(default=0, metadata=_help(
        "parallel SVM fits (threads); 0 = auto: min(classes, CPU cores, what free memory allows)"))
    cache: bool = field(default=True, metadata=_help(
        "read/write features and finished SVM fits in the feature cache (resumes interrupted runs)"))
    workers: int = field(default=4, metadata=_help("DataLoader worker processes"))
    seed: int = field(default=0, metadata=_help("seed of BN re-estimation, liblinear and low-shot sampling"))
    bn_recalibrate: Literal["auto", "on", "off"] = field(default="auto", metadata=_help(
        "re-estimate BatchNorm running stats on trainval on a copy before extracting; auto = on for random inits"))

    def validate(self) -> None:
        """Raise UsageError for impossible values."""
        _positive(self, ("max_iter", "image_size", "batch_size"))
        if not self.costs or any(c <= 0 for c in self.costs):
            raise UsageError(f"bad value {self.costs} for costs: give positive numbers")
        if self.positive_weight <= 0 or self.tol <= 0:
            raise UsageError("bad value: positive_weight and tol must be positive")
        if self.jobs < 0:
            raise UsageError(f"bad value {self.jobs} for jobs: 0 (auto) or a positive count")
        if self.taps is not None and not self.taps:
            raise UsageError("taps is empty: name at least one tap, or leave it unset for every conv tap")
        _check_common(self)


@dataclass
class VocSvmSettings(_SvmCommon):
    """Settings of ``voc07-svm`` (defaults = PROTOCOLS.md)."""

    cv_folds: int = field(default=3, metadata=_help("cross-validation folds choosing C per class"))

    def validate(self) -> None:
        """Raise UsageError for impossible values."""
        super().validate()
        if self.cv_folds < 2:
            raise UsageError(f"bad value {self.cv_folds} for cv_folds: at least 2")


@dataclass
class VocLowShotSettings(_SvmCommon):
    """Settings of ``voc07-lowshot`` (defaults = PROTOCOLS.md / VISSL)."""

    ks: list[int] = field(default_factory=lambda: list(LOW_SHOT_KS), metadata=_help(
        "positives per class in each low-shot training set (capped at what the class has)"))
    samples: int = field(default=5, metadata=_help("independent samples per k"))
    cost: float | None = field(default=None, metadata=_help(
        "fixed C; default (VISSL): per k, the C of the grid with the best mean test mAP over the samples"))

    def validate(self) -> None:
        """Raise UsageError for impossible values."""
        super().validate()
        if not self.ks or any(k < 1 for k in self.ks):
            raise UsageError(f"bad value {self.ks} for ks: give positive integers, e.g. [1,2,4]")
        if self.samples < 1:
            raise UsageError(f"bad value {self.samples} for samples: at least 1")
        if self.cost is not None and self.cost <= 0:
            raise UsageError(f"bad value {self.cost} for cost: must be positive")


def _positive(settings: Any, names: Sequence[str]) -> None:
    for name in names:
        if getattr(settings, name) < 1:
            raise UsageError(f"bad value {getattr(settings, name)} for {name}: must be at least 1")


def _check_common(settings: Any) -> None:
    if settings.workers < 0:
        raise UsageError(f"bad value {settings.workers} for workers: must be >= 0")
    if settings.classes is not None and (not settings.classes or len(set(settings.classes)) != len(settings.classes)):
        raise UsageError(f"bad value {settings.classes} for classes: give distinct class names, e.g. [cat,dog]")


# ============================================================================= data
@dataclass
class VocData:
    """The two splits of a run, with their labels read."""

    train: VOCSplit
    test: VOCSplit

    @property
    def classes(self) -> list[str]:
        """The evaluated classes, in label-column order."""
        return list(self.train.classes)

    def fingerprint(self) -> str:
        """16 hex chars over both splits (images and image-set files)."""
        text = f"{self.train.split}:{self.train.fingerprint()}\n{self.test.split}:{self.test.fingerprint()}\n"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        """JSON-safe facts recorded in the result."""
        return {"voc_dir": str(self.train.voc_dir), "classes": self.classes,
                "all_voc_classes": self.classes == list(VOC_CLASSES),
                "images": {self.train.split: len(self.train), self.test.split: len(self.test)}}


def load_voc_data(root: Path, settings: Any, warn: bool = True) -> VocData:
    """Both splits of ``settings.train_split`` with labels (DataError naming a missing piece);
    ``warn``: log when the devkit holds only some of the VOC classes."""
    test_split = TEST_SPLIT[settings.train_split]
    splits = [settings.train_split, test_split]
    classes = settings.classes or available_classes(root, splits, "2007")
    if warn and settings.classes is None and len(classes) < len(VOC_CLASSES):
        log.warning("VOCdevkit has the class files of %d of the 20 VOC classes; evaluating on %s "
                    "(mAP is comparable to published numbers only with all 20)", len(classes), ", ".join(classes))
    train = load_voc_split(root, settings.train_split, "2007", classes)
    test = load_voc_split(root, test_split, "2007", classes)
    return VocData(train, test)


class _VocProtocol(Protocol):
    """Shared data layout and check of the VOC07 classification protocols."""

    version: ClassVar[str] = "1"
    data_layout: ClassVar[str] = f"""\
{layout("2007")}
ROOT may also be ROOT/VOCdevkit or the VOC2007 folder itself. Labels: <cls>_<split>.txt lines
"<id> <label>" with 1 positive, -1 negative, 0 difficult. Default: train on trainval, test on
test (the VOC2007 test set is a separate download extracted into the same VOCdevkit).
A devkit holding the class files of only some VOC classes is evaluated on those (recorded).
"""

    def check_data(self, root: Path, settings: Any) -> None:
        """Read the image sets of both splits and check the JPEGs exist (cheap)."""
        load_voc_data(Path(root), settings, warn=False)


def _labels_of(split: VOCSplit, indices: np.ndarray) -> np.ndarray:
    return np.asarray(split.labels)[indices]


# ============================================================================= fine-tuning
class _DeepClusterTrunk(nn.Module):
    """DeepCluster AlexNet/VGG: fixed Sobel, conv features, flatten (what fc6-8 freezes)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.sobel = net.sobel
        self.features = net.features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sobel is not None:
            x = self.sobel(x)
        return torch.flatten(self.features(x), 1)


class _PooledTrunk(nn.Module):
    """Any other backbone: its last tap, averaged over space (or tokens)."""

    def __init__(self, backbone: nn.Module, tap: str) -> None:
        super().__init__()
        self.backbone, self.tap = backbone, tap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.backbone(x, taps=[self.tap])[self.tap]
        if out.dim() == 4:
            return out.mean(dim=(2, 3))
        return out.mean(dim=1) if out.dim() == 3 else out


class FineTuneNet(nn.Module):
    """trunk -> head (fc6, fc7) -> top (fc8): the network ``voc07-cls`` trains."""

    def __init__(self, trunk: nn.Module, head: nn.Sequential, top: nn.Linear, kind: str) -> None:
        super().__init__()
        self.trunk, self.head, self.top = trunk, head, top
        self.kind = kind
        #: trunk parameters the backbone itself keeps fixed (the Sobel filters): never trained
        self.fixed = frozenset(name for name, p in trunk.named_parameters() if not p.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.top(self.head(self.trunk(x)))


def _mlp_head(in_dim: int, hidden: int) -> nn.Sequential:
    """AlexNet's classifier shape: Dropout, Linear, ReLU, Dropout, Linear, ReLU."""
    return nn.Sequential(nn.Dropout(0.5), nn.Linear(in_dim, hidden), nn.ReLU(inplace=True),
                         nn.Dropout(0.5), nn.Linear(hidden, hidden), nn.ReLU(inplace=True))


def _trunk_dim(trunk: nn.Module, image_size: int) -> int:
    trunk.eval()
    with torch.no_grad():
        try:
            return int(trunk(torch.zeros(1, 3, image_size, image_size)).shape[1])
        except (ValueError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageError(f"image_size={image_size} does not fit this backbone ({first}); "
                             f"pick a larger image_size") from None


def _fit_first_linear(head: nn.Sequential, in_dim: int) -> nn.Sequential:
    """fc6 rebuilt when the trunk's output size differs (another input size): it is re-initialised anyway."""
    for i, layer in enumerate(head):
        if isinstance(layer, nn.Linear):
            if layer.in_features != in_dim:
                head[i] = nn.Linear(in_dim, layer.out_features)
            break
    return head


def build_finetune_net(backbone: nn.Module, n_classes: int, image_size: int, head_dim: int = 4096,
                       seed: int = 0) -> FineTuneNet:
    """A :class:`FineTuneNet` over a deep COPY of ``backbone`` (see the module docstring)."""
    net = copy.deepcopy(backbone).cpu()
    if hasattr(net, "set_top_layer"):
        net.set_top_layer(None)  # DeepCluster's cluster head plays no part here
    features, classifier = getattr(net, "features", None), getattr(net, "classifier", None)
    if isinstance(features, nn.Module) and isinstance(classifier, nn.Sequential):
        trunk, head, kind = _DeepClusterTrunk(net), classifier, "deepcluster: conv trunk + its fc6/fc7 (re-initialised)"
    else:
        tap = net.conv_tap_names[-1]
        for name, p in net.named_parameters():
            if name.startswith(tuple(getattr(net, "head_prefixes", ()))):
                p.requires_grad_(False)  # the model's own classifier never runs: keep it out of training
        trunk, head, kind = _PooledTrunk(net, tap), None, f"global average pool of {tap} + new fc6/fc7 MLP"
    in_dim = _trunk_dim(trunk, image_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = _mlp_head(in_dim, head_dim) if head is None else _fit_first_linear(head, in_dim)
        for layer in head:
            if isinstance(layer, nn.Linear):  # the paper's re-initialisation of fc6, fc7
                nn.init.normal_(layer.weight, 0.0, 0.01)
                nn.init.constant_(layer.bias, 0.1)
        last = [m for m in head if isinstance(m, nn.Linear)][-1]
        top = nn.Linear(last.out_features, n_classes)  # torch's default init, as the paper's new top layer
        nn.init.constant_(top.bias, 0.1)
    return FineTuneNet(trunk, head, top, kind)


def _bn_affine_names(trunk: nn.Module) -> set[str]:
    names = set()
    for prefix, module in trunk.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
            names |= {f"{prefix}.weight" if prefix else "weight", f"{prefix}.bias" if prefix else "bias"}
    return names


def set_trainable(net: FineTuneNet, mode: str, train_bn_affine: bool) -> set[str]:
    """Freeze per ``mode``; return the trunk tensors allowed to change. Parameters frozen in
    the backbone itself (the Sobel filters) stay frozen in both modes."""
    bn_affine = _bn_affine_names(net.trunk)
    allowed = set()
    for name, p in net.trunk.named_parameters():
        train = name not in net.fixed and (mode == "all" or (train_bn_affine and name in bn_affine))
        p.requires_grad_(train)
        if train:
            allowed.add(name)
    return allowed


def lr_at(lr0: float, step: int, iteration: int) -> float:
    """The paper's schedule: lr0 halved every ``step`` iterations."""
    return lr0 * 0.5 ** (iteration // step)


def masked_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits against ``labels == 1``, difficult (0) entries masked, summed over
    classes and averaged over the batch (the paper's loss)."""
    loss = F.binary_cross_entropy_with_logits(logits, (labels == 1).float(), reduction="none")
    return loss.masked_fill(labels == 0, 0.0).sum() / labels.shape[0]


def finetune_transform(image_size: int, scale: Sequence[float]) -> Callable:
    """RandomResizedCrop(s, scale, ratio 1) + flip, ImageNet normalisation (train and random10 test)."""
    return T.Compose([T.RandomResizedCrop(image_size, scale=tuple(scale), ratio=(1.0, 1.0)),
                      T.RandomHorizontalFlip(), T.ToTensor(), normalize()])


def _train(net: FineTuneNet, train: VOCSplit, settings: VocFinetuneSettings, device: str,
           progress: bool) -> dict[str, Any]:
    """The SGD loop; returns a small log (losses every 10% of the run, skipped images)."""
    ds = train.dataset(finetune_transform(settings.image_size, settings.crop_scale))
    loader = make_loader(ds, settings.batch_size, settings.workers, device, shuffle=True, seed=settings.seed,
                         persistent=True)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    counter, iteration, losses = SkipCounter(ds), 0, []
    every = max(1, settings.iterations // 10)
    bar = _bar(settings.iterations, "fine-tune", progress)
    while iteration < settings.iterations:
        done_before = iteration
        net.train()
        net.trunk.eval()  # BatchNorm keeps its running statistics, in both modes
        for images, _t, idx, n_skipped in loader:
            counter.update(idx, n_skipped)
            if len(idx) == 0:
                continue
            for group in optimizer.param_groups:
                group["lr"] = lr_at(settings.lr, settings.lr_step, iteration)
            labels = torch.from_numpy(train.labels[idx.numpy()]).to(device)
            loss = masked_bce(net(images.to(device, non_blocking=True)), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, settings.clip_norm)
            optimizer.step()
            iteration += 1
            if iteration % every == 0 or iteration == settings.iterations:
                losses.append([iteration, round(loss.item(), 5)])
            if bar is not None:
                bar.update(1)
            if iteration >= settings.iterations:
                break
        if iteration == done_before:
            raise DataError(f"no readable image in {train.voc_dir / 'JPEGImages'} for split {train.split}")
    if bar is not None:
        bar.close()
    counter.report()
    return {"loss": losses, "skipped_train_images": counter.count}


def _bar(total: int, desc: str, progress: bool) -> Any:
    if not show_progress(progress):
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="it", leave=False)


@torch.no_grad()
def score_test_split(net: FineTuneNet, test: VOCSplit, settings: VocFinetuneSettings,
                device: str) -> tuple[np.ndarray, np.ndarray]:
    """Summed logits per test image (N x C) and the mask of images that could be read."""
    tencrop = settings.test_crops == "tencrop"
    transform = (ten_crop_transform(settings.image_size) if tencrop
                 else finetune_transform(settings.image_size, settings.crop_scale))
    ds = test.dataset(transform)
    batch = max(1, settings.batch_size // 10) if tencrop else settings.batch_size
    loader = make_loader(ds, batch, settings.workers, device)
    scores = np.zeros((len(ds), len(test.classes)), dtype=np.float64)
    seen = np.zeros(len(ds), dtype=bool)
    net.eval()
    for _ in range(1 if tencrop else 10):  # the paper: 10 passes of random crops
        for images, _t, idx, _n in loader:
            if len(idx) == 0:
                continue
            images = images.to(device, non_blocking=True)
            if tencrop:  # B x 10 x 3 x s x s: sum the logits of each image's crops
                logits = net(images.flatten(0, 1)).view(len(idx), -1, scores.shape[1]).sum(1)
            else:
                logits = net(images)
            scores[idx.numpy()] += logits.double().cpu().numpy()
            seen[idx.numpy()] = True
    return scores, seen


def _tensor_kind(trunk: nn.Module, name: str) -> str:
    """conv / bn_affine / bn_stats / linear / other: what a state-dict entry of the trunk is."""
    prefix, _, leaf = name.rpartition(".")
    module = trunk.get_submodule(prefix) if prefix else trunk
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "bn_affine" if leaf in ("weight", "bias") else "bn_stats"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    return "linear" if isinstance(module, nn.Linear) else "other"


def check_trunk(trunk: nn.Module, before: dict[str, str], allowed: set[str], mode: str,
                iterations: int) -> dict[str, Any]:
    """fc6-8: nothing but ``allowed`` (BN affine) changed; all: some trained trunk weight changed.
    Raises RuntimeError otherwise; returns what changed, by kind, for the result."""
    after = tensor_digests(trunk)
    changed = sorted(k for k in before if before[k] != after.get(k))
    kinds: dict[str, int] = {}
    for name in changed:
        kind = _tensor_kind(trunk, name)
        kinds[kind] = kinds.get(kind, 0) + 1
    if mode == "fc6-8":
        forbidden = [k for k in changed if k not in allowed]
        if forbidden:
            raise RuntimeError(f"fc6-8 fine-tuning changed {len(forbidden)} frozen trunk tensors "
                               f"({', '.join(forbidden[:5])}); the result is invalid")
        rule = "fc6-8: every frozen trunk tensor unchanged"
    else:
        if iterations > 0 and not any(k in allowed for k in changed):
            raise RuntimeError("all-layers fine-tuning left every trunk weight unchanged; the result is invalid")
        rule = "all: the trunk weights changed"
    return {"passed": True, "rule": rule, "changed": kinds, "trainable_trunk_tensors": len(allowed)}


def ap_rows(aps: Sequence[float], classes: Sequence[str], tap: str, split: str,
            seed: int) -> tuple[list[MetricRow], dict[str, float | None]]:
    """``mAP`` (mean over the classes) and ``AP_<cls>`` rows, x100, plus the per-class dict
    recorded in the result; a class without test positives (AP undefined) gets no row."""
    rows = [MetricRow("mAP", 100.0 * mean_ap(aps), tap, split, None, seed)] if not all(map(math.isnan, aps)) else []
    rows += [MetricRow(f"AP_{cls}", 100.0 * ap, tap, split, None, seed)
             for cls, ap in zip(classes, aps) if not math.isnan(ap)]
    return rows, {cls: None if math.isnan(ap) else round(100.0 * ap, 4) for cls, ap in zip(classes, aps)}


@register_protocol
class VocFinetune(_VocProtocol):
    """``voc07-cls``: fine-tune fc6-8 or all layers on VOC2007, mAP over the classes."""

    name: ClassVar[str] = "voc07-cls"
    description: ClassVar[str] = "Pascal VOC07 classification by fine-tuning fc6-8 or all layers (paper Table 2)"
    Settings: ClassVar[type] = VocFinetuneSettings

    def run(self, ckpt: Any, settings: VocFinetuneSettings, root: Path, ctx: EvalContext) -> ProtocolOutput:
        """Fine-tune a copy of the backbone, then score the test split; see the module docstring."""
        started = time.perf_counter()
        data = load_voc_data(Path(root), settings)
        original = tensor_digests(ckpt.backbone)
        recal_ds = data.train.dataset(center_transform(settings.image_size))
        with torch.random.fork_rng(devices=[]), prepared_backbone(
                ckpt, settings.bn_recalibrate, recal_ds, max(settings.batch_size, 32), settings.workers,
                ctx.device, settings.seed, ctx.progress) as (backbone, _sha, bn_info):
            torch.manual_seed(settings.seed)
            net = build_finetune_net(backbone, len(data.classes), settings.image_size, settings.head_dim,
                                     settings.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            allowed = set_trainable(net, settings.mode, settings.train_bn_affine)
            net.to(ctx.device)
            before = tensor_digests(net.trunk)
            log_ = _train(net, data.train, settings, ctx.device, ctx.progress)
            check = check_trunk(net.trunk, before, allowed, settings.mode, settings.iterations)
            scores, seen = score_test_split(net, data.test, settings, ctx.device)
        assert_unchanged(ckpt.backbone, original, what="checkpoint backbone (fine-tuning works on a copy)")
        labels = data.test.labels[seen]
        aps = [finetune_class_ap(scores[seen, c], labels[:, c]) for c in range(len(data.classes))]
        rows, per_class = ap_rows(aps, data.classes, settings.mode, data.test.split, settings.seed)
        extra = {**data.describe(), "mode": settings.mode, "head": net.kind, "trunk_check": check,
                 "train_bn_affine": settings.train_bn_affine if settings.mode == "fc6-8" else None,
                 "test_crops": "sum of logits over 10 random crops" if settings.test_crops == "random10"
                 else "sum of logits over Resize + TenCrop",
                 "ap_rule": "sklearn average_precision_score on non-difficult images, score - 1e-5 * label",
                 "ap_per_class": per_class, "bn_recalibrate": bn_info, **log_,
                 "skipped_test_images": int((~seen).sum()),
                 "metric_tap": "the tap of the rows is the mode (fc6-8 / all)",
                 "finetune_wall_s": round(time.perf_counter() - started, 3)}
        return ProtocolOutput(rows, data.fingerprint(), extra)


# ============================================================================= SVM core
def l2_normalize(x: np.ndarray) -> np.ndarray:
    """VISSL's row normalisation ``x / (||x|| + 1e-5)``, in float64 (liblinear's type)."""
    x = np.asarray(x, dtype=np.float64)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + NORM_EPS)


def svm_targets(labels: np.ndarray) -> np.ndarray:
    """Training targets from 1/-1/0 labels: difficult (0) counts as negative (VISSL)."""
    return np.where(np.asarray(labels) == 1, 1, -1).astype(np.int64)


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
        from sklearn.svm import LinearSVC

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
    from sklearn.model_selection import StratifiedKFold, cross_val_score

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


def _atomic_bytes(path: Path, data: bytes) -> None:
    """No half-written fit survives an interruption."""
    atomic_write_bytes(path, data)


class FitStore:
    """Finished SVM fits in one folder (None: nothing persisted). One file per unit of work,
    written atomically, so concurrent threads never share a file."""

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
            _atomic_bytes(meta, json.dumps(key, indent=1, sort_keys=True).encode())
        return store

    def _path(self, name: str, suffix: str) -> Path:
        safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)
        return self.folder / f"{safe}{suffix}"

    def load_fit(self, name: str) -> dict | None:
        """A fit saved by :meth:`save_fit`, or None."""
        if self.folder is None or not self._path(name, ".npz").exists():
            return None
        try:
            with np.load(self._path(name, ".npz")) as z:
                return {"cv_ap": float(z["cv_ap"]), "coef": z["coef"], "intercept": float(z["intercept"]),
                        "n_iter": int(z["n_iter"]), "folds": int(z["folds"])}
        except (OSError, ValueError, KeyError) as exc:
            log.warning("ignoring unreadable SVM fit %s: %s", self._path(name, ".npz"), exc)
            return None

    def save_fit(self, name: str, fit: dict) -> None:
        """Persist one fit (coef, intercept, CV AP)."""
        if self.folder is None:
            return
        import io

        buf = io.BytesIO()
        np.savez(buf, **{k: np.asarray(v) for k, v in fit.items()})
        _atomic_bytes(self._path(name, ".npz"), buf.getvalue())

    def load_json(self, name: str) -> dict:
        """A JSON record saved by :meth:`save_json` ({} when absent or unreadable)."""
        if self.folder is None or not self._path(name, ".json").exists():
            return {}
        try:
            return json.loads(self._path(name, ".json").read_text())
        except (OSError, ValueError):
            return {}

    def save_json(self, name: str, record: dict) -> None:
        """Persist a small JSON record."""
        if self.folder is not None:
            _atomic_bytes(self._path(name, ".json"), json.dumps(record, sort_keys=True).encode())

    def count(self) -> int:
        """Files stored (fits and records)."""
        if self.folder is None:
            return 0
        return sum(1 for p in self.folder.iterdir() if p.suffix in (".npz", ".json") and p.name != "key.json")


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
    from joblib import Parallel, delayed
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():  # set in this thread, before the workers start: no filter race
        warnings.simplefilter("ignore", ConvergenceWarning)
        if jobs <= 1:
            return [fn(*t) for t in tasks]
        return Parallel(n_jobs=jobs, prefer="threads")(delayed(fn)(*t) for t in tasks)


def svm_tap(x_train: np.ndarray, train_labels: np.ndarray, x_test: np.ndarray, test_labels: np.ndarray,
            classes: Sequence[str], costs: Sequence[float], params: SvmParams, store: FitStore,
            jobs: int) -> tuple[list[float], list[ClassResult]]:
    """One tap of ``voc07-svm``: per class the CV-chosen SVM, then its test AP (all-points,
    difficult excluded). Features are normalised here."""
    x_train, x_test = l2_normalize(x_train), l2_normalize(x_test)
    tasks = [(x_train, svm_targets(train_labels[:, c]), cls, costs, params, store) for c, cls in enumerate(classes)]
    results = run_parallel(train_class, tasks, svm_jobs(jobs, len(tasks), *x_train.shape))
    aps = [voc_class_ap(x_test @ r.coef + r.intercept, test_labels[:, c]) for c, r in enumerate(results)]
    return aps, results


# ----------------------------------------------------------------------------- low-shot
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


# ============================================================================= SVM protocols
@dataclass
class _Features:
    """Extracted features of both splits for every tap, and how they were made."""

    train: Any  # ExtractedFeatures
    test: Any
    pooling: dict[str, Any]
    pool_ids: dict[str, str]
    sha: str
    bn_info: dict[str, Any]
    transform_id: str
    train_fingerprint: str


def extract_voc_features(ckpt: Any, data: VocData, taps: list[str], settings: _SvmCommon,
                         ctx: EvalContext) -> _Features:
    """Pooled centre-crop features of train and test splits through the feature cache."""
    plans = probe_pooling(ckpt.backbone, taps, settings.image_size, settings.preset)
    pools = {t: p.module() for t, p in plans.items()}
    transform = center_transform(settings.image_size)
    transform_id = center_transform_id(settings.image_size)
    train_ds, test_ds = data.train.dataset(transform), data.test.dataset(transform)
    cache_dir = ctx.cache_dir if settings.cache else None
    with torch.random.fork_rng(devices=[]), prepared_backbone(
            ckpt, settings.bn_recalibrate, train_ds, settings.batch_size, settings.workers, ctx.device,
            settings.seed, ctx.progress) as (backbone, sha, bn_info):
        feats = [extract_features(backbone, ds, taps, pools, transform_id, sha, cache_dir, settings.batch_size,
                                  settings.workers, ctx.device, ctx.progress, mmap=True)
                 for ds in (train_ds, test_ds)]
    return _Features(feats[0], feats[1], {t: p.describe() for t, p in plans.items()},
                     {t: pool_id(pools[t]) for t in taps}, sha, bn_info, transform_id, train_ds.fingerprint())


def _store_key(kind: str, feats: _Features, tap: str, train_labels: np.ndarray, params: SvmParams,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a stored fit depends on: the training features, their rows and labels, the SVM settings."""
    features = feature_key(feats.sha, tap, feats.transform_id, feats.train_fingerprint, feats.pool_ids[tap])
    rows = hashlib.sha256(np.ascontiguousarray(feats.train.indices).tobytes()).hexdigest()[:16]
    labels = hashlib.sha256(np.ascontiguousarray(train_labels).tobytes()).hexdigest()[:16]
    return {"kind": kind, "version": FIT_STORE_VERSION, "features": key_hash(features), "rows": rows,
            "labels": labels, "svm": params.describe(), **(extra or {})}


def _params(settings: _SvmCommon, cv_folds: int) -> SvmParams:
    return SvmParams(settings.positive_weight, settings.max_iter, settings.tol, cv_folds, settings.seed)


@register_protocol
class VocSvm(_VocProtocol):
    """``voc07-svm``: linear SVMs per tap on frozen features (Goyal et al. / VISSL)."""

    name: ClassVar[str] = "voc07-svm"
    description: ClassVar[str] = "Pascal VOC07 classification with linear SVMs per layer on frozen features (VISSL)"
    Settings: ClassVar[type] = VocSvmSettings

    def run(self, ckpt: Any, settings: VocSvmSettings, root: Path, ctx: EvalContext) -> ProtocolOutput:
        """Extract (or read) features, fit the SVMs of every class and tap, score the test split."""
        started = time.perf_counter()
        data = load_voc_data(Path(root), settings)
        taps = resolve_taps(ckpt.backbone, settings.taps)
        feats = extract_voc_features(ckpt, data, taps, settings, ctx)
        train_labels = _labels_of(data.train, feats.train.indices)
        test_labels = _labels_of(data.test, feats.test.indices)
        params = _params(settings, settings.cv_folds)
        rows, per_tap = [], {}
        for tap in taps:
            store = FitStore.for_key(ctx.cache_dir if settings.cache else None, feats.sha,
                                     _store_key("voc07-svm", feats, tap, train_labels, params))
            aps, results = svm_tap(feats.train.features[tap], train_labels, feats.test.features[tap], test_labels,
                                   data.classes, settings.costs, params, store, settings.jobs)
            tap_rows, per_class = ap_rows(aps, data.classes, tap, data.test.split, settings.seed)
            rows += tap_rows
            per_tap[tap] = {"ap": per_class, "chosen_cost": {r.cls: r.cost for r in results},
                            "cv_ap": {r.cls: [None if math.isnan(v) else round(100 * v, 3) for v in r.cv_aps]
                                      for r in results},
                            "fits_computed": sum(r.fitted for r in results),
                            "fits_reused": len(results) * len(settings.costs) - sum(r.fitted for r in results),
                            "not_converged": sum(r.not_converged for r in results)}
            log.info("voc07-svm %s: mAP %.2f", tap, 100.0 * mean_ap(aps))
        extra = {**data.describe(), **_svm_extra(feats, params, settings, data),
                 "per_tap": per_tap, "costs": list(settings.costs),
                 "svm_wall_s": round(time.perf_counter() - started, 3)}
        return ProtocolOutput(rows, data.fingerprint(), extra)


def _svm_extra(feats: _Features, params: SvmParams, settings: _SvmCommon, data: VocData) -> dict[str, Any]:
    return {"pooling": feats.pooling, "preset": settings.preset, "svm": params.describe(),
            "ap_rule": "VOC all-points (area under the monotone precision envelope), difficult excluded",
            "train_labels": "difficult counted as negative", "crops": "center",
            "bn_recalibrate": feats.bn_info,
            "skipped_images": {data.train.split: len(data.train) - len(feats.train.indices),
                               data.test.split: len(data.test) - len(feats.test.indices)},
            "fit_store": "feature cache" if settings.cache else "off"}


@register_protocol
class VocLowShot(_VocProtocol):
    """``voc07-lowshot``: low-shot linear SVMs per tap (VISSL)."""

    name: ClassVar[str] = "voc07-lowshot"
    description: ClassVar[str] = "Pascal VOC07 low-shot SVMs per layer (k positives per class, VISSL)"
    Settings: ClassVar[type] = VocLowShotSettings

    def run(self, ckpt: Any, settings: VocLowShotSettings, root: Path, ctx: EvalContext) -> ProtocolOutput:
        """Sample the low-shot sets, fit every (k, sample, class, C), report per k."""
        started = time.perf_counter()
        data = load_voc_data(Path(root), settings)
        if settings.cost is not None and settings.cost not in settings.costs:
            raise UsageError(f"cost={settings.cost} is not in costs {settings.costs}; add it to the grid")
        taps = resolve_taps(ckpt.backbone, settings.taps)
        feats = extract_voc_features(ckpt, data, taps, settings, ctx)
        train_labels = _labels_of(data.train, feats.train.indices)
        test_labels = _labels_of(data.test, feats.test.indices)
        params = _params(settings, 0)
        sets = {(k, s): lowshot_sample(train_labels, k, np.random.default_rng([settings.seed, k, s]))
                for k in dict.fromkeys(settings.ks) for s in range(settings.samples)}
        rows, per_tap = [], {}
        for tap in taps:
            tap_rows, per_tap[tap] = self._tap(tap, feats, data, sets, train_labels, test_labels, params, settings,
                                               ctx)
            rows += tap_rows
        extra = {**data.describe(), **_svm_extra(feats, params, settings, data),
                 "per_tap": per_tap, "costs": list(settings.costs), "samples": settings.samples,
                 "cost_selection": ("fixed" if settings.cost is not None
                                    else "VISSL: per k, the C with the best mean test mAP over the samples"),
                 "min_positives_drawn": {str(k): min(int((train_labels[rows, c] == 1).sum())
                                                     for c, rows in enumerate(sets[(k, 0)]))
                                         for k in dict.fromkeys(settings.ks)},
                 "lowshot_wall_s": round(time.perf_counter() - started, 3)}
        return ProtocolOutput(rows, data.fingerprint(), extra)

    @staticmethod
    def _tap(tap: str, feats: _Features, data: VocData, sets: dict, train_labels: np.ndarray,
             test_labels: np.ndarray, params: SvmParams, settings: VocLowShotSettings,
             ctx: EvalContext) -> tuple[list[MetricRow], dict[str, Any]]:
        x_train = l2_normalize(feats.train.features[tap])
        x_test = l2_normalize(feats.test.features[tap])
        key = _store_key("voc07-lowshot", feats, tap, train_labels, params,
                         {"test_features": key_hash(feature_key(feats.sha, tap, feats.transform_id,
                                                                data.test.dataset().fingerprint(),
                                                                feats.pool_ids[tap])),
                          "test_labels": hashlib.sha256(test_labels.tobytes()).hexdigest()[:16],
                          "seed": settings.seed})
        store = FitStore.for_key(ctx.cache_dir if settings.cache else None, feats.sha, key)
        tasks, names = [], []
        for (k, s), per_class in sets.items():
            for c, cls in enumerate(data.classes):
                rows = per_class[c]
                tasks.append((x_train[rows], svm_targets(train_labels[rows, c]), x_test, test_labels[:, c],
                              f"k{k}_s{s}_{cls}", settings.costs, params, store))
                names.append((k, s, c))
        jobs = svm_jobs(settings.jobs, len(tasks), max(len(t[0]) for t in tasks), x_train.shape[1])
        results = run_parallel(lowshot_unit, tasks, jobs)
        k_index = {k: i for i, k in enumerate(dict.fromkeys(settings.ks))}
        ap = np.full((len(k_index), settings.samples, len(data.classes), len(settings.costs)), np.nan)
        for (k, s, c), res in zip(names, results):
            ap[k_index[k], s, c] = [np.nan if v is None else v for v in res["aps"]]
        rows, chosen = [], {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN classes (no test positive)
            sample_map = np.nanmean(ap, axis=2)  # k x samples x costs: mAP over the classes
        for k, i in k_index.items():
            if np.isnan(sample_map[i]).all():
                continue  # no class has a test positive
            cost, stats = lowshot_stats(sample_map[i], settings.costs, settings.cost)
            chosen[str(k)] = cost
            rows += [MetricRow(f"mAP_k{k}_{stat}", value, tap, data.test.split, None, settings.seed)
                     for stat, value in stats.items()]
        return rows, {"chosen_cost": chosen, "fits_computed": sum(r["fitted"] for r in results)}
