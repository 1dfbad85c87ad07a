"""The fine-tune toolkit shared by ``voc07-cls``, ``voc-det`` and ``voc-seg``.

A fine-tune trains a COPY of the backbone; what differs between the protocols is the head
they put on it, and the DeepCluster paper's two modes decide which part of the copy trains:

- ``fc6-8``: the trunk (the fixed Sobel front end and the conv layers) is frozen, everything
  after it trains; optionally the BatchNorm scale/shift of the trunk trains too (the paper's
  ``voc07-cls`` code did, 72.0 vs 70.4 mAP);
- ``all``: everything trains, except the parameters the backbone itself keeps fixed (the
  Sobel filters, a native classifier that never runs).

This module decides the design family once (from :attr:`dcbench.models.Backbone.family` and
``is_deepcluster``), cuts the trunk out of a backbone (DeepCluster's conv layers up to a tap,
whose own fc6/fc7 the caller reuses; a ResNet's stem..res4; any backbone's tap, globally
averaged), sets ``requires_grad`` per mode, and checks after training that ``fc6-8`` left
every frozen trunk tensor (weights and BatchNorm buffers) unchanged and that ``all`` changed
some trained trunk weight: a fine-tune whose freezing failed refuses its own result.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, Literal

import torch
from torch import nn

from dcbench.digest import tensor_digests
from dcbench.progress import Progress

#: the fine-tune modes of the DeepCluster paper (Table 2)
MODES = ("fc6-8", "all")


# ----------------------------------------------------------------------------- family
def design_family(backbone: nn.Module) -> Literal["deepcluster", "resnet", "vit", "other"]:
    """The fine-tune design a backbone gets: ``deepcluster`` (DeepCluster's AlexNet/VGG16:
    conv ``features`` + its own fc6/fc7 ``classifier``), ``resnet`` (torchvision layout:
    stem, layer1..layer4 = res2..res5), ``vit`` (:class:`dcbench.models.vit.ViTBackbone`: block
    taps as patch-token maps, a ``cls`` image feature) or ``other``."""
    if getattr(backbone, "is_deepcluster", False):
        return "deepcluster"
    family = getattr(backbone, "family", "other")
    return family if family in ("resnet", "vit") else "other"


# ----------------------------------------------------------------------------- trunks
class Trunk(nn.Module):
    """The fixed Sobel front end (when the backbone has one), then ``body``: what ``fc6-8`` freezes."""

    def __init__(self, sobel: nn.Module | None, body: nn.Module) -> None:
        super().__init__()
        self.sobel, self.body = sobel, body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sobel is not None:
            x = self.sobel(x)
        return self.body(x)


class PooledTap(nn.Module):
    """Any backbone up to ``tap``, averaged over space (or tokens): N x C."""

    def __init__(self, backbone: nn.Module, tap: str) -> None:
        super().__init__()
        self.backbone, self.tap = backbone, tap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.backbone(x, taps=[self.tap])[self.tap]
        if out.dim() == 4:
            return out.mean(dim=(2, 3))
        return out.mean(dim=1) if out.dim() == 3 else out


def conv_body(net: nn.Module, upto: str | None = None) -> nn.Module:
    """DeepCluster AlexNet/VGG16's conv layers: up to the ReLU of tap ``upto`` (what follows,
    e.g. pool5, dropped), or the whole ``features`` (pool5 included) when ``upto`` is None.
    The layers are the net's own modules (no copy)."""
    if upto is None:
        return net.features
    last = net._feature_taps[upto]
    return nn.Sequential(*list(net.features)[:last + 1])


def c4_split(net: nn.Module) -> tuple[nn.Module, nn.Module]:
    """A ResNet's stem..res4 (stride 16) and its res5: the C4 split of Faster R-CNN /
    detectron2. The stages are the net's own modules (no copy); the Sobel front end is not
    included (wrap the first part in a :class:`Trunk`)."""
    model = net.model
    act = getattr(model, "act1", None) or getattr(model, "relu")  # timm names it act1, torchvision relu
    stem = nn.Sequential(model.conv1, model.bn1, act, model.maxpool)
    return nn.Sequential(stem, model.layer1, model.layer2, model.layer3), model.layer4


def drop_cluster_head(net: nn.Module) -> None:
    """Remove DeepCluster's cluster top layer (it plays no part in a fine-tune)."""
    if hasattr(net, "set_top_layer"):
        net.set_top_layer(None)


def freeze_native_head(net: nn.Module) -> None:
    """Stop gradients to the model's own classifier (``head_prefixes``, e.g. a torchvision
    ResNet's ``fc``): it never runs in a fine-tune, so it must not enter the optimiser."""
    prefixes = tuple(getattr(net, "head_prefixes", ()))
    for name, p in net.named_parameters():
        if name.startswith(prefixes):
            p.requires_grad_(False)


