"""Backbones whose taps are named submodules of a wrapped model, captured with forward hooks.

The forward pass is cut short (by an exception raised from the hook) once the deepest
requested tap is captured, so asking for an early tap does not pay for the whole network.
The clustering feature is the global average of the last tap. ResNets also have an
``avgpool`` tap: that same global average of the last stage (N x C, 2048-d on ResNet-50),
VISSL's ``res5avg`` and the feature torchvision's / timm's classifier reads.

Models whose stages emit channels-last maps (timm's Swin Transformers, ``output_fmt`` NHWC) are
read with ``channels_last=True``: each captured stage output N x H x W x C is permuted to the
N x C x H x W map every consumer of conv taps expects (timm's own ``forward_intermediates`` does
the same for its NCHW output).
"""
from __future__ import annotations

import torch
from torch import nn

from dcbench.models.base import CLUSTER_TAP, LOGITS_TAP, Backbone
from dcbench.models.sobel import make_sobel

#: the global average of the last stage (ResNets only; ViTs have their own, see dcbench.models.vit)
AVGPOOL_TAP = "avgpool"


class _StopForward(Exception):
    """Raised by a tap hook once every requested tap has been captured."""


class HookedBackbone(Backbone):
    """A model whose taps are named submodules; the cluster feature pools the last tap."""

    def __init__(self, arch: str, model: nn.Module, tap_modules: dict[str, str], feature_dim: int,
                 sobel: bool, input_size: int, native_heads: tuple[str, ...] = (),
                 channels_last: bool = False) -> None:
        super().__init__()
        #: stage outputs are N x H x W x C (permuted to maps when captured)
        self.channels_last = channels_last
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
        if self.family == "resnet":  # not a conv tap: a 2-D feature (probes use no spatial pooling)
            self.tap_names = [*self.tap_names, AVGPOOL_TAP]

    def _forward_taps(self, x: torch.Tensor, wanted: set[str]) -> dict[str, torch.Tensor]:
        if self.sobel is not None:
            x = self.sobel(x)
        x = self._fit_patches(x)
        last = self.conv_tap_names[-1]
        needs_last = bool(wanted & {CLUSTER_TAP, LOGITS_TAP, AVGPOOL_TAP})
        hooked = [t for t in self.conv_tap_names if t in wanted or (needs_last and t == last)]
        captured: dict[str, torch.Tensor] = {}
        modules = dict(self.model.named_modules())

        def make_hook(tap: str):
            def hook(_module, _inputs, output):
                captured[tap] = output.permute(0, 3, 1, 2) if self.channels_last else output
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
            pooled = captured[last].mean(dim=(-2, -1))
            for tap in (CLUSTER_TAP, AVGPOOL_TAP):
                if tap in wanted:
                    out[tap] = pooled
            if LOGITS_TAP in wanted:
                out[LOGITS_TAP] = self.top_layer(pooled)
        return out


    def _fit_patches(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` cut to whole patches of a transformer's patch embedding that takes any size (timm
        ViTs and Swins built with ``dynamic_img_size``): the bottom / right remainder is dropped, as
        a strided patch convolution drops it (timm asserts divisibility instead; see
        :mod:`dcbench.models.vit`). Unchanged for other models, fixed-size ones (their own size is
        checked at build) and padding patch embeds."""
        embed = getattr(self.model, "patch_embed", None)
        patch = getattr(embed, "patch_size", None)
        if patch is None or getattr(embed, "strict_img_size", True) or getattr(embed, "dynamic_img_pad", False):
            return x
        height, width = x.shape[-2] // patch[0] * patch[0], x.shape[-1] // patch[1] * patch[1]
        return x if (height, width) == tuple(x.shape[-2:]) else x[..., :height, :width]


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
