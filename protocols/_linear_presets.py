"""The linear-probe presets' numbers and schedules (``protocols/linear.py`` reads them): each
value with its source, as in the provenance card (``protocols/_sources_linear.py``)."""
from __future__ import annotations

import math
from collections.abc import Sequence

from dcbench.probe import ProbeOptim

# deepcluster eval_linear.sh: --wd -7 (10**-7); VISSL configs: weight_decay 0.0005; dino eval_linear.py: 0;
# moco-v3 main_lincls.py --wd default 0.
PRESET_WEIGHT_DECAY = {"deepcluster": 1e-7, "vissl": 5e-4, "dino": 0.0, "mocov3": 0.0}
# eval_linear.sh --lr 0.01; VISSL base_value 0.01; dino eval_linear.py --lr 0.001 (for batch 256); moco-v3
# CONFIG.md ViT linear classification --lr=3 (base lr for batch 256: init_lr = lr * batch_size / 256)
PRESET_LR = {"deepcluster": 0.01, "vissl": 0.01, "dino": 0.001, "mocov3": 3.0}
# eval_linear.sh --tencrops; VISSL TEST TRANSFORMS, dino and moco-v3 val: Resize 256, CenterCrop 224
PRESET_CROPS = {"deepcluster": "tencrop", "vissl": "center", "dino": "center", "mocov3": "center"}
# eval_linear.py transformations_train has CenterCrop(256); VISSL's TRAIN TRANSFORMS do not; dino and moco-v3
# train on RandomResizedCrop(224) (no Resize + RandomCrop at all: train_center_crop does not apply)
PRESET_TRAIN_CENTER_CROP = {"deepcluster": True, "vissl": False, "dino": False, "mocov3": False}
# torch's default Linear init (deepcluster RegLog, vissl mlp.py); dino LinearClassifier and moco-v3
# main_lincls.py (weight.data.normal_(mean=0.0, std=0.01), bias zero_()): N(0, 0.01), bias 0
PRESET_HEAD_INIT = {"deepcluster": "torch", "vissl": "torch", "dino": "normal", "mocov3": "normal"}
# torchvision's default Resize (bilinear) in deepcluster / vissl / moco-v3; dino: Resize(256, interpolation=3)
PRESET_INTERPOLATION = {"deepcluster": "bilinear", "vissl": "bilinear", "dino": "bicubic", "mocov3": "bilinear"}
#: presets training on RandomResizedCrop + flip with a per-epoch cosine lr (DINO's and MoCo v3's probes)
RRC_PRESETS = ("dino", "mocov3")
#: the training view recorded in ``extra.train_crops`` (by train_center_crop; RRC_PRESETS by preset)
TRAIN_CROPS = {True: "Resize, CenterCrop, RandomCrop, flip", False: "Resize, RandomCrop, flip",
               "rrc": "RandomResizedCrop, flip"}
# VISSL milestones [8, 16, 24] of 28 epochs (ImageNet), [4, 8, 12] of 14 (Places205)
VISSL_STEP_FRACTIONS = (8 / 28, 16 / 28, 24 / 28)
TEN_CROPS = 10


# ----------------------------------------------------------------------------- lr schedules
def deepcluster_lr(lr0: float, weight_decay: float, t: int) -> float:
    """DeepCluster's probe schedule: ``lr0 / sqrt(1 + lr0 * wd * t)``, t = iteration (from 0)."""
    return lr0 / math.sqrt(1.0 + lr0 * weight_decay * t)


def vissl_steps(epochs: int) -> list[int]:
    """Epochs at which the vissl preset multiplies lr by 0.1: 8/16/24 of 28, the same fractions
    (rounded) for other lengths (14 -> 4/8/12).

    Strictly increasing and within [1, epochs - 1]: a step rounding to 0 would only be a smaller
    lr0, one at ``epochs`` or later never applies, and two fractions rounding to the same epoch
    count once (2 epochs: [1], not [1, 1, 2]).
    """
    return sorted({s for s in (round(f * epochs) for f in VISSL_STEP_FRACTIONS) if 0 < s < epochs})


def dino_lr(lr0: float, epoch: int, epochs: int) -> float:
    """DINO's ``CosineAnnealingLR(optimizer, epochs, eta_min=0)`` stepped once per epoch:
    ``lr0 * (1 + cos(pi * epoch / epochs)) / 2``."""
    return lr0 * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def vissl_lr(lr0: float, epoch: int, steps: Sequence[int]) -> float:
    """lr at ``epoch`` (from 0): ``lr0 * 0.1 ** (number of steps <= epoch)``."""
    return lr0 * 0.1 ** sum(1 for s in steps if epoch >= s)


def probe_optim(preset: str, lr: float, weight_decay: float, momentum: float, steps: Sequence[int],
                head_init: str = "torch", epochs: int = 1) -> ProbeOptim:
    """The heads and SGD of ``preset``: DeepCluster's RegLog (Linear, 1/sqrt decay per
    iteration), VISSL's eval_mlp (BatchNorm2d + Linear, step decay per epoch) or DINO's
    LinearClassifier / MoCo v3's main_lincls.py (Linear, cosine decay per epoch over ``epochs``); ``head_init=normal``:
    N(0, 0.01) weights, zero bias, else torch's default init."""
    init_std = 0.01 if head_init == "normal" else None
    if preset in RRC_PRESETS:  # moco-v3 main_lincls.py adjust_learning_rate: the same cosine, per epoch
        return ProbeOptim(lr, weight_decay, momentum, lambda epoch, _t, _wd: dino_lr(lr, epoch, epochs),
                          init_std=init_std)
    if preset == "vissl":
        return ProbeOptim(lr, weight_decay, momentum, lambda epoch, _t, _wd: vissl_lr(lr, epoch, steps),
                          batchnorm=True, init_std=init_std)
    return ProbeOptim(lr, weight_decay, momentum, lambda _epoch, t, wd: deepcluster_lr(lr, wd, t), init_std=init_std)
