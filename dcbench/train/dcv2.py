"""DeepCluster-v2 (Caron et al., SwAV paper, NeurIPS 2020, appendix), one epoch in named phases:

    (epoch 0 only) fill the memory bank: projections of every image's large crops
    -> cluster the bank: per head, spherical k-means (``kmeans_iters``) on the bank of one
       large crop (heads take the crops in turn); the head's prototypes := the centroids
    -> train one pass (multi-crop views; every view of an image is trained to predict its
       assignment: cross-entropy of cosine(projection, prototypes) / temperature, averaged
       over heads; prototypes get no gradient), writing this epoch's projections of the large
       crops into the bank for the next clustering
    -> log -> checkpoint

As facebookresearch/swav ``main_deepclusterv2.py``: the projection head is Linear-BN-ReLU-Linear
on the backbone's clustering feature (the pooled last stage; fc7 pre-ReLU for DeepCluster's
AlexNet/VGG16, whose dropout is switched off: see :func:`switch_off_dropout`), outputs are L2-normalised, images absent from the previous epoch's bank
(unreadable, or dropped as the last incomplete batch) are ignored by the loss, and the
learning rate follows a warm-up + cosine schedule per iteration (LARC by default). Unlike the
original, k-means runs on rank 0 over the gathered bank (same algorithm, one process).

Resuming is exact on the CPU: views are a pure function of (seed, epoch, position), and the
checkpoint carries the bank, the epoch's assignments, the head, the optimiser and every RNG.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from dcbench.checkpoint import atomic_save, checkpoint_record
from dcbench.cluster import nmi, spherical_kmeans
from dcbench.data import ImageDataset, WaitedBatches, decoded_in_memory, open_training_data
from dcbench.data.seeded import read_seeded
from dcbench.errors import DcbenchError
from dcbench.models import CLUSTER_TAP, Backbone, build_backbone
from dcbench.settings import to_plain
from dcbench.train.common import (EpochState, add_seconds, augmentation_seeds, autocast, check_finite_features,
                                  check_finite_loss, finish_epoch, format_phase_times, freeze_foreign_heads,
                                  freeze_unreached, open_run, phase_times, progress, rank_states, read_train_state,
                                  restore_rank_state, run_epochs, warn_recipe, wrap_ddp)
from dcbench.train.config import DCv2Config
from dcbench.train.distributed import (DistInfo, all_agree, all_reduce_sum, barrier, broadcast_from_main,
                                       gather_to_main, main_rank_threads)
from dcbench.train.multicrop import collate_views, multicrop_transform
from dcbench.train.optim import make_optimizer, warmup_cosine
from dcbench.train.rundir import RunDir

log = logging.getLogger("dcbench")


class DCv2Net(nn.Module):
    """Backbone + projection head (Linear-BN-ReLU-Linear, L2-normalised) + one prototype layer per head."""

    def __init__(self, backbone: Backbone, hidden: int, out_dim: int, prototypes: list[int]) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection = nn.Sequential(nn.Linear(backbone.feature_dim, hidden), nn.BatchNorm1d(hidden),
                                        nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))
        self.prototypes = nn.ModuleList(nn.Linear(out_dim, k, bias=False) for k in prototypes)

    def forward(self, groups: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``groups``: views of one size each, batched; returns (unit projections, scores per head)."""
        features = torch.cat([self.backbone(x, taps=[CLUSTER_TAP])[CLUSTER_TAP] for x in groups])
        z = F.normalize(self.projection(features.flatten(1)), dim=1, p=2)
        return z, [p(z) for p in self.prototypes]

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """Projection and prototypes (the backbone goes into the checkpoint's own state_dict)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}


@dataclass
class V2State(EpochState):
    """:class:`EpochState` plus the memory bank (``assignments`` is heads x N here)."""

    bank: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # large crops x N x feat_dim
    filled: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))  # rows written this epoch


@dataclass
class V2Trainer:
    """Everything one DeepCluster-v2 run holds."""

    cfg: DCv2Config
    dist: DistInfo
    run: RunDir
    net: DCv2Net
    optimizer: torch.optim.Optimizer
    images: ImageDataset  # transform: the multi-crop views (uint8 pixels)
    bank_images: ImageDataset  # transform: the large views only (the bank's first fill; uint8 pixels)
    state: V2State
    iters_per_epoch: int
    #: per view position, ToTensor's scaling + Normalize of a uint8 batch (MultiCrop.uint8_views)
    finish_views: list[Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=list)


# ----------------------------------------------------------------------------- the loop
def train(cfg: DCv2Config, resume: bool = False) -> Path:
    """Run (or resume) DeepCluster-v2 training as ``cfg`` says; returns the run folder."""
    return run_epochs(cfg, resume, setup, train_one_epoch, save_training_checkpoint)


def train_one_epoch(t: V2Trainer) -> None:
    """Cluster the bank of the previous epoch (the first: an initial pass), then one training pass."""
    s = t.state
    if s.assignments is None:  # a resumed mid-epoch state already has them
        if s.epoch == 0 or not bool(s.filled.any()):  # a resume from a snapshot (no bank) refills it too
            s.stats["time_extract_s"] = fill_bank(t)
        start = time.perf_counter()
        s.assignments, s.stats["heads"] = cluster_bank(t)
        s.stats["time_cluster_s"] = time.perf_counter() - start
        s.filled.zero_()
    start = time.perf_counter()
    train_pass(t)
    add_seconds(s.stats, "time_train_s", time.perf_counter() - start)
    record = epoch_record(t)
    warn_skipped(t, record)
    finish_epoch(t, record, format_record(record), t.net.backbone, save_training_checkpoint)


# ----------------------------------------------------------------------------- setup
def setup(cfg: DCv2Config, dist: DistInfo, resume: bool) -> V2Trainer:
    """Open the data, build backbone + head and optimiser, prepare the run folder, maybe resume."""
    torch.manual_seed(cfg.seed + dist.rank)
    np.random.seed(cfg.seed + dist.rank)
    backbone = build_backbone(cfg.arch, sobel=cfg.sobel, input_size=cfg.image_size, seed=cfg.seed)
    fixed_input = backbone.is_deepcluster  # fc6 takes image_size inputs only
    images = open_training_data(cfg.data, transform=multicrop_transform(cfg, fixed_input), strict=cfg.strict)
    bank_images = open_training_data(cfg.data, transform=multicrop_transform(cfg, fixed_input, large_only=True),
                                     strict=cfg.strict)
    iters = check_sizes(cfg, len(images), dist.world_size)
    run = open_run(cfg, dist, resume)
    warn_recipe(cfg, len(images), dist)
    images.cache_decoded(cfg.decode_cache_gb)  # after the checks: a refused run reads no headers
    bank_images.decoded = images.decoded  # the bank pass and the training pass share the decoded pixels
    finish_views = _uint8_views(images, bank_images)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        net = DCv2Net(backbone, cfg.hidden_mlp, cfg.feat_dim, list(cfg.prototypes))
    freeze_foreign_heads(backbone)
    switch_off_dropout(backbone)
    if dist.enabled and dist.device.type == "cuda" and cfg.sync_bn:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    net.to(dist.device)
    freeze_unreached(backbone, cfg.image_size)
    optimizer = make_optimizer(cfg.optimizer, [p for p in net.parameters() if p.requires_grad], cfg.lr,
                               cfg.momentum, cfg.weight_decay, cfg.larc_trust, cfg.larc_clip, cfg.larc_exclude_1d)
    bank = torch.zeros(cfg.large_crops, len(images), cfg.feat_dim, device=dist.device)
    state = V2State(bank=bank, filled=torch.zeros(len(images), dtype=torch.bool, device=dist.device))
    trainer = V2Trainer(cfg, dist, run, net, optimizer, images, bank_images, state, iters, finish_views)
    if resume:
        restore_training(trainer)
    return trainer


def switch_off_dropout(backbone: Backbone) -> None:
    """Dropout p := 0 (DeepCluster's AlexNet/VGG16 have it in fc6/fc7; the recipe's ResNet-50 has none).

    The memory bank holds the projections computed in the training pass: with dropout they
    mostly encode the dropout masks (measured: recomputing the same view of an image lands in
    its own cluster 9% of the time with AlexNet's dropout, 100% without), and the targets become noise.
    Setting p keeps the state dict unchanged, so checkpoints load as any AlexNet's.
    """
    for module in backbone.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def check_sizes(cfg: DCv2Config, n_images: int, world_size: int) -> int:
    """SGD steps per epoch and process; one clear error for settings this data cannot take."""
    iters = n_images // world_size // cfg.batch_size
    if iters < 1:
        raise DcbenchError(f"batch_size={cfg.batch_size} x {world_size} process(es) exceeds the {n_images} images "
                           f"in {cfg.data}; choose a smaller --batch-size")
    bank_rows = iters * cfg.batch_size * world_size
    if max(cfg.prototypes) > bank_rows:
        raise DcbenchError(f"{max(cfg.prototypes)} prototypes exceed the {bank_rows} memory-bank rows of one crop; "
                           f"pass --set prototypes=[K,K,K] with K at most {bank_rows} (or --preset small-data)")
    return iters


def epoch_items(t: V2Trainer, epoch: int) -> list[tuple[int, int]]:
    """This process's ``(index, seed)`` items of ``epoch``: a seeded permutation, sharded across
    processes, cut to whole batches (the original drops the last incomplete batch)."""
    n, world = len(t.images), t.dist.world_size
    order = np.random.default_rng(t.cfg.seed + epoch).permutation(n)
    mine = order[: n // world * world][t.dist.rank::world][: t.iters_per_epoch * t.cfg.batch_size]
    return augmentation_seeds(t.cfg.seed, epoch, t.dist.rank, mine.tolist())


def _uint8_views(images: ImageDataset, bank_images: ImageDataset) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """Both datasets' views made to stop at uint8 pixels (the bank's are the first positions of the
    training views); the finishing step per view position, [] when a view cannot be split."""
    split, bank_split = images.transform.uint8_views(), bank_images.transform.uint8_views()
    if split is None or bank_split is None:
        return []
    (images.transform, finish), (bank_images.transform, _) = split, bank_split
    return finish


def _loader(t: V2Trainer, dataset: ImageDataset, items: list[tuple[int, int]]) -> DataLoader:
    return DataLoader(_SeededViews(dataset), batch_size=t.cfg.batch_size, sampler=items, num_workers=t.cfg.workers,
                      collate_fn=collate_views, generator=torch.Generator(), pin_memory=t.dist.device.type == "cuda")


class _SeededViews(torch.utils.data.Dataset):
    """Views of image ``index`` drawn with torch's RNG seeded by the item's own seed."""

    def __init__(self, images: ImageDataset) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: tuple[int, int]):
        return read_seeded(self.images, *item)


# ----------------------------------------------------------------------------- phase 1: bank
def _groups(t: V2Trainer, views: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views batched by size: the large ones together, then the small ones (one forward each)."""
    views = [v.to(t.dist.device, non_blocking=True) for v in views]
    if t.finish_views:  # uint8 views, scaled here on the device (the same inputs bit for bit)
        views = [finish(v) for finish, v in zip(t.finish_views, views)]
    large = torch.cat(views[: t.cfg.large_crops])
    return [large] + ([torch.cat(views[t.cfg.large_crops:])] if len(views) > t.cfg.large_crops else [])


