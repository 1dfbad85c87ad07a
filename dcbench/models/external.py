"""timm (``timm:NAME``) and torchvision (``tv:NAME``) models behind the Backbone interface.

Taps are the outputs of the model's stages (see :mod:`dcbench.models.hooked`); timm Vision
Transformers get block, ``cls`` and ``avgpool`` taps instead (:mod:`dcbench.models.vit`); timm
Swin Transformers ``stage1..stage4`` (their ``layers.0..3`` outputs, channels-last, as maps).
Pretrained weights by name are :mod:`dcbench.models.hub`'s.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from dcbench.errors import ArchError
from dcbench.models.hooked import HookedBackbone
from dcbench.models.vit import ViTBackbone, is_timm_vit, is_vit_model

__all__ = ["HookedBackbone", "ViTBackbone", "build_timm", "build_torchvision"]

# Standard names for ResNet stages (PROTOCOLS.md: conv1, res2..res5).
_RESNET_ALIASES = {"act1": "conv1", "relu": "conv1", "layer1": "res2", "layer2": "res3",
                   "layer3": "res4", "layer4": "res5"}

def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            new = nn.Conv2d(in_channels, module.out_channels, module.kernel_size, module.stride,
                            module.padding, module.dilation, module.groups, module.bias is not None)
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], new)
            return


#: timm modules of the Swin Transformers: channels-last stage outputs, ``dynamic_img_size`` (the
#: shifted-window attention masks computed per input, windows padded), so 32-64 px inputs work
SWIN_MODULES = ("timm.models.swin_transformer", "timm.models.swin_transformer_v2")


def is_timm_swin(name: str) -> bool:
    """Whether timm model ``name`` (without tag) is built by a :data:`SWIN_MODULES` module."""
    from timm.models import model_entrypoint

    return model_entrypoint(name).__module__ in SWIN_MODULES


def timm_model_kwargs(name: str) -> dict[str, Any]:
    """Extra ``timm.create_model`` arguments for ``name``: ViTs and Swins take any input size. The
    option changes no parameter, so the weights (and sha256) of a seeded random init stay as before."""
    return {"dynamic_img_size": True} if is_timm_vit(name) or is_timm_swin(name) else {}


def timm_input_config(model: nn.Module, source: str | None = None) -> dict[str, Any]:
    """The input convention of a timm model's pretrained config (see ``Backbone.input_config``),
    ``source`` naming where it comes from."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    return {"input_size": int(cfg["input_size"][-1]), "mean": [float(v) for v in cfg["mean"]],
            "std": [float(v) for v in cfg["std"]], "interpolation": str(cfg["interpolation"]),
            "crop_pct": float(cfg["crop_pct"]), "crop_mode": str(cfg.get("crop_mode", "center")), "source": source}


def wrap_timm(name: str, model: nn.Module, sobel: bool = False, input_size: int = 224,
              weights: str | None = None) -> HookedBackbone:
    """A built timm model (``name`` without tag) as a Backbone: ViT taps for VisionTransformers,
    ``feature_info`` stage taps otherwise. ``weights`` names published weights loaded into it
    (e.g. ``resnet18.a1_in1k``): then the model's pretrained config is its input convention; a
    random init keeps :data:`~dcbench.models.base.DEFAULT_INPUT_CONFIG` (its protocols' presets)."""
    head = model.pretrained_cfg.get("classifier") if hasattr(model, "pretrained_cfg") else None
    heads = tuple(head) if isinstance(head, (list, tuple)) else ((head,) if head else ())
    if is_vit_model(model):
        check_vit_input(name, model, input_size)
        backbone: HookedBackbone = ViTBackbone(f"timm:{name}", model, sobel, input_size, heads)
    else:
        info = getattr(model, "feature_info", None)
        if not info:
            raise ArchError(f"timm model '{name}' has no feature_info, so dcbench cannot name its taps")
        channels_last = getattr(model, "output_fmt", None) == "NHWC"  # Swin: N x H x W x C stage outputs
        taps = _name_taps([entry["module"] for entry in info], channels_last)
        backbone = HookedBackbone(f"timm:{name}", model, taps, info[-1]["num_chs"], sobel, input_size, heads,
                                  channels_last)
    if weights is not None:
        backbone.input_config = timm_input_config(model, f"timm pretrained_cfg of {weights}")
    return backbone


def check_vit_input(name: str, model: nn.Module, input_size: int) -> None:
    """One clear error for an input size a timm transformer cannot take (instead of timm's
    assertion, or a shape mismatch, at the first forward): the patch grid must divide it, and
    models with relative-position tables sized at build time (``vit_relpos_*``) take their own size only."""
    from timm.layers import PatchEmbed

    embed = getattr(model, "patch_embed", None)
    if not isinstance(embed, PatchEmbed):  # hybrids: a CNN stem, any size
        return
    patch = int(embed.patch_size[0])
    if input_size % patch:
        raise ArchError(f"timm:{name} cuts images into {patch} px patches: pass an image size that is a multiple "
                        f"of {patch} (e.g. --image-size {max(patch, input_size // patch * patch)})")
    fixed = int(embed.img_size[0]) if embed.img_size is not None else input_size
    if getattr(embed, "strict_img_size", False) and fixed != input_size:
        raise ArchError(f"timm:{name} takes {fixed} px images only (its position tables are sized for them); "
                        f"pass --image-size {fixed}, or use a timm:vit_* model without relpos")


def check_timm_name(name: str) -> None:
    """Raise ArchError unless ``name`` is a timm architecture (without pretrained tag)."""
    import timm

    if name not in timm.list_models():
        raise ArchError(f"unknown timm model '{name}'; see timm.list_models() for the names")


def build_timm(name: str, sobel: bool = False, input_size: int = 224, **_: object) -> HookedBackbone:
    """Any timm model, random init, taps at timm's ``feature_info`` stages (ViTs: see
    :mod:`dcbench.models.vit`)."""
    import timm

    check_timm_name(name)
    model = timm.create_model(name, pretrained=False, in_chans=2 if sobel else 3, **timm_model_kwargs(name))
    return wrap_timm(name, model, sobel, input_size)


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


def _name_taps(paths: list[str], channels_last: bool = False) -> dict[str, str]:
    if all(p in _RESNET_ALIASES for p in paths):
        return {_RESNET_ALIASES[p]: p for p in paths}
    if channels_last and all(p == f"layers.{i}" for i, p in enumerate(paths)):  # Swin: stage1..stage4
        return {f"stage{i + 1}": p for i, p in enumerate(paths)}
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


def check_torchvision_name(name: str) -> None:
    """Raise ArchError unless ``name`` is a torchvision classification model."""
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ArchError(f"unknown torchvision model '{name}'; see torchvision.models.list_models()")


def wrap_torchvision(name: str, model: nn.Module, sobel: bool = False, input_size: int = 224) -> HookedBackbone:
    """A built torchvision model as a Backbone with stage taps (its classifier as head)."""
    paths = _tv_tap_paths(model)
    taps = _name_taps(paths)
    heads = tuple(h for h in ("fc", "classifier", "heads") if hasattr(model, h) and h != paths[-1].split(".")[0])
    return HookedBackbone(f"tv:{name}", model, taps, _last_channels(model, paths[-1]), sobel, input_size, heads)


def build_torchvision(name: str, sobel: bool = False, input_size: int = 224, **_: object) -> HookedBackbone:
    """Any torchvision classification model, random init."""
    import torchvision

    check_torchvision_name(name)
    model = torchvision.models.get_model(name, weights=None)
    if sobel:
        _replace_first_conv(model, 2)
    return wrap_torchvision(name, model, sobel, input_size)
