"""The DeepCluster loop (Caron et al., ECCV 2018), one epoch in named phases:

    extract features (eval mode, centre crop, dataset order)
    -> cluster (PCA-whitening + L2, then k-means or PIC; rank 0)
    -> pseudo-labelled loader (uniform sampling over non-empty clusters)
    -> fresh top layer with its own momentum-free SGD
    -> train one pass (RandomResizedCrop + flip, cross-entropy on cluster ids)
    -> log -> checkpoint

Resuming is exact on the CPU: augmentation randomness is a pure function of
(seed, epoch, position in the epoch), the loader never touches the global RNG, and a
checkpoint carries the optimisers, the epoch's assignments and every RNG state.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dcbench.checkpoint import checkpoint_record, atomic_save
from dcbench.cluster import PCAWhitening, UniformClusterSampler, nmi, run_kmeans, run_pic
from dcbench.cluster.kmeans import faiss_has_gpu
from dcbench.cluster.pca import combine_moments, scatter_moments
from dcbench.data import (FinishedBatches, ImageDataset, WaitedBatches, decoded_in_memory, eval_transform,
                          open_training_data, skip_collate, train_transform, uint8_batches)
from dcbench.data.seeded import read_seeded
from dcbench.errors import DcbenchError
from dcbench.features import extract_rows
from dcbench.models import CLUSTER_TAP, LOGITS_TAP, Backbone, build_backbone
from dcbench.settings import to_plain
from dcbench.train.config import TrainConfig
from dcbench.train.common import (EpochState, add_seconds, augmentation_seeds, autocast, check_finite_features,
                                  check_finite_loss, finish_epoch, format_phase_times, freeze_foreign_heads,
                                  freeze_unreached, load_sgd_state, open_run, phase_times, progress, rank_states,
                                  read_train_state, restore_rank_state, run_epochs, sgd, warn_recipe, wrap_ddp)
from dcbench.train.distributed import (DistInfo, all_agree, all_reduce_sum, barrier, broadcast_from_main,
                                       gather_to_main, main_rank_threads)
from dcbench.train.rundir import RunDir

log = logging.getLogger("dcbench")


@dataclass
class Trainer:
    """Everything one training run holds."""

    cfg: TrainConfig
    dist: DistInfo
    run: RunDir
    model: Backbone
    optimizer: torch.optim.Optimizer
    images: ImageDataset  # eval transform: feature extraction
    crops: ImageDataset  # train transform up to uint8 pixels: the training pass
    #: ToTensor's scaling + Normalize of a batch of ``crops`` (see :func:`dcbench.data.uint8_batches`)
    finish_crops: Callable[[torch.Tensor], torch.Tensor] | None = None
    state: EpochState = field(default_factory=EpochState)
    top_optimizer: torch.optim.Optimizer | None = None


# ----------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Run (or resume) DeepCluster training as ``cfg`` says; returns the run folder."""
    return run_epochs(cfg, resume, setup, train_one_epoch, save_training_checkpoint)


def train_one_epoch(t: Trainer) -> None:
    """One DeepCluster round: cluster the current features, then learn to predict the clusters."""
    s = t.state
    if s.assignments is None:  # a resumed mid-epoch state already has them
        features, indices, s.stats["time_extract_s"] = extract_features(t)
        s.assignments, cluster_stats, s.stats["time_cluster_s"] = cluster_features(t, features, indices)
        s.stats.update(cluster_stats)
        del features
        new_top_layer(t)
    start = time.perf_counter()
    train_pass(t, pseudo_labelled_loader(t))
    add_seconds(s.stats, "time_train_s", time.perf_counter() - start)
    record = epoch_record(t)
    finish_epoch(t, record, format_record(record), t.model, save_training_checkpoint)


