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

from dcbench.data import SkipCounter
from dcbench.features import ExtractedFeatures, forward_pooled, frozen, make_loader
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

    @property
    def taps(self) -> list[str]:
        return list(self.pools)


class _Totals:
    """Per-image correctness over the batches of one evaluation, then accuracies in percent."""

    def __init__(self) -> None:
        self.hits: dict[str, np.ndarray] = {}
        self.parts: dict[str, list[np.ndarray]] = {}
        self.n = 0

    def add(self, correct: Mapping[str, np.ndarray], n: int) -> None:
        for tap, value in correct.items():
            self.hits[tap] = self.hits.get(tap, 0) + hits_of(value)
            self.parts.setdefault(tap, []).append(value)
        self.n += n

    def accuracy(self) -> dict[str, tuple[float, float]]:
        n = max(self.n, 1)
        return {t: (100.0 * float(v[0]) / n, 100.0 * float(v[1]) / n) for t, v in self.hits.items()}

    def correct(self) -> dict[str, np.ndarray]:
        """tap -> n x 2 bool (top-1, top-5) over the images added, in the order added."""
        return {t: np.concatenate(v) for t, v in self.parts.items()}


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
    """
    loader = make_loader(train_ds, loop.batch_size, loop.workers, loop.device, shuffle=True, seed=loop.seed,
                         persistent=True)
    val_loader = make_loader(val_ds, max(1, loop.batch_size // n_crops), loop.workers, loop.device,
                             persistent=True)
    counter, skipped = SkipCounter(train_ds), {}
    history: History = []
    iteration = 0
    for epoch in range(loop.epochs):
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
        totals.add(probes.correct(pooled, targets.to(loop.device), n_crops), len(idx))
    if report:
        counter.report()
    return totals, counter.count


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
