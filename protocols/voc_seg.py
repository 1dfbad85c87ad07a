"""Pascal VOC2012 semantic segmentation by fine-tuning (``voc-seg``) on mmsegmentation: the
DeepCluster paper's Table 2 (FCN on AlexNet) and the MMSelfSup standard.

Defaults = MMSelfSup's standard (open-mmlab/mmselfsup,
``configs/benchmarks/mmsegmentation/voc12aug/fcn_r50-d8_4xb4-20k_voc12aug-512x512.py``): FCN head, VOC2012
train + SBD aug (10,582 images; used when its files are present, ``sbd_aug``) -> val (1,449),
random resize into (2048, 512) x 0.5-2.0 keeping the aspect ratio, random 512 crop (at most 75%
one class), flip, photometric distortion; SGD lr 0.01, momentum 0.9, wd 5e-4, poly 0.9 down
to 1e-4, 20k iterations, batch 16, ignore label 255; whole-image test at the (2048, 512)
scale, predictions resized to the original size; mIoU over the 21 classes (one confusion
matrix over val) and the IoU of each class.

Presets (what each resolves to for the backbone at hand is in the result's ``recipe``; see
:mod:`dcbench.segmentation.config`):

- ``mmselfsup``: ResNets dilated to output stride 8, ``FCNHead`` on res5 + auxiliary head on
  res4; other backbones the same head on their last conv tap (timm ViTs: the last block's patch
  tokens as one map at the patch stride, ViTDet's single-scale input); everything trains (``all``).
- ``deepcluster`` (paper Table 2, FCN on AlexNet): the checkpoint's fc6/fc7 as convolutions
  (FCN-32s), mode ``fc6-8`` (convs frozen) or ``all``. The paper records no training schedule
  or data for its FCN runs, so this preset trains with the same data, augmentation and
  schedule as ``mmselfsup`` (all recorded; each is a setting).

The network is a deep COPY of the backbone (the checkpoint is never touched). The run checks
itself (:mod:`dcbench.finetune`) that ``fc6-8`` left every trunk tensor (weights and BN
statistics) unchanged and that ``all`` changed the trunk's weights.

Differences from MMSelfSup's runs, each recorded: one process instead of 4 GPUs x 4 images
(BN statistics over the same 16 images, so SyncBN = BN); the backbone is the checkpoint's own
(e.g. a torchvision ResNet-50, as MMSelfSup's ``torchvision://resnet50`` init) rather than
mmseg's ``ResNetV1c`` deep stem.

Published weights (timm / torchvision / hf-hub) are normalised with their own mean and std
(``input_convention=weights``, see :func:`dcbench.data.transforms.resolve_convention`; the resizes
and crops stay mmseg's, so their interpolation and crop ratio do not apply), recorded in
``extra.input_convention``; other checkpoints keep ImageNet's, exactly as before.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from dcbench.data import DataError
from dcbench.data.transforms import ConventionMode, InputConvention, describe_applied, resolve_uncropped_convention
from dcbench.data.voc import VOC_CLASSES
from dcbench.errors import UsageError
from dcbench.finetune import TrunkGuard, trainable_names
from dcbench.protocol import (CommonSettings, Deviation, EvalContext, Protocol, ProtocolOutput, batch_refusal,
                              register_protocol, setting)
from dcbench.provenance import WORKERS_SOURCE
from dcbench.results import MetricRow, outcome_key
from dcbench.stats import miou_outcomes

log = logging.getLogger("dcbench")


@dataclass
class VocSegSettings(CommonSettings):
    """Settings of ``voc-seg`` (defaults: MMSelfSup's ``fcn_r50-d8_4xb4-20k_voc12aug-512x512``, built
    from its ``_base_`` ``models/fcn_r50-d8.py``, ``datasets/pascal_voc12_aug.py`` and
    ``schedules/schedule_20k.py``)."""

    preset: Literal["mmselfsup", "deepcluster"] = setting(
        "mmselfsup", "mmselfsup: FCNHead (+ auxiliary head, output stride 8 for ResNets), all layers trained; "
                     "deepcluster: the paper's FCN-32s, fc6/fc7 of AlexNet/VGG16 as convolutions, fc6-8 by default")
    mode: Literal["fc6-8", "all"] | None = setting(
        None, "fc6-8: backbone convs frozen (weights and BN statistics), fc6/fc7 and the head trained; all: the whole "
              "network trained (default: the preset's, all for mmselfsup, fc6-8 for deepcluster)")
    # schedule_20k.py: IterBasedTrainLoop max_iters=20000; MMSelfSup: 4 GPUs x 4 images
    iterations: int = setting(20000, "SGD iterations (batches)")
    batch_size: int = setting(16, "training batch size")
    # pascal_voc12_aug.py: RandomResize(scale=(2048, 512), ratio_range=(0.5, 2.0)), RandomCrop 512
    crop_size: int = setting(
        512, "training crop side in px; images are resized into (4*crop, crop) x scale_range for training and into "
             "(4*crop, crop) for testing (mmseg's (2048, 512) at 512)")
    scale_range: list[float] = setting(help="random resize ratio range of the training images",
                                       factory=lambda: [0.5, 2.0])
    # schedule_20k.py: SGD(lr=0.01, momentum=0.9, weight_decay=0.0005), PolyLR(eta_min=1e-4, power=0.9)
    lr: float = setting(0.01, "initial learning rate")
    min_lr: float = setting(1e-4, "learning rate the poly schedule ends at (mmseg's eta_min)")
    poly_power: float = setting(0.9, "power of the poly schedule")
    momentum: float = setting(0.9, "SGD momentum")
    weight_decay: float = setting(5e-4, "weight decay of every trained parameter")
    sbd_aug: Literal["auto", "on", "off"] = setting(
        "auto", "add the SBD images (SegmentationClassAug/ + ImageSets/Segmentation/aug.txt, mmseg's layout) to "
                "train: auto = when present, on = required, off = VOC2012 train only")
    classes: list[str] | None = setting(
        None, "VOC classes to train and evaluate besides background (default: all 20); pixels of the other classes "
              "are ignored like the void label")
    norm_eval: bool | None = setting(
        None, "keep the backbone's BatchNorm in eval mode (running statistics) while training (default: the "
              "preset's, false for mmselfsup, true for deepcluster)")
    output_stride: Literal[8, 16, 32] | None = setting(
        None, "ResNets: reach this output stride by dilating res4/res5 (default: the preset's, 8 for mmselfsup, "
              "32 (none) for deepcluster)")
    input_convention: ConventionMode = setting(
        "weights", "weights: published weights (timm/tv/hf-hub) are normalised with their own mean and std (the "
                   "resizes and crops stay mmseg's); preset: always ImageNet mean/std")
    backend: Literal["mmseg"] = setting("mmseg", "segmentation library (mmsegmentation 1.x)")
    seed: int = setting(0, "seed of head init, sampling, augmentation and dropout", numbers=False)

    def validate(self) -> None:
        """Raise UsageError for impossible values."""
        super().validate()
        if self.iterations < 1:
            raise UsageError(f"bad value {self.iterations} for iterations: must be at least 1")
        if self.crop_size < 32:
            raise UsageError(f"bad value {self.crop_size} for crop_size: must be at least 32 px")
        if self.lr <= 0 or not 0 <= self.min_lr <= self.lr:
            raise UsageError(f"bad lr={self.lr} / min_lr={self.min_lr}: need lr > 0 and 0 <= min_lr <= lr")
        if self.poly_power <= 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise UsageError("bad value: poly_power must be > 0, weight_decay >= 0 and momentum in [0, 1)")
        if len(self.scale_range) != 2 or not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise UsageError(f"bad value {self.scale_range} for scale_range: give [min,max] with 0 < min <= max")
        self._validate_classes()

    def _validate_classes(self) -> None:
        if self.classes is None:
            return
        unknown = [c for c in self.classes if c not in VOC_CLASSES]
        if unknown or not self.classes or len(set(self.classes)) != len(self.classes):
            raise UsageError(f"bad value {self.classes} for classes: give distinct VOC class names, e.g. [cat,dog]"
                             + (f" ({', '.join(unknown)} unknown)" if unknown else ""))


# ----------------------------------------------------------------------------- provenance
_MMSS = "open-mmlab/mmselfsup configs/benchmarks/mmsegmentation/voc12aug/fcn_r50-d8_4xb4-20k_voc12aug-512x512.py"
_SCHED = "mmsegmentation configs/_base_/schedules/schedule_20k.py"
_DATA = "mmsegmentation configs/_base_/datasets/pascal_voc12_aug.py"
_MODEL = "mmsegmentation configs/_base_/models/fcn_r50-d8.py"
_COMMON = {
    "seed": "dcbench choice: the trial's seed (head init, sampling, augmentation); cannot be a deviation",
    "batch_size": f"{_MMSS}: 4 GPUs x train_dataloader batch_size 4 = 16 (SyncBN: BatchNorm over the 16)",
    "workers": WORKERS_SOURCE,
    "iterations": f"{_SCHED} IterBasedTrainLoop max_iters=20000",
    "crop_size": f"{_DATA} crop_size=(512, 512); test Resize scale=(2048, 512), keep_ratio",
    "scale_range": f"{_DATA} RandomResize(scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True)",
    "lr": f"{_SCHED} SGD lr=0.01",
    "min_lr": f"{_SCHED} PolyLR eta_min=1e-4",
    "poly_power": f"{_SCHED} PolyLR power=0.9",
    "momentum": f"{_SCHED} SGD momentum=0.9",
    "weight_decay": f"{_SCHED} SGD weight_decay=0.0005",
    "sbd_aug": f"{_DATA}: VOC2012 train + SBD aug (SegmentationClassAug, ImageSets/Segmentation/aug.txt)",
    "classes": f"{_DATA}: the 20 VOC classes + background",
    "backend": "open-mmlab/mmsegmentation 1.x: the library of the mmselfsup benchmark",
    "input_convention": f"dcbench choice (issue 19): published weights (timm pretrained_cfg, torchvision "
                        f"weights.transforms()) are normalised with their own mean and std; resizes and crops stay "
                        f"{_DATA}'s; random inits and dcbench/DeepCluster checkpoints get {_MODEL} "
                        f"data_preprocessor's (ImageNet mean/std)",
}
SEG_SOURCES = {
    "mmselfsup": {**_COMMON,
                  "preset": _MMSS,
                  "mode": f"all: {_MMSS} fine-tunes the whole network",
                  "norm_eval": f"{_MODEL} backbone norm_eval=False",
                  "output_stride": f"{_MODEL} ResNetV1c strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4): stride 8"},
    "deepcluster": {**_COMMON,
                    "preset": "DeepCluster paper (Caron et al., ECCV 2018) Table 2, segmentation: FCN (Long et al., "
                              "CVPR 2015) on the checkpoint's AlexNet",
                    "mode": "fc6-8: the paper's Table 2 FC6-8 column (ALL: mode=all)",
                    "norm_eval": "dcbench choice: frozen convs keep their BatchNorm statistics",
                    "output_stride": "FCN-32s (Long et al. 2015): stride 32, fc6/fc7 as convolutions"},
}
SEG_DEVIATIONS = {
    "mmselfsup": (
        Deviation("the checkpoint's own backbone layout (e.g. torchvision ResNet-50, 7x7 stem)",
                  f"{_MODEL} builds mmseg's ResNetV1c (deep 3x3 stem); dcbench evaluates the checkpoint as it is"),
        Deviation("ViTs: the FCN head on the last block's patch tokens, one map at the patch stride",
                  "the single-scale input of ViTDet's simple feature pyramid (facebookresearch/detectron2 "
                  "modeling/backbone/vit.py); the MAE paper segments with UperNet on several blocks instead"),
        Deviation("training order and random transforms seeded per (seed, pass over the data, image) in the main "
                  "process, a new shuffle each pass",
                  "mmengine's InfiniteSampler and worker_init_fn (MMSelfSup's loader) make the crops depend on the "
                  "number of loader workers and processes; the same distribution of crops, one draw per seed"),),
    "deepcluster": (
        Deviation("data, augmentation and schedule of the mmselfsup preset",
                  "the paper records no training schedule or data for its FCN runs"),),
}


def _filled(settings: VocSegSettings) -> VocSegSettings:
    """``settings`` with mode / norm_eval None replaced by the preset's."""
    from dcbench.segmentation.config import PRESET_MODE, PRESET_NORM_EVAL

    return dataclasses.replace(
        settings, mode=settings.mode or PRESET_MODE[settings.preset],
        norm_eval=PRESET_NORM_EVAL[settings.preset] if settings.norm_eval is None else settings.norm_eval)


