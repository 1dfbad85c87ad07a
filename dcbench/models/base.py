"""The one interface every backbone implements.

A :class:`Backbone` takes a float tensor N x 3 x H x W normalised with ImageNet mean/std
(the Sobel front end, when present, is inside the backbone) and returns the requested
named taps from ONE forward pass, stopping as soon as the deepest requested tap is computed.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dcbench.errors import ArchError

#: Extra tap names every backbone accepts besides ``tap_names``.
CLUSTER_TAP = "cluster"  # the clustering feature (fc7 pre-ReLU for AlexNet/VGG, pooled last stage otherwise)
LOGITS_TAP = "logits"  # the top layer's output (needs ``top_layer``)

#: Input convention of a backbone without published weights (random inits, DeepCluster and other
#: dcbench checkpoints): ImageNet mean/std, bilinear resize to 256 and a 224 centre crop
#: (torchvision's and DeepCluster's recipe). ``source`` None: protocols apply their presets'
#: conventions to it (dcbench.data.transforms.resolve_convention).
DEFAULT_INPUT_CONFIG: dict[str, Any] = {
    "input_size": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
    "interpolation": "bilinear", "crop_pct": 0.875, "crop_mode": "center", "source": None}


#: torch's messages for an input smaller than a convolution or pooling kernel (conv / max-pool)
_TOO_SMALL = ("Kernel size can't be greater than actual input size", "Output size is too small")


class InputTooSmallError(ArchError, RuntimeError):
    """Images smaller than the network can take: a user error (one CLI line), still a
    RuntimeError for callers that catch forward failures."""


class Backbone(nn.Module):
    """Common interface over DeepCluster AlexNet/VGG16, timm and torchvision models.

    Attributes:
        arch: the architecture name as accepted by :func:`dcbench.models.build_backbone`.
        sobel: the fixed Sobel front end applied inside the backbone, or None
            (``has_sobel`` tells which).
        input_size: the input side the fully connected layers were built for (conv taps
            work at any size at least as large as the network's receptive field needs).
        tap_names: the public taps in forward order, e.g. ``["conv1", ..., "fc7"]``.
        conv_tap_names: the convolutional taps (what per-layer probes evaluate).
        feature_dim: size of the clustering feature (the ``"cluster"`` tap).
        top_layer: ``nn.Linear(feature_dim, k)`` used by DeepCluster training, or None.
        family: the architecture family protocols key their tables and fine-tune recipes on:
            ``"alexnet"`` (conv1..conv5 at AlexNet's map sizes), ``"vgg"``, ``"resnet"``
            (torchvision layout: conv1/bn1/maxpool/layer1..layer4, taps conv1 res2..res5),
            ``"vit"`` or ``"other"``. Decided once, here, instead of by each protocol.
        is_deepcluster: whether this is DeepCluster's own AlexNet/VGG16 (``features`` +
            ``classifier`` Sequentials and a pool5 ``grid``), whose fc6/fc7 protocols reuse.
        input_config: the input convention the weights expect, ``{"input_size", "mean", "std",
            "interpolation", "crop_pct", "crop_mode", "source"}``: published weights' own (a timm
            model's pretrained config, a torchvision weight enum's transforms; ``source`` names
            it), else :data:`DEFAULT_INPUT_CONFIG` (``source`` None). Protocols read it through
            :func:`dcbench.data.transforms.resolve_convention`; the backbone itself never
            normalises its input.
    """

    #: see the class docstring; subclasses set or compute it
    family: str = "other"
    is_deepcluster: bool = False
    arch: str
    input_size: int
    tap_names: list[str]
    conv_tap_names: list[str]
    feature_dim: int

    def __init__(self) -> None:
        super().__init__()
        self.top_layer: nn.Linear | None = None
        self.sobel: nn.Module | None = None
        self.input_config: dict[str, Any] = copy.deepcopy(DEFAULT_INPUT_CONFIG)

    @property
    def has_sobel(self) -> bool:
        """Whether the fixed Sobel front end is part of this backbone."""
        return self.sobel is not None

    def forward(self, x: torch.Tensor, taps: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Return ``{tap: tensor}`` for ``taps`` (default: all of ``tap_names``); images too small
        for the network (a map shrunk below a kernel) raise :class:`InputTooSmallError`."""
        wanted = self._check_taps(taps)
        try:
            return self._forward_taps(x, wanted)
        except RuntimeError as exc:
            if not any(text in str(exc) for text in _TOO_SMALL):
                raise
            raise InputTooSmallError(
                f"{self.arch} cannot take {x.shape[-2]}x{x.shape[-1]} px images (a feature map shrinks below a "
                f"kernel: {str(exc).strip().splitlines()[0]}); use larger images (--set image_size=N to "
                f"evaluate, --image-size N to train)") from None

    def _forward_taps(self, x: torch.Tensor, wanted: set[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def has_tap(self, name: str) -> bool:
        """Whether ``name`` is a public tap (``tap_names``, or a composite tap a subclass accepts
        without listing every variant, e.g. a ViT's ``clsN``)."""
        return name in self.tap_names

    def _check_taps(self, taps: Sequence[str] | None) -> set[str]:
        wanted = set(self.tap_names if taps is None else taps)
        unknown = sorted(t for t in wanted if t not in (CLUSTER_TAP, LOGITS_TAP) and not self.has_tap(t))
        if unknown:
            raise KeyError(f"unknown tap(s) {', '.join(unknown)} for {self.arch}; "
                           f"available: {', '.join(self.tap_names)}")
        if LOGITS_TAP in wanted and self.top_layer is None:
            raise KeyError("tap 'logits' needs a top layer: call set_top_layer(k) first")
        return wanted

    def cluster_features(self, x: torch.Tensor) -> torch.Tensor:
        """The clustering feature of DeepCluster (N x feature_dim)."""
        return self(x, taps=[CLUSTER_TAP])[CLUSTER_TAP]

    def set_top_layer(self, k: int | None) -> nn.Linear | None:
        """Replace the top layer by a fresh ``Linear(feature_dim, k)`` (N(0, 0.01), bias 0)."""
        if k is None:
            self.top_layer = None
            return None
        layer = nn.Linear(self.feature_dim, k)
        nn.init.normal_(layer.weight, 0.0, 0.01)
        nn.init.zeros_(layer.bias)
        param = next(self.parameters(), None)
        if param is not None:
            layer = layer.to(param.device)
        self.top_layer = layer
        return layer

    #: state-dict prefixes outside the feature extractor (classification heads)
    head_prefixes: tuple[str, ...] = ("top_layer.",)

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict without heads (what checkpoints store and sha256 identifies)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(self.head_prefixes)}

    def describe(self) -> dict:
        """Facts about this backbone for checkpoint metadata and ``checkpoint inspect``."""
        n_params = sum(v.numel() for k, v in self.named_parameters() if not k.startswith(self.head_prefixes))
        return {"arch": self.arch, "sobel": self.has_sobel, "input_size": self.input_size,
                "taps": list(self.tap_names), "feature_dim": self.feature_dim, "parameters": n_params}
