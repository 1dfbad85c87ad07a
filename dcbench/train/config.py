"""Training configuration: every knob of DeepCluster (v1) and DeepCluster-v2, with their recipes' defaults.

``dcbench train --data IMAGENET/train`` with no other flag reproduces the DeepCluster paper's recipe
(AlexNet + Sobel, k=10000, PCA-256 whitening + L2, 20 k-means iterations, SGD lr 0.05,
momentum 0.9, weight decay 1e-5, batch 256, 500 epochs, seed 31). ``--method deepcluster-v2``
reproduces the SwAV repository's DeepCluster-v2 recipe (facebookresearch/swav
``main_deepclusterv2.py`` with ``scripts/deepclusterv2_800ep_pretrain.sh``); each field's help
names its source. ``--preset small-data`` replaces some defaults by values computed from the
number of images (:mod:`dcbench.train.presets`).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dcbench.env import DEFAULT_BUDGET_GB, default_workers
from dcbench.errors import UsageError

METHODS = ("deepcluster", "deepcluster-v2")
PRESETS = ("paper", "small-data")
#: where the v2 defaults come from (facebookresearch/swav)
SWAV = "swav main_deepclusterv2.py"
SWAV_800 = "swav scripts/deepclusterv2_800ep_pretrain.sh"
SWAV_CROPS = "swav src/multicropdataset.py"


def _doc(text: str) -> dict:
    return {"help": text}


#: Settings ``dcbench train --resume`` accepts with a value other than the saved one: they say
#: how long the run goes (``epochs``: extend or stop a run), where it lives and runs (``out``,
#: ``device``: bit-exact resumption needs the same device) and how it uses the machine
#: (``workers``, ``feature_memmap_gb``, ``decode_cache_gb``, ``checkpoint_every``, ``snapshot_every``, ``strict``),
#: never what a step computes. Any other change is refused: the run would mix two recipes.
#: (DeepCluster-v2's learning-rate schedule depends on ``epochs``: extending a v2 run
#: stretches the rest of its cosine.)
RESUME_MAY_CHANGE = frozenset({"epochs", "out", "device", "workers", "feature_memmap_gb", "checkpoint_every",
                               "snapshot_every", "strict", "dist_timeout_min", "decode_cache_gb"})


@dataclass
class _RunSettings:
    """Settings every training method shares (where the run lives, how it uses the machine)."""

    data: str = field(default="", metadata=_doc("training images: ImageFolder, folder of images, or a file list"))
    out: str = field(default="runs/deepcluster", metadata=_doc("run folder"))
    method: str = field(default="deepcluster", metadata=_doc("deepcluster (v1, ECCV 2018) | deepcluster-v2"))
    preset: Literal["paper", "small-data"] = field(default="paper", metadata=_doc(
        "paper: the published recipe; small-data: batch, lr, epochs, k/prototypes (and PCA for v1) "
        "computed from the number of images (README, Training)"))
    seed: int = field(default=31, metadata=_doc("seed of everything (k-means uses seed + epoch)"))
    workers: int = field(default_factory=default_workers, metadata=_doc(
        "data loader worker processes (default: usable cores / processes on the node, at most 8)"))
    checkpoint_every: int = field(default=0, metadata=_doc("also checkpoint every N iterations (0: per epoch only)"))
    snapshot_every: int = field(default=50, metadata=_doc("keep weights in checkpoints/ every N epochs (0: never)"))
    strict: bool = field(default=False, metadata=_doc("stop at the first unreadable image instead of skipping it"))
    device: str = field(default="auto", metadata=_doc("auto | cpu | cuda | cuda:N"))
    amp: bool = field(default=False, metadata=_doc(
        "bfloat16 autocast (mixed precision) on CUDA and on the CPU; changes the numbers. Faster on CPUs with "
        "AVX512-BF16/AMX (see dcbench doctor) and on GPUs with bfloat16 (compute capability >= 8.0)"))
    dist_timeout_min: float = field(default=120.0, metadata=_doc(
        "torchrun: minutes a process waits in a collective before the job fails (the others wait while "
        "rank 0 alone clusters; torch's default is 10)"))
    decode_cache_gb: float = field(default=DEFAULT_BUDGET_GB, metadata=_doc(
        "keep the decoded images (uint8) in memory when they fit this many GB (capped at half the available "
        "memory): each image is decoded once per run instead of every epoch (v1: twice); same pixels; 0: off"))

    def _check_common(self) -> None:
        """Checks of the fields every method's class declares (epochs, batch, crops)."""
        if self.preset not in PRESETS:
            raise UsageError(f"bad preset {self.preset!r}: choose one of {', '.join(PRESETS)}")
        if not self.dist_timeout_min > 0:
            raise UsageError(f"dist_timeout_min must be positive, got {self.dist_timeout_min}")
        if self.decode_cache_gb < 0:
            raise UsageError(f"decode_cache_gb must be >= 0 (0: off), got {self.decode_cache_gb}")
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "image_size": self.image_size}
        for name, value in positive.items():
            if value < 1:
                raise UsageError(f"{name} must be at least 1, got {value}")
        # a negative period would pass ``n % period == 0`` on its own schedule, silently
        counts = {"workers": "0: load in the main process", "checkpoint_every": "0: per epoch only",
                  "snapshot_every": "0: never"}
        for name, zero in counts.items():
            if getattr(self, name) < 0:
                raise UsageError(f"{name} must be >= 0 ({zero}), got {getattr(self, name)}")
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise UsageError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")


