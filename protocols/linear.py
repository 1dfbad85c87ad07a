"""Linear probes per layer on frozen features (DeepCluster paper Table 1, VISSL benchmarks).

Three protocols, one recipe: ``linear`` (any labelled ImageFolder with train/ and val/),
``imagenet-linear`` (ImageNet, 1000 classes) and ``places-linear`` (Places205, 205 classes).

- The backbone is frozen in eval mode (the runner checks its weights and BatchNorm buffers
  are unchanged afterwards); ALL requested taps are probed in ONE run that shares each
  batch's frozen forward pass (:mod:`dcbench.probe`).
- Preset ``deepcluster`` (facebookresearch/deepcluster ``eval_linear.py``): AvgPool2d table,
  then Linear; SGD lr 0.01, momentum 0.9, wd 1e-7, ``lr_t = lr0 / sqrt(1 + lr0 * wd * t)``
  with t the iteration, 90 epochs, batch 256.
- Preset ``vissl`` (facebookresearch/vissl ``configs/config/benchmark/linear_image_classification/
  {imagenet1k,places205}/eval_alexnet_8gpu_transfer_*_linear.yaml``, head
  ``vissl/models/heads/linear_eval_mlp.py``): VISSL's AvgPool2d table, then BatchNorm2d,
  then Linear (torch's default init, ``vissl/models/heads/mlp.py``); wd 5e-4 (none on BN),
  28 epochs (Places205: 14) with lr x0.1 at 8/16/24 (4/8/12), at the same fractions when
  ``epochs`` is overridden (see :func:`vissl_steps`); ResNets also probe ``avgpool`` (VISSL's
  ``res5avg``, the 2048-d global average on ResNet-50).
- Preset ``dino`` (facebookresearch/dino ``eval_linear.py``): on a ViT the concatenated normed
  CLS tokens of the last 4 blocks (``cls4``, ViT-S and narrower) or the last CLS token + the
  average patch token (``cls+avgpool``, ViT-B and wider), on a ResNet the 2048-d ``avgpool``;
  Linear head N(0, 0.01), SGD lr 0.001 at batch 256 (DINO's linear scaling rule), momentum 0.9,
  no weight decay, cosine lr over 100 epochs (per epoch, to 0); RandomResizedCrop(s) + flip for
  training, Resize(s*256/224, bicubic) + CenterCrop(s) for val.
- Preset ``mocov3`` (facebookresearch/moco-v3 ``main_lincls.py``), the simple ViT probe: Linear
  N(0, 0.01) on the last block's normed CLS (``cls``; ResNets: ``avgpool``), SGD lr 3 at batch 256,
  momentum 0.9, no wd, cosine lr over 90 epochs; RandomResizedCrop + flip, bilinear Resize +
  CenterCrop for val. ``cls`` is also the ViT default of ``deepcluster`` / ``vissl`` (a 2-D tap).
- Other input sizes / archs: adaptive average pooling to the preset's grid capped at the map size
  (:func:`dcbench.pooling.probe_pooling`); the pooling of each tap is recorded.
- Input convention: published weights (timm / torchvision / hf-hub) are read with their own mean, std,
  interpolation and crop ratio (``input_convention=weights``, ``resolve_convention``); others with the preset's.
- Train: Resize(s*256/224), [CenterCrop(same): deepcluster only], RandomCrop(s), flip; test (``crops``):
  Resize then TenCrop(s), softmax averaged (deepcluster), or the centre crop (vissl). ``cached=true``: pooled
  centre-crop features are extracted once per split (feature cache) and the heads trained on them.
- Provenance of every default, per preset, and the known deviations: protocols/_sources_linear.py,
  ``dcbench protocols linear [--json] [--set preset=vissl]`` and docs/protocols.md.
- Metrics: top-1 and top-5 per tap on val at the last epoch (``selection="final"``) and at the best epoch by
  val top-1 (``"best"``, what the paper reports); per-image correctness of both is kept for the bootstrap.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from torch import nn

from dcbench.data import decoded_in_memory, image_folder
from dcbench.data.layouts import check_train_val, train_val_fingerprint
from dcbench.data.transforms import (ConventionMode, InputConvention, convention_center_id,
                                     convention_center_transform, convention_probe_train_transform,
                                     convention_ten_crop_transform, random_resized_crop_transform, resolve_convention)
from dcbench.errors import UsageError
from dcbench.models.hooked import AVGPOOL_TAP
from dcbench.models.vit import ViTBackbone
from dcbench.pooling import PoolPlan, probe_pooling, resolve_taps
from dcbench.probe import (History, ProbeLoop, ProbeOutcomes, ProbeSet, final_and_best_rows,
                           train_on_features, train_on_images)
from dcbench.protocol import (Deviation, FrozenFeatureSettings, Protocol, ProtocolOutput, RunContext, batch_refusal,
                              decode_cache_setting, register_protocol, setting)
from dcbench.protocols._linear_presets import (  # noqa: F401 - schedules re-exported for tests and users
    PRESET_CROPS, PRESET_HEAD_INIT, PRESET_INTERPOLATION, PRESET_LR, PRESET_TRAIN_CENTER_CROP, PRESET_WEIGHT_DECAY,
    RRC_PRESETS, TEN_CROPS, TRAIN_CROPS, deepcluster_lr, dino_lr, probe_optim, vissl_lr, vissl_steps)
from dcbench.protocols._sources_linear import PRESET_DEVIATIONS, PRESET_SOURCES, places_epochs_source


def preset_taps(preset: str, backbone: nn.Module) -> list[str] | None:
    """The default taps of ``preset`` where they are not every conv tap (None: the engine's
    default, :func:`dcbench.pooling.default_taps`, ``cls`` on a ViT): vissl adds the ResNet
    ``avgpool`` (VISSL's res5avg, the most cited ResNet-50 probe); dino reads DINO eval_linear.py's
    feature, :meth:`ViTBackbone.dino_linear_tap` on a ViT, the 2048-d average (fc = Identity)
    on a ResNet; mocov3 the ViT's own head feature (``cls``) or that ResNet average."""
    resnet_avg = backbone.family == "resnet" and AVGPOOL_TAP in backbone.tap_names
    if preset == "vissl" and resnet_avg:
        return [*backbone.conv_tap_names, AVGPOOL_TAP]
    if preset in RRC_PRESETS and isinstance(backbone, ViTBackbone):
        return [backbone.dino_linear_tap() if preset == "dino" else backbone.image_feature_tap]
    return [AVGPOOL_TAP] if preset in RRC_PRESETS and resnet_avg else None


# ----------------------------------------------------------------------------- settings
@dataclass
class LinearSettings(FrozenFeatureSettings):
    """Settings of the linear-probe protocols (defaults and their sources: the module docstring)."""

    preset: Literal["deepcluster", "vissl", "dino", "mocov3"] = setting(
        "deepcluster", "deepcluster: AvgPool table + Linear, 1/sqrt lr decay, wd 1e-7, 90 epochs; "
        "vissl: VISSL AvgPool table + BatchNorm + Linear, lr x0.1 steps, wd 5e-4, 28 epochs (Places205: 14); "
        "dino: DINO eval_linear.py, Linear on cls4 (ViT-S) / cls+avgpool (ViT-B) / avgpool (ResNet), cosine lr, "
        "no wd, 100 epochs, RandomResizedCrop; mocov3: MoCo v3 main_lincls.py, Linear on cls (ViT) / avgpool "
        "(ResNet), lr 3, cosine lr, no wd, 90 epochs, RandomResizedCrop")
    taps: list[str] | None = setting(
        None, "taps to probe, all in one run sharing each forward pass (default: every conv tap; vissl on ResNets: "
              "+ avgpool; ViTs: cls, dino: cls4 or cls+avgpool; dino / mocov3 on ResNets: avgpool)", numbers=False)
    image_size: int = setting(224, "crop side in px; images are resized to round(s*256/224) first")
    batch_size: int = setting(256, "training batch size (TenCrop val batches hold batch_size/10 images)")
    epochs: int | None = setting(
        None, "training epochs (default: the preset's, 90 deepcluster / 28 vissl / 14 vissl on Places205)")
    lr: float | None = setting(
        None, "initial learning rate of the heads (SGD) (default: the preset's, 0.01 deepcluster / vissl, "
              "0.001 dino, 3 mocov3)")
    weight_decay: float | None = setting(
        None, "weight decay of the Linear heads (default: preset's, 1e-7 deepcluster, 5e-4 vissl, else 0; never BN)")
    momentum: float = setting(0.9, "SGD momentum")
    crops: Literal["tencrop", "center"] | None = setting(
        None, "val evaluation: TenCrop with softmax averaged, or the centre crop (default: the preset's, tencrop "
              "deepcluster, else center; cached=true always uses center)")
    train_center_crop: bool | None = setting(
        None, "training crops: Resize, CenterCrop(resize side), RandomCrop, flip (true) or Resize, RandomCrop, flip "
              "(false) (default: the preset's, true deepcluster, else false)")
    head_init: Literal["torch", "normal"] | None = setting(
        None, "init of the Linear heads: torch's default, or normal = N(0, 0.01) weights and zero bias (default: "
              "the preset's, torch deepcluster / vissl, normal dino / mocov3)")
    interpolation: Literal["bilinear", "bicubic"] | None = setting(
        None, "resampling of the resizes (default: the preset's, bilinear deepcluster / vissl / mocov3, bicubic dino; "
              "published weights: their own unless input_convention=preset)")
    input_convention: ConventionMode = setting(
        "weights", "weights: published weights (timm/tv/hf-hub) are read with their own mean, std, interpolation and "
                   "crop ratio; preset: always the preset's (ImageNet mean/std, Resize(s*256/224))")
    cached: bool = setting(
        False, "train on pooled features extracted once per split (centre crop, no augmentation) instead of "
        "augmented crops; much faster, not the paper's protocol")
    cache: bool = setting(
        True, "with cached=true, read/write the extracted features in the feature cache (shared with other runs)",
        numbers=False)
    decode_cache_gb: float = decode_cache_setting("train and val images of cached=false runs")
    seed: int = setting(0, "seed of head init, shuffling, augmentation and BN re-estimation", numbers=False)
    bn_recalibrate: Literal["auto", "on", "off"] = setting(
        "auto", "re-estimate BatchNorm running stats on train images (train-mode forwards, no grad, at most "
        "200 batches) on a copy of the backbone before probing; auto = on for random inits")

    def validate(self) -> None:
        """Raise UsageError for impossible values (taps are checked against the backbone in run)."""
        super().validate()
        if self.epochs is not None and self.epochs < 1:
            raise UsageError(f"bad value {self.epochs} for epochs: must be at least 1")
        if self.lr is not None and self.lr <= 0:
            raise UsageError(f"bad value {self.lr} for lr: must be positive")
        if self.preset in RRC_PRESETS and self.train_center_crop:
            raise UsageError(f"train_center_crop=true does not apply to preset {self.preset} (it trains on "
                             "RandomResizedCrop); drop it, or use preset=deepcluster")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise UsageError(f"bad value {self.weight_decay} for weight_decay: must be >= 0")
        if not 0 <= self.momentum < 1:
            raise UsageError(f"bad value {self.momentum} for momentum: must be in [0, 1)")


# ----------------------------------------------------------------------------- the recipe
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
    train_center_crop: bool
    head_init: str
    crops_note: str | None = None
    lr: float = 0.01
    convention: InputConvention = dataclasses.field(default_factory=InputConvention)
    image_size: int = 224

    def center(self, size: int) -> Any:
        """The centre-crop view (cached features, BN re-estimation, centre-crop val)."""
        return convention_center_transform(size, self.convention)

    def center_id(self, size: int) -> str:
        """Feature-cache id of :meth:`center`."""
        return convention_center_id(size, self.convention)

    def train_view(self, size: int) -> Any:
        """The augmented training view: dino's RandomResizedCrop, else Resize + [CenterCrop +] RandomCrop."""
        if self.preset in RRC_PRESETS:
            return random_resized_crop_transform(size, self.convention)
        return convention_probe_train_transform(size, self.train_center_crop, self.convention)

    def val_view(self, size: int) -> Any:
        """TenCrop (softmax averaged) or the centre crop."""
        if self.crops == "tencrop":
            return convention_ten_crop_transform(size, self.convention)
        return self.center(size)


class LinearProbe(Protocol):
    """Shared recipe of ``linear``, ``imagenet-linear`` and ``places-linear``."""

    #: 2: vissl_steps no longer repeats a step at 2 epochs (only vissl runs of exactly 2 epochs change). 3: the
    #: vissl preset follows VISSL: centre-crop test, no CenterCrop(256) in training, torch's head init, + avgpool.
    #: 4: ViTs default to the cls tap; published weights are read with their own input
    #: convention (input_convention=weights); lr / head_init / interpolation default to the preset's.
    #: 5: cached=false crops depend on (seed, epoch, image) only (dcbench.data.seeded): any workers / world size
    version: ClassVar[str] = "5"
    Settings: ClassVar[type] = LinearSettings
    #: number of classes the dataset must have (None: any)
    expected_classes: ClassVar[int | None] = None
    dataset_name: ClassVar[str] = ""
    #: top-1 per tap (DeepCluster Table 1, VISSL)
    headline_metrics: ClassVar[tuple[str, ...]] = ("top1",)
    #: default epochs per preset (dino eval_linear.py --epochs 100, moco-v3 main_lincls.py --epochs 90)
    preset_epochs: ClassVar[dict[str, int]] = {"deepcluster": 90, "vissl": 28, "dino": 100, "mocov3": 90}

    def check_data(self, root: Path, settings: Any) -> None:
        """Fast layout check (folder listings): DataError naming the problem and the layout."""
        layout = self.data_layout.strip().splitlines()[0]
        check_train_val(Path(root), self.name, layout, self.expected_classes, self.dataset_name)

    def filled(self, settings: LinearSettings) -> LinearSettings:
        """``settings`` with every "the preset's" (None) value replaced by the preset's."""
        p = settings.preset
        return dataclasses.replace(
            settings, epochs=settings.epochs or self.preset_epochs[p],
            weight_decay=PRESET_WEIGHT_DECAY[p] if settings.weight_decay is None else settings.weight_decay,
            crops=settings.crops or PRESET_CROPS[p],
            train_center_crop=(PRESET_TRAIN_CENTER_CROP[p] if settings.train_center_crop is None
                               else settings.train_center_crop),
            lr=PRESET_LR[p] if settings.lr is None else settings.lr,
            head_init=settings.head_init or PRESET_HEAD_INIT[p],
            interpolation=settings.interpolation or PRESET_INTERPOLATION[p])

    def preset_defaults(self, settings: Any) -> Any:
        """The preset's defaults with its values filled in (what the card shows)."""
        return self.filled(super().preset_defaults(settings))

    def deviations(self, settings: Any) -> list[Deviation]:
        """As :meth:`Protocol.deviations`, comparing filled-in values (crops=None under vissl is center)."""
        return super().deviations(self.filled(settings))

    def sources_for(self, preset: str | None) -> dict[str, str]:
        """Where each default of ``preset`` comes from."""
        chosen = dict(PRESET_SOURCES[preset or "deepcluster"])
        if preset == "vissl" and self.preset_epochs["vissl"] != 28:
            chosen["epochs"] = places_epochs_source(self.preset_epochs["vissl"])
        return {f.name: chosen[f.name] for f in dataclasses.fields(self.Settings)}

    def deviations_for(self, preset: str | None) -> list[Deviation]:
        """The known deviations of ``preset`` from its source."""
        return list(PRESET_DEVIATIONS[preset or "deepcluster"])

    def data_parallel(self, settings: Any) -> str | None:
        """Both modes run under torchrun: cached=true shards the extraction, cached=false splits
        every global batch of ``batch_size`` augmented images over the ranks (:mod:`dcbench.probe`);
        the one refusal is a batch size the number of processes does not divide."""
        return None if settings.cached else batch_refusal(settings.batch_size)

    def resolve(self, settings: LinearSettings, backbone: nn.Module, n_classes: int = 0) -> _Run:
        """Effective taps, pooling, epochs, weight decay, lr steps, mode and crops (UsageError
        for unknown taps or an image size the taps cannot take)."""
        s = self.filled(settings)
        taps = preset_taps(s.preset, backbone) if s.taps is None else None
        taps = resolve_taps(backbone, s.taps if taps is None else taps, image_feature=True)
        plans = probe_pooling(backbone, taps, s.image_size, s.preset)
        steps = vissl_steps(s.epochs) if s.preset == "vissl" else []
        mode = "cached" if s.cached else "augmented"
        crops = "center" if s.cached else s.crops
        note = "cached=true evaluates the centre crop" if s.cached and s.crops != "center" else None
        convention = resolve_convention(backbone, s.input_convention, s.interpolation)
        return _Run(s.preset, taps, plans, s.epochs, s.weight_decay, steps, mode, crops, n_classes,
                    s.train_center_crop, s.head_init, note, s.lr, convention, s.image_size)

    def run(self, ckpt: Any, settings: LinearSettings, root: Path, ctx: RunContext) -> ProtocolOutput:
        """Train one linear head per tap on the frozen backbone; see the module docstring."""
        started = time.perf_counter()
        train_ds, val_ds = ctx.data(image_folder(root / "train")), ctx.data(image_folder(root / "val"))
        run = self.resolve(settings, ckpt.backbone, len(train_ds.classes))  # settings errors before any work
        calibration = copy.copy(train_ds)  # same file list (no second scan), its own transform
        calibration.transform = run.center(settings.image_size)
        with ctx.frozen_backbone(ckpt, calibration) as (backbone, sha):
            loop = ProbeLoop({t: run.plans[t].module() for t in run.taps}, run.epochs, settings.batch_size,
                             settings.seed, ctx.device, settings.loader_workers(), ctx.progress, shard=ctx.shard,
                             decode_cache_gb=settings.decode_cache_gb)
            optim = probe_optim(run.preset, run.lr, run.weight_decay, settings.momentum, run.steps, run.head_init,
                                run.epochs)
            probes, outcomes = ProbeSet(run.plans, run.n_classes, optim, ctx.device, settings.seed), ProbeOutcomes()
            if settings.cached:
                history, skipped = self._train_cached(ctx, backbone, sha, probes, loop, train_ds, val_ds, run,
                                                      outcomes)
            else:
                ctx.shared_forward()  # under torchrun each rank forwards its share of every batch
                history, skipped = self._train_augmented(backbone, probes, loop, train_ds, val_ds, run, settings,
                                                         outcomes)
        rows, best_epochs = final_and_best_rows(history, run.taps, settings.seed)
        extra = self._extra(run, settings, best_epochs, history, skipped, train_ds, val_ds, started)
        return ProtocolOutput(rows, train_val_fingerprint(train_ds.fingerprint(), val_ds.fingerprint()), extra,
                              outcomes.named())

    @staticmethod
    def _train_cached(ctx: RunContext, backbone: nn.Module, sha: str, probes: ProbeSet, loop: ProbeLoop,
                      train_ds: Any, val_ds: Any, run: _Run,
                      outcomes: ProbeOutcomes) -> tuple[History, dict[str, int]]:
        """Pooled centre-crop features of both splits (feature cache), heads trained on them."""
        feats = {}
        for split, ds in (("train", train_ds), ("val", val_ds)):
            ds.transform = run.center(run.image_size)
            feats[split] = ctx.extract(backbone, sha, ds, loop.taps, loop.pools, run.center_id(run.image_size))
        skipped = {"train": len(train_ds) - len(feats["train"].indices),
                   "val": len(val_ds) - len(feats["val"].indices)}
        return train_on_features(probes, feats["train"], feats["val"], loop, outcomes), skipped

    @staticmethod
    def _train_augmented(backbone: nn.Module, probes: ProbeSet, loop: ProbeLoop, train_ds: Any, val_ds: Any,
                         run: _Run, settings: LinearSettings,
                         outcomes: ProbeOutcomes) -> tuple[History, dict[str, int]]:
        """Augmented crops through the frozen backbone every epoch; TenCrop or centre-crop val."""
        size = settings.image_size
        tencrop = run.crops == "tencrop"
        train_ds.transform = run.train_view(size)
        val_ds.transform = run.val_view(size)
        return train_on_images(backbone, probes, train_ds, val_ds, TEN_CROPS if tencrop else 1, loop, outcomes)

    @staticmethod
    def _extra(run: _Run, settings: LinearSettings, best_epochs: dict[str, int], history: History,
               skipped: dict[str, int], train_ds: Any, val_ds: Any, started: float) -> dict[str, Any]:
        schedule = (f"lr_e = lr0 * (1 + cos(pi * e / {run.epochs})) / 2, e = epoch" if run.preset in RRC_PRESETS
                    else {"vissl": f"lr x0.1 at epochs {run.steps}"}.get(
                        run.preset, "lr_t = lr0 / sqrt(1 + lr0 * wd * t), t = iteration"))
        return {
            "mode": run.mode,
            "crops": run.crops,
            "crops_note": run.crops_note,
            "train_crops": None if settings.cached else TRAIN_CROPS[
                "rrc" if run.preset in RRC_PRESETS else run.train_center_crop],
            "head_init": "torch default" if run.head_init == "torch" else "N(0, 0.01), bias 0",
            "selection": "final = last epoch; best = epoch with the highest val top-1 per tap (top-5 of that epoch)",
            "preset": run.preset,
            "taps": run.taps,
            "pooling": {t: p.describe() for t, p in run.plans.items()},
            "head": "AvgPool -> BatchNorm2d -> Linear" if run.preset == "vissl" else "AvgPool -> Linear",
            "epochs": run.epochs,
            "weight_decay": run.weight_decay,
            "lr": run.lr,
            "lr_schedule": schedule,
            "input_convention": run.convention.describe(),
            "lr_steps": run.steps,
            "best_epoch": best_epochs,
            "history_top1": [{t: round(a[0], 3) for t, a in h.items()} for h in history],
            "frozen_check": "passed: backbone weights and BN buffers unchanged",
            "classes": run.n_classes,
            "images": {"train": len(train_ds), "val": len(val_ds)},
            "skipped_images": dict(skipped),
            "decoded_in_memory": None if settings.cached else {  # decode_cache_gb (None: decoded every epoch)
                "train": decoded_in_memory(train_ds), "val": decoded_in_memory(val_ds)},
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
    preset_epochs = {"deepcluster": 90, "vissl": 14, "dino": 100, "mocov3": 90}  # dino, mocov3: their ImageNet length
    data_layout = """\
ROOT/train/CLASS/*.jpg and ROOT/val/CLASS/*.jpg (ImageFolder; 205 class folders each)
Places205 ships as images/<letter>/<class>/... plus trainvalsplit_places205/{train,val}_places205.csv;
dcbench reads the ImageFolder form only: link each CSV's files into train/ or val/ under a flat
class folder name (e.g. a/abbey -> a_abbey, f/field/wild -> f_field_wild).
"""
