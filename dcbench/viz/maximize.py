"""Filter visualisation by gradient ascent on the input (the paper's Fig. 4, left).

Starting from Gaussian noise (mean 128, std 20 in 0-255 pixel units, as the original code),
the image is changed step by step to raise one filter's mean activation, with the paper's
regularisers:

- normalised gradient steps: the gradient is divided by its root-mean-square, so ``lr`` is
  the RMS change per step in pixel units whatever the image size (the original divides by
  the L2 norm of the whole gradient, which ties the step size to the image size);
- image weight decay: after each step the image's deviation from mid-grey shrinks by the
  factor ``1 - weight_decay`` (keeps pixels from growing without bound);
- periodic Gaussian blur: every ``blur_every`` steps a blur of ``blur_sigma`` pixels removes
  the high-frequency patterns a network responds to but a person cannot see.

Each filter has its own image; the images of several filters are optimised together in one
batch (in eval mode every image's gradient depends only on itself). The objective is the
mean of the tap over positions; where the tap is a ReLU (DeepCluster nets), the gradient
passes it as through a leaky ReLU (slope 0.01 below zero) so that a filter silent on the
starting noise still gets a direction. Reported activations are the tap's own values.
"""
from __future__ import annotations

import logging
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dcbench.data import IMAGENET_MEAN, IMAGENET_STD
from dcbench.errors import UsageError
from dcbench.models import Backbone
from dcbench.viz import image_grid, save_png, to_uint8

log = logging.getLogger("dcbench")

__all__ = ["AscentResult", "AscentSettings", "display_image", "filter_activation", "gaussian_blur",
           "maximize_filters", "save_ascent", "starting_noise"]

NOISE_MEAN, NOISE_STD = 128.0, 20.0  # the original code's starting noise, 0-255 pixel units
_LEAK = 0.01


@dataclass
class AscentSettings:
    """Gradient-ascent settings (defaults: the paper's regularisers with dcbench's step size)."""

    iterations: int = 1000
    lr: float = 1.0  # RMS change per step, pixel units
    weight_decay: float = 1e-4
    blur_sigma: float = 0.3
    blur_every: int = 5
    image_size: int | None = None  # None: the backbone's input size
    seed: int = 0
    batch_size: int = 16

    def validate(self) -> None:
        """Raise UsageError for settings no run can use."""
        if self.iterations < 1:
            raise UsageError(f"--iterations must be at least 1, got {self.iterations}")
        if self.lr <= 0:
            raise UsageError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.weight_decay < 1:
            raise UsageError(f"--weight-decay must be in [0, 1), got {self.weight_decay}")
        if self.blur_sigma < 0 or self.blur_every < 0:
            raise UsageError("--blur-sigma and --blur-every must be >= 0 (0 turns the blur off)")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.image_size is not None and self.image_size < 16:
            raise UsageError(f"--image-size must be at least 16, got {self.image_size}")


@dataclass
class AscentResult:
    """Optimised images (N x 3 x H x W, 0-255 pixel units, unclipped) and the activations."""

    layer: str
    filters: list[int]
    images: torch.Tensor
    start_activation: list[float]
    final_activation: list[float]