# ----------------------------------------------------------------------------- result rows
def iou_rows(iou: np.ndarray, classes: list[str], tap: str, seed: int) -> tuple[list[MetricRow], dict[str, Any]]:
    """``mIoU`` and ``IoU_<class>`` rows x100 (a class absent from labels and predictions: no
    row, None in the per-class dict)."""
    from dcbench.metrics.segmentation import mean_of

    miou = mean_of(iou)
    rows = [] if math.isnan(miou) else [MetricRow("mIoU", 100.0 * miou, tap, "val", "final", seed)]
    rows += [MetricRow(f"IoU_{c}", float(100.0 * v), tap, "val", "final", seed)
             for c, v in zip(classes, iou) if not math.isnan(v)]
    return rows, {c: None if math.isnan(v) else round(100.0 * v, 4) for c, v in zip(classes, iou)}


def with_normalization(config: dict[str, Any], convention: InputConvention) -> dict[str, Any]:
    """The mmseg model ``config`` whose data_preprocessor normalises with ``convention``'s mean and
    std (mmseg's 0..255 scale); unchanged for a preset's convention (ImageNet's, the config's own)."""
    if convention.source is None:
        return config
    pre = {**config["data_preprocessor"], "mean": [255.0 * v for v in convention.mean],
           "std": [255.0 * v for v in convention.std]}
    return {**config, "data_preprocessor": pre}


