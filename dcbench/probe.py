"""Linear probes on pooled taps of a frozen backbone: heads, their optimiser, and the two
training passes (augmented images through the backbone, or cached features).

A probe run trains one head per tap, all in ONE pass that shares each batch's frozen forward.
The heads are independent, so summing their losses and stepping one optimiser gives each head
exactly the update it would get alone; each head is initialised from its own seed (run seed +
tap name), so a tap's numbers do not depend on which other taps share the run.

What a protocol chooses (the preset: head shape, init, weight decay, lr schedule, epochs,
transforms) comes in as :class:`ProbeOptim`; this module knows no preset by name.

Per-image outcomes: a :class:`ProbeOutcomes` handed to a training pass keeps, per tap, the
top-1/top-5 correctness of every scored val image (dataset order) at the final epoch and at
the best epoch (the selections of :func:`final_and_best_rows`), for the paired bootstrap.

Data parallelism (``ProbeLoop.shard``, torchrun): the rule is that the GLOBAL batch is the
preset's ``batch_size`` and each of the N ranks reads ``batch_size / N`` augmented images of it
(:class:`dcbench.data.seeded.SeededOrder`: the one-process order reshuffled per epoch from the
seed, rank r reading every N-th image of it; a batch size N does not divide is refused). Every
image's random crop is a function of (seed, epoch, image) (:mod:`dcbench.data.seeded`), so the
crops, and the images of each global batch, are those of one process, whatever the number of
ranks or loader workers. Each rank forwards its share through the frozen backbone,
the pooled features and targets are all-gathered (:func:`dcbench.parallel.all_gather_batch`),
and every rank takes the same SGD step of the heads on the whole global batch. This is exactly
DistributedDataParallel's averaged gradient for Linear heads (the mean loss over the global
batch), and also exact for the BatchNorm heads of the vissl preset, whose batch statistics
DDP would compute per rank (VISSL uses SyncBatchNorm for this). Only the backbone's forward,
the expensive part, is split; moving pooled features costs less than DDP's all-reduce of the
heads' gradients (``taps x D x classes`` floats per step). Validation: each rank scores its
contiguous block of the one-process val batches (:func:`dcbench.features.rank_batches`);
hits and image counts are summed over ranks (counts, not averages of accuracies) and the
per-image outcomes gathered back into dataset order.
"""
from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from dcbench import parallel
from dcbench.data import MeteredLoader, SkipCounter, cache_decoded_images, normalised_batches, skip_collate
from dcbench.data.seeded import SeededOrder, seeded_loader
from dcbench.features import ExtractedFeatures, forward_pooled, frozen, make_loader, rank_batches
from dcbench.progress import track
from dcbench.metrics.classification import hits_of, topk_correct
from dcbench.pooling import PoolPlan
from dcbench.results import MetricRow, outcome_key

log = logging.getLogger("dcbench")

#: ``(epoch, iteration, weight_decay of the param group) -> lr``; epoch and iteration from 0
LrSchedule = Callable[[int, int, float], float]
#: per epoch: tap -> (val top-1, val top-5) in percent
History = list[dict[str, tuple[float, float]]]


# ----------------------------------------------------------------------------- heads
@dataclass(frozen=True)
class ProbeOptim:
    """The heads and their SGD: what a probe preset decides."""

    lr: float
    weight_decay: float  # of the Linear layers; BatchNorm parameters never get weight decay
    momentum: float
    schedule: LrSchedule
    batchnorm: bool = False  # BatchNorm2d over the pooled map before the Linear (VISSL's MLP head)
    init_std: float | None = None  # N(0, std) weights and zero bias; None keeps torch's default init


class ProbeHead(nn.Module):
    """[BatchNorm2d over the pooled C x g x g map] then Linear, on a flat pooled feature."""

    def __init__(self, plan: PoolPlan, n_classes: int, batchnorm: bool, init_std: float | None) -> None:
        super().__init__()
        self.shape = (plan.channels, *plan.grid)
        self.bn = nn.BatchNorm2d(plan.channels) if batchnorm else None
        self.linear = nn.Linear(plan.dim, n_classes)
        if init_std is not None:
            nn.init.normal_(self.linear.weight, 0.0, init_std)
            nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn is not None:
            x = self.bn(x.view(-1, *self.shape)).flatten(1)
        return self.linear(x)


