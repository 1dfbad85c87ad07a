"""Pure-PyTorch stand-ins for the ``mmcv.ops`` names mmsegmentation 1.2.2 imports.

mmcv-lite ships ``mmcv/ops/*.py`` but not the compiled ``mmcv._ext``, so ``import mmcv.ops``
fails, and with it ``import mmseg.models``: these modules of mmseg import from ``mmcv.ops``
when they are imported (found by grepping the installed package)::

    mmseg/utils/mask_classification.py      from mmcv.ops import point_sample
    mmseg/models/utils/point_sample.py      from mmcv.ops import point_sample
    mmseg/models/decode_heads/san_head.py   from mmcv.ops import point_sample
    mmseg/models/losses/focal_loss.py       from mmcv.ops import sigmoid_focal_loss
    mmseg/models/decode_heads/point_head.py try: from mmcv.ops import point_sample
    mmseg/models/decode_heads/cc_head.py    try: from mmcv.ops import CrissCrossAttention
    mmseg/models/decode_heads/psa_head.py   try: from mmcv.ops import PSAMask

The last three catch only ``ModuleNotFoundError``. This module supplies ``point_sample`` and
``sigmoid_focal_loss``; any other name raises ``ModuleNotFoundError`` (see :func:`__getattr__`),
so those three fall back exactly as they would without ``mmcv.ops`` (CCNet and PSANet stay
unavailable: dcbench does not use them). It is installed by :func:`dcbench.compat.ensure_mmcv_ops`
only when the real ``mmcv.ops`` cannot be imported.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

#: the names this stand-in provides (everything else is "not installed")
PROVIDED: tuple[str, ...] = ("point_sample", "sigmoid_focal_loss")
#: marks the stand-in, so callers can tell it from the real package
IS_DCBENCH_STANDIN = True


def point_sample(input: Tensor, points: Tensor, align_corners: bool = False, **kwargs: Any) -> Tensor:  # noqa: A002
    """mmcv's ``point_sample``: ``grid_sample`` at points given in ``[0, 1] x [0, 1]``.

    Args:
        input: feature map N x C x H x W.
        points: N x P x 2 or N x Hg x Wg x 2, (x, y) normalised to [0, 1].
        align_corners: as in :func:`torch.nn.functional.grid_sample`.

    Returns:
        N x C x P (3-d ``points``) or N x C x Hg x Wg.
    """
    flat = points.dim() == 3
    grid = points.unsqueeze(2) if flat else points
    out = F.grid_sample(input, 2.0 * grid - 1.0, align_corners=align_corners, **kwargs)
    return out.squeeze(3) if flat else out


def sigmoid_focal_loss(input: Tensor, target: Tensor, gamma: float = 2.0, alpha: float = 0.25,  # noqa: A002
                       weight: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """mmcv's ``sigmoid_focal_loss`` (its CUDA kernel's formula, differentiated by autograd).

    Args:
        input: logits N x C.
        target: N class indices (int64); a value outside ``[0, C)`` (mmseg uses ``C``) means no
            class is positive.
        gamma, alpha: the focal-loss parameters.
        weight: optional per-class weights (C), applied by each row's target class.
        reduction: 'none' (N x C), 'mean' (sum / N, as mmcv) or 'sum'.
    """
    if target.dtype != torch.long or input.dim() != 2 or target.dim() != 1 or input.size(0) != target.size(0):
        raise ValueError("sigmoid_focal_loss expects N x C logits and N int64 targets")
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be none, mean or sum, got {reduction!r}")
    n_classes = input.size(1)
    has_class = (target >= 0) & (target < n_classes)
    index = torch.where(has_class, target, torch.full_like(target, n_classes))  # n_classes: no positive
    positive = F.one_hot(index, n_classes + 1)[:, :n_classes].to(input.dtype)
    p = input.sigmoid()
    tiny = torch.finfo(input.dtype).tiny  # the kernel clamps the logs at FLT_MIN
    term_p = (1 - p).pow(gamma) * p.clamp(min=tiny).log()
    term_n = p.pow(gamma) * (1 - p).clamp(min=tiny).log()
    loss = -alpha * positive * term_p - (1 - alpha) * (1 - positive) * term_n
    if weight is not None:
        # the kernel multiplies each row by weight[target]; a "no class" row keeps weight 1
        per_row = torch.where(has_class, weight[index.clamp(max=n_classes - 1)], torch.ones_like(weight[:1]))
        loss = loss * per_row.unsqueeze(1)
    if reduction == "mean":
        return loss.sum() / input.size(0)
    return loss.sum() if reduction == "sum" else loss


def __getattr__(name: str) -> Any:
    """Any other op is reported as not installed: ``ModuleNotFoundError`` is what mmseg's
    optional imports catch (dunder look-ups get the usual AttributeError)."""
    if name.startswith("__") and name.endswith("__"):
        raise AttributeError(name)
    raise ModuleNotFoundError(f"mmcv.ops.{name} needs the compiled mmcv (mmcv-lite has no mmcv.ops; dcbench "
                              f"provides only {', '.join(PROVIDED)}); install the full mmcv for it",
                              name=f"mmcv.ops.{name}")
