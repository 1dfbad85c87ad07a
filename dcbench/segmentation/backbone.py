"""A dcbench backbone as an mmsegmentation backbone (``DCBenchBackbone`` in mmseg's MODELS).

The wrapper returns the requested taps of one forward pass as a tuple (what mmseg's decode
heads index with ``in_index``). Two geometric adaptations, neither of which changes a weight:

- :class:`FcAsConv`: DeepCluster's fc6/fc7 as convolutions over the pool5 map (FCN's
  "convolutionalisation"): fc6 ``Linear(C*g*g, 4096)`` becomes ``Conv2d(C, 4096, g)`` with the
  same weights (the flatten order of N x C x g x g is C, y, x), zero-padded by ``(g-1)//2`` before
  and ``g//2`` after so the map keeps pool5's size, and fc7 a 1x1 convolution; the classifier's
  ReLU and Dropout layers keep their places. The tap it produces is called ``fc7``.
- :func:`dilate_resnet`: mmseg's dilated ResNet ("-d8"): the stride-2 convolutions of res4
  and/or res5 become stride 1 and the first 3x3 convolution of each of their blocks is dilated
  by 2 / 4, the first block of a stage by half that (mmseg's ``contract_dilation=True``).
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from mmengine.model import BaseModule
from mmseg.registry import MODELS
from torch import nn

from dcbench import finetune as ft

#: dilation of res4 and res5 for each output stride (mmseg: strides (1, 2, 1, 1), dilations (1, 1, 2, 4) = 8)
RESNET_DILATIONS: dict[int, tuple[int, int]] = {8: (2, 4), 16: (1, 2), 32: (1, 1)}
FC_TAP = "fc7"


class FcAsConv(nn.Module):
    """fc6 and fc7 of a DeepCluster classifier as convolutions (see the module docstring)."""

    def __init__(self, classifier: nn.Sequential, channels: int, grid: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        first = True
        for module in classifier:
            if isinstance(module, nn.Linear):
                layers += self._convert(module, channels if first else module.in_features, grid if first else 1)
                first = False
            else:  # ReLU, Dropout: elementwise, they work on maps unchanged
                layers.append(copy.deepcopy(module))
        self.layers = nn.Sequential(*layers)
        self.out_channels = [m for m in layers if isinstance(m, nn.Conv2d)][-1].out_channels

    @staticmethod
    def _convert(linear: nn.Linear, channels: int, kernel: int) -> list[nn.Module]:
        if linear.in_features != channels * kernel * kernel:
            raise ValueError(f"cannot view Linear({linear.in_features}, ...) as a {kernel}x{kernel} "
                             f"convolution over {channels} channels")
        conv = nn.Conv2d(channels, linear.out_features, kernel, bias=linear.bias is not None)
        with torch.no_grad():
            conv.weight.copy_(linear.weight.view(linear.out_features, channels, kernel, kernel))
            if linear.bias is not None:
                conv.bias.copy_(linear.bias)
        if kernel == 1:
            return [conv]
        before, after = (kernel - 1) // 2, kernel // 2  # "same" output size for odd and even kernels
        return [nn.ZeroPad2d((before, after, before, after)), conv]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _set_geometry(block: nn.Module, dilation: int) -> None:
    """Stride 1 everywhere in ``block``; ``dilation`` on its first spatial (k > 1) convolution,
    as mmseg's blocks do (Bottleneck: its 3x3 conv2; BasicBlock: conv1 only)."""
    dilated = False
    for conv in block.modules():
        if not isinstance(conv, nn.Conv2d):
            continue
        conv.stride = (1, 1)
        if conv.kernel_size[0] > 1 and not dilated:
            conv.dilation = (dilation, dilation)
            conv.padding = tuple(dilation * (k - 1) // 2 for k in conv.kernel_size)
            dilated = True


def dilate_resnet(net: nn.Module, output_stride: int) -> dict[str, int]:
    """Make a timm/torchvision ResNet (``HookedBackbone``) reach ``output_stride`` (8, 16, 32)
    by dilation instead of striding, in place; returns ``{stage: dilation}``."""
    if output_stride not in RESNET_DILATIONS:
        raise ValueError(f"output_stride must be one of {sorted(RESNET_DILATIONS)}, got {output_stride}")
    done = {}
    for tap, dilation in zip(("res4", "res5"), RESNET_DILATIONS[output_stride]):
        if dilation == 1:
            continue
        stage = net.model.get_submodule(net._tap_modules[tap])
        for index, block in enumerate(stage.children()):
            _set_geometry(block, max(1, dilation // 2) if index == 0 else dilation)  # contract_dilation
        done[tap] = dilation
    return done


@MODELS.register_module(name="DCBenchBackbone", force=True)
class DCBenchBackbone(BaseModule):
    """A dcbench :class:`~dcbench.models.Backbone` inside an mmseg segmentor.

    Args:
        net: the backbone (the caller passes a copy: it is modified and trained).
        taps: the taps returned, in this order; ``"fc7"`` on a DeepCluster net means the
            convolutionalised fc7 (see :class:`FcAsConv`).
        frozen: keep ``net`` fixed (no gradients, always eval mode): the ``fc6-8`` mode. The
            convolutionalised fc6/fc7 are not part of ``net`` and still train.
        norm_eval: keep ``net``'s BatchNorm layers in eval mode (running statistics) while training.
        output_stride: dilate a ResNet to this stride (None: as built).
    """

    def __init__(self, net: nn.Module, taps: Sequence[str], frozen: bool = False, norm_eval: bool = False,
                 output_stride: int | None = None) -> None:
        super().__init__(init_cfg=None)
        self.net, self.taps = net, list(taps)
        self.frozen, self.norm_eval = frozen, norm_eval
        self.fc: FcAsConv | None = None
        if FC_TAP in self.taps and ft.design_family(net) == "deepcluster":
            self.fc = FcAsConv(net.classifier, net.channels, net.grid)
            net.classifier = nn.Sequential()  # replaced by self.fc: no dead weights in the optimiser
        ft.drop_cluster_head(net)  # DeepCluster's cluster head plays no part
        self.dilations = dilate_resnet(net, output_stride) if output_stride else {}
        ft.freeze_native_head(net)  # the model's own classifier never runs
        ft.set_trainable(net, "fc6-8" if frozen else "all")  # fc6-8: the whole trunk frozen
        self._conv_taps = [t for t in self.taps if not (self.fc is not None and t == FC_TAP)]

    def init_weights(self) -> None:
        """Nothing to initialise: the weights come from the checkpoint (mmseg would otherwise
        recurse into timm/torchvision ``init_weights`` methods and re-initialise them)."""
        self._is_init = True

    def train(self, mode: bool = True) -> "DCBenchBackbone":
        """Train mode, except the frozen trunk (eval) and, with ``norm_eval``, its BatchNorm."""
        super().train(mode)
        if self.frozen:
            self.net.eval()
        elif mode and self.norm_eval:
            for m in self.net.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def _pool5(self, x: torch.Tensor) -> torch.Tensor:
        if self.net.sobel is not None:
            x = self.net.sobel(x)
        return self.net.features(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The taps, in ``taps`` order."""
        # a frozen trunk needs no graph: fc6-8 then costs a forward pass of the convs only
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            out = self.net(x, taps=self._conv_taps) if self._conv_taps else {}
            # pool5 for fc6/fc7: a second pass over the convs only when conv taps are wanted too
            pool5 = self._pool5(x) if self.fc is not None else None
        if pool5 is not None:
            out[FC_TAP] = self.fc(pool5)
        return tuple(out[t] for t in self.taps)
