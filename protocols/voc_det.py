"""Pascal VOC object detection by fine-tuning (``voc-det``): the DeepCluster paper's Table 2
(Caron et al., ECCV 2018) and the MoCo / VISSL standard; engine: :mod:`dcbench.detection`.

The detector is torchvision's Faster R-CNN built on a deep COPY of the backbone (the
checkpoint is never touched):

- DeepCluster AlexNet / VGG16: conv5 features (stride 16), RoI pooling, and the box head
  made of the checkpoint's OWN fc6/fc7 (weights kept, as Fast R-CNN starts from the
  pre-trained fc layers). fc6 takes the ``grid x grid`` map the checkpoint was built for, so
  the RoI output size is the backbone's grid (6 for AlexNet, 7 for VGG16 at 224 px; e.g. 2 for
  an AlexNet built at 96 px) whatever the detection image size;
- ResNets (tv/timm): the C4 design of MoCo / VISSL / detectron2: stem..res4 as trunk, res5 on
  14 x 14 RoIAlign features as box head.
- timm ViTs: ViTDet's backbone, single-scale (facebookresearch/detectron2 modeling/backbone/vit.py):
  the last block's patch tokens as one map at the patch stride, the scale-1 level of its
  SimpleFeaturePyramid (256 channels, LayerNorm) as neck, 7 x 7 RoIAlign and a 2-fc box head
  (:mod:`dcbench.detection.model`); preset ``auto`` gives them ``moco``'s schedule.

Modes (the paper's): ``fc6-8`` = the conv trunk frozen (and in eval mode), everything after
it trains (RPN, fc6, fc7, the new predictor; for ResNets res5 as well); ``all`` = everything
trains except the fixed Sobel filters. The run checks itself (:mod:`dcbench.finetune`):
``fc6-8`` left every trunk tensor (weights and BatchNorm buffers) unchanged, ``all`` changed
trunk weights; the runner checks that the checkpoint's backbone is unchanged.

Presets (``preset=auto``: ``deepcluster`` for DeepCluster AlexNet/VGG16, ``moco`` for every
other backbone); every value is a setting, ``None`` meaning "the preset's":

=====================  ==============================  ===================================
                       ``deepcluster`` (paper, Table 2)  ``moco`` (MoCo / VISSL, R50-C4)
=====================  ==============================  ===================================
train -> test          VOC2007 trainval -> test          VOC2007+2012 trainval -> VOC2007 test
mode                   fc6-8 (``all`` = the ALL column)  all
iterations, batch      40k, 2 images                     24k, 16 images
lr, steps, warm-up     0.001, x0.1 at 30k, none           0.02, x0.1 at 18k/22k, 100 (linear from 0.001x)
weight decay           5e-4 (biases: 2x lr, no decay)     1e-4 (none on BatchNorm)
train / test sizes     short side 600 / 600, long <= 1000 480..800 step 32 / 800, long <= 1333
anchors                128, 256, 512 x (0.5, 1, 2)        32..512 x (0.5, 1, 2)
RoIs                   RoIPool, 64 per image, 25% fg      RoIAlign (aligned), 512 per image, 25% fg
proposals train/test   2000 / 300 (after NMS 0.7)         2000 / 1000
BatchNorm              frozen (running statistics)        trained (batch statistics; + PreciseBN 200
                                                          iterations; extra BN after res5)
difficult objects      left out of training               trained on (detectron2's loader)
box loss (smooth-L1)   RPN beta 1/9, box head beta 1      L1 (beta 0) in both
test NMS               0.3                                0.5
=====================  ==============================  ===================================

The deepcluster preset follows Fast R-CNN's VOC2007 solver (Girshick 2015: 40k iterations,
lr 0.001 divided by 10 at 30k, 2 images x 64 RoIs, scale 600 / 1000, Caffe's bias
convention); the paper used Fast R-CNN with selective-search proposals, which dcbench
replaces with an RPN trained jointly (Faster R-CNN): numbers are close to, not equal to,
the paper's Table 2. One run is one trial (``seed``); the mean +- std of the 5 trials of
PROTOCOLS.md is ``dcbench compare --seeds 0,1,2,3,4``.

Evaluation (:mod:`dcbench.detection.evaluation`): the VOC devkit's matching on the VOC2007
test set, difficult objects ignored; AP50 by the VOC07 11-point rule, AP75 and AP (mean over
IoU 0.50:0.95) by the same rule (as detectron2's PascalVOCDetectionEvaluator, which MoCo and
VISSL report); per-class AP50 rows, per-class AP50/AP75/AP in the record.

``backend=detectron2`` (ResNet-50/101/152 only) exports the backbone with
:mod:`dcbench.export_detectron2` and runs detectron2's trainer with the same recipe; without
detectron2 installed it is a one-line usage error naming the install command.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import re
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Literal

from dcbench.data import DataError
from dcbench.data.transforms import ConventionMode, describe_applied
from dcbench.data.voc import layout
from dcbench.detection import (DetData, DetectionDataset, DetectorSpec, SolverSpec, ap_rows, evaluate_detections,
                               finetune_torchvision, load_det_data, records_from_annotations, require_supported)
from dcbench.errors import UsageError
from dcbench.finetune import design_family
from dcbench.protocol import (CommonSettings, Deviation, EvalContext, Protocol, ProtocolOutput, batch_refusal,
                              register_protocol, setting)
from dcbench.protocols._sources_voc_det import PRESET_DEVIATIONS, PRESET_SOURCES, auto_deviations, auto_sources
from dcbench.protocols._voc_det_presets import (INPUT_CONVENTION_SOURCE, PRESET_CONSTANTS, PRESETS,  # noqa: F401
                                                detection_convention)

log = logging.getLogger("dcbench")
_SET_RE = re.compile(r"(2007|2012):(train|val|trainval|test)")


# ============================================================================= settings
@dataclass
class VocDetSettings(CommonSettings):
    """Settings of ``voc-det``; ``None`` = the preset's value (see the module docstring)."""

    preset: Literal["auto", "deepcluster", "moco"] = setting(
        "auto", "deepcluster: the paper's Fast R-CNN setup on conv5 (VOC07 trainval -> test); moco: the MoCo/VISSL "
                "R50-C4 recipe (VOC07+12 trainval -> VOC07 test, 24k it.); auto: deepcluster for DeepCluster "
                "alexnet/vgg16, moco otherwise")
    mode: Literal["fc6-8", "all"] | None = setting(
        None, "fc6-8: conv trunk frozen, the rest trains; all: everything trains (preset: deepcluster fc6-8, moco all)")
    iterations: int | None = setting(None, "SGD iterations (preset: 40000 / 24000)")
    batch_size: int | None = setting(None, "images per iteration (preset: 2 / 16)")
    micro_batch: int = setting(
        0, "images per forward pass, gradients accumulated over the batch (0: the whole batch; smaller saves "
           "memory, BatchNorm then sees micro-batch statistics)")
    lr: float | None = setting(None, "base learning rate (preset: 0.001 / 0.02)")
    lr_steps: list[int] | None = setting(
        None, "iterations at which lr is multiplied by 0.1 (preset: [30000] / [18000,22000])")
    warmup_iters: int | None = setting(None, "linear warm-up iterations (preset: 0 / 100)")
    momentum: float = setting(0.9, "SGD momentum")
    weight_decay: float | None = setting(None, "weight decay (preset: 5e-4 / 1e-4)")
    min_size: list[int] | None = setting(
        None, "training short sides in px, one drawn per image (preset: [600] / [480,512,...,800])")
    test_size: int | None = setting(None, "test short side in px (preset: 600 / 800)")
    max_size: int | None = setting(None, "long-side cap in px, train and test (preset: 1000 / 1333)")
    anchor_sizes: list[int] | None = setting(
        None, "RPN anchor sizes in px, aspect ratios 0.5/1/2 (preset: [128,256,512] / [32,64,128,256,512])")
    roi_pool: Literal["pool", "align"] | None = setting(
        None, "pool: RoIPool (Fast R-CNN); align: aligned RoIAlign (detectron2's ROIAlignV2) (preset: pool / align)")
    rois_per_image: int | None = setting(
        None, "RoIs sampled per image for the box head, 25% foreground (preset: 64 / 512)")
    proposals_train: int | None = setting(
        None, "RPN proposals kept per image after NMS in training (preset: 2000)")
    proposals_test: int | None = setting(
        None, "RPN proposals kept per image after NMS at test (preset: 300 / 1000)")
    bn: Literal["frozen", "train"] | None = setting(
        None, "frozen: BatchNorm uses running statistics, scale/shift fixed; train: batch statistics in the layers "
              "that train (SyncBN semantics on one device) (preset: frozen / train)")
    precise_bn: int | None = setting(
        None, "with bn=train: re-estimate BatchNorm statistics over this many training batches before testing "
              "(detectron2's PreciseBN; preset: 0 / 200)")
    rpn_loss_beta: float | None = setting(
        None, "smooth-L1 beta of the RPN's box loss, 0 = L1 (preset: 1/9 as py-faster-rcnn's sigma 3 / 0 as "
              "detectron2)")
    box_loss_beta: float | None = setting(
        None, "smooth-L1 beta of the box head's loss, 0 = L1 (preset: 1 as Fast R-CNN / 0 as detectron2)")
    train_difficult: bool | None = setting(
        None, "train on difficult objects too (preset: false as py-faster-rcnn / true as detectron2); the test "
              "always ignores them")
    train_sets: list[str] | None = setting(
        None, "training image sets as YEAR:SPLIT (preset: [2007:trainval] / [2007:trainval,2012:trainval])")
    test_set: str | None = setting(None, "evaluated image set, YEAR:SPLIT (2007:test)")
    classes: list[str] | None = setting(
        None, "classes to detect (default: the VOC classes whose ImageSets/Main files exist for the test set; "
              "all 20 on VOC2007)")
    ap_rule: Literal["11-point", "all-points"] = setting(
        "11-point", "AP integration: VOC07 11-point (detectron2 on VOC2007 test) or all-points (VOC2010+)")
    backend: Literal["torchvision", "detectron2"] = setting(
        "torchvision", "torchvision: the built-in Faster R-CNN; detectron2: export the ResNet and run "
                       "detectron2's trainer (needs detectron2 installed)")
    bn_recalibrate: Literal["auto", "on", "off"] = setting(
        "auto", "re-estimate the backbone's BatchNorm statistics on training images before fine-tuning; auto = on "
                "for random inits")
    input_convention: ConventionMode = setting(
        "weights", "weights: published weights (timm/tv/hf-hub) are normalised with their own mean and std (the "
                   "resizes stay the preset's); preset: always ImageNet mean/std")
    seed: int = setting(0, "seed of the new layers, sampling, flips and shuffling (one trial)", numbers=False)

    def validate(self) -> None:
        """Raise UsageError for impossible values (and for backend=detectron2 without detectron2)."""
        super().validate()
        for name in ("iterations", "warmup_iters", "precise_bn", "micro_batch", "rpn_loss_beta", "box_loss_beta"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise UsageError(f"bad value {getattr(self, name)} for {name}: must be >= 0")
        for name in ("test_size", "max_size", "rois_per_image", "proposals_train", "proposals_test"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UsageError(f"bad value {getattr(self, name)} for {name}: must be at least 1")
        for name in ("min_size", "anchor_sizes"):
            value = getattr(self, name)
            if value is not None and (not value or min(value) < 1):
                raise UsageError(f"bad value {value} for {name}: give positive integers, e.g. [600]")
        self._validate_solver()
        for text in (self.train_sets or []) + ([self.test_set] if self.test_set else []):
            if not _SET_RE.fullmatch(text):
                raise UsageError(f"bad image set {text!r}: use YEAR:SPLIT with YEAR 2007|2012 and SPLIT "
                                 f"train|val|trainval|test, e.g. 2007:trainval")
        if self.train_sets is not None and not self.train_sets:
            raise UsageError("train_sets is empty: name at least one YEAR:SPLIT")
        if self.classes is not None and (not self.classes or len(set(self.classes)) != len(self.classes)):
            raise UsageError(f"bad value {self.classes} for classes: give distinct class names, e.g. [cat,dog]")
        if self.backend == "detectron2":
            from dcbench.detection.detectron2_backend import require_detectron2
            require_detectron2()

    def _validate_solver(self) -> None:
        if self.lr is not None and self.lr <= 0:
            raise UsageError(f"bad value {self.lr} for lr: must be positive")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise UsageError(f"bad value {self.weight_decay} for weight_decay: must be >= 0")
        if not 0 <= self.momentum < 1:
            raise UsageError(f"bad value {self.momentum} for momentum: must be in [0, 1)")
        if self.lr_steps is not None and any(s < 0 for s in self.lr_steps):
            raise UsageError(f"bad value {self.lr_steps} for lr_steps: iterations must be >= 0")


# ============================================================================= recipe
@dataclass
class Recipe:
    """Every effective value of a run: the settings with the preset's values filled in."""

    preset: str
    values: dict[str, Any]
    constants: dict[str, Any]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def detector_spec(self) -> DetectorSpec:
        """The architecture part."""
        v, c = self.values, self.constants
        return DetectorSpec(min_size=tuple(v["min_size"]), test_size=v["test_size"], max_size=v["max_size"],
                            anchor_sizes=tuple(v["anchor_sizes"]), roi_pool=v["roi_pool"],
                            rpn_pre_nms_train=max(c["rpn_pre_nms_train"], v["proposals_train"]),
                            rpn_post_nms_train=v["proposals_train"],
                            rpn_pre_nms_test=max(c["rpn_pre_nms_test"], v["proposals_test"]),
                            rpn_post_nms_test=v["proposals_test"], rois_per_image=v["rois_per_image"],
                            extra_norm=c["extra_norm"], nms_thresh=c["nms_thresh"],
                            rpn_loss_beta=v["rpn_loss_beta"], box_loss_beta=v["box_loss_beta"])

    def solver(self, workers: int) -> SolverSpec:
        """The optimisation part."""
        v, c = self.values, self.constants
        return SolverSpec(iterations=v["iterations"], batch_size=v["batch_size"], micro_batch=v["micro_batch"],
                          lr=v["lr"], momentum=v["momentum"], weight_decay=v["weight_decay"],
                          norm_weight_decay=c["norm_weight_decay"], bias_lr_factor=c["bias_lr_factor"],
                          bias_weight_decay=v["weight_decay"] if c["bias_decay"] else 0.0,
                          steps=tuple(v["lr_steps"]), warmup_iters=v["warmup_iters"],
                          warmup_factor=c["warmup_factor"], seed=v["seed"], workers=workers)


def preset_for(settings: VocDetSettings, backbone: Any | None) -> str:
    """The effective preset; ``auto`` needs the backbone (None: unknown yet)."""
    if settings.preset != "auto":
        return settings.preset
    if backbone is None:
        return "auto"
    return "deepcluster" if design_family(backbone) == "deepcluster" else "moco"


def resolve(settings: VocDetSettings, backbone: Any | None) -> Recipe:
    """The recipe of a run: each ``None`` setting takes the preset's value."""
    preset = preset_for(settings, backbone)
    if preset == "auto":
        raise ValueError("resolve(): preset auto needs the backbone")
    values = {f.name: getattr(settings, f.name) for f in fields(settings)}
    for key, default in PRESETS[preset].items():
        if values.get(key) is None:
            values[key] = copy.deepcopy(default)
    values["preset"] = preset
    values["workers"] = settings.loader_workers()  # a DataLoader count ("auto" resolved)
    if values["bn"] == "frozen":
        values["precise_bn"] = 0  # nothing to re-estimate
    return Recipe(preset, values, dict(PRESET_CONSTANTS[preset]))


def filled(settings: VocDetSettings) -> VocDetSettings:
    """``settings`` with each None replaced by its preset's value (unchanged for preset auto)."""
    if settings.preset == "auto":
        return settings
    values = {k: copy.deepcopy(v) for k, v in PRESETS[settings.preset].items() if getattr(settings, k) is None}
    return dataclasses.replace(settings, **values)


def _sets_needed(settings: VocDetSettings, preset: str) -> tuple[list[str], str]:
    """Train sets and test set; with preset auto, only what both presets share (VOC2007)."""
    base = PRESETS["deepcluster" if preset == "auto" else preset]
    train = settings.train_sets or base["train_sets"]
    return list(train), settings.test_set or base["test_set"]


# ============================================================================= protocol
@register_protocol
class VocDetection(Protocol):
    """``voc-det``: Faster R-CNN fine-tuning on Pascal VOC, AP50 / AP75 / AP."""

    name: ClassVar[str] = "voc-det"
    description: ClassVar[str] = ("Pascal VOC detection by fine-tuning Faster R-CNN (conv5 + fc6/fc7 or R-C4), "
                                  "AP50/AP75/AP (paper Table 2; MoCo/VISSL)")
    #: 2: VOC07 11-point AP on np.arange thresholds; box losses with the presets' smooth-L1 betas
    #: (moco: L1 as detectron2; deepcluster: Fast R-CNN's beta 1 in the box head); deepcluster
    #: test NMS 0.3 (Fast R-CNN's cfg.TEST.NMS). 3: published weights are read with their own input convention
    #: (input_convention=weights): mean and std. 4: flips depend on (seed, epoch, image) only: any workers
    version: ClassVar[str] = "4"
    finetune: ClassVar[bool] = True
    Settings: ClassVar[type] = VocDetSettings
    headline_metrics: ClassVar[tuple[str, ...]] = ("AP50",)
    data_layout: ClassVar[str] = f"""\
{layout("2007")}, and VOC2012 the same way for the moco preset
ROOT may also be ROOT/VOCdevkit. Boxes from Annotations/<id>.xml (difficult objects ignored by
the evaluation); image sets from ImageSets/Main/<split>.txt; classes from the test set's
ImageSets/Main/<cls>_test.txt files (a devkit with only some VOC classes is evaluated on those).
preset deepcluster: VOC2007 trainval -> test; preset moco: VOC2007+VOC2012 trainval -> VOC2007 test
(the VOC2007 test set is a separate download extracted into the same VOCdevkit).
"""

    def preset_defaults(self, settings: Any) -> Any:
        """The preset's defaults with its values filled in (preset auto: left to the backbone)."""
        return filled(super().preset_defaults(settings))

    def deviations(self, settings: Any) -> list[Deviation]:
        """As :meth:`Protocol.deviations`, comparing filled-in values (None is the preset's)."""
        return super().deviations(filled(settings))

    def sources_for(self, preset: str | None) -> dict[str, str]:
        """Where each default of ``preset`` comes from (auto: both presets')."""
        chosen = auto_sources() if preset in (None, "auto") else PRESET_SOURCES[preset]
        chosen = {**chosen, "input_convention": INPUT_CONVENTION_SOURCE}
        return {f.name: chosen[f.name] for f in fields(self.Settings)}

    def deviations_for(self, preset: str | None) -> list[Deviation]:
        """The known deviations of ``preset`` (auto: both presets')."""
        return auto_deviations() if preset in (None, "auto") else list(PRESET_DEVIATIONS[preset])

    def check_data(self, root: Path, settings: VocDetSettings) -> None:
        """Image sets, JPEGs and annotation files of every set the run reads (with preset auto,
        the VOC2007 sets both presets share; VOC2012 is checked once the backbone decides)."""
        train, test = _sets_needed(settings, settings.preset)
        load_det_data(Path(root), train, test, settings.classes, warn=False)

    def data_parallel(self, settings: Any) -> str | None:
        """The torchvision backend is data-parallel under torchrun (:mod:`dcbench.detection.engine`:
        global batch ``batch_size``, ``batch_size / N`` per process; a batch size N does not divide
        is refused here when set, else when the preset resolves it); detectron2 runs its own
        launcher, so backend=detectron2 is refused."""
        if settings.backend == "detectron2":
            return ("voc-det with backend=detectron2 runs in one process (detectron2 has its own launcher): "
                    "use --set backend=torchvision under torchrun, or launch it as one process")
        return None if settings.batch_size is None else batch_refusal(settings.batch_size)

    def run(self, ckpt: Any, settings: VocDetSettings, root: Path, ctx: EvalContext) -> ProtocolOutput:
        """Fine-tune a detector on a copy of the backbone, detect on the test set, score it."""
        started = time.perf_counter()
        recipe = resolve(settings, ckpt.backbone)
        convention = detection_convention(ckpt.backbone, settings)
        # backbone errors before reading thousands of annotation files
        if recipe.backend == "torchvision":
            require_supported(ckpt.backbone)
        else:
            from dcbench.detection.detectron2_backend import detectron2_depth
            detectron2_depth(ckpt)
        data = load_det_data(Path(root), recipe.train_sets, recipe.test_set, settings.classes)
        data.read_annotations()
        train_ds = DetectionDataset(data.training_records(recipe.train_difficult), flip=True, strict=ctx.strict)
        if len(train_ds) == 0:
            raise DataError(f"no training image holds an object of {', '.join(data.classes)} in "
                            f"{', '.join(recipe.train_sets)}; check Annotations/ and the classes setting")
        test_ds = DetectionDataset(records_from_annotations(data.test, data.test_annotations, data.classes, True),
                                   strict=ctx.strict)
        if recipe.backend == "detectron2":
            detections, facts = self._run_detectron2(ckpt, train_ds, test_ds, data, recipe, ctx)
        else:
            ctx.shared_forward()  # under torchrun each rank trains on its share of every batch
            spec = dataclasses.replace(recipe.detector_spec(), image_mean=convention.mean, image_std=convention.std)
            detections, facts = finetune_torchvision(ckpt, train_ds, test_ds, len(data.classes), data.train[0],
                                                     spec, recipe.solver(recipe.workers), recipe, ctx.device,
                                                     ctx.progress)
        ap = evaluate_detections(detections, data.test_annotations, data.classes,
                                 use_07_metric=recipe.ap_rule == "11-point")
        rows = ap_rows(ap, recipe.mode, recipe.seed, data.test.split)  # "val" when tuning on a val split
        extra = {**data.describe(), **facts, "preset": recipe.preset, "recipe": _plain(recipe.values),
                 "recipe_constants": recipe.constants, "backend": recipe.backend, "mode": recipe.mode,
                 "ap_rule": f"{ap.rule}, VOC devkit matching (IoU > t), difficult objects ignored; "
                            f"AP = mean over IoU 0.50:0.95 of the same rule",
                 "ap_per_class": ap.per_class(), "test_objects": ap.n_ground_truth,
                 "training_images": len(train_ds), "metric_tap": "the tap of the rows is the mode (fc6-8 / all)",
                 "proposals": "RPN trained jointly (Faster R-CNN); the paper's Fast R-CNN used selective search",
                 "input_convention": describe_applied(
                     convention, "mean, std (Faster R-CNN's transform; the resizes stay the preset's)"),
                 "det_wall_s": round(time.perf_counter() - started, 3)}
        return ProtocolOutput(rows, data.fingerprint(), extra)

    def _run_detectron2(self, ckpt: Any, train_ds: DetectionDataset, test_ds: DetectionDataset, data: DetData,
                        recipe: Recipe, ctx: EvalContext) -> tuple[list, dict[str, Any]]:
        from dcbench.detection.detectron2_backend import run_detectron2

        solver = recipe.solver(recipe.workers)
        detections, facts = run_detectron2(ckpt, train_ds.records, test_ds.records, data.classes,
                                           recipe.detector_spec(), solver, recipe.mode, recipe.bn,
                                           recipe.precise_bn, ctx.device)
        return detections, {"detectron2": facts, "solver": solver.describe(),
                            "trunk_check": "not run: detectron2 freezes the trunk itself (FREEZE_AT)",
                            "bn_recalibrate": {"ran": False, "reason": "not done with backend=detectron2"}}


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