def seeded_head(plan: PoolPlan, n_classes: int, optim: ProbeOptim, seed: int) -> ProbeHead:
    """A head initialised from its own seed (``seed`` + tap name) without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(f"{seed}:{plan.tap}".encode()))
        return ProbeHead(plan, n_classes, optim.batchnorm, optim.init_std)


class ProbeSet:
    """Every tap's head, one SGD optimiser over all of them, and the lr schedule."""

    def __init__(self, plans: Mapping[str, PoolPlan], n_classes: int, optim: ProbeOptim,
                 device: str | torch.device, seed: int = 0) -> None:
        self.taps = list(plans)
        self.heads = nn.ModuleList(seeded_head(plans[t], n_classes, optim, seed) for t in self.taps).to(device)
        bn_params = [p for h in self.heads if h.bn is not None for p in h.bn.parameters()]
        linear_params = [p for h in self.heads for p in h.linear.parameters()]
        groups = [{"params": linear_params, "weight_decay": optim.weight_decay}]
        if bn_params:
            groups.append({"params": bn_params, "weight_decay": 0.0})
        self.optimizer = torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum)
        self.schedule = optim.schedule
        self.has_bn = bool(bn_params)

    def can_step(self, batch: int) -> bool:
        """BatchNorm heads need 2+ samples for batch statistics; a lone last sample is skipped."""
        return batch >= 2 or not self.has_bn

    def set_lr(self, epoch: int, iteration: int) -> None:
        """Apply the schedule before the step of ``iteration`` (global, from 0) in ``epoch``."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.schedule(epoch, iteration, group["weight_decay"])

    def step(self, pooled: Mapping[str, torch.Tensor], targets: torch.Tensor) -> float:
        """One SGD step of every head on its tap's pooled features; returns the summed loss."""
        self.heads.train()
        loss = sum(F.cross_entropy(head(pooled[t]), targets) for t, head in zip(self.taps, self.heads))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    @torch.no_grad()
    def correct(self, pooled: Mapping[str, torch.Tensor], targets: torch.Tensor,
                n_crops: int = 1) -> dict[str, np.ndarray]:
        """Per tap, per image: [top-1 correct, top-5 correct] (n x 2 bool); with crops, softmax
        averaged over the ``n_crops`` rows of each image (rows are image-major), as the ten-crop
        test of the DeepCluster paper."""
        self.heads.eval()
        out = {}
        for tap, head in zip(self.taps, self.heads):
            probs = F.softmax(head(pooled[tap]), dim=1).view(len(targets), n_crops, -1).mean(1)
            out[tap] = topk_correct(probs, targets)
        return out

    def hits(self, pooled: Mapping[str, torch.Tensor], targets: torch.Tensor,
             n_crops: int = 1) -> dict[str, np.ndarray]:
        """Top-1 and top-5 hits per tap (counts of :meth:`correct`)."""
        return {tap: hits_of(c) for tap, c in self.correct(pooled, targets, n_crops).items()}


# ----------------------------------------------------------------------------- training passes
@dataclass
class ProbeLoop:
    """How the heads are trained and evaluated (the part of a run that is not the preset)."""

    pools: dict[str, nn.Module]  # tap -> pooling module applied before flattening
    epochs: int
    batch_size: int
    seed: int  # shuffling order
    device: str = "cpu"
    workers: int = 0
    progress: bool = False
    #: ``(rank, world_size)`` of a data-parallel run (torchrun), None in one process
    shard: tuple[int, int] | None = None
    #: :func:`train_on_images`: decoded train and val images kept in memory up to this many GB
    #: (:func:`dcbench.data.cache_decoded_images`; 0: decoded every epoch)
    decode_cache_gb: float = 0.0

    @property
    def taps(self) -> list[str]:
        return list(self.pools)

    @property
    def world(self) -> int:
        """Processes sharing the work (1 in one process)."""
        return self.shard[1] if self.shard is not None else 1

    def rank_batch(self) -> int:
        """Images per step on this rank: the global batch / world size (UsageError when it does
        not divide: the global batch is the preset's whatever the number of processes)."""
        return per_rank_batch(self.batch_size, self.world)


