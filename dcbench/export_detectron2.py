"""Export a ResNet backbone to detectron2's checkpoint format.

detectron2 reads a pickle ``{"model": {name: numpy array}, "__author__": ...,
"matching_heuristics": True}``; with ``matching_heuristics`` its checkpointer matches these
names to the model by suffix, so ``res5.*`` reaches the C4 RoI head and ``stem.*`` /
``res2..res4.*`` the backbone. The renaming is the one of detectron2's
``tools/convert-torchvision-to-d2.py``, for torchvision's ResNet layout (timm's standard
ResNets share it):

====================================  =========================================
torchvision / timm                    detectron2
====================================  =========================================
``conv1.weight``                      ``stem.conv1.weight``
``bn1.{weight,bias,running_*}``       ``stem.conv1.norm.*``
``layer{i}.{b}.conv{k}.weight``       ``res{i+1}.{b}.conv{k}.weight``
``layer{i}.{b}.bn{k}.*``              ``res{i+1}.{b}.conv{k}.norm.*``
``layer{i}.{b}.downsample.0.weight``  ``res{i+1}.{b}.shortcut.weight``
``layer{i}.{b}.downsample.1.*``       ``res{i+1}.{b}.shortcut.norm.*``
====================================  =========================================

Unlike the detectron2 tool, the classifier (``fc.*``) and the ``num_batches_tracked``
counters are left out (detectron2's ResNet has neither; they would only be reported as
unused), and any other key is an error rather than passed through, so a ResNet variant
whose layout differs (deep stem, average-pool shortcut, attention blocks) is refused
instead of exported half-matched.

Use the file in detectron2 with the torchvision conventions (RGB input, std-normalised,
stride in the 3x3 conv)::

    MODEL.WEIGHTS: out.pkl
    MODEL.PIXEL_MEAN: [123.675, 116.280, 103.530]
    MODEL.PIXEL_STD: [58.395, 57.120, 57.375]
    MODEL.RESNETS.STRIDE_IN_1X1: False
    MODEL.RESNETS.DEPTH: 50
    INPUT.FORMAT: RGB
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import torch

from dcbench.checkpoint import LoadedCheckpoint
from dcbench.detectron2_names import to_detectron2
from dcbench.errors import CheckpointError
from dcbench.fileio import atomic_write

AUTHOR = "dcbench"
#: detectron2 config values that match an exported torchvision-convention ResNet
DETECTRON2_CONFIG = {"MODEL.PIXEL_MEAN": [123.675, 116.280, 103.530], "MODEL.PIXEL_STD": [58.395, 57.120, 57.375],
                     "MODEL.RESNETS.STRIDE_IN_1X1": False, "INPUT.FORMAT": "RGB"}
_DROPPED = re.compile(r"(fc\.(weight|bias)|.*num_batches_tracked)")
#: blocks per stage -> detectron2's RESNETS.DEPTH (bottleneck ResNets)
DEPTHS = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}


def detectron2_key(key: str) -> str | None:
    """The detectron2 name of a torchvision-layout ResNet key; None for keys detectron2 has no
    use for (``fc.*``, ``num_batches_tracked``). Raises CheckpointError for any other key."""
    if _DROPPED.fullmatch(key):
        return None
    name = to_detectron2(key)
    if name is not None:
        return name
    raise CheckpointError(f"cannot export {key!r} to detectron2: only the torchvision ResNet layout "
                          f"(conv1/bn1/layer1-4 with bn1-3 and downsample.0/1) has a detectron2 equivalent")


def _resnet_state_dict(loaded: LoadedCheckpoint) -> dict[str, torch.Tensor]:
    backbone = loaded.backbone
    if backbone.family != "resnet":
        raise CheckpointError(f"{backbone.arch} is not a ResNet; the detectron2 export supports ResNets "
                              f"(tv:resnet*, timm ResNets); use --to dcbench")
    if backbone.has_sobel:
        raise CheckpointError(f"{backbone.arch} has a Sobel front end, which detectron2's ResNet lacks; "
                              f"use --to dcbench")
    return {k[len("model."):]: v for k, v in backbone.backbone_state_dict().items() if k.startswith("model.")}


def detectron2_state_dict(loaded: LoadedCheckpoint) -> dict[str, np.ndarray]:
    """The backbone's weights renamed for detectron2 (see the module docstring), as numpy arrays."""
    out = {}
    for key, tensor in _resnet_state_dict(loaded).items():
        name = detectron2_key(key)
        if name is not None:
            out[name] = tensor.detach().cpu().numpy().copy()
    return out


def resnet_depth(model: dict[str, np.ndarray]) -> int | None:
    """detectron2's RESNETS.DEPTH of an exported bottleneck ResNet (None when not one of 50/101/152)."""
    blocks = tuple(1 + max((int(k.split(".")[1]) for k in model if k.startswith(f"res{s}.")), default=-1)
                   for s in range(2, 6))
    bottleneck = "res2.0.conv3.weight" in model
    return DEPTHS.get(blocks) if bottleneck else None


def export_detectron2(loaded: LoadedCheckpoint, dst: Path) -> Path:
    """Write ``loaded``'s ResNet to ``dst`` as a detectron2 checkpoint (pickle, written
    atomically); raises CheckpointError for other architectures or a Sobel front end."""
    record = {"model": detectron2_state_dict(loaded), "__author__": AUTHOR, "matching_heuristics": True}
    dst = Path(dst)
    atomic_write(dst, lambda f: pickle.dump(record, f, protocol=pickle.HIGHEST_PROTOCOL), fsync=True)
    return dst
