"""The standard image transforms, parameterised by image size so 32 px demos and 224 px
benchmarks share one definition."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
INTERPOLATIONS = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}


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