@dataclass
class TrainConfig(_RunSettings):
    """DeepCluster (v1) settings; saved as ``RUN_DIR/config.yaml``.

    On ``--resume`` the saved config.yaml and the resolved settings must agree on every field
    but those in :data:`RESUME_MAY_CHANGE` (e.g. raise ``epochs`` to extend a run, change
    ``workers`` or ``device``); see :func:`resume_conflicts`.
    """

    method: Literal["deepcluster"] = field(default="deepcluster", metadata=_doc(
        "deepcluster (v1, ECCV 2018; this list) | deepcluster-v2 (see --method deepcluster-v2 --list-settings)"))
    arch: str = field(default="alexnet", metadata=_doc("alexnet | vgg16 | timm:NAME | tv:NAME"))
    sobel: bool = field(default=True, metadata=_doc("fixed Sobel front end (the paper trains with it)"))
    image_size: int = field(default=224, metadata=_doc("training crop side (the paper: 224)"))
    clustering: Literal["kmeans", "pic"] = field(default="kmeans", metadata=_doc("kmeans or pic"))
    k: int = field(default=10000, metadata=_doc("number of k-means clusters"))
    pca_dim: int = field(default=256, metadata=_doc("PCA-whitening dimension before L2 and clustering"))
    pca_sample: int = field(default=0, metadata=_doc(
        "rows the PCA is fitted on: 0 = every row (the original's faiss PCAMatrix; a streamed covariance keeps "
        "memory at D x D), N = a random sample of N rows (faster; the whitening moves)"))
    pca_eps: float = field(default=0.0, metadata=_doc(
        "added to each eigenvalue before whitening: 0 as faiss PCAMatrix(eigen_power=-0.5) in the original "
        "code (components of exactly zero eigenvalue are dropped); dcbench before 2026-12 used 1e-5"))
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
    feature_memmap_gb: float = field(default=2.0, metadata=_doc("features larger than this go to a disk "
                                                                 "memmap in the run folder (deleted after use)"))
    channels_last: bool = field(default=False, metadata=_doc(
        "feed the network channels-last batches (oneDNN/cuDNN then pick channels-last kernels: faster on some "
        "machines, mostly with amp; last-bit differences in the numbers)"))

    def validate(self) -> None:
        """Raise UsageError for settings no run can use."""
        self._check_common()
        positive = {"k": self.k, "pca_dim": self.pca_dim, "kmeans_iters": self.kmeans_iters}
        for name, value in positive.items():
            if value < 1:
                raise UsageError(f"{name} must be at least 1, got {value}")
        if self.k < 2 and self.clustering == "kmeans":
            raise UsageError(f"k must be at least 2, got {self.k}")
        if self.pca_sample < 0 or self.pca_eps < 0:
            raise UsageError(f"pca_sample and pca_eps must be >= 0, got {self.pca_sample} and {self.pca_eps}")
        if self.reassign <= 0:
            raise UsageError(f"reassign must be positive, got {self.reassign}")
        if self.lr <= 0 or self.top_lr <= 0:
            raise UsageError("lr and top_lr must be positive")
        _non_negative(self, "momentum", "weight_decay", "top_weight_decay")
        if self.pic_sigma <= 0 or not 0 <= self.pic_alpha <= 1 or min(self.pic_neighbors, self.pic_iters) < 1:
            raise UsageError(f"PIC needs pic_sigma > 0, 0 <= pic_alpha <= 1, pic_neighbors and pic_iters >= 1; got "
                             f"{self.pic_sigma}, {self.pic_alpha}, {self.pic_neighbors}, {self.pic_iters}")


