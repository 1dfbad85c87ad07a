"""Pieces both training loops share: run folder opening, DDP wrapping, autocast, progress bars,
resumable checkpoints, per-position augmentation seeds and the recipe warnings."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dcbench.env import usable_cores
from dcbench.errors import CheckpointError, DataError, DcbenchError
from dcbench.checkpoint import read_checkpoint_file
from dcbench.data import UnreadableImageError
from dcbench.features import AMP_DEVICES
from dcbench.models import CLUSTER_TAP, Backbone
from dcbench.progress import track
from dcbench.settings import to_plain
from dcbench.train.config import absolute_data
from dcbench.train.distributed import DistInfo, barrier, gather_to_main, init_distributed, shutdown
from dcbench.train.presets import recipe_warnings
from dcbench.train.rundir import RunDir, capture_rng, restore_rng

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
               one_epoch: Callable[[Any], None], save_state: Callable[..., None]) -> Path:
    """Join the torchrun job (if any), ``setup`` the trainer, run its remaining epochs; the run folder.

    A new run checkpoints its initial state first, so that a run stopped in its first epoch
    (a non-finite loss, a kill) still leaves a loadable, resumable checkpoint.pth.
    """
    cfg = dataclasses.replace(cfg, data=absolute_data(cfg.data))  # config.yaml must name it from anywhere
    dist = init_distributed(cfg.device, cfg.dist_timeout_min)
    try:
        trainer = setup(cfg, dist, resume)
        if not resume:
            save_state(trainer)
        for _ in range(trainer.state.epoch, cfg.epochs):
            with resumable_hint(trainer.run.path):
                one_epoch(trainer)
        return trainer.run.path
    finally:
        shutdown(dist)


@contextlib.contextmanager
def resumable_hint(run: Path) -> Iterator[None]:
    """An unreadable image under ``strict`` stops the run with the fix that works for a run: its
    settings are saved, so "run without --strict" would resume strict again (or be refused as an
    existing run); resuming with ``--set strict=false`` skips the image instead."""
    try:
        yield
    except UnreadableImageError as exc:
        raise DataError(f"{exc.problem()}; replace or delete the file and continue with dcbench train --resume "
                        f"--out {run}, or skip unreadable images: add --set strict=false") from exc


def finish_epoch(t: Any, record: dict[str, Any], line: str, backbone: Backbone,
                 save_state: Callable[..., None]) -> None:
    """Log the epoch (metrics.jsonl, assignments, one log ``line``, a :func:`waiting_warning`),
    move to the next epoch, checkpoint it (``save_state``) and keep a resumable snapshot in
    ``checkpoints/`` every ``snapshot_every`` epochs (``--resume`` falls back to the newest when
    checkpoint.pth is damaged)."""
    del backbone  # the snapshot is a whole training checkpoint (``save_state``), weights included
    s = t.state
    if t.dist.is_main:
        t.run.log_epoch(record)
        t.run.save_assignments(s.epoch, s.assignments)
        log.info(line)
        warning = waiting_warning(s.epoch, record, t.cfg.workers, t.dist.device, usable_cores())
        if warning:
            log.warning(warning)
    s.next_epoch()
    save_state(t)
    if t.cfg.snapshot_every and s.epoch % t.cfg.snapshot_every == 0:
        save_state(t, t.run.snapshot_path(s.epoch))


#: the epoch record's phase times (seconds): each pass's time and, of it, the time it waited for
#: images (:class:`dcbench.data.WaitedBatches`; under torchrun rank 0's); clustering reads no image
PHASE_TIMES = ("time_extract_s", "time_extract_wait_s", "time_cluster_s", "time_train_s", "time_train_wait_s")

#: a pass on a GPU that waited for images at least this share of its time, and at least
#: WAIT_WARN_S seconds (shorter waits are not worth tuning: worker start-up, tiny runs), is reported
WAIT_WARN_SHARE = 0.25
WAIT_WARN_S = 10.0


def phase_times(stats: dict[str, Any]) -> dict[str, float]:
    """The epoch record's :data:`PHASE_TIMES` from the epoch's ``stats`` (0 for a phase not run)."""
    return {key: round(stats.get(key, 0.0), 3) for key in PHASE_TIMES}


def format_phase_times(r: dict[str, Any], names: str) -> str:
    """``time NAMES 3.8/2.3/8.4s (waiting for images 1.2/0.3s)`` of an epoch record."""
    return (f"time {names} {r['time_extract_s']:.1f}/{r['time_cluster_s']:.1f}/{r['time_train_s']:.1f}s "
            f"(waiting for images {r['time_extract_wait_s']:.1f}/{r['time_train_wait_s']:.1f}s)")


def add_seconds(stats: dict[str, Any], key: str, seconds: float) -> None:
    """Add ``seconds`` to ``stats[key]`` (a pass resumed mid-epoch adds to its first part)."""
    stats[key] = stats.get(key, 0.0) + seconds


def waiting_warning(epoch: int, record: dict[str, Any], workers: int, device: torch.device,
                    cores: int) -> str | None:
    """One line when a pass on a GPU waited for images a large share of its time (see
    :data:`WAIT_WARN_SHARE`), naming what to change; None otherwise. On the CPU, loading and
    computing share the cores: more workers are no remedy there, so no warning."""
    if device.type == "cpu":
        return None
    for phase, name in (("extract", "feature pass"), ("train", "training pass")):
        total, waited = record[f"time_{phase}_s"], record[f"time_{phase}_wait_s"]
        if waited >= WAIT_WARN_S and waited >= WAIT_WARN_SHARE * total:
            fix = (f"more loader workers would use the idle cores: --workers {cores}" if workers < cores else
                   "every usable core runs a loader worker already: decoding and augmenting the images is the "
                   "limit (--set decode_cache_gb=N keeps decoded images in memory when N GB holds them)")
            return (f"epoch {epoch}: the {name} waited for images {waited / max(total, 1e-9):.0%} of its "
                    f"{total:.0f} s with {workers} loader workers ({cores} usable cores) while the {device.type} "
                    f"device idled; {fix}")
    return None


def check_finite_loss(t: Any, loss: float, finite_everywhere: bool) -> None:
    """Stop the run (every rank: ``finite_everywhere`` is agreed across ranks) when the loss is not
    finite: no step is taken and nothing is saved, so the last checkpoint stays the last good state."""
    if not finite_everywhere:
        stop_diverged(t, f"the training loss became non-finite ({loss})")


def check_finite_features(t: Any, finite_everywhere: bool) -> None:
    """Stop the run when the network's clustering features are not finite (weights blown up by
    the last epoch's steps: the loss can stay finite while the features overflow)."""
    if not finite_everywhere:
        stop_diverged(t, "the network's features became non-finite before clustering")