per_rank_batch = parallel.per_rank_batch  # the rule lives with the collectives (fine-tunes share it)


class _Totals:
    """Per-image correctness over the batches of one evaluation, then accuracies in percent."""

    def __init__(self) -> None:
        self.hits: dict[str, np.ndarray] = {}
        self.parts: dict[str, list[np.ndarray]] = {}
        self.indices: list[np.ndarray] = []
        self.n = 0

    def add(self, correct: Mapping[str, np.ndarray], n: int, indices: Any = None) -> None:
        for tap, value in correct.items():
            self.hits[tap] = self.hits.get(tap, 0) + hits_of(value)
            self.parts.setdefault(tap, []).append(value)
        if indices is not None:
            self.indices.append(np.asarray(indices, dtype=np.int64))
        self.n += n

    def accuracy(self) -> dict[str, tuple[float, float]]:
        n = max(self.n, 1)
        return {t: (100.0 * float(v[0]) / n, 100.0 * float(v[1]) / n) for t, v in self.hits.items()}

    def correct(self) -> dict[str, np.ndarray]:
        """tap -> n x 2 bool (top-1, top-5) over the images added, in the order added."""
        return {t: np.concatenate(v) for t, v in self.parts.items()}

    def reduced(self, taps: list[str]) -> _Totals:
        """Every rank's totals in one (identity in one process): image and hit counts summed
        over ranks (exact int64), per-image correctness gathered and put in dataset order."""
        if parallel.world_size() == 1:
            return self
        mine = self.correct() if self.n else {t: np.zeros((0, 2), bool) for t in taps}
        counts = parallel.all_reduce_sum([self.n, *(int(h) for t in taps for h in self.hits.get(t, (0, 0)))])
        rows = np.concatenate([mine[t].astype(np.float32) for t in taps], 1)
        owner = np.concatenate(self.indices) if self.indices else np.zeros(0, np.int64)
        rows, owner = parallel.all_gather_indexed(rows, owner)
        out = _Totals()
        out.n = int(counts[0])
        for i, tap in enumerate(taps):
            out.hits[tap] = counts[1 + 2 * i:3 + 2 * i]
            out.parts[tap] = [rows[:, 2 * i:2 * i + 2] > 0.5]
        out.indices = [owner]
        return out


class ProbeOutcomes:
    """Per-image val outcomes of the final epoch and of each tap's best epoch (highest top-1,
    the first epoch reaching it: the epoch :func:`final_and_best_rows` reports)."""

    def __init__(self) -> None:
        self.final: dict[str, np.ndarray] = {}
        self.best: dict[str, np.ndarray] = {}
        self._best_top1: dict[str, float] = {}

    def update(self, acc: Mapping[str, tuple[float, float]], correct: Mapping[str, np.ndarray]) -> None:
        """Record one epoch's evaluation (accuracies and per-image correctness per tap)."""
        self.final = dict(correct)
        for tap, (top1, _top5) in acc.items():
            if tap not in self._best_top1 or top1 > self._best_top1[tap]:
                self._best_top1[tap], self.best[tap] = top1, correct[tap]

    def named(self) -> dict[str, np.ndarray]:
        """0/1 arrays named like the metric rows of :func:`final_and_best_rows`
        (``top1/conv3/final``, ``top5/conv3/best``, ...)."""
        out = {}
        for selection, per_tap in (("final", self.final), ("best", self.best)):
            for tap, correct in per_tap.items():
                out[outcome_key("top1", tap, selection)] = correct[:, 0].astype(np.uint8)
                out[outcome_key("top5", tap, selection)] = correct[:, 1].astype(np.uint8)
        return out