def _write_bank(t: V2Trainer, z: torch.Tensor, indices: torch.Tensor) -> None:
    s, b = t.state, len(indices)
    indices = indices.to(t.dist.device)
    for crop in range(t.cfg.large_crops):
        s.bank[crop, indices] = z[crop * b:(crop + 1) * b].detach().float()
    s.filled[indices] = True


@torch.no_grad()
def fill_bank(t: V2Trainer) -> float:
    """The bank's first fill: projections of the large crops in training mode (as the original's
    ``init_memory``, BN statistics included), over epoch 0's items with their own views."""
    start = time.perf_counter()
    t.net.train()
    items = augmentation_seeds(t.cfg.seed + 1, 0, t.dist.rank, [i for i, _ in epoch_items(t, 0)])
    loader = WaitedBatches(_loader(t, t.bank_images, items))
    for views, indices, _ in progress(loader, "memory bank", t.dist):
        if len(indices):
            with autocast(t.dist.device, t.cfg.amp):
                z, _ = t.net(_groups(t, views))
            _write_bank(t, z, indices)
    t.state.stats["time_extract_wait_s"] = loader.seconds
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- phase 2: cluster
def _gathered_bank(t: V2Trainer) -> tuple[np.ndarray, torch.Tensor] | None:
    """Rank 0: (indices, crops x rows x dim) of every row some process filled; None elsewhere."""
    s = t.state
    rows = torch.nonzero(s.filled).flatten()
    parts = gather_to_main(t.dist, (rows.cpu().numpy(), s.bank[:, rows].cpu()))
    if not t.dist.is_main:
        return None
    indices, unique = np.unique(np.concatenate([p[0] for p in parts]), return_index=True)
    bank = torch.cat([p[1] for p in parts], dim=1)[:, torch.from_numpy(unique)]
    return indices, bank


