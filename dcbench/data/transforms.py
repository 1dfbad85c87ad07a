"""The standard image transforms, parameterised by image size so 32 px demos and 224 px
benchmarks share one definition."""
from __future__ import annotations

from collections.abc import Callable

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