@dataclass
class DCv2Config(_RunSettings):
    """DeepCluster-v2 settings (Caron et al., SwAV paper, NeurIPS 2020, appendix); defaults are the
    SwAV repository's 800-epoch recipe, each help text names the file it comes from.

    Batch size and learning rate are per process as in the recipe, which ran 64 processes
    (64 x 64 = 4096 images per step): with fewer processes, scale ``lr`` with the total batch
    (``--preset small-data`` does).
    """

    out: str = field(default="runs/deepcluster-v2", metadata=_doc("run folder"))
    method: Literal["deepcluster-v2"] = field(default="deepcluster-v2", metadata=_doc(
        "deepcluster-v2 (this list) | deepcluster (v1, see --list-settings without --method)"))
    arch: str = field(default="tv:resnet50", metadata=_doc(
        f"alexnet | vgg16 | timm:NAME | tv:NAME ({SWAV_800}: resnet50)"))
    sobel: bool | None = field(default=None, metadata=_doc(
        "fixed Sobel front end; None: the arch's default (on for DeepCluster's alexnet/vgg16, off otherwise)"))
    image_size: int = field(default=224, metadata=_doc(f"side of the large crops ({SWAV_800}: size_crops 224)"))
    large_crops: int = field(default=2, metadata=_doc(
        f"large crops per image; all of them feed the memory bank ({SWAV_800}: nmb_crops 2, crops_for_assign 0 1)"))
    small_crops: int = field(default=6, metadata=_doc(f"small crops per image ({SWAV_800}: nmb_crops 6)"))
    small_crop_size: int = field(default=0, metadata=_doc(
        f"side of the small crops; 0: round(image_size * 96 / 224) ({SWAV_800}: size_crops 96). Backbones whose "
        "fc layers fix the input size (DeepCluster's alexnet/vgg16) get them resized to image_size"))
    crop_scale: tuple[float, float] = field(default=(0.14, 1.0), metadata=_doc(
        f"RandomResizedCrop scale of the large crops ({SWAV_800}: min/max_scale_crops 0.14 1)"))
    small_crop_scale: tuple[float, float] = field(default=(0.05, 0.14), metadata=_doc(
        f"RandomResizedCrop scale of the small crops ({SWAV_800}: 0.05 0.14)"))
    color_jitter: float = field(default=1.0, metadata=_doc(
        f"colour distortion strength s: ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) with p 0.8, grey p 0.2 ({SWAV_CROPS})"))
    blur_p: float = field(default=0.5, metadata=_doc(
        f"Gaussian blur probability, radius U(0.1, 2) ({SWAV_CROPS}: PILRandomGaussianBlur)"))
    feat_dim: int = field(default=128, metadata=_doc(f"projection output size, L2-normalised ({SWAV}: feat_dim)"))
    hidden_mlp: int = field(default=2048, metadata=_doc(
        f"projection head Linear-BN-ReLU-Linear hidden size ({SWAV}: hidden_mlp)"))
    prototypes: list[int] = field(default_factory=lambda: [3000, 3000, 3000], metadata=_doc(
        f"k-means heads and their prototypes ({SWAV_800}: nmb_prototypes 3000 3000 3000)"))
    temperature: float = field(default=0.1, metadata=_doc(f"softmax temperature of the loss ({SWAV_800})"))
    kmeans_iters: int = field(default=10, metadata=_doc(
        f"spherical k-means iterations on the memory bank per epoch ({SWAV}: cluster_memory nmb_kmeans_iters)"))
    epochs: int = field(default=800, metadata=_doc(f"epochs ({SWAV_800}; may change on --resume)"))
    batch_size: int = field(default=64, metadata=_doc(f"batch per process ({SWAV_800}: 64 on 64 GPUs)"))
    optimizer: Literal["larc", "sgd"] = field(default="larc", metadata=_doc(
        f"larc: SGD wrapped in LARC, trust 0.001, no clipping ({SWAV}); sgd: plain SGD"))
    larc_trust: float = field(default=0.001, metadata=_doc(f"LARC trust coefficient ({SWAV})"))
    larc_clip: bool = field(default=False, metadata=_doc(
        f"clip LARC's rate at the learning rate ({SWAV}: clip=False; solo-learn's CIFAR recipe: clip_lr)"))
    larc_exclude_1d: bool = field(default=False, metadata=_doc(
        f"biases and BN weights skip LARC and weight decay ({SWAV}: no; solo-learn's CIFAR recipe: exclude_bias_n_norm)"))
    lr: float = field(default=4.8, metadata=_doc(f"base learning rate ({SWAV_800}: base_lr)"))
    final_lr: float = field(default=0.0048, metadata=_doc(f"end of the cosine schedule ({SWAV_800}: final_lr)"))
    warmup_epochs: int = field(default=10, metadata=_doc(f"linear warm-up epochs ({SWAV_800})"))
    start_warmup: float = field(default=0.3, metadata=_doc(f"learning rate at the start of warm-up ({SWAV_800})"))
    momentum: float = field(default=0.9, metadata=_doc(f"SGD momentum ({SWAV})"))
    weight_decay: float = field(default=1e-6, metadata=_doc(f"weight decay ({SWAV_800}: wd)"))
    freeze_prototypes_iters: int = field(default=300_000, metadata=_doc(
        f"prototypes get no gradient for this many iterations; they are the k-means centroids, set every "
        f"epoch ({SWAV_800}: freeze_prototypes_niters 300000, longer than the run)"))
    sync_bn: bool = field(default=True, metadata=_doc(
        f"SyncBatchNorm under torchrun on CUDA ({SWAV_800}: sync_bn; gloo/CPU runs keep per-process BN)"))

    def validate(self) -> None:
        """Raise UsageError for settings no run can use."""
        self._check_common()
        if self.large_crops < 1 or self.small_crops < 0:
            raise UsageError("large_crops must be >= 1 and small_crops >= 0")
        if not self.prototypes or min(self.prototypes) < 2:
            raise UsageError(f"prototypes must list at least one head of at least 2, got {self.prototypes}")
        low, high = self.small_crop_scale
        if not 0 < low <= high <= 1:
            raise UsageError(f"small_crop_scale must satisfy 0 < low <= high <= 1, got {self.small_crop_scale}")
        for name in ("feat_dim", "hidden_mlp", "kmeans_iters"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.temperature <= 0 or self.lr <= 0:
            raise UsageError("temperature and lr must be positive")
        if self.warmup_epochs < 0 or self.small_crop_size < 0:
            raise UsageError("warmup_epochs and small_crop_size must be >= 0")
        _non_negative(self, "momentum", "weight_decay", "final_lr", "start_warmup", "larc_trust")
        # ColorJitter's hue is 0.2 s and torchvision takes a hue of at most 0.5
        if not 0 <= self.color_jitter <= 2.5 or not 0 <= self.blur_p <= 1:
            raise UsageError(f"color_jitter must be within [0, 2.5] and blur_p within [0, 1], got {self.color_jitter} "
                             f"and {self.blur_p}")

    def small_size(self) -> int:
        """Side of the small crops (``small_crop_size``, or the recipe's 96/224 of ``image_size``)."""
        return self.small_crop_size or max(1, round(self.image_size * 96 / 224))


AnyTrainConfig = TrainConfig | DCv2Config


def config_class(method: str) -> type[TrainConfig] | type[DCv2Config]:
    """The settings class of ``method`` (``deepcluster`` or ``deepcluster-v2``)."""
    if method == "deepcluster":
        return TrainConfig
    if method == "deepcluster-v2":
        return DCv2Config
    raise UsageError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")


def _non_negative(cfg: Any, *names: str) -> None:
    """UsageError naming the first of ``names`` below 0 (torch's SGD would fail mid-setup otherwise)."""
    for name in names:
        if getattr(cfg, name) < 0:
            raise UsageError(f"{name} must be >= 0, got {getattr(cfg, name)}")


def resume_conflicts(saved: Mapping[str, Any], resolved: Mapping[str, Any]) -> list[str]:
    """Keys whose saved value differs from the resolved one, outside :data:`RESUME_MAY_CHANGE`.

    Both are plain dicts (``config.yaml`` and ``to_plain(config)``); a key the saved config
    lacks (a file from a version without that setting) is not compared.
    """
    return [k for k in resolved if k not in RESUME_MAY_CHANGE and k in saved
            and _comparable(k, saved[k]) != _comparable(k, resolved[k])]


def absolute_data(data: str) -> str:
    """``data`` as an absolute path when it names an existing file or folder (else unchanged).

    config.yaml and the checkpoints record it so: ``dcbench train --resume --out RUN`` reads the
    data from there, and a path relative to the folder the run was started in would name
    nothing (or other images) from any other working directory."""
    path = Path(str(data)).expanduser()
    return os.path.abspath(path) if str(data) and path.exists() else str(data)


def _comparable(key: str, value: Any) -> Any:
    """``data`` compared as the absolute path it names (a run saved with a relative path resumes
    from the folder it was started in with either form; newer runs save the absolute one)."""
    return absolute_data(value) if key == "data" and isinstance(value, str) else value