def cluster_bank(t: V2Trainer) -> tuple[np.ndarray, list[dict]]:
    """Spherical k-means per head on rank 0, broadcast; every rank sets its prototypes to the centroids."""
    check_finite_features(t, all_agree(t.dist, bool(torch.isfinite(t.state.bank).all())))
    check_bank_rows(t, int(all_reduce_sum(t.dist, int(t.state.filled.sum()))))
    gathered = _gathered_bank(t)
    with main_rank_threads(t.dist):  # under torchrun rank 0 clusters alone: give it the node's cores
        payload = _cluster_heads(t, gathered) if gathered is not None else None
    assignments, centroids, heads = broadcast_from_main(t.dist, payload)
    with torch.no_grad():
        for layer, c in zip(t.net.prototypes, centroids):
            layer.weight.copy_(c.to(layer.weight.device))
    return assignments, heads


def check_bank_rows(t: V2Trainer, rows: int) -> None:
    """Prototypes against the bank rows actually filled (``check_sizes`` counted the files;
    unreadable images leave rows empty): one error line on every rank, not a k-means failure."""
    k = max(t.cfg.prototypes)
    if k > rows:
        raise DcbenchError(f"{k} prototypes exceed the {rows} memory-bank rows filled from readable images of "
                           f"{t.cfg.data}; start a new run (another --out) with --set prototypes=[K,...] and K "
                           f"at most {rows}, or replace the unreadable files")


