"""The fixed Sobel front end of DeepCluster (grey conversion, then two gradient filters)."""
from __future__ import annotations

import torch
from torch import nn

_GX = [[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]]
_GY = [[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]]


def make_sobel() -> nn.Sequential:
    """1x1 conv 3->1 (weights 1/3, bias 0), then 3x3 conv 1->2 with Gx, Gy (pad 1, bias 0).

    Module indices and parameter names match the original code (``sobel.0.*``, ``sobel.1.*``)
    so original checkpoints load without renaming. The parameters are frozen.
    """
    grey = nn.Conv2d(3, 1, kernel_size=1, stride=1, padding=0)
    edges = nn.Conv2d(1, 2, kernel_size=3, stride=1, padding=1)
    with torch.no_grad():
        grey.weight.fill_(1.0 / 3.0)
        grey.bias.zero_()
        edges.weight[0, 0].copy_(torch.tensor(_GX))
        edges.weight[1, 0].copy_(torch.tensor(_GY))
        edges.bias.zero_()
    sobel = nn.Sequential(grey, edges)
    for p in sobel.parameters():
        p.requires_grad = False
    return sobel
