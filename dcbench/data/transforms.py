"""The standard image transforms, parameterised by image size so 32 px demos and 224 px
benchmarks share one definition.

Input conventions (issue 19), the one rule every protocol applies: published weights carry the
preprocessing they were trained with (``Backbone.input_config`` with a ``source``: a timm
model's ``pretrained_cfg``, a torchvision weight enum's ``transforms()``). A protocol whose
``input_convention`` setting is ``weights`` (the default of ``linear`` and ``knn``) uses that
convention's mean, std, interpolation and crop ratio instead of its preset's; a backbone without
one (random inits, DeepCluster and other dcbench checkpoints) gets the preset's, exactly as
before (same transforms, same feature-cache ids). See :func:`resolve_convention`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from torchvision import transforms as T

from dcbench.errors import UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: the centre-crop ratio of torchvision's and DeepCluster's Resize(256) + CenterCrop(224)
DEFAULT_CROP_PCT = 224 / 256


def normalize() -> T.Normalize:
    """ImageNet mean/std normalisation, the input convention of every dcbench backbone."""
    return T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)


def eval_resize(image_size: int) -> int:
    """Short-side resize used before the centre crop: the usual 256/224 ratio."""
    return round(image_size * 256 / 224)


def eval_transform(image_size: int = 224, resize: int | None = None) -> Callable:
    """Deterministic evaluation transform for PIL images.

    Resize(short side to ``resize``, default ``round(image_size * 256 / 224)``),
    CenterCrop(image_size), ToTensor, Normalize(ImageNet).
    """
    return T.Compose([
        T.Resize(resize or eval_resize(image_size)),
        T.CenterCrop(image_size),
        T.ToTensor(),
        normalize(),
    ])


def train_transform(image_size: int = 224, scale: tuple[float, float] = (0.08, 1.0)) -> Callable:
    """Random augmentation used by DeepCluster training and linear probes.

    RandomResizedCrop(image_size, scale), RandomHorizontalFlip, ToTensor, Normalize(ImageNet).
    """
    return T.Compose([
        T.RandomResizedCrop(image_size, scale=tuple(scale)),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        normalize(),
    ])


#: resampling filters a protocol may ask for (torchvision's names)
INTERPOLATIONS = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC,
                  "nearest": T.InterpolationMode.NEAREST}


def _interpolation(name: str) -> T.InterpolationMode:
    if name not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {name!r}")
    return INTERPOLATIONS[name]


def center_transform(image_size: int, interpolation: str = "bilinear") -> Any:
    """Resize(round(s*256/224)), CenterCrop(s), ImageNet normalisation (the cached/test view).

    ``interpolation="bicubic"`` is DINO's ``eval_knn.py`` (``Resize(256, interpolation=3)``).
    """
    if interpolation == "bilinear":
        return eval_transform(image_size)
    return T.Compose([T.Resize(eval_resize(image_size), interpolation=_interpolation(interpolation)),
                      T.CenterCrop(image_size), T.ToTensor(), normalize()])


def center_transform_id(image_size: int, interpolation: str = "bilinear") -> str:
    """Feature-cache id of :func:`center_transform` (shared by every frozen-feature protocol)."""
    resample = "" if interpolation == "bilinear" else f"-{interpolation}"  # bilinear keeps the ids of v1 caches
    return f"resize{eval_resize(image_size)}{resample}-center{image_size}-imagenet-norm"


def squash_transform(image_size: int, pre_resize: bool = True) -> Any:
    """The WHOLE image resized to ``s x s`` (no crop), ImageNet normalisation; with
    ``pre_resize`` first Resize(round(s*256/224)) (short side). VISSL's VOC07 SVM configs
    (``Resize 256``, ``Resize [224, 224]``) and its low-shot config (``Resize [224, 224]`` only)."""
    first = [T.Resize(eval_resize(image_size))] if pre_resize else []
    return T.Compose([*first, T.Resize((image_size, image_size)), T.ToTensor(), normalize()])


def squash_transform_id(image_size: int, pre_resize: bool = True) -> str:
    """Feature-cache id of :func:`squash_transform`."""
    first = f"resize{eval_resize(image_size)}-" if pre_resize else ""
    return f"{first}squash{image_size}x{image_size}-imagenet-norm"


def probe_train_transform(image_size: int, center_crop: bool = True) -> Any:
    """Resize(r), [CenterCrop(r),] RandomCrop(s), flip, with r = round(s*256/224) (256 at 224).

    With the centre crop: DeepCluster's ``eval_linear.py``; without: VISSL's linear configs
    (``Resize 256``, ``RandomCrop 224``, ``RandomHorizontalFlip``).
    """
    r = eval_resize(image_size)
    crop = [T.CenterCrop(r)] if center_crop else []
    return T.Compose([T.Resize(r), *crop, T.RandomCrop(image_size), T.RandomHorizontalFlip(),
                      T.ToTensor(), normalize()])


class _StackCrops:
    """PIL crops -> normalised tensor n_crops x 3 x s x s (a class, so workers can pickle it)."""

    def __init__(self) -> None:
        self.norm = normalize()

    def __call__(self, crops: Sequence[Any]) -> torch.Tensor:
        return torch.stack([self.norm(T.functional.to_tensor(c)) for c in crops])


def ten_crop_transform(image_size: int) -> Any:
    """Resize(r) then TenCrop(s) (4 corners + centre, and their flips)."""
    return T.Compose([T.Resize(eval_resize(image_size)), T.TenCrop(image_size), _StackCrops()])


# ----------------------------------------------------------------------------- input conventions
@dataclass(frozen=True)
class InputConvention:
    """How images are prepared for a backbone: normalisation, resampling filter and the
    centre-crop ratio (``Resize(s / crop_pct)`` then ``CenterCrop(s)``, timm's rule).

    ``source`` says where it comes from (e.g. ``timm pretrained_cfg of resnet18.a1_in1k``);
    None is a protocol preset's convention (ImageNet mean/std, Resize(round(s*256/224)))."""

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    crop_pct: float = DEFAULT_CROP_PCT
    crop_mode: str = "center"
    source: str | None = None

    def resize(self, image_size: int) -> int:
        """Short side before the centre crop: the presets' round(s*256/224) (256 at 224), or timm's
        ``floor(s / crop_pct)`` for a convention of published weights (the 1e-4 absorbs a crop
        ratio stored rounded, e.g. torchvision's 224/232)."""
        if self.source is None:
            return eval_resize(image_size)
        return int(math.floor(image_size / self.crop_pct + 1e-4))

    def normalize(self) -> T.Normalize:
        """Normalisation with this convention's mean and std."""
        return T.Normalize(mean=self.mean, std=self.std)

    def resample(self) -> T.InterpolationMode:
        """The torchvision resampling mode of :attr:`interpolation`."""
        return _interpolation(self.interpolation)

    def id_suffix(self) -> str:
        """What feature-cache ids add for this convention ("" for a preset's, so their ids stay)."""
        if self.source is None:
            return ""
        values = ",".join(f"{v:.4g}" for v in (*self.mean, *self.std))
        return f"-{self.crop_mode}-pct{self.crop_pct:.4g}-norm[{values}]"

    def describe(self) -> dict[str, Any]:
        """JSON-safe record of the convention a run used (results' ``extra.input_convention``)."""
        return {"source": self.source or "protocol preset", "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation, "crop_pct": round(self.crop_pct, 4), "crop_mode": self.crop_mode}


#: what a protocol's ``input_convention`` setting may say
ConventionMode = Literal["weights", "preset"]
#: the crop modes of timm's pretrained configs that dcbench reproduces
CROP_MODES = ("center", "squash")


def weights_convention(input_config: Mapping[str, Any] | None) -> InputConvention | None:
    """The convention of published weights from a ``Backbone.input_config`` (None when it has no
    ``source``: random inits and dcbench's own checkpoints, whose convention is the preset's)."""
    if not input_config or not input_config.get("source"):
        return None
    interpolation = str(input_config.get("interpolation", "bilinear"))
    return InputConvention(tuple(float(v) for v in input_config["mean"]), tuple(float(v) for v in input_config["std"]),
                           interpolation if interpolation in INTERPOLATIONS else "bicubic",
                           float(input_config.get("crop_pct", DEFAULT_CROP_PCT)),
                           str(input_config.get("crop_mode", "center")), str(input_config["source"]))


def resolve_convention(backbone: Any, mode: str = "weights", interpolation: str = "bilinear") -> InputConvention:
    """THE rule (see the module docstring): the convention of ``backbone``'s published weights
    when ``mode`` is ``weights`` and it has one, else the preset's (ImageNet mean/std,
    Resize(round(s*256/224)) with ``interpolation``, CenterCrop). A crop mode dcbench does not
    reproduce (timm's ``border``) is one UsageError naming ``input_convention=preset``."""
    own = weights_convention(getattr(backbone, "input_config", None)) if mode == "weights" else None
    if own is None:
        return InputConvention(interpolation=interpolation)
    if own.crop_mode not in CROP_MODES:
        raise UsageError(f"the weights' input convention ({own.source}) crops in mode '{own.crop_mode}', which dcbench "
                         f"does not reproduce; add --set input_convention=preset (ImageNet mean/std, centre crop)")
    return own


def _resize_step(image_size: int, convention: InputConvention) -> Any:
    r = convention.resize(image_size)
    if convention.crop_mode == "squash":  # timm's squash: both sides to r, then the centre crop
        return T.Resize((r, r), interpolation=convention.resample())
    return T.Resize(r, interpolation=convention.resample())


def convention_center_transform(image_size: int, convention: InputConvention) -> Any:
    """Resize, CenterCrop(s), normalisation of ``convention`` (a preset's: :func:`center_transform`)."""
    if convention.source is None:
        return center_transform(image_size, convention.interpolation)
    return T.Compose([_resize_step(image_size, convention), T.CenterCrop(image_size), T.ToTensor(),
                      convention.normalize()])


def convention_center_id(image_size: int, convention: InputConvention) -> str:
    """Feature-cache id of :func:`convention_center_transform` (a preset's: :func:`center_transform_id`)."""
    if convention.source is None:
        return center_transform_id(image_size, convention.interpolation)
    resize = convention.resize(image_size)
    return f"resize{resize}-{convention.interpolation}-center{image_size}{convention.id_suffix()}"


def convention_probe_train_transform(image_size: int, center_crop: bool, convention: InputConvention) -> Any:
    """:func:`probe_train_transform` with ``convention``'s resize, filter and normalisation."""
    if convention.source is None:
        return probe_train_transform(image_size, center_crop)
    r = convention.resize(image_size)
    crop = [T.CenterCrop(r)] if center_crop else []
    return T.Compose([_resize_step(image_size, convention), *crop, T.RandomCrop(image_size), T.RandomHorizontalFlip(),
                      T.ToTensor(), convention.normalize()])


def random_resized_crop_transform(image_size: int, convention: InputConvention) -> Any:
    """RandomResizedCrop(s) (scale 0.08-1, bilinear as torchvision's default; a weights' convention
    its own filter), RandomHorizontalFlip, normalisation: DINO's ``eval_linear.py`` training view."""
    resample = convention.resample() if convention.source else T.InterpolationMode.BILINEAR
    return T.Compose([T.RandomResizedCrop(image_size, interpolation=resample), T.RandomHorizontalFlip(),
                      T.ToTensor(), convention.normalize()])


class _StackCropsWith(_StackCrops):
    """:class:`_StackCrops` with a convention's normalisation."""

    def __init__(self, norm: T.Normalize) -> None:
        super().__init__()
        self.norm = norm


def convention_ten_crop_transform(image_size: int, convention: InputConvention) -> Any:
    """:func:`ten_crop_transform` with ``convention``'s resize, filter and normalisation."""
    if convention.source is None:
        return ten_crop_transform(image_size)
    return T.Compose([_resize_step(image_size, convention), T.TenCrop(image_size),
                      _StackCropsWith(convention.normalize())])


# ----------------------------------------------------------------------------- whole-image views
def resolve_uncropped_convention(backbone: Any, mode: str = "weights",
                                 interpolation: str = "bilinear") -> InputConvention:
    """:func:`resolve_convention` for views that never centre-crop (VOC SVMs' squash, R-MAC
    retrieval, fine-tunes' random crops): the same choice, but the weights' crop mode is not
    used, so timm's ``border`` mode is no error there."""
    own = weights_convention(getattr(backbone, "input_config", None)) if mode == "weights" else None
    return own if own is not None else InputConvention(interpolation=interpolation)


def norm_id(convention: InputConvention) -> str:
    """Feature-cache text of ``convention``'s normalisation ("imagenet-norm" for a preset's)."""
    if convention.source is None:
        return "imagenet-norm"
    values = ",".join(f"{v:.4g}" for v in (*convention.mean, *convention.std))
    return f"norm[{values}]"


def convention_squash_transform(image_size: int, pre_resize: bool, convention: InputConvention) -> Any:
    """:func:`squash_transform` with ``convention``'s filter and normalisation. The geometry is the
    protocol's (the whole image, no crop), so the weights' crop ratio does not apply; the optional
    first resize stays round(s*256/224) (VISSL's ``Resize 256``)."""
    if convention.source is None:
        return squash_transform(image_size, pre_resize)
    resample = convention.resample()
    first = [T.Resize(eval_resize(image_size), interpolation=resample)] if pre_resize else []
    return T.Compose([*first, T.Resize((image_size, image_size), interpolation=resample), T.ToTensor(),
                      convention.normalize()])


def convention_squash_id(image_size: int, pre_resize: bool, convention: InputConvention) -> str:
    """Feature-cache id of :func:`convention_squash_transform` (a preset's: :func:`squash_transform_id`)."""
    if convention.source is None:
        return squash_transform_id(image_size, pre_resize)
    first = f"resize{eval_resize(image_size)}-" if pre_resize else ""
    return f"{first}squash{image_size}x{image_size}-{convention.interpolation}-{norm_id(convention)}"


def describe_applied(convention: InputConvention, applied: str) -> dict[str, Any]:
    """:meth:`InputConvention.describe` plus which parts the protocol's view used (``applied``),
    for views that take only some of them (e.g. retrieval: mean and std)."""
    return {**convention.describe(), "applied": applied}


def convention_finetune_transform(image_size: int, scale: Sequence[float], convention: InputConvention) -> Any:
    """RandomResizedCrop(s, scale, ratio 1) + flip with ``convention``'s filter and normalisation
    (``voc07-cls``'s train and random10 test crops; a preset's: bilinear, ImageNet mean/std, i.e.
    ``dcbench.voc_finetune.finetune_transform``). Random crops take no crop ratio."""
    resample = convention.resample() if convention.source else T.InterpolationMode.BILINEAR
    return T.Compose([T.RandomResizedCrop(image_size, scale=tuple(scale), ratio=(1.0, 1.0), interpolation=resample),
                      T.RandomHorizontalFlip(), T.ToTensor(), convention.normalize()])


class BatchNormalise:
    """The ``ToTensor`` + ``Normalize`` tail of a transform, applied to a uint8 batch ``B x C x H x W``:
    ``x / 255`` in float32, then ``(x - mean) / std`` per channel (see :func:`split_normalisation`)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        # as Normalize builds them: float32 tensors of the Python floats
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        images = batch.to(torch.float32).div_(255)
        return images.sub_(self.mean.to(images.device)).div_(self.std.to(images.device))


def split_normalisation(transform: Any) -> tuple[T.Compose, BatchNormalise] | None:
    """``(pixels, finish)`` for a ``Compose`` that ends in ``ToTensor()`` and ``Normalize``:
    ``pixels`` stops at uint8 ``C x H x W`` (``PILToTensor``), ``finish`` scales a collated batch;
    None for any other transform.

    Loader workers then send one byte per pixel instead of four and the scaling runs once per batch
    (on the accelerator when there is one). ``finish(stack(pixels(img)))`` is bit for bit
    ``stack(transform(img))`` for RGB images: the same float32 operations in the same order
    (ToTensor divides by 255, Normalize subtracts the mean then divides by the std; tested).
    """
    steps = getattr(transform, "transforms", None)
    if type(transform) is not T.Compose or not steps or len(steps) < 2:
        return None
    *head, to_tensor, norm = steps
    if type(to_tensor) is not T.ToTensor or type(norm) is not T.Normalize:
        return None
    return T.Compose([*head, T.PILToTensor()]), BatchNormalise(norm.mean, norm.std)
