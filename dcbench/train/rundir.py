"""The run folder: config.yaml, metrics.jsonl, assignments/, checkpoint.pth, checkpoints/.

Also the RNG capture/restore that makes a resumed run bit-identical on the CPU.
"""
from __future__ import annotations

import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from dcbench.errors import DcbenchError, UsageError
from dcbench.fileio import atomic_write_text
from dcbench.train.config import resume_conflicts

log = logging.getLogger("dcbench")


class RunDir:
    """Files of one training run. Only rank 0 writes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.checkpoint = self.path / "checkpoint.pth"
        self.metrics = self.path / "metrics.jsonl"
        self.config = self.path / "config.yaml"
        self.assignments = self.path / "assignments"
        self.snapshots = self.path / "checkpoints"
        self._tb = None

    def check(self, config: dict[str, Any], resume: bool) -> None:
        """Refuse to start over a run, to resume nothing, or to resume with other settings.

        Read-only, so every rank runs it and they all stop together (rank 0 alone writes).
        """
        if not resume and self.checkpoint.exists():
            raise UsageError(f"{self.path} already holds a run; pass --resume to continue it "
                             f"or choose another --out")
        if resume and not self.checkpoint.exists():
            raise UsageError(f"nothing to resume: {self.checkpoint} does not exist; drop --resume to start")
        if resume:
            self._check_epochs(config)
        if resume and self.config.exists():
            saved = yaml.safe_load(self.config.read_text()) or {}
            changed = resume_conflicts(saved, config)
            if changed:
                shown = ", ".join(f"{k} ({saved[k]!r} -> {config.get(k)!r})" for k in changed)
                raise UsageError(f"cannot resume {self.path} with other settings: {shown}; resume with the "
                                 f"settings in {self.config.name}, or start a new run with another --out")

    def _check_epochs(self, config: dict[str, Any]) -> None:
        """``--resume --epochs N`` below the epochs already trained would train nothing and record
        N in config.yaml beside weights trained longer: refused (checkpoint.json says where it is)."""
        try:
            done = int(json.loads((self.path / "checkpoint.json").read_text())["epoch"])
        except (OSError, ValueError, KeyError, TypeError):
            return  # no progress file (an older run): the checkpoint itself is read later
        asked = config.get("epochs")
        if isinstance(asked, int) and asked < done:
            raise UsageError(f"cannot resume {self.path} with --epochs {asked}: it has trained {done} epochs "
                             f"already; pass --epochs {done} or more (its weights are in {self.checkpoint})")

    def prepare(self, config: dict[str, Any], resume: bool) -> None:
        """Check (see :meth:`check`), create the folder (checking it is writable) and save the
        resolved config (on resume: the saved one with the changes it may take)."""
        self.check(config, resume)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise DcbenchError(f"cannot write the run folder {self.path} ({exc.strerror or exc}); "
                               f"choose a writable --out") from None
        self.assignments.mkdir(exist_ok=True)
        self.snapshots.mkdir(exist_ok=True)
        atomic_write_text(self.config, yaml.safe_dump(config, sort_keys=False))  # resume reads it: never torn

    def log_epoch(self, record: dict[str, Any]) -> None:
        """Append one JSON line; rewrite-free so a crash never corrupts earlier epochs."""
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._tensorboard(record)

    def truncate_metrics(self, epochs_done: int) -> None:
        """Drop lines of epochs a resumed run will redo (written after the last checkpoint), and
        lines that are not a JSON record with an epoch, such as a last line torn by a process
        killed while writing it (dropped with a warning). The file is rewritten atomically."""
        if not self.metrics.exists():
            return
        kept, torn = [], []
        for number, line in enumerate(self.metrics.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            epoch = _record_epoch(line)
            if epoch is None:
                torn.append(number)
            elif epoch < epochs_done:
                kept.append(line)
        if torn:
            log.warning("warning: dropped %d unreadable line(s) of %s (line %s; a process killed while "
                        "writing leaves a torn last line)", len(torn), self.metrics, ", ".join(map(str, torn)))
        atomic_write_text(self.metrics, "".join(line + "\n" for line in kept))

    def snapshot_path(self, epoch: int) -> Path:
        """``checkpoints/epoch_NNNN.pth``: the resumable snapshot kept after ``epoch`` epochs."""
        return self.snapshots / f"epoch_{epoch:04d}.pth"

    def last_checkpoint_note(self) -> str:
        """Where ``checkpoint.pth`` stands, for messages (from ``checkpoint.json``)."""
        try:
            saved = json.loads((self.path / "checkpoint.json").read_text())
            return f"{self.checkpoint} (epoch {saved['epoch']}, iteration {saved['iteration']})"
        except (OSError, ValueError, KeyError, TypeError):
            return f"{self.checkpoint}" if self.checkpoint.exists() else "none yet"

    def write_progress(self, epoch: int, iteration: int) -> None:
        """``checkpoint.json``: where checkpoint.pth stands, readable without loading it."""
        tmp = self.path / ".checkpoint.json.tmp"
        tmp.write_text(json.dumps({"epoch": epoch, "iteration": iteration, "time": time.time()}))
        os.replace(tmp, self.path / "checkpoint.json")

    def save_assignments(self, epoch: int, assignments: np.ndarray) -> Path:
        """One compressed file per epoch (int32, -1 for unreadable images)."""
        path = self.assignments / f"epoch_{epoch:04d}.npz"
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, assignments=assignments.astype(np.int32))
        os.replace(tmp, path)
        return path

    def _tensorboard(self, record: dict[str, Any]) -> None:
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                self._tb = False
                return
            self._tb = SummaryWriter(str(self.path / "tensorboard"))
        if self._tb:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "epoch" and value is not None:
                    self._tb.add_scalar(key, value, record["epoch"])
            self._tb.flush()


def capture_rng() -> dict[str, Any]:
    """All RNG states, in types ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": _py_state_to_plain(random.getstate()),
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng` captured. CUDA generators are restored for the GPUs this
    machine has (``torch.cuda.set_rng_state_all`` indexes devices by position and fails on a
    machine with fewer); a warning says when some saved GPU states have no GPU here."""
    torch.set_rng_state(state["torch"])
    random.setstate(_plain_to_py_state(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    saved = list(state.get("cuda") or [])
    if saved and torch.cuda.is_available():
        present = torch.cuda.device_count()
        for index, cuda_state in enumerate(saved[:present]):
            torch.cuda.set_rng_state(cuda_state, index)
        if len(saved) > present:
            log.warning("warning: the checkpoint holds the CUDA RNG states of %d GPUs and this machine has %d: "
                        "restored the first %d; GPU randomness may differ from the interrupted run",
                        len(saved), present, present)


def _record_epoch(line: str) -> int | None:
    """The ``epoch`` of one metrics.jsonl line, None when the line is not such a record."""
    try:
        record = json.loads(line)
        return int(record["epoch"])
    except (ValueError, KeyError, TypeError):
        return None


def _py_state_to_plain(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _plain_to_py_state(plain: list) -> tuple:
    return (plain[0], tuple(plain[1]), plain[2])
