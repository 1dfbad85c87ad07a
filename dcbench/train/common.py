"""Pieces both training loops share: run folder opening, DDP wrapping, autocast, progress bars,
resumable checkpoints, per-position augmentation seeds and the recipe warnings."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dcbench.errors import DcbenchError
from dcbench.checkpoint import read_checkpoint_file, save_checkpoint
from dcbench.models import Backbone
from dcbench.settings import to_plain
from dcbench.train.distributed import DistInfo, barrier, init_distributed, shutdown
from dcbench.train.presets import recipe_warnings
from dcbench.train.rundir import RunDir

log = logging.getLogger("dcbench")


@dataclass
class EpochState:
    """Progress inside the current epoch: exactly what a mid-epoch checkpoint must carry."""

    epoch: int = 0  # 0-based epoch in progress (== epochs completed)
    iteration: int = 0  # batches done in this epoch
    assignments: np.ndarray | None = None  # this epoch's cluster id per image (-1: unreadable)
    previous: np.ndarray | None = None  # last epoch's, for NMI(t, t-1)
    stats: dict[str, Any] = field(default_factory=dict)  # clustering stats and phase times
    loss_sum: float = 0.0
    loss_count: int = 0

    def next_epoch(self) -> None:
        self.previous, self.assignments = self.assignments, None
        self.epoch, self.iteration, self.stats, self.loss_sum, self.loss_count = self.epoch + 1, 0, {}, 0.0, 0


def run_epochs(cfg: Any, resume: bool, setup: Callable[[Any, DistInfo, bool], Any],
               one_epoch: Callable[[Any], None]) -> Path:
    """Join the torchrun job (if any), ``setup`` the trainer, run its remaining epochs; the run folder."""
    dist = init_distributed(cfg.device)
    try:
        trainer = setup(cfg, dist, resume)
        for _ in range(trainer.state.epoch, cfg.epochs):
            one_epoch(trainer)
        return trainer.run.path
    finally:
        shutdown(dist)


def finish_epoch(t: Any, record: dict[str, Any], line: str, backbone: Backbone,
                 save_state: Callable[[Any], None]) -> None:
    """Log the epoch (metrics.jsonl, assignments, one log ``line``), move to the next epoch,
    checkpoint it (``save_state``) and keep a weights snapshot every ``snapshot_every`` epochs."""
    s = t.state
    if t.dist.is_main:
        t.run.log_epoch(record)
        t.run.save_assignments(s.epoch, s.assignments)
        log.info(line)
    s.next_epoch()
    save_state(t)
    if t.cfg.snapshot_every and s.epoch % t.cfg.snapshot_every == 0 and t.dist.is_main:
        save_checkpoint(t.run.snapshots / f"epoch_{s.epoch:04d}.pth", backbone, s.epoch, to_plain(t.cfg))


def open_run(cfg: Any, dist: DistInfo, resume: bool) -> RunDir:
    """Check (every rank: they all stop together on a refused resume) and prepare (rank 0) the run folder."""
    run = RunDir(cfg.out)
    run.check(to_plain(cfg), resume)
    if dist.is_main:
        run.prepare(to_plain(cfg), resume)
    barrier(dist)
    return run


def warn_recipe(cfg: Any, n_images: int, dist: DistInfo) -> None:
    """Log (rank 0) every setting that makes the recipe learn little on ``n_images`` images."""
    if dist.is_main:
        for message in recipe_warnings(cfg, n_images, dist.world_size):
            log.warning("warning: %s", message)


def freeze_foreign_heads(model: Backbone) -> None:
    """A timm/torchvision model's own classifier is not trained (it is not in the backbone)."""
    for name, p in model.named_parameters():
        if name.startswith(model.head_prefixes):
            p.requires_grad = False


def wrap_ddp(module: nn.Module, dist: DistInfo) -> nn.Module:
    """``module`` in DistributedDataParallel under torchrun, itself otherwise."""
    if not dist.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def autocast(device: torch.device, amp: bool):
    """bfloat16 autocast on CUDA when ``amp``; a no-op context otherwise."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


def progress(iterable, desc: str, dist: DistInfo):
    """tqdm with rate and ETA on the main rank's terminal; silent otherwise."""
    if not dist.is_main:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, leave=False, disable=None, dynamic_ncols=True)


def augmentation_seeds(seed: int, epoch: int, rank: int, indices: list[int]) -> list[tuple[int, int]]:
    """``(index, seed)`` sampler items: each crop depends only on (seed, epoch, rank, position),
    never on worker scheduling, so a resumed epoch redraws the same crops."""
    base = (seed * 1_000_003 + epoch) * 10_000_019 + rank * len(indices)
    return [(int(i), (base + pos) % 2**63) for pos, i in enumerate(indices)]


def read_train_state(t: Any, model: Backbone) -> dict[str, Any]:
    """Load ``RUN_DIR/checkpoint.pth`` weights into ``model``; return its ``train_state``."""
    record = read_checkpoint_file(t.run.checkpoint)
    ts = record.get("train_state")
    if record.get("format") != "dcbench" or ts is None:
        raise DcbenchError(f"{t.run.checkpoint} is not a resumable training checkpoint")
    if record["arch"] != t.cfg.arch or bool(record["sobel"]) != model.has_sobel:
        raise DcbenchError(f"{t.run.checkpoint} was trained with arch {record['arch']} (sobel {record['sobel']}); "
                           f"resume with the same --arch and --sobel/--no-sobel")
    model.load_state_dict(record["state_dict"], strict=False)
    return ts


def seeded_view(images: Any, index: int, seed: int) -> Any:
    """Image ``index`` of ``images`` with its augmentation drawn from torch's RNG seeded by
    ``seed`` (the caller's RNG untouched), so a crop depends only on (seed, epoch, position)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return images[index]
