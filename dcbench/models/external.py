"""timm (``timm:NAME``) and torchvision (``tv:NAME``) models behind the Backbone interface.

Taps are the outputs of the model's stages (see :mod:`dcbench.models.hooked`); timm Vision
Transformers get block, ``cls`` and ``avgpool`` taps instead (:mod:`dcbench.models.vit`); timm
Swin Transformers ``stage1..stage4`` (their ``layers.0..3`` outputs, channels-last, as maps).
Pretrained weights by name are :mod:`dcbench.models.hub`'s.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dcbench.errors import ArchError
from dcbench.models.hooked import HookedBackbone, _StopForward
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
        size = max(patch, input_size // patch * patch)
        raise ArchError(f"timm:{name} cuts images into {patch} px patches: pass an image size that is a multiple "
                        f"of {patch} (e.g. {_size_options(size)})")
    fixed = int(embed.img_size[0]) if embed.img_size is not None else input_size
    if getattr(embed, "strict_img_size", False) and fixed != input_size:
        raise ArchError(f"timm:{name} takes {fixed} px images only (its position tables are sized for them); "
                        f"pass {_size_options(fixed)}, or use a timm:vit_* model without relpos")


def _size_options(size: int) -> str:
    """How each command takes an image size: ``train`` and ``viz`` have ``--image-size``, the
    evaluation commands the protocols' ``image_size`` setting."""
    return f"--image-size {size} to train, --set image_size={size} to evaluate"


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
        from torchvision.models import SwinTransformer

        if isinstance(model, SwinTransformer):
            # torchvision's Swin stages emit N x H x W x C maps, which this layout does not read
            raise ArchError(f"dcbench does not read the channels-last stages of torchvision's "
                            f"{type(model).__name__}; use a timm Swin, e.g. timm:swin_tiny_patch4_window7_224")
        children = list(features.named_children())
        relus = [f"features.{n}" for i, (n, m) in enumerate(children)
                 if isinstance(m, nn.ReLU) and i > 0 and isinstance(children[i - 1][1], (nn.Conv2d, nn.BatchNorm2d))]
        convs = sum(isinstance(m, nn.Conv2d) for m in features.modules())
        if relus and len(relus) == convs:  # a plain conv stack (AlexNet, VGG): each conv's ReLU output
            return relus
        return _stage_paths(children)
    raise ArchError(f"dcbench cannot name the taps of torchvision model {type(model).__name__}; use a timm "
                    f"model instead (timm:NAME, e.g. timm:resnet50: timm names every model's stages)")


_SKIPPED_CHILDREN = (nn.MaxPool2d, nn.AvgPool2d, nn.Dropout)


def _stage_paths(children: list[tuple[str, nn.Module]]) -> list[str]:
    """Taps of a ``features`` Sequential that is not a plain conv stack (DenseNet, SqueezeNet,
    MobileNet, EfficientNet, ConvNeXt): every child but poolings and dropouts, and a conv / BN
    that a ReLU follows is tapped at that ReLU (its output is what the next stage reads)."""
    paths = []
    for i, (name, module) in enumerate(children):
        following = children[i + 1][1] if i + 1 < len(children) else None
        if isinstance(module, _SKIPPED_CHILDREN):
            continue
        leads_to_relu = isinstance(following, (nn.Conv2d, nn.BatchNorm2d, nn.ReLU))
        if isinstance(module, (nn.Conv2d, nn.BatchNorm2d)) and leads_to_relu:
            continue
        paths.append(f"features.{name}")
    return paths


def _name_taps(paths: list[str], channels_last: bool = False) -> dict[str, str]:
    if all(p in _RESNET_ALIASES for p in paths):
        return {_RESNET_ALIASES[p]: p for p in paths}
    if channels_last and all(p == f"layers.{i}" for i, p in enumerate(paths)):  # Swin: stage1..stage4
        return {f"stage{i + 1}": p for i, p in enumerate(paths)}
    if all(p.startswith("features.") for p in paths) and len(paths) > 1:
        return {f"conv{i + 1}": p for i, p in enumerate(paths)}
    return {p.replace(".", "_"): p for p in paths}


def _last_channels(model: nn.Module, path: str) -> int:
    """Channels of the tap at ``path``: read off the layer for a conv, a BN or the ReLU after a
    conv, and a ResNet stage; measured by a forward pass for any other module (a DenseNet block or
    a SqueezeNet Fire module concatenates branches, so its last conv is not its width)."""
    module = model.get_submodule(path)
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    if isinstance(module, nn.BatchNorm2d):
        return module.num_features
    if path == "relu" and hasattr(model, "conv1"):
        return model.conv1.out_channels
    if isinstance(module, nn.ReLU):  # the ReLU of a plain conv stack: the conv that feeds it
        parent_path, _, index = path.rpartition(".")
        children = list(model.get_submodule(parent_path).named_children())
        position = [n for n, _ in children].index(index)
        before = [m for _, m in children[:position] if isinstance(m, nn.Conv2d)]
        if before:
            return before[-1].out_channels
    if path.startswith("layer") and "." not in path:  # a ResNet stage ends with its widest conv
        return [m for m in module.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
    return _measured_channels(model, path)


def _measured_channels(model: nn.Module, path: str) -> int:
    """Channels of ``path``'s output on one 224 px image, in eval mode (BatchNorm statistics and
    the RNG untouched), the forward stopped there."""
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    found: list[int] = []

    def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        found.append(int(output.shape[1]))
        raise _StopForward

    handle = model.get_submodule(path).register_forward_hook(hook)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, first.in_channels, 224, 224))
    except _StopForward:
        pass
    finally:
        handle.remove()
        model.train(training)
    return found[0]


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
