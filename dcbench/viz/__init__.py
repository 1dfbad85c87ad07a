"""Pictures of checkpoints and runs: filter grids, activation maximisation, top images,
training curves and the HTML report (the DeepCluster paper's Fig. 2-5).

This module holds the pieces the others share: checking a layer / filter choice against a
backbone, turning normalised tensors back into pixels, tiling images into a grid, and
writing PNGs reproducibly (no timestamps or version strings in the files, atomic writes).
Plots use matplotlib's Agg canvas directly (no pyplot, so no display and no global state).

Submodules: :mod:`dcbench.viz.filters`, :mod:`dcbench.viz.maximize`,
:mod:`dcbench.viz.top_images`, :mod:`dcbench.viz.training`, :mod:`dcbench.viz.report`;
the click commands live in :mod:`dcbench.viz.cli`.
"""
from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from dcbench.data import IMAGENET_MEAN, IMAGENET_STD
from dcbench.errors import DcbenchError, UsageError
from dcbench.fileio import atomic_write_bytes

if TYPE_CHECKING:  # matplotlib is imported only by the modules that plot
    from matplotlib.figure import Figure

    from dcbench.models import Backbone

__all__ = ["channel_count", "choose_filters", "denormalize", "figure_png_bytes", "image_grid",
           "new_figure", "png_bytes", "resolve_layer", "save_figure", "save_png", "to_uint8"]


# ----------------------------------------------------------------------------- layers and filters
def resolve_layer(backbone: Backbone, layer: str | None, default: str | None = None) -> str:
    """``layer`` checked against the backbone's taps (default: ``default``, else the last conv tap)."""
    if layer is None:
        return default or backbone.conv_tap_names[-1]
    if layer not in backbone.tap_names:
        raise UsageError(f"layer {layer!r} is not in {backbone.arch}; "
                         f"choose one of {', '.join(backbone.tap_names)}")
    return layer


def channel_count(backbone: Backbone, layer: str, image_size: int) -> int:
    """Number of filters (channels, or units of an fc tap) of ``layer``, from one forward pass."""
    param = next(backbone.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            out = backbone(torch.zeros(1, 3, image_size, image_size, device=device), taps=[layer])[layer]
    except (ValueError, RuntimeError) as exc:  # fc taps need the built-for size; tiny inputs fail in a conv
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"{layer} of {backbone.arch} cannot be computed at {image_size} px ({reason}); "
                         f"pass another --image-size") from None
    finally:
        backbone.train(was_training)
    return int(out.shape[1])


def choose_filters(filters: str | Sequence[int] | None, count: int | None, n_channels: int,
                   layer: str, default_count: int = 16) -> list[int]:
    """The filter indices to show: an explicit list (``"0,5,9"``) or the first ``count``.

    Raises UsageError for both given, a bad list, an index outside ``0..n_channels-1`` or a
    count outside ``1..n_channels``.
    """
    if filters is not None and count is not None:
        raise UsageError("pass either --filters or --count, not both")
    if filters is not None:
        indices = _parse_indices(filters)
        bad = [i for i in indices if not 0 <= i < n_channels]
        if bad:
            raise UsageError(f"filter {bad[0]} is out of range: {layer} has {n_channels} filters "
                             f"(0..{n_channels - 1})")
        return list(dict.fromkeys(indices))  # a repeated index would only duplicate work
    count = min(default_count, n_channels) if count is None else count
    if not 1 <= count <= n_channels:
        raise UsageError(f"--count must be between 1 and {n_channels} ({layer} has {n_channels} filters), "
                         f"got {count}")
    return list(range(count))


def _parse_indices(filters: str | Sequence[int]) -> list[int]:
    if not isinstance(filters, str):
        return [int(i) for i in filters]
    try:
        indices = [int(part) for part in filters.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--filters takes comma-separated filter indices such as 0,5,9; got {filters!r}") from None
    if not indices:
        raise UsageError("--filters is empty; pass indices such as 0,5,9")
    return indices


# ----------------------------------------------------------------------------- pixels
def denormalize(images: torch.Tensor) -> np.ndarray:
    """ImageNet-normalised N x 3 x H x W (or 3 x H x W) tensor -> uint8 N x H x W x 3 (or H x W x 3)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device).view(3, 1, 1)
    pixels = (images.detach() * std + mean).clamp(0, 1)
    return to_uint8(pixels.movedim(-3, -1).cpu().numpy())


def to_uint8(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 (rounded, clipped)."""
    return np.clip(np.round(np.asarray(values, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)


def image_grid(tiles: Sequence[np.ndarray], cols: int | None = None, pad: int = 2,
               background: int = 255, scale: int = 1) -> np.ndarray:
    """Tile equally sized H x W x 3 uint8 images into one grid (``cols`` default: near-square).

    ``scale`` enlarges every tile by pixel replication first (small filters stay crisp).
    """
    if not tiles:
        raise ValueError("image_grid needs at least one tile")
    if scale > 1:
        tiles = [np.repeat(np.repeat(t, scale, axis=0), scale, axis=1) for t in tiles]
    h, w = tiles[0].shape[:2]
    cols = cols or int(np.ceil(np.sqrt(len(tiles))))
    rows = int(np.ceil(len(tiles) / cols))
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), background, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y:y + h, x:x + w] = tile
    return grid


# ----------------------------------------------------------------------------- writing
def png_bytes(image: np.ndarray | Image.Image) -> bytes:
    """PNG encoding of an RGB image; PIL writes no time or version chunk, so equal pixels give equal bytes."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def save_png(image: np.ndarray | Image.Image, path: str | os.PathLike) -> Path:
    """Write ``image`` as a PNG atomically (temp file + rename), creating the folder."""
    return _atomic_write_bytes(path, png_bytes(image))


def new_figure(width: float = 6.4, height: float = 4.0) -> Figure:
    """A matplotlib Figure on an Agg canvas (no pyplot: no display, nothing global to close)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_png_bytes(fig: Figure) -> bytes:
    """The figure as PNG bytes, without the Software chunk (the only variable metadata)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Write a figure as a reproducible PNG, atomically."""
    return _atomic_write_bytes(path, figure_png_bytes(fig))


def _atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    try:
        return atomic_write_bytes(path, data)
    except OSError as exc:
        raise DcbenchError(f"cannot write {path} ({exc.strerror or exc}); choose a writable --out") from None