# ----------------------------------------------------------------------------- the protocol
@register_protocol
class VocSeg(Protocol):
    """``voc-seg``: fine-tune an FCN on VOC2012 (+ SBD) train, mIoU on val."""

    name: ClassVar[str] = "voc-seg"
    description: ClassVar[str] = "Pascal VOC2012 segmentation: FCN fine-tuning on mmsegmentation, mIoU (paper Table 2)"
    #: 2: published weights are read with their own input convention (input_convention=weights): mean and std
    #: 3: timm Swin stage maps read channels-last (they were misread as N x H x W x C)
    #: 4: training order and random transforms seeded per (seed, pass, image): any workers or world size
    version: ClassVar[str] = "4"
    finetune: ClassVar[bool] = True
    Settings: ClassVar[type] = VocSegSettings
    headline_metrics: ClassVar[tuple[str, ...]] = ("mIoU",)

    def preset_defaults(self, settings: Any) -> Any:
        """The preset's defaults with its mode and norm_eval filled in (output_stride depends on
        the backbone: 8 for ResNets under mmselfsup)."""
        return _filled(super().preset_defaults(settings))

    def deviations(self, settings: Any) -> list[Deviation]:
        """As :meth:`Protocol.deviations`, comparing filled-in values (None is the preset's)."""
        return super().deviations(_filled(settings))

    def sources_for(self, preset: str | None) -> dict[str, str]:
        """Where each default of ``preset`` comes from."""
        return dict(SEG_SOURCES[preset or "mmselfsup"])

    def deviations_for(self, preset: str | None) -> list[Deviation]:
        """The known deviations of ``preset`` from its source."""
        return list(SEG_DEVIATIONS[preset or "mmselfsup"])
    data_layout: ClassVar[str] = """\
ROOT/VOCdevkit/VOC2012/{JPEGImages/<id>.jpg, SegmentationClass/<id>.png, ImageSets/Segmentation/{train,val}.txt}
ROOT may also be ROOT/VOCdevkit or the VOC2012 folder itself. Labels: palette (or greyscale) index PNGs,
index = class (0 background, 1..20 the VOC classes in the official order), 255 = void (ignored).
Optional SBD augmentation in mmsegmentation's layout (tools/dataset_converters/voc_aug.py):
SegmentationClassAug/<id>.png + ImageSets/Segmentation/aug.txt, added to train when present.
Trains on train (+ aug), evaluates on val. Needs the seg extra: pip install -e '.[seg]'.
"""

    def check_data(self, root: Path, settings: VocSegSettings) -> None:
        """The seg extra is installed; the image sets, images and masks exist (cheap)."""
        from dcbench.segmentation import missing_packages
        from dcbench.segmentation.data import load_seg_data

        missing = missing_packages()
        if missing:
            raise UsageError(f"voc-seg needs mmsegmentation ({', '.join(missing)} not installed); "
                             f"install the segmentation extra: pip install -e '.[seg]'")
        load_seg_data(Path(root), settings.sbd_aug, settings.classes)

    def data_parallel(self, settings: Any) -> str | None:
        """Data-parallel under torchrun (:mod:`dcbench.segmentation.engine`: global batch
        ``batch_size``, ``batch_size / N`` per process); refused only when N does not divide it."""
        return batch_refusal(settings.batch_size)

    def run(self, ckpt: Any, settings: VocSegSettings, root: Path, ctx: EvalContext) -> ProtocolOutput:
        """Fine-tune a copy of the backbone as an FCN, then score val; see the module docstring."""
        import copy

        from dcbench import segmentation as seg

        started = time.perf_counter()
        ops_source = seg.prepare_mmseg()
        data = seg.load_seg_data(Path(root), settings.sbd_aug, settings.classes)
        if data.aug == "absent":
            log.warning("voc-seg: no SBD augmentation found (%s); training on the %d VOC2012 train images only "
                        "(published numbers use train + aug, 10,582 images)", seg.data.AUG_SET, data.n_train)
        with seg.seeded(settings.seed):
            net = copy.deepcopy(ckpt.backbone).cpu()
            recipe = seg.resolve_recipe(net, settings.preset, len(data.classes), settings.mode, settings.norm_eval,
                                        settings.output_stride)
            convention = resolve_uncropped_convention(ckpt.backbone, settings.input_convention)
            config = with_normalization(seg.model_config(recipe, settings.crop_size), convention)
            model = seg.build_segmentor(net, config).to(ctx.device)
            if ctx.shard is not None and torch.device(ctx.device).type == "cuda":
                # MMSelfSup's SyncBN: batch statistics over the global batch (torch has it for GPUs only)
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            ctx.shared_forward()  # under torchrun each rank trains on its share of every batch
            guard = TrunkGuard(net, trainable_names(net), recipe.mode)
            fit = self._train(model, data, settings, ctx)
            check = guard.check(settings.iterations, detail="count")
            per_image, n_eval, failed = self._evaluate(model, data, settings, ctx)
        out = self._output(per_image, n_eval, failed, data, recipe, config, fit, check, ops_source, settings,
                           started)
        out.extra["input_convention"] = describe_applied(
            convention, "mean, std (mmseg's data_preprocessor; the resizes and crops stay the preset's)")
        return out

    @staticmethod
    def _train(model: Any, data: Any, settings: VocSegSettings, ctx: EvalContext) -> dict[str, Any]:
        from dcbench import segmentation as seg

        pipeline = seg.build_pipeline(seg.train_pipeline(settings.crop_size, tuple(settings.scale_range)))
        dataset = seg.SegDataset(data.train, pipeline, len(data.classes), data.label_map, strict=ctx.strict)
        loader = seg.train_loader(dataset, settings.batch_size, settings.loader_workers(), settings.seed)
        schedule = seg.schedule_config(settings.iterations, settings.lr, settings.momentum, settings.weight_decay,
                                       settings.poly_power, settings.min_lr)
        t0 = time.perf_counter()
        log_ = seg.train(model, loader, schedule, ctx.progress)
        if ctx.shard is not None:
            log_["data_parallel"] = {
                "batch_per_process": settings.batch_size // ctx.world_size,
                "batchnorm": "SyncBatchNorm over the global batch" if torch.device(ctx.device).type == "cuda"
                else "per process (gloo: torch has no SyncBatchNorm on the CPU)"}
        return {**log_, "schedule": schedule, "train_wall_s": round(time.perf_counter() - t0, 3)}

    @staticmethod
    def _evaluate(model: Any, data: Any, settings: VocSegSettings, ctx: EvalContext) -> tuple[np.ndarray, int, list]:
        from dcbench import segmentation as seg

        pipeline = seg.build_pipeline(seg.eval_pipeline(settings.crop_size))
        dataset = seg.SegDataset(data.val, pipeline, len(data.classes), data.label_map, strict=ctx.strict)
        per_image, n_eval, failed = seg.evaluate(model, seg.eval_loader(dataset, settings.loader_workers()),
                                                 len(data.classes), ctx.progress)
        if n_eval == 0:
            raise DataError(f"no readable val image in {data.voc_dir} (first error: {failed[0] if failed else 'none'})")
        return per_image, n_eval, failed

    @staticmethod
    def _output(per_image: np.ndarray, n_eval: int, failed: list, data: Any, recipe: Any, config: dict, fit: dict,
                check: dict, ops_source: str, settings: VocSegSettings, started: float) -> ProtocolOutput:
        from dcbench import segmentation as seg
        from dcbench.metrics.segmentation import iou_from_confusion, pixel_accuracy

        cm = per_image.sum(axis=0)
        iou = iou_from_confusion(cm)
        rows, per_class = iou_rows(iou, data.classes, recipe.mode, settings.seed)
        rows.append(MetricRow("aAcc", 100.0 * pixel_accuracy(cm), recipe.mode, "val", "final", settings.seed))
        config = {**config, "train_pipeline": seg.train_pipeline(settings.crop_size, tuple(settings.scale_range)),
                  "eval_pipeline": seg.eval_pipeline(settings.crop_size)}
        extra = {**data.describe(), "recipe": recipe.describe(), "mode": recipe.mode, "head": recipe.head,
                 "iou": per_class, "mmseg_config": config, "trunk_check": check, "train": fit,
                 "evaluated_images": n_eval, "skipped_val_images": len(failed),
                 "metric": "IoU per class from one confusion matrix over val, ignore label 255; mIoU = mean over "
                           "the classes present in labels or predictions",
                 "segmentation_versions": seg.versions(), "mmcv_ops": ops_source,
                 "voc_seg_wall_s": round(time.perf_counter() - started, 3)}
        # per-image confusion matrices: the paired bootstrap re-sums them per resample (dcbench.stats)
        outcomes = {outcome_key("mIoU", recipe.mode, "final"): miou_outcomes(per_image)} if rows else {}
        return ProtocolOutput(rows, data.fingerprint(), extra, outcomes=outcomes)
