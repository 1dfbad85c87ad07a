"""Recognisers for foreign checkpoint formats, in the spirit of timm's ``checkpoint_filter_fn``.

Each registered converter gets the object ``torch.load`` returned and either declines
(returns None) or returns a :class:`Converted`: the weights renamed to the *native* naming of
the architecture (torchvision/timm names for ResNets, the original DeepCluster names for
AlexNet/VGG16 without DataParallel's ``.module``), the keys it dropped as classification or
projection heads, and whatever metadata the file carries. Converters are tried in
registration order; the first that accepts wins.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dcbench.detectron2_names import to_torchvision

Tensor = torch.Tensor


@dataclass
class Converted:
    """A foreign checkpoint rewritten into native key names."""

    format: str
    state_dict: dict[str, Tensor]
    head_keys: list[str] = field(default_factory=list)
    arch: str | None = None  # arch named by the file itself (DeepCluster's ``arch`` key)
    meta: dict[str, Any] = field(default_factory=dict)


Converter = Callable[[Any], "Converted | None"]
_CONVERTERS: list[tuple[str, Converter]] = []


def register_converter(name: str) -> Callable[[Converter], Converter]:
    """Register a recogniser. Contract: pure function of the loaded object; never raises on
    objects of other formats (return None instead)."""
    def decorate(fn: Converter) -> Converter:
        _CONVERTERS.append((name, fn))
        return fn
    return decorate


def converters() -> list[str]:
    """Names of the known formats, in the order they are tried."""
    return [name for name, _ in _CONVERTERS]


def convert(obj: Any) -> Converted | None:
    """Run the recognisers; None when no format matches."""
    for _name, fn in _CONVERTERS:
        result = fn(obj)
        if result is not None:
            return result
    return None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def _strip(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _split_heads(sd: dict[str, Tensor], head_prefixes: tuple[str, ...]) -> tuple[dict[str, Tensor], list[str]]:
    kept = {k: v for k, v in sd.items() if not k.startswith(head_prefixes)}
    return kept, sorted(set(sd) - set(kept))


def _meta(obj: dict, keys: tuple[str, ...] = ("epoch", "arch")) -> dict[str, Any]:
    return {k: obj[k] for k in keys if k in obj and isinstance(obj[k], (int, float, str))}


@register_converter("deepcluster")
def deepcluster(obj: Any) -> Converted | None:
    """Original DeepCluster: ``{'arch', 'epoch', 'state_dict', 'optimizer'}`` with
    DataParallel-wrapped ``features.module.N.*``, ``classifier.N.*``, ``top_layer.*``, ``sobel.*``."""
    sd = obj.get("state_dict") if isinstance(obj, dict) and "state_dict" in obj else obj
    if not _is_state_dict(sd) or not any(k.startswith("features.module.") for k in sd):
        return None
    renamed = {k.replace("features.module.", "features.", 1): v for k, v in sd.items()}
    kept, heads = _split_heads(renamed, ("top_layer.",))
    arch = obj.get("arch") if isinstance(obj, dict) and isinstance(obj.get("arch"), str) else None
    return Converted("deepcluster", kept, heads, arch, _meta(obj) if sd is not obj else {})


@register_converter("vissl")
def vissl(obj: Any) -> Converted | None:
    """VISSL: ``classy_state_dict.base_model.model.trunk`` with ``_feature_blocks.`` keys."""
    if not isinstance(obj, dict) or "classy_state_dict" not in obj:
        return None
    try:
        model = obj["classy_state_dict"]["base_model"]["model"]
        trunk = model["trunk"]
    except (KeyError, TypeError):
        return None
    sd = {k.replace("_feature_blocks.", "", 1): v for k, v in trunk.items()}
    heads = [f"heads.{k}" for k in model.get("heads", {})]
    return Converted("vissl", sd, heads, None, {"phase_idx": obj.get("phase_idx")} if "phase_idx" in obj else {})


@register_converter("moco")
def moco(obj: Any) -> Converted | None:
    """MoCo v1/v2: ``state_dict`` with ``module.encoder_q.*`` (the key encoder is dropped)."""
    sd = obj.get("state_dict") if isinstance(obj, dict) else None
    if not _is_state_dict(sd) or not any(k.startswith("module.encoder_q.") for k in sd):
        return None
    query = _strip(sd, "module.encoder_q.")
    kept, heads = _split_heads(query, ("fc.",))
    others = [k for k in sd if not k.startswith("module.encoder_q.")]
    return Converted("moco", kept, heads + others, obj.get("arch") if isinstance(obj.get("arch"), str) else None,
                     _meta(obj, ("epoch",)))


@register_converter("lightning")
def lightning(obj: Any) -> Converted | None:
    """PyTorch Lightning (solo-learn and similar): ``state_dict`` with ``backbone.*`` keys."""
    sd = obj.get("state_dict") if isinstance(obj, dict) else None
    if not _is_state_dict(sd) or not any(k.startswith("backbone.") for k in sd):
        return None
    kept, _ = _split_heads(_strip(sd, "backbone."), ("fc.",))
    heads = sorted(k for k in sd if not k.startswith("backbone.") or k.startswith("backbone.fc."))
    return Converted("lightning", kept, heads, None, _meta(obj, ("epoch", "global_step")))


def _unwrap_state_dict(obj: Any) -> dict[str, Tensor] | None:
    """``obj`` itself when it is a state dict, else a state dict under ``obj['state_dict']``."""
    if _is_state_dict(obj):
        return obj
    if isinstance(obj, dict) and _is_state_dict(obj.get("state_dict")):
        return obj["state_dict"]
    return None


def _wrapper_meta(obj: Any) -> dict[str, Any]:
    """The epoch of a training checkpoint (``{'state_dict', 'epoch', ...}``); nothing for a bare state dict."""
    return {} if _is_state_dict(obj) else _meta(obj, ("epoch",))


def _strip_data_parallel(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Remove DataParallel/DDP's ``module.`` prefix when every key has it."""
    return _strip(sd, "module.") if all(k.startswith("module.") for k in sd) else sd


