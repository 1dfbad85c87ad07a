"""Training configuration: every knob of the original DeepCluster, with the paper's defaults.

``dcbench train --data IMAGENET/train`` with no other flag reproduces the paper's recipe
(AlexNet + Sobel, k=10000, PCA-256 whitening + L2, 20 k-means iterations, SGD lr 0.05,
momentum 0.9, weight decay 1e-5, batch 256, 500 epochs, seed 31).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from dcbench.errors import UsageError


def _doc(text: str) -> dict:
    return {"help": text}


#: Settings ``dcbench train --resume`` accepts with a value other than the saved one: they say
#: how long the run goes (``epochs``: extend or stop a run), where it lives and runs (``out``,
#: ``device``: bit-exact resumption needs the same device) and how it uses the machine
#: (``workers``, ``feature_memmap_gb``, ``checkpoint_every``, ``snapshot_every``, ``strict``),
#: never what a step computes. Any other change is refused: the run would mix two recipes.
RESUME_MAY_CHANGE = frozenset({"epochs", "out", "device", "workers", "feature_memmap_gb", "checkpoint_every",
                               "snapshot_every", "strict"})


@dataclass
class TrainConfig:
    """Resolved training settings; saved as ``RUN_DIR/config.yaml``.

    On ``--resume`` the saved config.yaml and the resolved settings must agree on every field
    but those in :data:`RESUME_MAY_CHANGE` (e.g. raise ``epochs`` to extend a run, change
    ``workers`` or ``device``); see :func:`resume_conflicts`.
    """

    data: str = field(default="", metadata=_doc("training images: ImageFolder, folder of images, or a file list"))
    out: str = field(default="runs/deepcluster", metadata=_doc("run folder"))
    arch: str = field(default="alexnet", metadata=_doc("alexnet | vgg16 | timm:NAME | tv:NAME"))
    sobel: bool = field(default=True, metadata=_doc("fixed Sobel front end (the paper trains with it)"))
    image_size: int = field(default=224, metadata=_doc("training crop side (the paper: 224)"))
    clustering: Literal["kmeans", "pic"] = field(default="kmeans", metadata=_doc("kmeans or pic"))
    k: int = field(default=10000, metadata=_doc("number of k-means clusters"))
    pca_dim: int = field(default=256, metadata=_doc("PCA-whitening dimension before L2 and clustering"))
    pca_sample: int = field(default=100_000, metadata=_doc("rows the PCA is fitted on (all when fewer)"))
    kmeans_iters: int = field(default=20, metadata=_doc("k-means iterations per clustering"))
    pic_neighbors: int = field(default=5, metadata=_doc("PIC: neighbours in the graph"))
    pic_sigma: float = field(default=0.2, metadata=_doc("PIC: edge weight exp(-d/sigma^2)"))
    pic_alpha: float = field(default=0.001, metadata=_doc("PIC: teleport probability"))
    pic_iters: int = field(default=200, metadata=_doc("PIC: power iterations"))
    reassign: float = field(default=1.0, metadata=_doc("images drawn per clustering, as a multiple of N "
                                                        "(several passes per clustering on small data)"))
    epochs: int = field(default=500, metadata=_doc("clustering + training rounds (may change on --resume)"))
    batch_size: int = field(default=256, metadata=_doc("SGD batch size (per process under torchrun)"))
    lr: float = field(default=0.05, metadata=_doc("backbone SGD learning rate (constant)"))
    momentum: float = field(default=0.9, metadata=_doc("backbone SGD momentum"))
    weight_decay: float = field(default=1e-5, metadata=_doc("backbone weight decay"))
    top_lr: float = field(default=0.05, metadata=_doc("top layer SGD learning rate (no momentum)"))
    top_weight_decay: float = field(default=1e-5, metadata=_doc("top layer weight decay"))
    crop_scale: tuple[float, float] = field(default=(0.08, 1.0), metadata=_doc("RandomResizedCrop scale range"))
    seed: int = field(default=31, metadata=_doc("seed of everything (k-means uses seed + epoch)"))
    workers: int = field(default=4, metadata=_doc("data loader worker processes"))
    checkpoint_every: int = field(default=0, metadata=_doc("also checkpoint every N iterations (0: per epoch only)"))
    snapshot_every: int = field(default=50, metadata=_doc("keep weights in checkpoints/ every N epochs (0: never)"))
    strict: bool = field(default=False, metadata=_doc("stop at the first unreadable image instead of skipping it"))
    device: str = field(default="auto", metadata=_doc("auto | cpu | cuda | cuda:N"))
    amp: bool = field(default=False, metadata=_doc("mixed precision on CUDA (bfloat16 autocast)"))
    feature_memmap_gb: float = field(default=2.0, metadata=_doc("features larger than this go to a disk "
                                                                 "memmap in the run folder (deleted after use)"))

    def validate(self) -> None:
        """Raise UsageError for settings no run can use."""
        positive = {"k": self.k, "pca_dim": self.pca_dim, "kmeans_iters": self.kmeans_iters,
                    "epochs": self.epochs, "batch_size": self.batch_size, "image_size": self.image_size}
        for name, value in positive.items():
            if value < 1:
                raise UsageError(f"{name} must be at least 1, got {value}")
        if self.k < 2 and self.clustering == "kmeans":
            raise UsageError(f"k must be at least 2, got {self.k}")
        if self.reassign <= 0:
            raise UsageError(f"reassign must be positive, got {self.reassign}")
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise UsageError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        if self.lr <= 0 or self.top_lr <= 0:
            raise UsageError("lr and top_lr must be positive")


def resume_conflicts(saved: Mapping[str, Any], resolved: Mapping[str, Any]) -> list[str]:
    """Keys whose saved value differs from the resolved one, outside :data:`RESUME_MAY_CHANGE`.

    Both are plain dicts (``config.yaml`` and ``to_plain(TrainConfig)``); a key the saved
    config lacks (a file from a version without that setting) is not compared.
    """
    names = [f.name for f in fields(TrainConfig)]
    return [k for k in names if k not in RESUME_MAY_CHANGE and k in saved and saved[k] != resolved.get(k)]