def _cluster_heads(t: V2Trainer, gathered: tuple[np.ndarray, torch.Tensor]) -> tuple:
    """Rank 0: spherical k-means of every head on the gathered bank; (assignments, centroids, stats)."""
    cfg = t.cfg
    indices, bank = gathered
    assignments = np.full((len(cfg.prototypes), len(t.images)), -1, dtype=np.int64)
    centroids, heads = [], []
    for h, k in enumerate(cfg.prototypes):
        result = spherical_kmeans(bank[h % cfg.large_crops].to(t.dist.device), k, cfg.kmeans_iters,
                                  seed=cfg.seed * 1000 + t.state.epoch * 10 + h)
        assignments[h, indices] = result.assignments
        centroids.append(result.centroids.cpu())
        nonempty = result.sizes[result.sizes > 0]
        heads.append({"n_clusters": k, "kmeans_objective": result.objective,
                      "empty_clusters": result.empty_clusters, "cluster_size_min": int(nonempty.min()),
                      "cluster_size_max": int(nonempty.max())})
    return assignments, centroids, heads


# ----------------------------------------------------------------------------- phase 3: train
def train_pass(t: V2Trainer) -> None:
    """One pass over this epoch's items; checkpoints every ``checkpoint_every`` batches. Under
    torchrun the ranks agree on every step: a batch unreadable on one rank is skipped by all."""
    cfg, s = t.cfg, t.state
    model = wrap_ddp(t.net, t.dist)
    model.train()
    targets_all = torch.from_numpy(s.assignments)
    items = epoch_items(t, s.epoch)[s.iteration * cfg.batch_size:]
    loader = WaitedBatches(_loader(t, t.images, items))
    for batch, (views, indices, skipped) in enumerate(progress(loader, f"epoch {s.epoch} train", t.dist)):
        s.stats["n_skipped"] = s.stats.get("n_skipped", 0) + skipped
        if skipped and "first_skipped" not in s.stats:
            _note_first_skipped(t, items[batch * cfg.batch_size:(batch + 1) * cfg.batch_size], indices)
        iteration = s.epoch * t.iters_per_epoch + s.iteration
        lr = warmup_cosine(iteration, t.iters_per_epoch, cfg.epochs, cfg.lr, cfg.final_lr, cfg.warmup_epochs,
                           cfg.start_warmup)
        for group in t.optimizer.param_groups:
            group["lr"] = lr
        s.stats["lr"] = lr
        if all_agree(t.dist, len(indices) > 0):
            _step(t, model, views, indices, targets_all[:, indices], iteration)
        s.iteration += 1
        if cfg.checkpoint_every and s.iteration % cfg.checkpoint_every == 0:
            save_training_checkpoint(t)
    add_seconds(s.stats, "time_train_wait_s", loader.seconds)


