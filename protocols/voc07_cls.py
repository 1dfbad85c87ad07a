"""Pascal VOC 2007 classification by fine-tuning (``voc07-cls``): the DeepCluster paper's
Table 2 (Caron et al., ECCV 2018), as its released code runs it
(facebookresearch/deepcluster, ``eval_voc_classif.py``).

Labels come from ``ImageSets/Main/<cls>_<split>.txt``: 1 positive, -1 negative, 0 difficult.
Train on trainval and test on test (``train_split=train``: train -> val, for tuning).

- the network is a deep COPY of the backbone (the checkpoint is never touched): its conv
  trunk, then fc6 and fc7 re-initialised N(0, 0.01) with bias 0.1 (fc6 rebuilt for the input
  size when needed), then a new ``Linear(4096, n_classes)`` (torch's default init, bias 0.1);
  for backbones without DeepCluster's ``features``/``classifier`` (timm, torchvision) the
  trunk is the backbone up to its last tap, globally average-pooled (a timm ViT: up to its
  final-normed CLS token, tap ``cls``, the feature timm's / DeiT's fine-tuning head reads), and fc6-fc7 are a new
  ``Dropout, Linear(C, 4096), ReLU, Dropout, Linear(4096, 4096), ReLU`` (``head_dim``);
  see :mod:`dcbench.voc_finetune`;
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
- published weights (timm / torchvision / hf-hub) are fine-tuned with their own mean, std and
  interpolation (``input_convention=weights``; ``test_crops=tencrop``: also their crop ratio; see
  :func:`dcbench.data.transforms.resolve_convention`), recorded in ``extra.input_convention``;
  other checkpoints with the paper's (ImageNet mean/std, bilinear), exactly as before;
- AP per class: ``sklearn.metrics.average_precision_score`` on the non-difficult test
  images, with the paper's tie rule (score - 1e-5 * label); mAP = mean over classes;
- the run checks itself (:mod:`dcbench.finetune`) that ``fc6-8`` left every trunk tensor
  unchanged (but the BN affine parameters it was allowed to train) and that ``all`` changed
  the trunk's weights.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from dcbench.data.transforms import (ConventionMode, InputConvention, convention_center_transform, describe_applied,
                                     resolve_convention, resolve_uncropped_convention)
from dcbench.errors import UsageError
from dcbench.features import prepared_backbone
from dcbench.metrics.ap import finetune_class_ap
from dcbench.protocol import (CommonSettings, Deviation, EvalContext, Protocol, ProtocolOutput, batch_refusal,
                              decode_cache_setting, register_protocol, setting)
from dcbench.provenance import DECODE_CACHE_SOURCE, FROZEN_FEATURE_SOURCES
from dcbench.results import outcome_key
from dcbench.stats import map_outcomes
from dcbench.voc_classification import VOC07_LAYOUT, ap_rows, check_classes, load_voc_data
from dcbench.voc_finetune import build_finetune_net, finetune_and_score


@dataclass
class VocFinetuneSettings(CommonSettings):
    """Settings of ``voc07-cls`` (defaults: facebookresearch/deepcluster ``eval_voc_classif.py``
    and the paper's Table 2)."""

    mode: Literal["fc6-8", "all"] = setting(
        "fc6-8", "fc6-8: convs frozen, fc6-fc8 trained; all: the whole network trained")
    # eval_voc_classif.py --train_batchnorm: the paper's 72.0 trained them, the erratum's 70.4 did not
    train_bn_affine: bool = setting(
        True, "fc6-8 only: also train the BatchNorm scale/shift of the frozen trunk (the paper's 72.0; "
              "false reproduces the erratum's 70.4)")
    # eval_voc_classif.py: --nit 80000, --lr 0.003, halved every --stepsize 5000, SGD momentum 0.9, --wd 1e-6
    iterations: int = setting(80000, "SGD iterations (batches)")
    lr: float = setting(0.003, "initial learning rate")
    lr_step: int = setting(5000, "the learning rate is halved every lr_step iterations")
    momentum: float = setting(0.9, "SGD momentum")
    weight_decay: float = setting(1e-6, "weight decay of every trained parameter")
    batch_size: int = setting(16, "training batch size")  # eval_voc_classif.py: DataLoader batch_size=16
    # eval_voc_classif.py: clip_grad_norm_(model.parameters(), 10)
    clip_norm: float = setting(10.0, "gradient-norm clipping threshold")
    image_size: int = setting(224, "crop side in px (train and test crops)")
    # eval_voc_classif.py: RandomResizedCrop(224, scale=(--min_scale 0.1, --max_scale 0.5), ratio=(1, 1))
    crop_scale: list[float] = setting(help="RandomResizedCrop area range (ratio fixed at 1)",
                                      factory=lambda: [0.1, 0.5])
    # eval_voc_classif.py --eval_random_crops 1: the outputs of 10 random crops per test image, summed
    test_crops: Literal["random10", "tencrop"] = setting(
        "random10", "random10: sum of the logits of 10 random train-style crops (the paper); "
                    "tencrop: Resize(s*256/224) + TenCrop(s), logits summed")
    input_convention: ConventionMode = setting(
        "weights", "weights: published weights (timm/tv/hf-hub) are read with their own mean, std and interpolation "
                   "(test_crops=tencrop: and crop ratio); preset: always ImageNet mean/std, bilinear")
    train_split: Literal["trainval", "train"] = setting(
        "trainval", "trainval: train on trainval, test on test (report); train: train on train, test on val (tuning)")
    classes: list[str] | None = setting(
        None, "classes to evaluate (default: the VOC classes whose ImageSets/Main files exist; all 20 on VOC2007)")
    head_dim: int = setting(
        4096, "hidden width of the new fc6/fc7 for backbones without DeepCluster's classifier (timm, tv)")
    seed: int = setting(0, "seed of head init, shuffling, crops and BN re-estimation", numbers=False)
    bn_recalibrate: Literal["auto", "on", "off"] = setting(
        "auto", "re-estimate BatchNorm running stats on trainval before fine-tuning; auto = on for random inits")
    decode_cache_gb: float = decode_cache_setting("training images (and, after training, the test images)")

    def validate(self) -> None:
        """Raise UsageError for impossible values."""
        super().validate()
        for name in ("iterations", "lr_step", "image_size", "head_dim"):
            if getattr(self, name) < 1:
                raise UsageError(f"bad value {getattr(self, name)} for {name}: must be at least 1")
        if self.lr <= 0 or self.clip_norm <= 0:
            raise UsageError(f"bad value for {'lr' if self.lr <= 0 else 'clip_norm'}: must be positive")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise UsageError("bad value: weight_decay must be >= 0 and momentum in [0, 1)")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise UsageError(f"bad value {self.crop_scale} for crop_scale: give [min,max] with 0 < min <= max <= 1")
        check_classes(self.classes)


_DC = "facebookresearch/deepcluster eval_voc_classif.py"
VOC_CLS_SOURCES = {
    "workers": FROZEN_FEATURE_SOURCES["workers"], "bn_recalibrate": FROZEN_FEATURE_SOURCES["bn_recalibrate"],
    "decode_cache_gb": DECODE_CACHE_SOURCE,
    "seed": "dcbench choice: the trial's seed (head init, shuffling, crops); cannot be a deviation",
    "batch_size": f"{_DC} DataLoader(batch_size=16)",
    "mode": f"{_DC} --fc6_8 1 (the paper's Table 2 FC6-8 column; mode=all: --fc6_8 0, the ALL column)",
    "train_bn_affine": f"{_DC} --train_batchnorm 1: the paper's 72.0 (the README's erratum: 70.4 without)",
    "iterations": f"{_DC} --nit 80000",
    "lr": f"{_DC} --lr 0.003",
    "lr_step": f"{_DC} --stepsize 5000 (train(): lr x0.5 every stepsize iterations)",
    "momentum": f"{_DC} torch.optim.SGD(momentum=0.9)",
    "weight_decay": f"{_DC} --wd 1e-6",
    "clip_norm": f"{_DC} train(): clip_grad_norm_(model.parameters(), 10)",
    "image_size": f"{_DC} RandomResizedCrop(224, ...)",
    "crop_scale": f"{_DC} --min_scale 0.1 --max_scale 0.5, ratio (1, 1)",
    "test_crops": f"{_DC} --eval_random_crops 1: logits of 10 random train-style crops summed (evaluate())",
    "train_split": f"{_DC} --split trainval (test on test; the paper's Table 2)",
    "classes": "dcbench choice: the VOC classes whose ImageSets/Main files exist (all 20 on VOC2007)",
    "head_dim": f"4096: the width of DeepCluster's fc6/fc7 ({_DC} re-initialises them); used only for "
                "backbones without that classifier (dcbench choice), on their last tap globally averaged or, for "
                "a ViT, on its cls token (timm VisionTransformer.forward_head global_pool='token', as DeiT and MAE "
                "fine-tune)",
    "input_convention": "dcbench choice (issue 19): published weights (timm pretrained_cfg, torchvision "
                        "weights.transforms()) are fine-tuned with their own mean, std and interpolation (and crop "
                        "ratio with test_crops=tencrop); random inits and dcbench/DeepCluster checkpoints get "
                        f"{_DC}'s (ImageNet mean/std, bilinear)",
}
VOC_CLS_DEVIATIONS = (
    Deviation("mode=all only: the conv weights of the checkpoint are kept",
              f"{_DC} --fc6_8 0 re-initialises the convs (a bug its authors acknowledged, facebookresearch/"
              "deepcluster#16); the paper's ALL column fine-tunes the pre-trained convs"),
    Deviation("training images reshuffled at every pass over trainval",
              f"{_DC} shuffles the image list once (VOC2007_dataset: np.random.shuffle) and iterates it in that "
              "order every pass (DataLoader shuffle=False)"),
)


def finetune_convention(backbone: Any, settings: VocFinetuneSettings) -> InputConvention:
    """The input convention of the fine-tune's crops (:func:`dcbench.data.transforms.resolve_convention`):
    random crops take the weights' mean, std and filter; ``tencrop`` also their crop ratio."""
    if settings.test_crops == "tencrop":
        return resolve_convention(backbone, settings.input_convention)
    return resolve_uncropped_convention(backbone, settings.input_convention)


@register_protocol
class VocFinetune(Protocol):
    """``voc07-cls``: fine-tune fc6-8 or all layers on VOC2007, mAP over the classes."""

    name: ClassVar[str] = "voc07-cls"
    description: ClassVar[str] = "Pascal VOC07 classification by fine-tuning fc6-8 or all layers (paper Table 2)"
    #: 2: published weights are read with their own input convention (input_convention=weights): mean, std, interpolation
    #: 3: a timm ViT's head reads its cls token (was its last block's patch map, averaged); timm Swin maps read
    #: channels-last (they were misread as N x H x W x C); training crops depend on (seed, pass, image) only
    #: (dcbench.data.seeded): the same numbers with any workers
    version: ClassVar[str] = "3"
    finetune: ClassVar[bool] = True
    data_layout: ClassVar[str] = VOC07_LAYOUT
    Settings: ClassVar[type] = VocFinetuneSettings
    headline_metrics: ClassVar[tuple[str, ...]] = ("mAP",)
    sources: ClassVar[dict[str, str]] = VOC_CLS_SOURCES
    known_deviations: ClassVar[tuple[Deviation, ...]] = VOC_CLS_DEVIATIONS

    def check_data(self, root: Path, settings: VocFinetuneSettings) -> None:
        """Read the image sets of both splits and check the JPEGs exist (cheap)."""
        load_voc_data(Path(root), settings.train_split, settings.classes, warn=False)

    def data_parallel(self, settings: Any) -> str | None:
        """Data-parallel under torchrun (:mod:`dcbench.voc_finetune`: global batch ``batch_size``,
        ``batch_size / N`` per process); refused only when N does not divide ``batch_size``."""
        return batch_refusal(settings.batch_size)

    def run(self, ckpt: Any, settings: VocFinetuneSettings, root: Path, ctx: EvalContext) -> ProtocolOutput:
        """Fine-tune a copy of the backbone, then score the test split; see the module docstring."""
        started = time.perf_counter()
        data = load_voc_data(Path(root), settings.train_split, settings.classes)
        convention = finetune_convention(ckpt.backbone, settings)
        recal_ds = ctx.data(data.train.dataset(convention_center_transform(settings.image_size, convention)))
        # BN re-estimation (random inits) in batches of max(batch_size, 32) images, as in version 1
        with torch.random.fork_rng(devices=[]), prepared_backbone(
                ckpt, settings.bn_recalibrate, recal_ds, max(settings.batch_size, 32), settings.loader_workers(),
                ctx.device, settings.seed, ctx.progress, shard=ctx.shard) as (backbone, _sha, bn_info):
            torch.manual_seed(settings.seed)
            net = build_finetune_net(backbone, len(data.classes), settings.image_size, settings.head_dim,
                                     settings.seed)
        ctx.shared_forward()  # under torchrun each rank trains on its share of every batch, scores its test block
        out = finetune_and_score(net, data.train, data.test, settings, ctx.device, ctx.progress, strict=ctx.strict,
                                 shard=ctx.shard, convention=convention)
        labels = data.test.labels[out.seen]
        aps = [finetune_class_ap(out.scores[out.seen, c], labels[:, c]) for c in range(len(data.classes))]
        rows, per_class = ap_rows(aps, data.classes, settings.mode, data.test.split, settings.seed)
        extra = {**data.describe(), "mode": settings.mode, "head": net.kind, "trunk_check": out.trunk_check,
                 "train_bn_affine": settings.train_bn_affine if settings.mode == "fc6-8" else None,
                 "test_crops": "sum of logits over 10 random crops" if settings.test_crops == "random10"
                 else "sum of logits over Resize + TenCrop",
                 "ap_rule": "sklearn average_precision_score on non-difficult images, score - 1e-5 * label",
                 "ap_per_class": per_class, "bn_recalibrate": bn_info, **out.log,
                 "input_convention": describe_applied(convention, "mean, std, interpolation" + (
                     ", crop ratio (TenCrop)" if settings.test_crops == "tencrop"
                     else " (random crops: no crop ratio)")),
                 "skipped_test_images": int((~out.seen).sum()),
                 "metric_tap": "the tap of the rows is the mode (fc6-8 / all)",
                 "finetune_wall_s": round(time.perf_counter() - started, 3)}
        # per-image scores and labels: the paired bootstrap re-ranks them per resample (dcbench.stats)
        outcomes = {outcome_key("mAP", settings.mode): map_outcomes(out.scores[out.seen], labels, "finetune")}
        return ProtocolOutput(rows, data.fingerprint(), extra, outcomes=outcomes if rows else {})