# ----------------------------------------------------------------------------- the objective
def _to_input(pixels: torch.Tensor) -> torch.Tensor:
    """0-255 pixel units -> the backbones' ImageNet-normalised input."""
    mean = torch.tensor(IMAGENET_MEAN, device=pixels.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(IMAGENET_STD, device=pixels.device).view(1, 3, 1, 1) * 255.0
    return (pixels - mean) / std


def _tap_relu(backbone: Backbone, layer: str) -> nn.Module | None:
    """The ReLU module whose output is tap ``layer`` (DeepCluster nets), else None."""
    features, classifier = getattr(backbone, "features", None), getattr(backbone, "classifier", None)
    index = getattr(type(backbone), "_feature_taps", {}).get(layer)
    if index is not None and isinstance(features, nn.Sequential):
        module = features[index]
    elif layer == "fc6" and isinstance(classifier, nn.Sequential) and hasattr(backbone, "_fc6_index"):
        module = classifier[backbone._fc6_index]
    elif layer == "fc7" and isinstance(classifier, nn.Sequential):
        module = classifier[-1]
    else:
        return None
    return module if isinstance(module, nn.ReLU) else None


def _pick(out: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """Mean over positions of channel ``filters[i]`` of image ``i``: shape (N,)."""
    chosen = out[torch.arange(out.shape[0], device=out.device), filters]
    return chosen.flatten(1).mean(dim=1) if chosen.dim() > 1 else chosen


def _responses(backbone: Backbone, layer: str, pixels: torch.Tensor,
               filters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(activation, objective) per image; the objective is leaky where the tap is a ReLU."""
    relu = _tap_relu(backbone, layer)
    captured: list[torch.Tensor] = []
    # the ReLU works in place: keep a copy of its input (the pre-activation) before it runs
    handle = relu.register_forward_pre_hook(lambda _m, inp: captured.append(inp[0].clone())) if relu else None
    try:
        out = backbone(_to_input(pixels), taps=[layer])[layer]
    finally:
        if handle is not None:
            handle.remove()
    activation = _pick(out, filters)
    if not captured:
        return activation, activation
    return activation, _pick(F.leaky_relu(captured[0], _LEAK), filters)


def filter_activation(backbone: Backbone, layer: str, pixels: torch.Tensor,
                      filters: list[int] | torch.Tensor) -> torch.Tensor:
    """Mean activation of filter ``filters[i]`` on image ``pixels[i]`` (0-255 units), eval mode."""
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            idx = torch.as_tensor(filters, device=pixels.device)
            return _responses(backbone, layer, pixels, idx)[0]
    finally:
        backbone.train(was_training)


# ----------------------------------------------------------------------------- the ascent
def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(4.0 * sigma)))  # scipy's gaussian_filter truncates at 4 sigma
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of N x C x H x W images per channel (edges replicated)."""
    if sigma <= 0:
        return images
    kernel = _gaussian_kernel(sigma).to(images.device, images.dtype)
    r, c = kernel.numel() // 2, images.shape[1]
    horizontal = kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1)
    vertical = kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1)
    out = F.conv2d(F.pad(images, (r, r, 0, 0), mode="replicate"), horizontal, groups=c)
    return F.conv2d(F.pad(out, (0, 0, r, r), mode="replicate"), vertical, groups=c)


@contextmanager
def _frozen_weights(backbone: Backbone) -> Iterator[None]:
    """Eval mode and no weight gradients for the duration (only the image is optimised)."""
    was_training = backbone.training
    flags = [p.requires_grad for p in backbone.parameters()]
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(backbone.parameters(), flags):
            p.requires_grad_(flag)
        backbone.train(was_training)


def _ascend(backbone: Backbone, layer: str, pixels: torch.Tensor, filters: torch.Tensor,
            s: AscentSettings) -> torch.Tensor:
    """Run the ascent on one batch of images (one per filter); returns the final images."""
    for it in range(s.iterations):
        pixels = pixels.detach().requires_grad_(True)
        _, objective = _responses(backbone, layer, pixels, filters)
        (grad,) = torch.autograd.grad(objective.sum(), pixels)
        rms = grad.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
        with torch.no_grad():
            pixels = pixels + s.lr * grad / (rms + 1e-12)
            pixels = NOISE_MEAN + (1.0 - s.weight_decay) * (pixels - NOISE_MEAN)
            if s.blur_every and (it + 1) % s.blur_every == 0:
                pixels = gaussian_blur(pixels, s.blur_sigma)
    return pixels.detach()


def starting_noise(n: int, size: int, seed: int) -> torch.Tensor:
    """The starting images: N(128, 20) pixel noise, image ``i`` from generator ``seed``, draw ``i``.

    Drawn on the CPU, so the start (and on the CPU, the result) is the same for a seed
    whatever the batch size or device.
    """
    gen = torch.Generator().manual_seed(seed)
    return NOISE_MEAN + NOISE_STD * torch.randn(n, 3, size, size, generator=gen)


def maximize_filters(backbone: Backbone, layer: str, filters: list[int], settings: AscentSettings,
                     device: str | torch.device = "cpu") -> AscentResult:
    """Gradient ascent for each of ``filters`` of tap ``layer``; the backbone must be on ``device``."""
    settings.validate()
    size = settings.image_size or backbone.input_size
    start = starting_noise(len(filters), size, settings.seed)
    finals, before, after = [], [], []
    with _frozen_weights(backbone):
        for lo in range(0, len(filters), settings.batch_size):
            idx = torch.as_tensor(filters[lo:lo + settings.batch_size], device=device)
            batch = start[lo:lo + settings.batch_size].to(device)
            before.append(filter_activation(backbone, layer, batch, idx).cpu())
            result = _ascend(backbone, layer, batch, idx, settings)
            after.append(filter_activation(backbone, layer, result, idx).cpu())
            finals.append(result.cpu())
            log.info("%s: filters %d-%d of %d done", layer, lo, lo + len(idx) - 1, len(filters))
    return AscentResult(layer, list(filters), torch.cat(finals), torch.cat(before).tolist(),
                        torch.cat(after).tolist())


# ----------------------------------------------------------------------------- output
def display_image(pixels: torch.Tensor) -> np.ndarray:
    """3 x H x W pixel-unit image -> uint8 H x W x 3 for display.

    Contrast-normalised like the original code's ``deprocess_image``: zero mean, std 0.1,
    shifted to 0.5 and clipped, so a faint pattern is as visible as a strong one.
    """
    x = pixels.detach().double().cpu()
    x = (x - x.mean()) / (x.std() + 1e-5) * 0.1 + 0.5
    return to_uint8(x.permute(1, 2, 0).numpy())


def save_ascent(result: AscentResult, out_dir: str | os.PathLike, scale: int = 1) -> list[Path]:
    """One PNG per filter (``LAYER-filterNNNN.png``) and ``LAYER-grid.png``; returns the paths."""
    out_dir = Path(out_dir)
    tiles = [display_image(img) for img in result.images]
    paths = [save_png(tile, out_dir / f"{result.layer}-filter{f:04d}.png")
             for f, tile in zip(result.filters, tiles)]
    paths.append(save_png(image_grid(tiles, pad=4, scale=scale), out_dir / f"{result.layer}-grid.png"))
    return paths
