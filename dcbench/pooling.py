"""How a tap's feature map is pooled before a linear head, an SVM or a kNN bank.

The tables are PROTOCOLS.md "Linear probes per layer" (DeepCluster's eval_linear.py and
VISSL's linear-evaluation configs); other input sizes and archs pool adaptively to the
preset's output grid capped at the map size, and the plan of each tap is recorded in the
result (:meth:`PoolPlan.describe`). Every frozen-feature protocol shares these.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dcbench.errors import UsageError
from dcbench.features import frozen

# (kernel, stride, padding) per tap; PROTOCOLS.md "Linear probes per layer".
ALEXNET_TABLES: dict[str, dict[str, tuple[int, int, int]]] = {
    "deepcluster": {"conv1": (6, 6, 3), "conv2": (4, 4, 0), "conv3": (3, 3, 1), "conv4": (3, 3, 1),
                    "conv5": (2, 2, 0)},
    "vissl": {"conv1": (19, 4, 0), "conv2": (12, 3, 0), "conv3": (9, 1, 0), "conv4": (9, 1, 0),
              "conv5": (8, 1, 0)},
}
#: map side of each AlexNet tap at 224 px, where the tables apply
ALEXNET_MAPS = {"conv1": 55, "conv2": 27, "conv3": 13, "conv4": 13, "conv5": 13}
#: the tables' output grids, the adaptive target at other sizes
ALEXNET_GRIDS = {"conv1": 10, "conv2": 6, "conv3": 5, "conv4": 5, "conv5": 6}
RESNET50_TABLE = {"conv1": (10, 10, 4), "res2": (16, 8, 0), "res3": (13, 5, 0), "res4": (8, 3, 0),
                  "res5": (6, 1, 0)}
RESNET_MAPS = {"conv1": 112, "res2": 56, "res3": 28, "res4": 14, "res5": 7}
RESNET_GRIDS = {"conv1": 12, "res2": 6, "res3": 4, "res4": 3, "res5": 2}
#: other taps: the grid keeps C * g * g near this (the tables' ~9k dims)
TARGET_DIM = 9216



#: maps up to this many pixels pool by one matrix product (2-6x faster than AdaptiveAvgPool2d on CPU)
GEMM_POOL_MAX_PIXELS = 1024


def _region_matrix(size: int, out: int) -> torch.Tensor:
    """out x size averaging matrix with AdaptiveAvgPool's regions [floor(i*size/out), ceil((i+1)*size/out))."""
    m = torch.zeros(out, size)
    for i in range(out):
        start, end = (i * size) // out, -((-(i + 1) * size) // out)
        m[i, start:end] = 1.0 / (end - start)
    return m


class AdaptiveGridPool(nn.Module):
    """``AdaptiveAvgPool2d(grid)`` with the same regions, faster: identity when the map already
    has the grid's size, one matrix product on small maps, torch's kernel otherwise."""

    def __init__(self, grid: tuple[int, int]) -> None:
        super().__init__()
        self.grid = tuple(grid)
        self.pool_id = f"adaptive-avg-{self.grid[0]}x{self.grid[1]}"  # the feature-cache pooling id
        self._fallback = nn.AdaptiveAvgPool2d(self.grid)
        self._matrices: dict[tuple, torch.Tensor] = {}

    def extra_repr(self) -> str:
        return f"grid={self.grid}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if (h, w) == self.grid:
            return x
        if h * w > GEMM_POOL_MAX_PIXELS:
            return self._fallback(x)
        key = (h, w, x.device, x.dtype)
        if key not in self._matrices:
            kron = torch.kron(_region_matrix(h, self.grid[0]), _region_matrix(w, self.grid[1]))
            self._matrices[key] = kron.T.contiguous().to(device=x.device, dtype=x.dtype)
        return (x.reshape(n * c, h * w) @ self._matrices[key]).view(n, c, *self.grid)


@dataclass(frozen=True)
class PoolPlan:
    """How one tap is pooled before its linear head."""

    tap: str
    kind: str  # "table": AvgPool2d(kernel, stride, padding); "adaptive": AdaptiveAvgPool2d(grid); "none": 2-D tap
    table: str | None
    kernel: int | None
    stride: int | None
    padding: int | None
    channels: int
    map_size: tuple[int, int]
    grid: tuple[int, int]

    @property
    def dim(self) -> int:
        """Size of the flattened pooled feature."""
        return self.channels * self.grid[0] * self.grid[1]

    def module(self) -> nn.Module:
        """The parameter-free pooling module (see :func:`dcbench.features.pool_id` for its cache id)."""
        if self.kind == "table":
            return nn.AvgPool2d(self.kernel, stride=self.stride, padding=self.padding)
        if self.kind == "adaptive":
            return AdaptiveGridPool(self.grid)
        return nn.Identity()

    def describe(self) -> dict[str, Any]:
        """JSON-safe description recorded in the result."""
        out = {"kind": self.kind, "map": list(self.map_size), "grid": list(self.grid), "dim": self.dim}
        if self.kind == "table":
            out.update(table=self.table, kernel=self.kernel, stride=self.stride, padding=self.padding)
        return out


