"""DeepCluster's AlexNet (with BatchNorm) and VGG16-BN, as in the original code.

Module layout and parameter names equal the original (``features.N``, ``classifier.N``,
``top_layer``, ``sobel.N``), so an original checkpoint needs only its DataParallel
``.module`` removed. Layer shapes, initialisation and Sobel follow the paper and facebookresearch/deepcluster
``models/alexnet.py``, ``models/vgg16.py`` and ``util.py``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from dcbench.errors import ArchError
from dcbench.models.base import CLUSTER_TAP, LOGITS_TAP, Backbone
from dcbench.models.sobel import make_sobel

# (out_channels, kernel, stride, padding) or "M" = MaxPool2d(3, 2)
ALEXNET_CFG: list = [(96, 11, 4, 2), "M", (256, 5, 1, 2), "M", (384, 3, 1, 1), (384, 3, 1, 1),
                     (256, 3, 1, 1), "M"]
VGG16_CFG: list = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                   512, 512, 512, "M"]
MIN_INPUT_SIZE = 32


class InputSizeError(ArchError, ValueError):
    """An fc tap asked at another input size than the fc layers were built for: a user error
    (one line on the CLI), still a ValueError for callers that catch shape problems."""


def _init_weights(module: nn.Module) -> None:
    """The original init: conv N(0, sqrt(2/(kh*kw*out))), BN (1, 0), linear N(0, 0.01), biases 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


class _DeepClusterNet(Backbone):
    """Shared forward for the two DeepCluster nets: features -> flatten -> classifier."""

    is_deepcluster = True

    #: index in ``features`` of each tap's ReLU, filled by subclasses
    _feature_taps: dict[str, int]
    #: classifier index after which fc6 (post-ReLU), fc7 pre-ReLU and fc7 (post-ReLU) exist
    _fc6_index: int
    _fc7_pre_index: int

    def __init__(self, arch: str, features: nn.Sequential, classifier: nn.Sequential,
                 sobel: bool, input_size: int, grid: int, channels: int) -> None:
        super().__init__()
        self.arch, self.input_size = arch, input_size
        self.grid, self.channels = grid, channels
        self.features = features
        self.classifier = classifier
        self.feature_dim = 4096
        _init_weights(self)
        # created after the init so it keeps its fixed filters; named as in the original
        self.sobel = make_sobel() if sobel else None
        self.conv_tap_names = list(self._feature_taps)
        self.tap_names = self.conv_tap_names + ["fc6", "fc7"]

    def _forward_taps(self, x: torch.Tensor, wanted: set[str]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.sobel is not None:
            x = self.sobel(x)
        last_feature = max((self._feature_taps[t] for t in wanted if t in self._feature_taps), default=-1)
        needs_head = bool(wanted & {"fc6", "fc7", CLUSTER_TAP, LOGITS_TAP})
        stop = len(self.features) - 1 if needs_head else last_feature
        by_index = {i: t for t, i in self._feature_taps.items() if t in wanted}
        for i, layer in enumerate(self.features):
            if i > stop:
                break
            x = layer(x)
            if i in by_index:
                out[by_index[i]] = x
        if not needs_head:
            return out
        if x.shape[-1] != self.grid or x.shape[-2] != self.grid:
            raise InputSizeError(f"{self.arch} was built for {self.input_size}px input (a {self.grid}x{self.grid} "
                                 f"last map) but got a {tuple(x.shape[-2:])} map: its fc taps need "
                                 f"{self.input_size} px images (--set image_size={self.input_size}); "
                                 f"conv taps work at any size")
        x = torch.flatten(x, 1)
        for i, layer in enumerate(self.classifier):
            x = layer(x)
            if i == self._fc6_index and "fc6" in wanted:
                out["fc6"] = x
            if i == self._fc7_pre_index and CLUSTER_TAP in wanted:
                out[CLUSTER_TAP] = x
        if "fc7" in wanted:
            out["fc7"] = x
        if LOGITS_TAP in wanted:
            out[LOGITS_TAP] = self.top_layer(x)
        return out


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def alexnet_grid(input_size: int) -> int:
    """Side of AlexNet's last feature map for a square input (6 at 224, 1 at 64)."""
    size = input_size
    for v in ALEXNET_CFG:
        size = _conv_out(size, 3, 2, 0) if v == "M" else _conv_out(size, v[1], v[2], v[3])
    return size


class DeepClusterAlexNet(_DeepClusterNet):
    """AlexNet with BN: conv taps ``conv1..conv5`` are the ReLU outputs before max-pool."""

    family = "alexnet"

    _feature_taps = {"conv1": 2, "conv2": 6, "conv3": 10, "conv4": 13, "conv5": 16}
    _fc6_index = 2  # Dropout, Linear, ReLU
    _fc7_pre_index = 4  # Dropout, Linear

    def __init__(self, sobel: bool = True, input_size: int = 224) -> None:
        grid = alexnet_grid(input_size)
        if grid < 1 or input_size < MIN_INPUT_SIZE:
            raise ArchError(f"alexnet needs an input of at least 63 px, got {input_size}")
        layers: list[nn.Module] = []
        in_ch = 2 if sobel else 3
        for v in ALEXNET_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=3, stride=2))
                continue
            layers += [nn.Conv2d(in_ch, v[0], kernel_size=v[1], stride=v[2], padding=v[3]),
                       nn.BatchNorm2d(v[0]), nn.ReLU(inplace=True)]
            in_ch = v[0]
        classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(256 * grid * grid, 4096), nn.ReLU(),
                                   nn.Dropout(0.5), nn.Linear(4096, 4096), nn.ReLU())
        super().__init__("alexnet", nn.Sequential(*layers), classifier, sobel, input_size, grid, 256)


def _vgg_tap_names() -> dict[str, int]:
    taps, index, block, conv = {}, 0, 1, 1
    for v in VGG16_CFG:
        if v == "M":
            index, block, conv = index + 1, block + 1, 1
            continue
        taps[f"conv{block}_{conv}"] = index + 2  # conv, BN, ReLU
        index, conv = index + 3, conv + 1
    return taps


class DeepClusterVGG16(_DeepClusterNet):
    """VGG16-BN: taps ``conv1_1..conv5_3`` (ReLU outputs), ``fc6``, ``fc7``; one dropout only."""

    family = "vgg"

    _feature_taps = _vgg_tap_names()
    _fc6_index = 1  # Linear, ReLU
    _fc7_pre_index = 3  # Dropout, Linear

    def __init__(self, sobel: bool = True, input_size: int = 224) -> None:
        if input_size < MIN_INPUT_SIZE:
            raise ArchError(f"vgg16 needs an input of at least {MIN_INPUT_SIZE} px, got {input_size}")
        grid = input_size // 32
        layers: list[nn.Module] = []
        in_ch = 2 if sobel else 3
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            layers += [nn.Conv2d(in_ch, v, kernel_size=3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            in_ch = v
        classifier = nn.Sequential(nn.Linear(512 * grid * grid, 4096), nn.ReLU(), nn.Dropout(0.5),
                                   nn.Linear(4096, 4096), nn.ReLU())
        super().__init__("vgg16", nn.Sequential(*layers), classifier, sobel, input_size, grid, 512)
