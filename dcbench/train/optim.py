"""DeepCluster-v2's optimiser and schedule: SGD wrapped in LARC, linear warm-up then cosine.

Both follow facebookresearch/swav ``main_deepclusterv2.py``, which wraps ``torch.optim.SGD`` in
apex's ``LARC(trust_coefficient=0.001, clip=False)`` and sets the learning rate of every
iteration from a precomputed warm-up + cosine array. The ``clip`` and ``exclude_1d`` options
give the LARS of solo-learn's small-image recipes (``solo/utils/lars.py``: ``clip_lars_lr``,
``exclude_bias_n_norm_lars``). Written here from those descriptions.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch

#: LARC's epsilon in the adaptive-rate denominator (apex's default)
LARC_EPS = 1e-8


class LARC(torch.optim.SGD):
    """SGD with LARC's layer-wise adaptive rate (apex ``LARC``).

    Before each SGD step every parameter with a gradient and a non-zero weight and gradient
    norm gets ``grad <- (grad + wd * w) * rate`` with ``rate = trust * |w| / (|g| + wd * |w| + eps)``
    (``clip``: ``min(rate / lr, 1)``, so no layer steps faster than plain SGD); the SGD step then
    runs with weight decay 0 (it was folded into the gradient). A parameter whose weight or
    gradient norm is zero, or (``exclude_1d``) a bias or normalisation weight, takes a plain SGD
    step without weight decay, as in apex and solo-learn.
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, clip: bool = False, exclude_1d: bool = False) -> None:
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.trust_coefficient, self.clip, self.exclude_1d = trust_coefficient, clip, exclude_1d

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch.optim.Optimizer.step
        decays = []
        for group in self.param_groups:
            decay = group["weight_decay"]
            decays.append(decay)
            group["weight_decay"] = 0.0
            for p in group["params"]:
                if p.grad is None or (self.exclude_1d and p.ndim == 1):
                    continue
                w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(p.grad)
                if w_norm != 0 and g_norm != 0:
                    rate = self.trust_coefficient * w_norm / (g_norm + w_norm * decay + LARC_EPS)
                    if self.clip:
                        rate = torch.clamp(rate / group["lr"], max=1.0)
                    p.grad.add_(p, alpha=decay).mul_(rate)
        try:
            return super().step(closure)
        finally:
            for group, decay in zip(self.param_groups, decays):
                group["weight_decay"] = decay


def make_optimizer(kind: str, params: Iterable, lr: float, momentum: float, weight_decay: float,
                   trust: float, clip: bool = False, exclude_1d: bool = False) -> torch.optim.Optimizer:
    """``larc`` (the recipe) or plain ``sgd``, over ``params``."""
    if kind == "larc":
        return LARC(params, lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust,
                    clip=clip, exclude_1d=exclude_1d)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def warmup_cosine(iteration: int, iters_per_epoch: int, epochs: int, base_lr: float, final_lr: float,
                  warmup_epochs: int, start_warmup: float) -> float:
    """Learning rate of ``iteration``: linear from ``start_warmup`` to ``base_lr`` over the
    warm-up iterations (numpy.linspace's end-inclusive steps), then a cosine from ``base_lr``
    down to ``final_lr`` over the remaining ones. A run shorter than its warm-up stops part-way up
    the ramp and never decays, as facebookresearch/swav main_deepclusterv2.py's schedule (warm-up
    linspace, then a cosine over ``epochs - warmup_epochs`` epochs: none) gives it."""
    warmup = iters_per_epoch * warmup_epochs
    if iteration < warmup:
        return start_warmup + (base_lr - start_warmup) * iteration / max(1, warmup - 1)
    total = max(1, iters_per_epoch * (epochs - warmup_epochs))
    t = min(iteration - warmup, total)
    return final_lr + 0.5 * (base_lr - final_lr) * (1 + math.cos(math.pi * t / total))