# ----------------------------------------------------------------------------- what trains
def fixed_parameters(module: nn.Module) -> frozenset[str]:
    """Names of the parameters ``module`` keeps fixed itself (``requires_grad`` False now: the
    Sobel filters, a frozen native head). Take it BEFORE :func:`set_trainable` changes flags."""
    return frozenset(name for name, p in module.named_parameters() if not p.requires_grad)


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm layer (any dimension)."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def bn_affine_names(module: nn.Module) -> set[str]:
    """Parameter names of the BatchNorm scales and shifts in ``module``."""
    names = set()
    for prefix, sub in module.named_modules():
        if is_norm(sub) and sub.affine:
            names |= {f"{prefix}.weight" if prefix else "weight", f"{prefix}.bias" if prefix else "bias"}
    return names


def set_trainable(trunk: nn.Module, mode: str, train_bn_affine: bool = False,
                  fixed: Collection[str] | None = None) -> set[str]:
    """Set ``requires_grad`` of the trunk's parameters per ``mode``; return the names of
    those that train (what :func:`check_trunk` allows to change).

    ``all``: every parameter but ``fixed``; ``fc6-8``: none, except the BatchNorm scale/shift
    when ``train_bn_affine``. ``fixed`` (default: :func:`fixed_parameters` now) never trains.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    fixed = fixed_parameters(trunk) if fixed is None else fixed
    bn_affine = bn_affine_names(trunk) if train_bn_affine else set()
    allowed = set()
    for name, p in trunk.named_parameters():
        train = name not in fixed and (mode == "all" or name in bn_affine)
        p.requires_grad_(train)
        if train:
            allowed.add(name)
    return allowed


def trainable_names(module: nn.Module) -> set[str]:
    """Names of the parameters of ``module`` that currently train."""
    return {name for name, p in module.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------- trunk check
def tensor_kind(trunk: nn.Module, name: str) -> str:
    """conv / bn_affine / bn_stats / linear / other: what a state-dict entry of the trunk is."""
    prefix, _, leaf = name.rpartition(".")
    module = trunk.get_submodule(prefix) if prefix else trunk
    if is_norm(module):
        return "bn_affine" if leaf in ("weight", "bias") else "bn_stats"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    return "linear" if isinstance(module, nn.Linear) else "other"


def check_trunk(trunk: nn.Module, before: Mapping[str, str], allowed: Collection[str], mode: str,
                iterations: int, detail: Literal["kinds", "count"] = "kinds") -> dict[str, Any]:
    """``fc6-8``: nothing but ``allowed`` changed; ``all``: some ``allowed`` tensor changed
    (when anything trained). ``before``: :func:`dcbench.digest.tensor_digests` of the trunk
    before training. Raises RuntimeError otherwise (the result would be invalid).

    Returns the record of the check: what changed, counted by kind (``detail="kinds"``), or
    as one count (``"count"``, the ``voc-seg`` record).
    """
    after = tensor_digests(trunk)
    changed = sorted(k for k in before if before[k] != after.get(k))
    if mode == "fc6-8":
        forbidden = [k for k in changed if k not in allowed]
        if forbidden:
            raise RuntimeError(f"fc6-8 fine-tuning changed {len(forbidden)} frozen trunk tensors "
                               f"({', '.join(forbidden[:5])}); the result is invalid")
    elif iterations > 0 and not any(k in allowed for k in changed):
        raise RuntimeError("all-layers fine-tuning left every trunk weight unchanged; the result is invalid")
    if detail == "count":
        if mode == "fc6-8":
            return {"passed": True, "rule": "fc6-8: every trunk tensor unchanged", "changed": len(changed)}
        return {"passed": True, "rule": "all: the trunk weights changed", "changed": len(changed),
                "trainable_trunk_tensors": len(allowed)}
    kinds: dict[str, int] = {}
    for name in changed:
        kind = tensor_kind(trunk, name)
        kinds[kind] = kinds.get(kind, 0) + 1
    rule = "fc6-8: every frozen trunk tensor unchanged" if mode == "fc6-8" else "all: the trunk weights changed"
    return {"passed": True, "rule": rule, "changed": kinds, "trainable_trunk_tensors": len(allowed)}


class TrunkGuard:
    """The trunk's tensors before fine-tuning, checked afterwards by :meth:`check`::

        guard = TrunkGuard(trunk, set_trainable(trunk, mode), mode)
        ...train...
        record = guard.check(iterations)
    """

    def __init__(self, trunk: nn.Module, allowed: Collection[str], mode: str) -> None:
        self.trunk, self.allowed, self.mode = trunk, set(allowed), mode
        self.before = tensor_digests(trunk)

    def check(self, iterations: int, detail: Literal["kinds", "count"] = "kinds") -> dict[str, Any]:
        """:func:`check_trunk` against the snapshot taken at construction."""
        return check_trunk(self.trunk, self.before, self.allowed, self.mode, iterations, detail)


# ----------------------------------------------------------------------------- progress
def progress_bar(total: int, desc: str, unit: str, progress: bool) -> Progress | None:
    """A :class:`~dcbench.progress.Progress` (a bar on a terminal, log lines otherwise) when
    ``progress``, else None."""
    return Progress(total, desc, unit) if progress else None


def close_bar(bar: Any) -> None:
    """Close a bar made by :func:`progress_bar` (None: nothing to do)."""
    if bar is not None:
        bar.close()