def stop_diverged(t: Any, what: str) -> None:
    """Raise the one-line error of a diverged run: where, the checkpoint kept, the setting to change."""
    s = t.state
    where = t.run.last_checkpoint_note()
    raise DcbenchError(f"{what} at epoch {s.epoch}, iteration {s.iteration}; stopped, nothing overwritten, last "
                       f"good checkpoint: {where}; start a new run (another --out) with a lower learning rate "
                       f"(--set lr=..., now {t.cfg.lr:g})")


def rank_states(t: Any) -> list[dict[str, Any]] | None:
    """Every rank's own RNG state and loss sums, in rank order, on rank 0 (None elsewhere): each
    process has its own augmentation-free RNG stream (seeded seed + rank) and its own share of
    the epoch's loss, and a resumed process must get its own back."""
    s = t.state
    return gather_to_main(t.dist, {"rng": capture_rng(), "loss_sum": s.loss_sum, "loss_count": s.loss_count})


def restore_rank_state(t: Any, ts: dict[str, Any]) -> None:
    """Give this process its own RNG state and loss sums from the training state ``ts``.

    Saved by the same number of processes: rank r takes entry r (bit-identical resumption on
    the CPU). By another number: rank r takes entry ``r % saved`` and rank 0 carries the whole
    loss sum (the epoch's mean loss stays right); the samples each process sees then differ
    from an uninterrupted run, which a warning says. Files from before per-rank states hold
    rank 0's only, which every process then takes (as those versions did).
    """
    s = t.state
    world, rank = t.dist.world_size, t.dist.rank
    ranks = ts.get("ranks")
    if not ranks:  # a file from before per-rank states
        mine = {"rng": ts["rng"], "loss_sum": ts["loss_sum"], "loss_count": ts["loss_count"]}
    elif len(ranks) == world:
        mine = ranks[rank]
    else:
        mine = dict(ranks[rank % len(ranks)])
        mine["loss_sum"] = sum(float(r["loss_sum"]) for r in ranks) if rank == 0 else 0.0
        mine["loss_count"] = sum(int(r["loss_count"]) for r in ranks) if rank == 0 else 0
        if t.dist.is_main:
            log.warning("warning: %s was saved by %d process(es) and resumes with %d: process r takes the RNG "
                        "state of saved process r mod %d, rank 0 the epoch's loss so far, and the data is sharded "
                        "anew, so the run differs from an uninterrupted one", t.run.checkpoint, len(ranks), world,
                        len(ranks))
    s.loss_sum, s.loss_count = float(mine["loss_sum"]), int(mine["loss_count"])
    restore_rng(mine["rng"])


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


def freeze_unreached(model: Backbone, image_size: int) -> list[str]:
    """Freeze the parameters the clustering feature's forward never reaches; their names.

    Taps stop a timm/torchvision model at its last stage, so layers after it (convnext's
    ``head.norm``, efficientnet's ``conv_head``/``bn2``, a hybrid's unused stages) never get a
    gradient. DistributedDataParallel expects a gradient for every parameter that requires
    one and fails at the second step ("Expected to have finished reduction in the prior
    iteration"); freezing them costs nothing, where ``find_unused_parameters=True`` would
    walk the autograd graph every step. One probe forward/backward in eval mode (no BN
    statistics move, no RNG is drawn) finds them. SGD and LARC skip parameters without a
    gradient anyway, so single-process numbers do not change.
    """
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        return []
    was_training = model.training
    model.eval()
    device = trainable[0][1].device
    try:
        probe = torch.zeros(2, 3, image_size, image_size, device=device)
        model(probe, taps=[CLUSTER_TAP])[CLUSTER_TAP].float().sum().backward()
        frozen = [n for n, p in trainable if p.grad is None]
    finally:
        for _, p in trainable:
            p.grad = None
        model.train(was_training)
    for name, p in trainable:
        if name in frozen:
            p.requires_grad = False
    if frozen:
        log.info("%d parameter tensor(s) after the last tap get no gradient and stay frozen: %s", len(frozen),
                 ", ".join(frozen[:6]) + (", ..." if len(frozen) > 6 else ""))
    return frozen