def _note_first_skipped(t: V2Trainer, batch_items: list[tuple[int, int]], indices: torch.Tensor) -> None:
    """Remember the path of the epoch's first unreadable image (named by :func:`warn_skipped`)."""
    arrived = set(indices.tolist())
    missing = [i for i, _ in batch_items if i not in arrived]
    if missing:
        t.state.stats["first_skipped"] = str(t.images.paths[missing[0]])


def warn_skipped(t: V2Trainer, record: dict[str, Any]) -> None:
    """One warning per epoch when the training pass skipped unreadable images (rank 0; as v1's
    feature pass does): they are left out of the steps and of the next clustering."""
    if t.dist.is_main and record["n_skipped"]:
        first = t.state.stats.get("first_skipped")
        log.warning("skipped %d unreadable image(s) in epoch %d%s; use --strict to stop at the first one",
                    record["n_skipped"], record["epoch"], f" (first: {first})" if first else "")


def _step(t: V2Trainer, model: nn.Module, views: list[torch.Tensor], indices: torch.Tensor,
          targets: torch.Tensor, iteration: int) -> None:
    """One SGD step on the loss averaged over heads; the bank gets the large crops' projections."""
    cfg, s = t.cfg, t.state
    with autocast(t.dist.device, cfg.amp):
        z, scores = model(_groups(t, views))
    n_views = cfg.large_crops + cfg.small_crops
    loss = z.new_zeros(())
    for h, head_scores in enumerate(scores):
        target = targets[h].repeat(n_views).to(t.dist.device)
        n_valid = max(1, int((target >= 0).sum()))  # images outside the last bank are ignored
        loss = loss + F.cross_entropy(head_scores.float() / cfg.temperature, target, ignore_index=-1,
                                      reduction="sum") / n_valid
    loss = loss / len(scores)
    value = float(loss.item())
    check_finite_loss(t, value, all_agree(t.dist, math.isfinite(value)))
    t.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if iteration < cfg.freeze_prototypes_iters:
        for p in t.net.prototypes.parameters():
            p.grad = None
    t.optimizer.step()
    _write_bank(t, z, indices)
    s.loss_sum += value * len(indices)
    s.loss_count += len(indices)


# ----------------------------------------------------------------------------- phase 4: log
def _head_record(h: int, stats: dict, current: np.ndarray, previous: np.ndarray | None,
                 labels: np.ndarray | None) -> dict[str, Any]:
    valid = current >= 0
    if previous is not None:
        valid_prev = valid & (previous >= 0)
        nmi_prev = nmi(current[valid_prev], previous[valid_prev])
    else:
        nmi_prev = None
    return {f"nmi_prev_h{h}": nmi_prev,
            f"nmi_labels_h{h}": nmi(current[valid], labels[valid]) if labels is not None else None,
            **{f"{key}_h{h}": value for key, value in stats.items() if key != "n_clusters"}}


def epoch_record(t: V2Trainer) -> dict[str, Any]:
    """The metrics.jsonl line: v1's keys (from head 0) plus ``KEY_hH`` for every head H."""
    s = t.state
    labels = np.asarray(t.images.targets) if t.images.targets is not None else None
    heads = {}
    for h, stats in enumerate(s.stats["heads"]):
        previous = s.previous[h] if s.previous is not None else None
        heads.update(_head_record(h, stats, s.assignments[h], previous, labels))
    loss_sum, loss_count = all_reduce_sum(t.dist, s.loss_sum), all_reduce_sum(t.dist, s.loss_count)
    first = s.stats["heads"][0]
    return {
        "epoch": s.epoch, "method": "deepcluster-v2",
        "nmi_prev": heads["nmi_prev_h0"], "nmi_labels": heads["nmi_labels_h0"],
        "kmeans_objective": first["kmeans_objective"], "empty_clusters": first["empty_clusters"],
        "n_clusters": first["n_clusters"], "cluster_size_min": first["cluster_size_min"],
        "cluster_size_max": first["cluster_size_max"],
        "loss": loss_sum / loss_count if loss_count else None,
        "iterations": s.iteration, "n_images": int((s.assignments[0] >= 0).sum()),
        "n_skipped": int(all_reduce_sum(t.dist, s.stats.get("n_skipped", 0))),
        "lr": s.stats.get("lr"), "heads": len(t.cfg.prototypes),
        **phase_times(s.stats),
        "decoded_in_memory": decoded_in_memory(t.images),  # decode_cache_gb; None: decoded every epoch
        **heads,
    }


