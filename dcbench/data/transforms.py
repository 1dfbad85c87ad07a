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


def center_transform(image_size: int) -> Any:
    """Resize(round(s*256/224)), CenterCrop(s), ImageNet normalisation (the cached/test view)."""
    return eval_transform(image_size)


def center_transform_id(image_size: int) -> str:
    """Feature-cache id of :func:`center_transform` (shared by every frozen-feature protocol)."""
    return f"resize{eval_resize(image_size)}-center{image_size}-imagenet-norm"


def probe_train_transform(image_size: int) -> Any:
    """Resize(r), CenterCrop(r), RandomCrop(s), flip, with r = round(s*256/224) (256 at 224)."""
    r = eval_resize(image_size)
    return T.Compose([T.Resize(r), T.CenterCrop(r), T.RandomCrop(image_size), T.RandomHorizontalFlip(),
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
