"""Multi-crop views for DeepCluster-v2 (SwAV paper, Sec. 3.2; swav ``src/multicropdataset.py``).

Each image gives ``large_crops`` views at ``image_size`` and ``small_crops`` views at the small
size, each: RandomResizedCrop(size, scale), horizontal flip, colour distortion (ColorJitter
0.8s/0.8s/0.8s/0.2s applied with probability 0.8, greyscale with probability 0.2), Gaussian blur
(probability ``blur_p``, radius U(0.1, 2)), ImageNet normalisation. Every random draw comes
from torch's RNG, so a per-image seed fixes the views (exact resume).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T

from dcbench.data.transforms import BatchNormalise, normalize, split_normalisation


class RandomGaussianBlur:
    """PIL Gaussian blur with probability ``p`` and radius U(low, high), drawn from torch's RNG."""

    def __init__(self, p: float = 0.5, low: float = 0.1, high: float = 2.0) -> None:
        self.p, self.low, self.high = p, low, high

    def __call__(self, image: Image.Image) -> Image.Image:
        if self.p <= 0 or torch.rand(1).item() >= self.p:
            return image
        radius = self.low + (self.high - self.low) * torch.rand(1).item()
        return image.filter(ImageFilter.GaussianBlur(radius=radius))


def view_transform(size: int, scale: Sequence[float], jitter: float, blur_p: float,
                   out_size: int | None = None) -> Callable:
    """One view: crop at ``size`` (then resized to ``out_size`` when given: for backbones whose
    fc layers fix the input side), flip, colour distortion, blur, tensor, normalisation."""
    steps: list[Callable] = [T.RandomResizedCrop(size, scale=tuple(scale))]
    if out_size and out_size != size:
        steps.append(T.Resize((out_size, out_size)))
    steps.append(T.RandomHorizontalFlip())
    if jitter > 0:
        steps.append(T.RandomApply([T.ColorJitter(0.8 * jitter, 0.8 * jitter, 0.8 * jitter, 0.2 * jitter)], p=0.8))
    steps += [T.RandomGrayscale(p=0.2), RandomGaussianBlur(blur_p), T.ToTensor(), normalize()]
    return T.Compose(steps)


class MultiCrop:
    """PIL image -> list of view tensors: the large views first, then the small ones."""

    def __init__(self, views: Sequence[Callable]) -> None:
        self.views = list(views)

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        return [view(image) for view in self.views]

    def uint8_views(self) -> tuple["MultiCrop", list[BatchNormalise]] | None:
        """The same views stopping at uint8 pixels, and the step that finishes each view position's
        batch on the device (:func:`~dcbench.data.transforms.split_normalisation`: the same inputs
        bit for bit, the random draws unchanged); None when a view does not end in ToTensor + Normalize."""
        splits = [split_normalisation(view) for view in self.views]
        if any(split is None for split in splits):
            return None
        return MultiCrop([split[0] for split in splits]), [split[1] for split in splits]


def multicrop_transform(cfg, fixed_input: bool, large_only: bool = False) -> MultiCrop:
    """The views of DeepCluster-v2 settings ``cfg`` (a :class:`~dcbench.train.config.DCv2Config`).

    ``fixed_input``: the backbone only takes ``image_size`` inputs, so small crops are resized
    up to it. ``large_only``: just the large views (the memory bank's initial fill).
    """
    large = view_transform(cfg.image_size, cfg.crop_scale, cfg.color_jitter, cfg.blur_p)
    views = [large] * cfg.large_crops
    if not large_only and cfg.small_crops:
        small = view_transform(cfg.small_size(), cfg.small_crop_scale, cfg.color_jitter, cfg.blur_p,
                               out_size=cfg.image_size if fixed_input else None)
        views += [small] * cfg.small_crops
    return MultiCrop(views)


def collate_views(batch: list) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    """DataLoader ``collate_fn`` for ``(views, target, index)`` items, ``None`` for unreadable
    images: ``(one tensor per view position, indices, n_skipped)``; empty lists when every
    item was unreadable."""
    kept = [item for item in batch if item is not None]
    if not kept:
        return [], torch.empty(0, dtype=torch.long), len(batch)
    views = [torch.stack([item[0][v] for item in kept]) for v in range(len(kept[0][0]))]
    return views, torch.tensor([item[2] for item in kept], dtype=torch.long), len(batch) - len(kept)