def format_record(r: dict[str, Any]) -> str:
    def f(x: Any, spec: str = ".3f") -> str:
        return "-" if x is None else format(x, spec)
    nmis = " ".join(f(r[f"nmi_labels_h{h}"]) for h in range(r["heads"]))
    sizes = " ".join(f"{r[f'cluster_size_min_h{h}']}-{r[f'cluster_size_max_h{h}']}" for h in range(r["heads"]))
    return (f"epoch {r['epoch']}: loss {f(r['loss'])}  lr {f(r['lr'], '.4g')}  nmi_prev {f(r['nmi_prev'])}  "
            f"nmi_labels per head {nmis}  cluster sizes {sizes}  {format_phase_times(r, 'bank/cluster/train')}")


# ----------------------------------------------------------------------------- phase 5: checkpoint
def save_training_checkpoint(t: V2Trainer, path: Path | None = None) -> None:
    """``RUN_DIR/checkpoint.pth``: backbone weights + everything needed to resume (rank 0 writes;
    every process hands in the bank rows it filled, its RNG state and loss sums).

    A snapshot (``path`` in ``checkpoints/``, taken between epochs) leaves the memory bank out
    (large_crops x N x feat_dim floats, 1.3 GB on ImageNet): a run resumed from it refills the
    bank as epoch 0 does, so it is not bit-identical to the uninterrupted run.
    """
    snapshot = path is not None
    gathered = None if snapshot else _gathered_bank(t)
    ranks = rank_states(t)
    if t.dist.is_main:
        s = t.state
        indices, rows = gathered if gathered is not None else (np.zeros(0, dtype=np.int64), None)
        bank = torch.zeros(t.cfg.large_crops, len(t.images) if rows is not None else 0, t.cfg.feat_dim)
        if rows is not None:
            bank[:, torch.from_numpy(indices)] = rows
        train_state = {
            "method": "deepcluster-v2", "epoch": s.epoch, "iteration": s.iteration,
            "assignments": None if s.assignments is None else torch.from_numpy(s.assignments),
            "previous": None if s.previous is None else torch.from_numpy(s.previous),
            "bank": bank, "bank_rows": torch.from_numpy(indices),
            "stats": dict(s.stats), "loss_sum": s.loss_sum, "loss_count": s.loss_count,
            "optimizer": t.optimizer.state_dict(), "head": t.net.head_state_dict(),
            "rng": ranks[0]["rng"], "ranks": ranks,
        }
        atomic_save(checkpoint_record(t.net.backbone, s.epoch, to_plain(t.cfg), train_state), path or t.run.checkpoint)
        if not snapshot:
            t.run.write_progress(s.epoch, s.iteration)
    barrier(t.dist)


def restore_training(t: V2Trainer) -> None:
    """Load ``RUN_DIR/checkpoint.pth``: backbone, head, optimiser, bank, epoch state, RNG."""
    ts = read_train_state(t, t.net.backbone)
    if ts.get("method") != "deepcluster-v2":
        raise DcbenchError(f"{t.run.checkpoint} is not a DeepCluster-v2 run; resume it with --method deepcluster")
    t.net.load_state_dict(ts["head"], strict=False)
    t.optimizer.load_state_dict(ts["optimizer"])
    s = t.state
    s.epoch, s.iteration = int(ts["epoch"]), int(ts["iteration"])
    s.assignments = None if ts["assignments"] is None else ts["assignments"].numpy().copy()
    s.previous = None if ts["previous"] is None else ts["previous"].numpy().copy()
    s.filled.zero_()
    if ts["bank"].numel():  # a snapshot carries no bank: train_one_epoch refills it
        s.bank.copy_(ts["bank"].to(s.bank.device))
        s.filled[ts["bank_rows"].to(s.filled.device)] = True
    s.stats = dict(ts["stats"])
    restore_rank_state(t, ts)
    if t.dist.is_main:
        t.run.truncate_metrics(s.epoch)
    log.info("resumed %s at epoch %d, iteration %d", t.run.checkpoint, s.epoch, s.iteration)