def _family(backbone: nn.Module) -> str | None:
    """The family whose table applies: AlexNet or ResNet with the tables' own tap names."""
    taps = list(backbone.conv_tap_names)
    family = getattr(backbone, "family", "other")
    if family == "alexnet" and taps == list(ALEXNET_MAPS):
        return "alexnet"
    if family == "resnet" and taps == list(RESNET_MAPS):
        return "resnet"
    return None


def _table_grid(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def plan_pool(family: str | None, preset: str, tap: str, shape: Sequence[int]) -> PoolPlan:
    """The pooling of ``tap`` whose output (without batch dim) has ``shape`` (C, H, W) or (D,)."""
    if len(shape) == 1:
        return PoolPlan(tap, "none", None, None, None, None, int(shape[0]), (1, 1), (1, 1))
    channels, h, w = (int(v) for v in shape)
    table, ref_maps, grids, table_name = None, None, None, None
    if family == "alexnet" and tap in ALEXNET_MAPS:
        preset = preset if preset in ALEXNET_TABLES else "deepcluster"  # presets without a table of their own (dino)
        table, ref_maps, grids, table_name = ALEXNET_TABLES[preset], ALEXNET_MAPS, ALEXNET_GRIDS, f"{preset}-alexnet"
    elif family == "resnet" and tap in RESNET_MAPS:
        table, ref_maps, grids, table_name = RESNET50_TABLE, RESNET_MAPS, RESNET_GRIDS, "resnet50"
    if table is not None and h == w == ref_maps[tap]:
        k, s, p = table[tap]
        g = _table_grid(h, k, s, p)
        return PoolPlan(tap, "table", table_name, k, s, p, channels, (h, w), (g, g))
    target = grids[tap] if grids is not None else max(1, round(math.sqrt(TARGET_DIM / channels)))
    return PoolPlan(tap, "adaptive", None, None, None, None, channels, (h, w), (min(target, h), min(target, w)))


def tap_shapes(backbone: nn.Module, taps: Sequence[str], image_size: int) -> dict[str, tuple[int, ...]]:
    """Output shape (without batch) of each tap for a square ``image_size`` input (a dry run
    of one blank image in eval mode, on the backbone's device; nothing is changed)."""
    first = next(backbone.parameters(), None)
    x = torch.zeros(1, 3, image_size, image_size, device=first.device if first is not None else "cpu")
    try:
        with frozen(backbone), torch.inference_mode():
            out = backbone(x, taps=list(taps))
    except (ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"image_size={image_size} does not work with {backbone.arch} taps "
                         f"{', '.join(taps)} ({first}); pick another image_size or conv taps") from None
    return {t: tuple(out[t].shape[1:]) for t in taps}


def probe_pooling(backbone: nn.Module, taps: Sequence[str], image_size: int,
                  preset: str = "deepcluster") -> dict[str, PoolPlan]:
    """The pooling of each tap for the linear-probe ``preset`` at ``image_size`` (see module docs)."""
    family = _family(backbone)
    shapes = tap_shapes(backbone, taps, image_size)
    return {t: plan_pool(family, preset, t, shapes[t]) for t in taps}


def default_taps(backbone: nn.Module, image_feature: bool = False) -> list[str]:
    """The taps a protocol evaluates when the user names none: every conv tap, or, with
    ``image_feature`` on a ViT, its image feature only (``cls``, ``avgpool`` without a CLS token:
    facebookresearch/dino eval_knn.py's feature and the simple ViT linear probe)."""
    feature = getattr(backbone, "image_feature_tap", None) if image_feature else None
    return [feature] if feature else list(backbone.conv_tap_names)


def resolve_taps(backbone: nn.Module, taps: Sequence[str] | None, image_feature: bool = False) -> list[str]:
    """``taps`` checked against the backbone (default: :func:`default_taps`), duplicates removed."""
    if taps is None:
        return default_taps(backbone, image_feature)
    wanted = list(dict.fromkeys(taps))
    has_tap = getattr(backbone, "has_tap", lambda t: t in backbone.tap_names)
    unknown = [t for t in wanted if not has_tap(t)]
    if unknown:
        raise UsageError(f"unknown tap '{unknown[0]}' for {backbone.arch}; available: "
                         f"{', '.join(backbone.tap_names)} (e.g. --set taps=[{backbone.conv_tap_names[-1]}])")
    return wanted