_SWAV_HEADS = ("projection_head.", "prototypes.")


@register_converter("swav")
def swav(obj: Any) -> Converted | None:
    """facebookresearch/swav files (SwAV, DeepCluster-v2, SeLa-v2): a bare state dict (the released
    ``*_pretrain.pth.tar``) or ``{'state_dict', 'epoch', 'optimizer'}`` (a training checkpoint), keys
    ``module.``-prefixed, a torchvision-named ResNet trunk plus ``projection_head.*`` (MLP) and
    ``prototypes.*`` (one Linear, or ``prototypes.prototypesN.*`` for DeepCluster-v2's several
    k-means heads). The trunk is kept; the two heads are reported as dropped."""
    sd = _unwrap_state_dict(obj)
    if sd is None:
        return None
    sd = _strip_data_parallel(sd)
    if "conv1.weight" not in sd or not any(k.startswith(_SWAV_HEADS) for k in sd):
        return None
    kept, heads = _split_heads(sd, _SWAV_HEADS)
    return Converted("swav", kept, heads, None, _wrapper_meta(obj))


@register_converter("deepercluster")
def deepercluster(obj: Any) -> Converted | None:
    """facebookresearch/DeeperCluster files (its DeeperCluster, DeepCluster-on-YFCC100M and RotNet
    VGG16s): ``{'state_dict', 'epoch', ...}`` of a wrapper net whose trunk is ``body.features.N.*``
    / ``body.classifier.N.*`` (DeepCluster's VGG16 names under ``body.``), with ``sobel.*`` and a
    ``pred_layer.*`` classifier, possibly ``module.``-prefixed."""
    sd = _unwrap_state_dict(obj)
    if sd is None:
        return None
    sd = _strip_data_parallel(sd)
    if not any(k.startswith("body.features.") for k in sd):
        return None
    # sobel.* is kept under its own name: the loader rebuilds the fixed filters and ignores it
    renamed = {k[len("body."):] if k.startswith("body.") else k: v for k, v in sd.items()}
    kept, heads = _split_heads(renamed, ("pred_layer.",))
    return Converted("deepercluster", kept, heads, None, _wrapper_meta(obj))


@register_converter("detectron2")
def detectron2(obj: Any) -> Converted | None:
    """detectron2 files of a torchvision-layout ResNet (``dcbench checkpoint convert --to detectron2``,
    MoCo's ``convert-pretrain-to-detectron2.py``): ``{"model": {name: numpy array}, "__author__",
    "matching_heuristics"}`` with ``stem.conv1.*``, ``resN.B.convK[.norm].*``, ``resN.B.shortcut[.norm].*``.
    Any other key (caffe2 names, a whole detector) declines: those files are not a backbone alone."""
    model = obj.get("model") if isinstance(obj, dict) else None
    if not isinstance(model, dict) or "stem.conv1.weight" not in model:
        return None
    sd: dict[str, Tensor] = {}
    for key, value in model.items():
        name = to_torchvision(key) if isinstance(key, str) else None
        if name is None or not isinstance(value, (np.ndarray, Tensor)):
            return None
        sd[name] = torch.tensor(value) if isinstance(value, np.ndarray) else value
    author = obj.get("__author__")
    return Converted("detectron2", sd, [], None, {"author": author} if isinstance(author, str) else {})


@register_converter("state_dict")
def plain(obj: Any) -> Converted | None:
    """A bare state dict (torchvision, timm, DeepCluster without DataParallel), possibly inside
    ``{'state_dict': ...}`` or ``{'model': ...}`` and possibly prefixed with ``module.``."""
    sd = obj
    if isinstance(obj, dict) and not _is_state_dict(obj):
        inner = [obj[k] for k in ("state_dict", "model", "model_state") if _is_state_dict(obj.get(k))]
        if not inner:
            return None
        sd = inner[0]
    if not _is_state_dict(sd):
        return None
    if all(k.startswith("module.") for k in sd):
        sd = _strip(sd, "module.")
    fmt = "timm" if any(re.match(r"(stem|stages|blocks|patch_embed|head)\.", k) for k in sd) else "torchvision"
    kept, heads = _split_heads(sd, ("top_layer.",))
    arch = obj.get("arch") if isinstance(obj, dict) and isinstance(obj.get("arch"), str) and sd is not obj else None
    return Converted(fmt, kept, heads, arch, _meta(obj) if sd is not obj and isinstance(obj, dict) else {})
