"""First-layer filters as an image grid (the paper's Fig. 3).

A model with the fixed Sobel front end has 2-channel first-layer filters that act on image
gradients, not on colours. As in the paper, they are shown as seen through the front end:
the front end's stride-1 convolutions are composed with the first layer's weights into one
equivalent RGB kernel (11x11 filters become 13x13 kernels, grey because the front end
averages the colours first). Each filter is contrast-normalised on its own (min -> black,
max -> white over all its channels, so colour balance is kept).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dcbench.errors import UsageError
from dcbench.models import Backbone
from dcbench.viz import image_grid, resolve_layer, save_png

__all__ = ["compose_front_end", "effective_filters", "filter_grid", "first_conv", "normalize_filters",
           "save_filter_grid"]


def first_conv(backbone: Backbone) -> nn.Conv2d:
    """The first learned convolution of ``backbone`` (the Sobel front end is not learned)."""
    for name, module in backbone.named_modules():
        if isinstance(module, nn.Conv2d) and not name.startswith("sobel."):
            return module
    raise UsageError(f"{backbone.arch} has no convolution to show")


def compose_front_end(front: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """Kernels equivalent to ``front`` (stride-1 convolutions) followed by convolution ``weight``.

    For cross-correlations ``conv(conv(x, A), K) = conv(x, K')`` with
    ``K'[f, i] = sum_j full_convolution(K[f, j], A[j, i])``, which is exactly what
    ``conv_transpose2d(K, A)`` computes; biases are left out (they shift, not shape, a filter).
    """
    kernels = weight.detach().float()
    convs = [m for m in front.modules() if isinstance(m, nn.Conv2d)]
    for conv in reversed(convs):
        if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1:
            raise UsageError("the model's front end is not a chain of plain stride-1 convolutions; "
                             "its filters cannot be shown in image space")
        kernels = F.conv_transpose2d(kernels, conv.weight.detach().float().to(kernels.device))
    return kernels


def effective_filters(backbone: Backbone) -> torch.Tensor:
    """First-layer kernels in RGB image space: F x 3 x kh x kw (composed with Sobel when present)."""
    weight = first_conv(backbone).weight.detach().float().cpu()
    if backbone.sobel is not None:
        weight = compose_front_end(backbone.sobel, weight)
    if weight.shape[1] != 3:
        raise UsageError(f"the first layer of {backbone.arch} takes {weight.shape[1]} channels, "
                         f"not RGB; its filters cannot be shown as images")
    return weight


def normalize_filters(kernels: torch.Tensor) -> np.ndarray:
    """F x 3 x h x w kernels -> F x h x w x 3 floats in [0, 1], each filter min-max scaled.

    A constant filter (no contrast to stretch) becomes mid-grey.
    """
    flat = kernels.reshape(kernels.shape[0], -1)
    low = flat.min(dim=1).values.view(-1, 1, 1, 1)
    span = (flat.max(dim=1).values - flat.min(dim=1).values).view(-1, 1, 1, 1)
    scaled = torch.where(span > 1e-12, (kernels - low) / span.clamp_min(1e-12), torch.full_like(kernels, 0.5))
    return scaled.permute(0, 2, 3, 1).numpy()


def filter_grid(backbone: Backbone, scale: int = 4, columns: int | None = None) -> np.ndarray:
    """The first-layer filters of ``backbone`` as one uint8 grid image (H x W x 3)."""
    tiles = np.round(normalize_filters(effective_filters(backbone)) * 255).astype(np.uint8)
    return image_grid(list(tiles), cols=columns, pad=max(1, scale // 2), scale=scale)


def check_first_layer(backbone: Backbone, layer: str | None) -> str:
    """The first conv tap; a different existing layer is a usage error (its filters are not images)."""
    first = backbone.conv_tap_names[0]
    layer = resolve_layer(backbone, layer, default=first)
    if layer != first:
        raise UsageError(f"viz filters shows the weights of the first layer ({first}) only: deeper "
                         f"filters have no image meaning; use `dcbench viz maximize --layer {layer}` "
                         f"or `dcbench viz top-images --layer {layer}`")
    return layer


def save_filter_grid(backbone: Backbone, out: str | os.PathLike, layer: str | None = None,
                     scale: int = 4, columns: int | None = None) -> Path:
    """Write the first-layer filter grid of ``backbone`` to the PNG ``out``."""
    if scale < 1:
        raise UsageError(f"--scale must be at least 1, got {scale}")
    check_first_layer(backbone, layer)
    return save_png(filter_grid(backbone, scale=scale, columns=columns), out)
