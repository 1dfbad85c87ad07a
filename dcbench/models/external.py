"""timm (``timm:NAME``) and torchvision (``tv:NAME``) models behind the Backbone interface.

Taps are the outputs of the model's stages, captured with forward hooks; the forward pass is
cut short (by an exception raised from the hook) once the deepest requested tap is captured,
so asking for an early tap does not pay for the whole network. The clustering feature is the
global average of the last stage.
"""
from __future__ import annotations

import torch
from torch import nn

from dcbench.errors import ArchError
from dcbench.models.base import CLUSTER_TAP, LOGITS_TAP, Backbone
from dcbench.models.sobel import make_sobel

# Standard names for ResNet stages (PROTOCOLS.md: conv1, res2..res5).
_RESNET_ALIASES = {"act1": "conv1", "relu": "conv1", "layer1": "res2", "layer2": "res3",
                   "layer3": "res4", "layer4": "res5"}


class _StopForward(Exception):
    """Raised by a tap hook once every requested tap has been captured."""


class HookedBackbone(Backbone):
    """A model whose taps are named submodules; the cluster feature pools the last tap."""

    def __init__(self, arch: str, model: nn.Module, tap_modules: dict[str, str], feature_dim: int,
                 sobel: bool, input_size: int, native_heads: tuple[str, ...] = ()) -> None:
        super().__init__()
        #: prefixes of the model's own classifier in native (un-prefixed) key names
        self.native_heads = tuple(f"{h}." for h in native_heads)
        self.head_prefixes = ("top_layer.",) + tuple(f"model.{h}" for h in self.native_heads)
        self.arch, self.input_size = arch, input_size
        self.model = model
        self.sobel = make_sobel() if sobel else None
        self._tap_modules = tap_modules  # tap name -> module path inside ``model``
        self.tap_names = list(tap_modules)
        self.conv_tap_names = list(tap_modules)
        self.feature_dim = feature_dim
        self.family = hooked_family(arch, model, self.tap_names)

    def _forward_taps(self, x: torch.Tensor, wanted: set[str]) -> dict[str, torch.Tensor]:
        if self.sobel is not None:
            x = self.sobel(x)
        needs_last = bool(wanted & {CLUSTER_TAP, LOGITS_TAP})
        hooked = [t for t in self.tap_names if t in wanted or (needs_last and t == self.tap_names[-1])]
        captured: dict[str, torch.Tensor] = {}
        modules = dict(self.model.named_modules())

        def make_hook(tap: str):
            def hook(_module, _inputs, output):
                captured[tap] = output
                if len(captured) == len(hooked):
                    raise _StopForward
            return hook

        handles = [modules[self._tap_modules[t]].register_forward_hook(make_hook(t)) for t in hooked]
        try:
            self.model(x)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        out = {t: v for t, v in captured.items() if t in wanted}
        if needs_last:
            pooled = captured[self.tap_names[-1]].mean(dim=(-2, -1))
            if CLUSTER_TAP in wanted:
                out[CLUSTER_TAP] = pooled
            if LOGITS_TAP in wanted:
                out[LOGITS_TAP] = self.top_layer(pooled)
        return out


_RESNET_LAYOUT = ("conv1", "bn1", "maxpool", "layer1", "layer2", "layer3", "layer4")
_ALEXNET_TAPS = ["conv1", "conv2", "conv3", "conv4", "conv5"]
_RESNET_TAPS = ["conv1", "res2", "res3", "res4", "res5"]


def hooked_family(arch: str, model: nn.Module, tap_names: list[str]) -> str:
    """The :attr:`Backbone.family` of a timm / torchvision model (see that docstring)."""
    if tap_names == _RESNET_TAPS and all(hasattr(model, name) for name in _RESNET_LAYOUT):
        return "resnet"
    if "alexnet" in arch and tap_names == _ALEXNET_TAPS:
        return "alexnet"
    if "vgg" in arch:
        return "vgg"
    if "vit" in arch:
        return "vit"
    return "other"


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            new = nn.Conv2d(in_channels, module.out_channels, module.kernel_size, module.stride,
                            module.padding, module.dilation, module.groups, module.bias is not None)
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], new)
            return


def build_timm(name: str, sobel: bool = False, input_size: int = 224, **_: object) -> HookedBackbone:
    """Any timm model, random init, taps at timm's ``feature_info`` stages."""
    import timm

    if name not in timm.list_models():
        raise ArchError(f"unknown timm model '{name}'; see timm.list_models() for the names")
    model = timm.create_model(name, pretrained=False, in_chans=2 if sobel else 3)
    info = getattr(model, "feature_info", None)
    if not info:
        raise ArchError(f"timm model '{name}' has no feature_info, so dcbench cannot name its taps")
    paths = [entry["module"] for entry in info]
    taps = _name_taps(paths)
    dim = info[-1]["num_chs"]
    head = model.pretrained_cfg.get("classifier") if hasattr(model, "pretrained_cfg") else None
    heads = tuple(head) if isinstance(head, (list, tuple)) else ((head,) if head else ())
    return HookedBackbone(f"timm:{name}", model, taps, dim, sobel, input_size, heads)


def _tv_tap_paths(model: nn.Module) -> list[str]:
    if all(hasattr(model, f"layer{i}") for i in range(1, 5)):  # ResNet family
        return ["relu", "layer1", "layer2", "layer3", "layer4"]
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential):
        children = list(features.named_children())
        relus = [f"features.{n}" for i, (n, m) in enumerate(children)
                 if isinstance(m, nn.ReLU) and i > 0 and isinstance(children[i - 1][1], (nn.Conv2d, nn.BatchNorm2d))]
        return relus or [f"features.{n}" for n, _ in children]
    raise ArchError(f"dcbench cannot name the taps of torchvision model {type(model).__name__}")


def _name_taps(paths: list[str]) -> dict[str, str]:
    if all(p in _RESNET_ALIASES for p in paths):
        return {_RESNET_ALIASES[p]: p for p in paths}
    if all(p.startswith("features.") for p in paths) and len(paths) > 1:
        return {f"conv{i + 1}": p for i, p in enumerate(paths)}
    return {p.replace(".", "_"): p for p in paths}


def _last_channels(model: nn.Module, path: str) -> int:
    module = model.get_submodule(path)
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    if convs:
        return convs[-1].out_channels
    # a bare ReLU: find the conv that feeds it
    parent_path, _, index = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    before = [m for i, m in enumerate(parent.children()) if i < int(index) and isinstance(m, nn.Conv2d)]
    if path == "relu" and hasattr(model, "conv1"):
        return model.conv1.out_channels
    return before[-1].out_channels


def build_torchvision(name: str, sobel: bool = False, input_size: int = 224, **_: object) -> HookedBackbone:
    """Any torchvision classification model, random init."""
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ArchError(f"unknown torchvision model '{name}'; see torchvision.models.list_models()")
    model = torchvision.models.get_model(name, weights=None)
    if sobel:
        _replace_first_conv(model, 2)
    paths = _tv_tap_paths(model)
    taps = _name_taps(paths)
    heads = tuple(h for h in ("fc", "classifier", "heads") if hasattr(model, h) and h != paths[-1].split(".")[0])
    return HookedBackbone(f"tv:{name}", model, taps, _last_channels(model, paths[-1]), sobel, input_size, heads)