def _record(totals: _Totals, outcomes: ProbeOutcomes | None) -> dict[str, tuple[float, float]]:
    """The epoch's accuracies; the per-image outcomes go to ``outcomes`` when kept."""
    acc = totals.accuracy()
    if outcomes is not None:
        outcomes.update(acc, totals.correct())
    return acc


def train_on_images(backbone: nn.Module, probes: ProbeSet, train_ds: Any, val_ds: Any, n_crops: int,
                    loop: ProbeLoop, outcomes: ProbeOutcomes | None = None) -> tuple[History, dict[str, int]]:
    """Train on the (augmented) images of ``train_ds``, one shared frozen forward per batch,
    and evaluate on ``val_ds`` after every epoch (per-image outcomes into ``outcomes``).
    ``val_ds`` yields ``n_crops`` crops per image (a crops x 3 x s x s tensor) when
    ``n_crops > 1``; its batches hold batch_size/n_crops images.

    Returns the history and the number of unreadable images per split (skipped, counted).
    With ``loop.shard`` of several ranks the work is data-parallel (the module docstring).
    Each image is decoded once when the two splits fit ``loop.decode_cache_gb`` (same pixels).
    """
    cache_decoded_images([train_ds, val_ds], loop.decode_cache_gb)  # before the loaders fork workers
    if loop.world > 1:
        return _train_on_images_parallel(backbone, probes, train_ds, val_ds, n_crops, loop, outcomes)
    order = SeededOrder(train_ds, loop.seed)
    # uint8 pixels through the loaders, scaled on the device (the same inputs bit for bit)
    loader = normalised_batches(train_ds, lambda ds: seeded_loader(ds, order, loop.batch_size, loop.workers,
                                                                   loop.device), loop.device)
    val_loader = normalised_batches(val_ds, lambda ds: make_loader(ds, max(1, loop.batch_size // n_crops),
                                                                   loop.workers, loop.device, persistent=True),
                                    loop.device)
    counter, skipped = SkipCounter(train_ds), {}
    history: History = []
    iteration = 0
    for epoch in range(loop.epochs):
        order.set_epoch(epoch)
        with frozen(backbone):
            for images, targets, idx, n_skipped in _bar(loader, f"epoch {epoch + 1}/{loop.epochs}", loop.progress):
                counter.update(idx, n_skipped)
                if not probes.can_step(len(idx)):
                    continue
                pooled = forward_pooled(backbone, images.to(loop.device, non_blocking=True), loop.taps, loop.pools)
                probes.set_lr(epoch, iteration)
                # clone() turns inference tensors into ordinary ones the heads can train on
                probes.step({t: v.clone() for t, v in pooled.items()}, targets.to(loop.device))
                iteration += 1
            skipped["train"] = counter.count
            first = epoch == 0  # one warning about unreadable images, not one per epoch
            if first:
                counter.report()
            counter.reset()
            totals, skipped["val"] = _evaluate_images(backbone, probes, val_loader, val_ds, n_crops, loop, first)
            acc = _record(totals, outcomes)
            history.append(acc)
        _log_epoch(epoch, loop.epochs, acc)
    return history, skipped


def _train_on_images_parallel(backbone: nn.Module, probes: ProbeSet, train_ds: Any, val_ds: Any, n_crops: int,
                              loop: ProbeLoop, outcomes: ProbeOutcomes | None) -> tuple[History, dict[str, int]]:
    """:func:`train_on_images` on rank ``loop.shard[0]`` of a torchrun job: this rank's share of
    every global batch through the backbone, the same head step on every rank."""
    rank, world = loop.shard
    sampler = SeededOrder(train_ds, loop.seed, world, rank)  # rank r: every world-th image of the same order
    loader = normalised_batches(train_ds, lambda ds: seeded_loader(ds, sampler, loop.rank_batch(), loop.workers,
                                                                   loop.device), loop.device)
    val_batches = rank_batches(len(val_ds), max(1, loop.batch_size // n_crops), loop.shard)
    val_loader = normalised_batches(val_ds, lambda ds: MeteredLoader(
        ds, batch_sampler=val_batches, num_workers=loop.workers, collate_fn=skip_collate,
        pin_memory=torch.device(loop.device).type == "cuda", persistent_workers=loop.workers > 0), loop.device)
    width_of = {tap: head.linear.in_features for tap, head in zip(probes.taps, probes.heads)}
    widths = [width_of[t] for t in loop.taps]  # in the order the pooled features travel
    counter, skipped, history, iteration = SkipCounter(train_ds), {}, [], 0
    for epoch in range(loop.epochs):
        sampler.set_epoch(epoch)
        with frozen(backbone):
            for images, targets, idx, n_skipped in _bar(loader, f"epoch {epoch + 1}/{loop.epochs}", loop.progress):
                counter.update(idx, n_skipped)
                pooled, labels = _global_batch(backbone, images, targets, widths, loop)
                if not probes.can_step(len(labels)):  # the same test on every rank: all skip or none
                    continue
                probes.set_lr(epoch, iteration)
                probes.step(pooled, labels)
                iteration += 1
            skipped["train"] = _skipped_everywhere(counter, sampler.indices(), train_ds, report=epoch == 0)
            # the heads took identical steps; rank 0's copy makes any last-bit drift impossible
            parallel.broadcast_module_(probes.heads)
            totals, skipped["val"] = _evaluate_images(backbone, probes, val_loader, val_ds, n_crops, loop, False)
            totals = totals.reduced(loop.taps)
            skipped["val"] = int(parallel.all_reduce_sum([skipped["val"]])[0])
            if epoch == 0 and skipped["val"]:
                log.warning("skipped %d unreadable val images; use --strict to stop at the first one", skipped["val"])
            history.append(_record(totals, outcomes))
        _log_epoch(epoch, loop.epochs, history[-1])
    return history, skipped


def _global_batch(backbone: nn.Module, images: torch.Tensor, targets: torch.Tensor, widths: list[int],
                  loop: ProbeLoop) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """This rank's images through the frozen backbone, then every rank's pooled features and
    targets (rank order) on every rank: the step's global batch. A rank whose share was all
    unreadable contributes no row."""
    if len(targets):
        pooled = forward_pooled(backbone, images.to(loop.device, non_blocking=True), loop.taps, loop.pools)
        # targets ride along as one float32 column (exact below 2**24 classes)
        mine = torch.cat([*(pooled[t] for t in loop.taps), targets.to(loop.device, torch.float32)[:, None]], 1)
    else:
        mine = torch.zeros((0, sum(widths) + 1), device=loop.device)
    everything = parallel.all_gather_batch(mine.clone())  # clone: out of inference mode, trainable
    parts = torch.split(everything[:, :-1], widths, dim=1)
    return dict(zip(loop.taps, parts)), everything[:, -1].long()


def _skipped_everywhere(counter: SkipCounter, expected: list[int], dataset: Any, report: bool) -> int:
    """Unreadable images of the epoch over every rank (the union of each rank's misses); warns
    once on rank 0."""
    mine = counter.missing_indices(expected)
    counter.reset()
    _, missing = parallel.all_gather_rows(np.zeros((len(mine), 1), np.float32), mine.astype(np.int64))
    missing = np.unique(missing)
    if report and len(missing):
        log.warning("skipped %d unreadable images (first: %s); use --strict to stop at the first one",
                    len(missing), dataset.paths[int(missing[0])])
    return int(len(missing))


def _evaluate_images(backbone: nn.Module, probes: ProbeSet, loader: Iterable, val_ds: Any, n_crops: int,
                     loop: ProbeLoop, report: bool) -> tuple[_Totals, int]:
    """Val correctness per tap and image, one shared frozen forward per batch (all crops of an
    image), and the number of unreadable val images."""
    totals, counter = _Totals(), SkipCounter(val_ds)
    for images, targets, idx, n_skipped in _bar(loader, "val", loop.progress):
        counter.update(idx, n_skipped)
        if len(idx) == 0:
            continue
        images = images.to(loop.device, non_blocking=True)
        if n_crops > 1:  # B x crops x 3 x s x s -> (B*crops) x 3 x s x s, image-major
            images = images.flatten(0, 1)
        pooled = forward_pooled(backbone, images, loop.taps, loop.pools)
        totals.add(probes.correct(pooled, targets.to(loop.device), n_crops), len(idx), idx)
    count = counter.count  # before report(), which resets it (the first epoch used to record 0)
    if report:
        counter.report()
    return totals, count


def train_on_features(probes: ProbeSet, train: ExtractedFeatures, val: ExtractedFeatures,
                      loop: ProbeLoop, outcomes: ProbeOutcomes | None = None) -> History:
    """Train on extracted (pooled) features, shuffled each epoch by ``loop.seed``; evaluate on
    ``val`` after every epoch (per-image outcomes into ``outcomes``). Rows may be memory-mapped:
    each batch is read in sorted order."""
    y_train = torch.from_numpy(train.labels)
    rng = np.random.default_rng(loop.seed)
    history: History = []
    iteration, n = 0, len(train.labels)
    for epoch in range(loop.epochs):
        order = rng.permutation(n)
        for start in range(0, n, loop.batch_size):
            rows = np.sort(order[start:start + loop.batch_size])  # sorted: sequential reads of memmaps
            if not probes.can_step(len(rows)):
                continue
            batch = {t: _tensor(train.features[t][rows], loop.device) for t in loop.taps}
            probes.set_lr(epoch, iteration)
            probes.step(batch, y_train[rows].to(loop.device))
            iteration += 1
        history.append(_record(_evaluate_features(probes, val, loop), outcomes))
        _log_epoch(epoch, loop.epochs, history[-1])
    return history


def _evaluate_features(probes: ProbeSet, val: ExtractedFeatures, loop: ProbeLoop) -> _Totals:
    totals = _Totals()
    chunk = max(loop.batch_size, 1024)
    for start in range(0, len(val.labels), chunk):
        batch = {t: _tensor(val.features[t][start:start + chunk], loop.device) for t in loop.taps}
        labels = torch.from_numpy(val.labels[start:start + chunk])
        totals.add(probes.correct(batch, labels.to(loop.device)), len(labels))
    return totals


def _tensor(rows: np.ndarray, device: str | torch.device) -> torch.Tensor:
    """Rows of a (possibly read-only, memory-mapped) array as a tensor on ``device`` (copied)."""
    return torch.from_numpy(np.array(rows, dtype=np.float32)).to(device)


def _bar(loader: Iterable, desc: str, progress: bool) -> Iterable:
    """``loader`` with a bar on a terminal, periodic log lines otherwise (:mod:`dcbench.progress`)."""
    return track(loader, f"probe {desc}", "batch", enabled=progress)


def _log_epoch(epoch: int, epochs: int, acc: Mapping[str, tuple[float, float]]) -> None:
    log.info("epoch %d/%d val top-1: %s", epoch + 1, epochs, ", ".join(f"{t} {a[0]:.1f}" for t, a in acc.items()))


# ----------------------------------------------------------------------------- metric rows
def final_and_best_rows(history: History, taps: Iterable[str], seed: int) -> tuple[list[MetricRow], dict[str, int]]:
    """top1/top5 rows per tap at the final epoch (``selection="final"``) and at the epoch with
    the best val top-1 (``"best"``, the first one reaching it; top-5 of that same epoch), plus
    the best epoch (from 1) per tap."""
    rows, best_epochs = [], {}
    for tap in taps:
        top1 = [h[tap][0] for h in history]
        best = int(np.argmax(top1))
        best_epochs[tap] = best + 1
        for selection, epoch in (("final", len(history) - 1), ("best", best)):
            t1, t5 = history[epoch][tap]
            rows.append(MetricRow("top1", t1, tap, "val", selection, seed))
            rows.append(MetricRow("top5", t5, tap, "val", selection, seed))
    return rows, best_epochs
