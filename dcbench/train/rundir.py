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
        if resume and self.config.exists():
            saved = yaml.safe_load(self.config.read_text()) or {}
            changed = resume_conflicts(saved, config)
            if changed:
                shown = ", ".join(f"{k} ({saved[k]!r} -> {config.get(k)!r})" for k in changed)
                raise UsageError(f"cannot resume {self.path} with other settings: {shown}; resume with the "
                                 f"settings in {self.config.name}, or start a new run with another --out")

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
        self.config.write_text(yaml.safe_dump(config, sort_keys=False))

    def log_epoch(self, record: dict[str, Any]) -> None:
        """Append one JSON line; rewrite-free so a crash never corrupts earlier epochs."""
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._tensorboard(record)

    def truncate_metrics(self, epochs_done: int) -> None:
        """Drop lines of epochs a resumed run will redo (written after the last checkpoint)."""
        if not self.metrics.exists():
            return
        lines = [line for line in self.metrics.read_text().splitlines()
                 if line.strip() and json.loads(line)["epoch"] < epochs_done]
        self.metrics.write_text("".join(line + "\n" for line in lines))

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
    torch.set_rng_state(state["torch"])
    random.setstate(_plain_to_py_state(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _py_state_to_plain(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _plain_to_py_state(plain: list) -> tuple:
    return (plain[0], tuple(plain[1]), plain[2])