# ----------------------------------------------------------------------------- setup
def setup(cfg: TrainConfig, dist: DistInfo, resume: bool) -> Trainer:
    """Open the data, build the model and optimiser, prepare the run folder, maybe resume."""
    torch.manual_seed(cfg.seed + dist.rank)
    np.random.seed(cfg.seed + dist.rank)
    images = open_training_data(cfg.data, transform=eval_transform(cfg.image_size), strict=cfg.strict)
    crops = copy.copy(images)
    crops.transform = train_transform(cfg.image_size, tuple(cfg.crop_scale))
    crops, finish_crops = uint8_batches(crops)  # the same random draws, the same inputs bit for bit
    model = build_backbone(cfg.arch, sobel=cfg.sobel, input_size=cfg.image_size, seed=cfg.seed)
    check_sizes(cfg, len(images), model.feature_dim)
    run = open_run(cfg, dist, resume)
    warn_recipe(cfg, len(images), dist)
    model.to(dist.device)
    freeze_foreign_heads(model)
    freeze_unreached(model, cfg.image_size)
    optimizer = sgd([p for p in model.parameters() if p.requires_grad], dist.device, lr=cfg.lr,
                    momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    images.cache_decoded(cfg.decode_cache_gb)  # after the checks: a refused run reads no headers
    crops.decoded = images.decoded  # both passes share the decoded pixels
    trainer = Trainer(cfg, dist, run, model, optimizer, images, crops, finish_crops)
    if resume:
        restore_training(trainer)
    return trainer


def check_sizes(cfg: TrainConfig, n_images: int, feature_dim: int) -> None:
    """Settings that cannot work with this many images: one clear error before any work."""
    too_big = _too_few_images(cfg, n_images)
    if too_big:
        problem, fix = too_big
        raise DcbenchError(f"{problem} needs more images than the {n_images} in {cfg.data}; pass {fix}")
    if cfg.pca_dim > feature_dim:
        raise DcbenchError(f"pca_dim={cfg.pca_dim} exceeds the {feature_dim} dimensions of the clustering "
                           f"feature; pass --set pca_dim={feature_dim} or less")


def _too_few_images(cfg: TrainConfig, n: int) -> tuple[str, str] | None:
    """(the setting, its fix) when ``cfg`` cannot cluster ``n`` images: k clusters need k images,
    PIC's graph more images than neighbours, PCA no more dimensions than images."""
    if cfg.clustering == "kmeans" and cfg.k > n:
        return f"k={cfg.k}", f"--k {n} or less"
    if cfg.clustering == "pic" and cfg.pic_neighbors >= n:
        return f"pic_neighbors={cfg.pic_neighbors}", f"--set pic_neighbors={n - 1} or less"
    if cfg.pca_dim > n:
        return f"pca_dim={cfg.pca_dim}", f"--set pca_dim={n} or less"
    return None


# ----------------------------------------------------------------------------- phase 1: extract
def extract_features(t: Trainer) -> tuple[np.ndarray, np.ndarray, float]:
    """Clustering features of this rank's contiguous shard, in dataset order (eval mode).

    The one extractor (:func:`dcbench.features.extract_rows`); beyond ``feature_memmap_gb``
    the rows go to a disk memmap in the run folder that is deleted with the array.
    """
    start = time.perf_counter()
    out = extract_rows(t.model, t.images, [CLUSTER_TAP], batch_size=t.cfg.batch_size, workers=t.cfg.workers,
                       device=t.dist.device, progress=t.dist.is_main, shard=(t.dist.rank, t.dist.world_size),
                       spill_dir=t.run.path, spill_over_bytes=t.cfg.feature_memmap_gb * 1e9, amp=t.cfg.amp,
                       channels_last=t.cfg.channels_last, desc=f"epoch {t.state.epoch} extract")
    rows = out.taps[CLUSTER_TAP]
    t.state.stats["n_skipped"] = int(all_reduce_sum(t.dist, out.n_items - len(rows.owner)))
    t.state.stats["time_extract_wait_s"] = out.waited_s or 0.0
    features = rows.rows if len(rows.owner) else np.empty((0, t.model.feature_dim), dtype=np.float32)
    check_finite_features(t, all_agree(t.dist, _all_finite(features)))
    return features, rows.owner, time.perf_counter() - start


def _all_finite(features: np.ndarray, chunk: int = 65536) -> bool:
    """No NaN or inf in ``features`` (chunked: it may be a disk memmap larger than memory)."""
    return all(np.isfinite(features[i:i + chunk]).all() for i in range(0, len(features), chunk))


# ----------------------------------------------------------------------------- phase 2: cluster
def check_readable_rows(t: Trainer, rows: int) -> None:
    """k, pic_neighbors and pca_dim against the images that could be read (``check_sizes``
    counted the files): one error line on every rank (``rows`` is agreed across ranks), not a
    k-means failure."""
    too_big = _too_few_images(t.cfg, rows)
    if too_big:
        problem, fix = too_big
        skipped = len(t.images) - rows
        raise DcbenchError(f"{problem} exceeds the {rows} readable images ({skipped} of the {len(t.images)} in "
                           f"{t.cfg.data} are unreadable); start a new run (another --out) with {fix}, or replace "
                           f"the unreadable files")


def cluster_features(t: Trainer, features: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, dict, float]:
    """PCA-whiten + L2 (fitted on a sample), cluster on rank 0, broadcast the assignments."""
    start = time.perf_counter()
    cfg, dist = t.cfg, t.dist
    check_readable_rows(t, len(t.images) - int(t.state.stats.get("n_skipped", 0)))
    with main_rank_threads(dist):  # under torchrun rank 0 works alone here: give it the node's cores
        pca = _fit_pca(t, features)
        reduced = pca.transform(features, l2_normalize=True)
        parts = gather_to_main(dist, (indices, reduced))
        payload = None
        if dist.is_main:
            all_indices = np.concatenate([p[0] for p in parts])
            points = np.concatenate([p[1] for p in parts]).astype(np.float32, copy=False)
            payload = _cluster_points(cfg, points, all_indices, len(t.images), seed=cfg.seed + t.state.epoch,
                                      gpu=dist.device.type == "cuda")
    assignments, stats = broadcast_from_main(dist, payload)
    return assignments, stats, time.perf_counter() - start


def _fit_pca(t: Trainer, features: np.ndarray) -> PCAWhitening:
    """DeepCluster's PCA-whitening (faiss PCAMatrix(eigen_power=-0.5) on every row by default;
    see the pca_sample and pca_eps settings). Under torchrun each rank summarises its rows
    (mean + covariance, D x D) and rank 0 fits on their combination: every row, nothing gathered."""
    cfg, dist = t.cfg, t.dist
    seed = cfg.seed + t.state.epoch
    pca = PCAWhitening(cfg.pca_dim, cfg.pca_eps, "additive")
    if not dist.enabled:
        return pca.fit(features, sample_size=cfg.pca_sample or None, seed=seed)
    if cfg.pca_sample:
        per_rank = max(1, cfg.pca_sample // dist.world_size)
        rows = np.random.default_rng(seed + dist.rank).permutation(len(features))[:per_rank]
        samples = gather_to_main(dist, np.ascontiguousarray(features[np.sort(rows)]))
        fitted = pca.fit(np.concatenate(samples), sample_size=None) if dist.is_main else None
    else:
        parts = gather_to_main(dist, scatter_moments(features))
        fitted = pca.fit_moments(combine_moments(parts)) if dist.is_main else None
    return broadcast_from_main(dist, fitted)


def _cluster_points(cfg: TrainConfig, points: np.ndarray, indices: np.ndarray, n_images: int,
                    seed: int, gpu: bool = False) -> tuple[np.ndarray, dict]:
    """Cluster ``points`` as ``cfg`` says; faiss's GPU index only when training runs on a GPU
    (``gpu``), so ``--device cpu`` never touches a GPU even with faiss-gpu installed."""
    if cfg.clustering == "pic":
        result = run_pic(points, n_neighbors=cfg.pic_neighbors, sigma=cfg.pic_sigma, alpha=cfg.pic_alpha,
                         n_iter=cfg.pic_iters, seed=seed)
    else:
        result = run_kmeans(points, cfg.k, n_iter=cfg.kmeans_iters, seed=seed, use_gpu=gpu and faiss_has_gpu())
    assignments = np.full(n_images, -1, dtype=np.int64)
    assignments[indices] = result.assignments
    sizes = np.bincount(result.assignments, minlength=result.n_clusters)
    nonempty = sizes[sizes > 0]
    stats = {"n_clusters": int(result.n_clusters), "kmeans_objective": _finite_or_none(result.objective),
             "empty_clusters": int(result.empty_clusters), "cluster_size_min": int(nonempty.min()),
             "cluster_size_max": int(nonempty.max())}
    return assignments, stats


def _finite_or_none(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


# ----------------------------------------------------------------------------- phase 3: loader
class _PseudoLabelled(Dataset):
    """Training crops labelled with cluster ids; sampler items are ``(index, augmentation_seed)``
    so that each crop depends only on (seed, epoch, position), never on worker scheduling."""

    def __init__(self, images: ImageDataset, assignments: np.ndarray) -> None:
        self.images, self.assignments = images, assignments

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        sample = read_seeded(self.images, index, seed)
        if sample is None:
            return None
        return sample[0], int(self.assignments[index]), index


def pseudo_labelled_loader(t: Trainer) -> Iterable:
    """Uniform sampling over non-empty clusters, sharded across ranks, resumable mid-epoch."""
    s, cfg = t.state, t.cfg
    n_valid = int((s.assignments >= 0).sum())
    sampler = UniformClusterSampler(s.assignments, num_samples=max(1, int(cfg.reassign * n_valid)),
                                    seed=cfg.seed + s.epoch, rank=t.dist.rank, world_size=t.dist.world_size)
    items = augmentation_seeds(cfg.seed, s.epoch, t.dist.rank, list(sampler))[s.iteration * cfg.batch_size:]
    loader = DataLoader(_PseudoLabelled(t.crops, s.assignments), batch_size=cfg.batch_size, sampler=items,
                        num_workers=cfg.workers, collate_fn=skip_collate, generator=torch.Generator(),
                        pin_memory=t.dist.device.type == "cuda")
    # uint8 crops, scaled on the device (the same inputs bit for bit)
    return loader if t.finish_crops is None else FinishedBatches(loader, t.finish_crops, t.dist.device)


# ----------------------------------------------------------------------------- phase 4: top layer
def new_top_layer(t: Trainer) -> None:
    """A fresh Linear(feature_dim, k), N(0, 0.01), with its own SGD (no momentum), same on every rank."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(t.cfg.seed * 7919 + t.state.epoch)
        layer = t.model.set_top_layer(t.state.stats["n_clusters"])
    t.top_optimizer = sgd(layer.parameters(), t.dist.device, lr=t.cfg.top_lr, weight_decay=t.cfg.top_weight_decay)


# ----------------------------------------------------------------------------- phase 5: train
def train_pass(t: Trainer, loader: Iterable) -> None:
    """One pass over the pseudo-labelled sample; checkpoints every ``checkpoint_every`` batches.

    ``iteration`` counts batches, stepped or not, so a resumed epoch restarts at the right one.
    Under torchrun the ranks agree before each step: a batch unreadable on one rank is skipped
    by all (a rank alone skipping DDP's gradient all-reduce hangs the others), and a
    non-finite loss on any rank stops all of them before the step.
    """
    model = wrap_ddp(t.model, t.dist)
    model.train()
    criterion = nn.CrossEntropyLoss()
    s = t.state
    loader = WaitedBatches(loader)
    for images, targets, _, _ in progress(loader, f"epoch {s.epoch} train", t.dist):
        if all_agree(t.dist, len(targets) > 0):
            images, targets = images.to(t.dist.device, non_blocking=True), targets.to(t.dist.device)
            if t.cfg.channels_last:  # the input's format decides the convolutions' (the weights stay NCHW)
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(t.dist.device, t.cfg.amp):
                loss = criterion(model(images, taps=[LOGITS_TAP])[LOGITS_TAP].float(), targets)
            value = float(loss.item())
            check_finite_loss(t, value, all_agree(t.dist, math.isfinite(value)))
            t.optimizer.zero_grad(set_to_none=True)
            t.top_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            t.optimizer.step()
            t.top_optimizer.step()
            s.loss_sum += value * len(targets)
            s.loss_count += len(targets)
        s.iteration += 1
        if t.cfg.checkpoint_every and s.iteration % t.cfg.checkpoint_every == 0:
            save_training_checkpoint(t)
    add_seconds(s.stats, "time_train_wait_s", loader.seconds)


# ----------------------------------------------------------------------------- phase 6: log
def epoch_record(t: Trainer) -> dict[str, Any]:
    """The metrics.jsonl line of the finished epoch."""
    s, labels = t.state, t.images.targets
    valid = s.assignments >= 0
    loss_sum = all_reduce_sum(t.dist, s.loss_sum)
    loss_count = all_reduce_sum(t.dist, s.loss_count)
    stats = s.stats
    return {
        "epoch": s.epoch,
        "nmi_prev": nmi(s.assignments[valid], s.previous[valid]) if s.previous is not None else None,
        "nmi_labels": nmi(s.assignments[valid], np.asarray(labels)[valid]) if labels is not None else None,
        "kmeans_objective": stats.get("kmeans_objective"),
        "empty_clusters": stats.get("empty_clusters"),
        "n_clusters": stats.get("n_clusters"),
        "cluster_size_min": stats.get("cluster_size_min"),
        "cluster_size_max": stats.get("cluster_size_max"),
        "loss": loss_sum / loss_count if loss_count else None,
        "iterations": s.iteration,
        "n_images": int(valid.sum()),
        "n_skipped": stats.get("n_skipped", 0),
        "lr": t.cfg.lr,
        **phase_times(stats),
        # images whose decoded pixels this process holds in memory (decode_cache_gb; None: cache off)
        "decoded_in_memory": decoded_in_memory(t.images),
    }


def format_record(r: dict[str, Any]) -> str:
    def f(x: Any, spec: str = ".3f") -> str:
        return "-" if x is None else format(x, spec)
    return (f"epoch {r['epoch']}: loss {f(r['loss'])}  nmi_prev {f(r['nmi_prev'])}  nmi_labels {f(r['nmi_labels'])}  "
            f"clusters {r['n_clusters']} (empty {r['empty_clusters']}, sizes {r['cluster_size_min']}-"
            f"{r['cluster_size_max']})  {format_phase_times(r, 'extract/cluster/train')}")


# ----------------------------------------------------------------------------- phase 7: checkpoint
def save_training_checkpoint(t: Trainer, path: Path | None = None) -> None:
    """``RUN_DIR/checkpoint.pth`` (or the snapshot ``path``): weights + everything needed to
    resume. Every rank hands in its own RNG state and loss sums; rank 0 writes."""
    ranks = rank_states(t)
    if t.dist.is_main:
        s = t.state
        top = t.model.top_layer
        train_state = {
            "epoch": s.epoch, "iteration": s.iteration,
            "assignments": None if s.assignments is None else torch.from_numpy(s.assignments),
            "previous": None if s.previous is None else torch.from_numpy(s.previous),
            "stats": dict(s.stats), "loss_sum": s.loss_sum, "loss_count": s.loss_count,
            "optimizer": t.optimizer.state_dict(),
            "top_layer": None if s.assignments is None or top is None else top.state_dict(),
            "top_optimizer": None if s.assignments is None or t.top_optimizer is None else t.top_optimizer.state_dict(),
            "rng": ranks[0]["rng"], "ranks": ranks,
        }
        atomic_save(checkpoint_record(t.model, s.epoch, to_plain(t.cfg), train_state), path or t.run.checkpoint)
        if path is None:
            t.run.write_progress(s.epoch, s.iteration)
    barrier(t.dist)


def restore_training(t: Trainer) -> None:
    """Load ``RUN_DIR/checkpoint.pth`` into the trainer: model, optimisers, epoch state, RNG."""
    ts = read_train_state(t, t.model)
    load_sgd_state(t.optimizer, ts["optimizer"])
    s = t.state
    s.epoch, s.iteration = int(ts["epoch"]), int(ts["iteration"])
    s.assignments = None if ts["assignments"] is None else ts["assignments"].numpy().copy()
    s.previous = None if ts["previous"] is None else ts["previous"].numpy().copy()
    s.stats = dict(ts["stats"])
    if s.assignments is not None:
        new_top_layer(t)
        t.model.top_layer.load_state_dict(ts["top_layer"])
        load_sgd_state(t.top_optimizer, ts["top_optimizer"])
    restore_rank_state(t, ts)
    if t.dist.is_main:
        t.run.truncate_metrics(s.epoch)
    log.info("resumed %s at epoch %d, iteration %d", t.run.checkpoint, s.epoch, s.iteration)