def wrap_ddp(module: nn.Module, dist: DistInfo) -> nn.Module:
    """``module`` in DistributedDataParallel under torchrun, itself otherwise."""
    if not dist.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def autocast(device: torch.device, amp: bool):
    """bfloat16 autocast on CUDA and on the CPU when ``amp`` (opt-in: it changes the numbers; on CPUs
    with AVX512-BF16/AMX oneDNN runs bfloat16 convolutions several times faster); a no-op otherwise."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=amp and device.type in AMP_DEVICES)


def sgd(params: Any, device: torch.device, **options: Any) -> torch.optim.SGD:
    """``torch.optim.SGD(params, **options)``, fused into one kernel on the CPU.

    torch's CPU default is a Python loop over the tensors (``foreach`` is CUDA's default), a
    temporary per tensor for the weight decay and ~8 passes over memory: with DeepCluster's
    AlexNet (21.6M parameters at 64 px) that is a large share of a CPU training step, and the
    fused kernel computes the same update bit for bit (tests/test_speed_decoded.py checks it).
    Elsewhere torch's default is kept, so GPU numbers do not move.
    """
    return torch.optim.SGD(params, **options, **({"fused": True} if device.type == "cpu" else {}))


def load_sgd_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a saved optimiser ``state`` but keep ``optimizer``'s implementation switches
    (``fused``/``foreach``): the checkpoint may come from another version or device."""
    switches = [{k: g.get(k) for k in ("fused", "foreach")} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, saved in zip(optimizer.param_groups, switches):
        group.update(saved)


def progress(iterable, desc: str, dist: DistInfo):
    """Progress of the main rank (dcbench.progress: a bar on a terminal, log lines otherwise)."""
    return track(iterable, desc, "batch", enabled=dist.is_main)


def augmentation_seeds(seed: int, epoch: int, rank: int, indices: list[int]) -> list[tuple[int, int]]:
    """``(index, seed)`` sampler items: each crop depends only on (seed, epoch, rank, position),
    never on worker scheduling, so a resumed epoch redraws the same crops."""
    base = (seed * 1_000_003 + epoch) * 10_000_019 + rank * len(indices)
    return [(int(i), (base + pos) % 2**63) for pos, i in enumerate(indices)]


def read_train_state(t: Any, model: Backbone) -> dict[str, Any]:
    """Load ``RUN_DIR/checkpoint.pth`` weights into ``model``; return its ``train_state``.

    A damaged checkpoint.pth (truncated, overwritten) makes the newest readable snapshot in
    ``checkpoints/`` the starting point, with a warning; with none, one error line says so.
    """
    path = t.run.checkpoint
    try:
        record = _resumable(path)
    except CheckpointError as exc:
        path, record = _newest_snapshot(t.run)
        if record is None:
            raise CheckpointError(f"cannot resume: {exc} and {t.run.snapshots} holds no readable training "
                                  f"snapshot; start a new run with another --out") from None
        if t.dist.is_main:
            log.warning("warning: %s; resuming from the newest readable snapshot %s (epoch %s), the epochs "
                        "after it are trained again", exc, path, record.get("epoch"))
    ts = record["train_state"]
    if record["arch"] != t.cfg.arch or bool(record["sobel"]) != model.has_sobel:
        raise DcbenchError(f"{path} was trained with arch {record['arch']} (sobel {record['sobel']}); "
                           f"resume with the same --arch and --sobel/--no-sobel")
    model.load_state_dict(record["state_dict"], strict=False)
    return ts


def _resumable(path: Path) -> dict[str, Any]:
    """The record of a readable dcbench training checkpoint at ``path`` (CheckpointError otherwise)."""
    record = read_checkpoint_file(path)
    if not isinstance(record, dict) or record.get("format") != "dcbench" or record.get("train_state") is None:
        raise CheckpointError(f"{path} is not a resumable training checkpoint")
    return record


def _newest_snapshot(run: RunDir) -> tuple[Path, dict[str, Any] | None]:
    """``(path, record)`` of the newest readable training snapshot in ``checkpoints/`` (record None: none)."""
    for path in sorted(run.snapshots.glob("epoch_*.pth"), reverse=True):
        try:
            return path, _resumable(path)
        except CheckpointError as exc:
            log.warning("warning: skipping snapshot %s (%s)", path, exc)
    return run.snapshots, None

