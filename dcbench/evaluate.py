"""Running a protocol on a checkpoint and recording the result.

The order matters to users: settings are validated and the data layout is checked BEFORE a
checkpoint is loaded or any forward pass runs; a result reaches the store in one transaction
only after the protocol finished, so a failed or interrupted evaluation stores nothing.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcbench.checkpoint import LoadedCheckpoint, resolve_checkpoint
from dcbench.env import git_hash, software_versions
from dcbench.errors import UsageError
from dcbench.results import Result, ResultStore, utc_now
from dcbench.settings import apply_settings, to_plain
from protocols import EvalContext, Protocol, get_protocol

log = logging.getLogger("dcbench")


def feature_cache_dir() -> Path:
    """``$DCBENCH_CACHE`` or ``~/.cache/dcbench/features``."""
    return Path(os.environ.get("DCBENCH_CACHE") or Path.home() / ".cache" / "dcbench" / "features")


@dataclass
class Plan:
    """A validated evaluation: protocol, resolved settings, data root."""

    protocol: Protocol
    settings: Any
    root: Path

    @property
    def plain_settings(self) -> dict[str, Any]:
        return to_plain(self.settings)


def plan(protocol_name: str, overrides: dict[str, Any], data_root: str | Path | None) -> Plan:
    """Validate everything that can be validated without loading a checkpoint."""
    protocol = get_protocol(protocol_name)
    settings = apply_settings(protocol.default_settings(), overrides, owner=protocol_name)
    if data_root is None:
        raise UsageError(f"--data is required for {protocol_name}; it expects: "
                         f"{protocol.data_layout.strip().splitlines()[0]}")
    root = Path(data_root).expanduser()
    protocol.check_data(root, settings)
    return Plan(protocol, settings, root)


def with_seed(p: Plan, seed: int) -> Plan:
    """The same plan with another ``seed`` setting (for ``compare --seeds``)."""
    if not hasattr(p.settings, "seed"):
        raise UsageError(f"{p.protocol.name} has no seed setting; drop --seeds")
    return Plan(p.protocol, apply_settings(p.settings, {"seed": seed}), p.root)


def load_for(p: Plan, spec: str, arch: str | None = None, trust: bool = False) -> LoadedCheckpoint:
    """The checkpoint, with a random init built at the protocol's image size."""
    size = p.protocol.model_input_size(p.settings)
    return resolve_checkpoint(spec, arch=arch, trust=trust, input_size=size)


def context_for(p: Plan, device: str = "auto", progress: bool = False) -> EvalContext:
    from dcbench.train.distributed import pick_device

    use_cache = getattr(p.settings, "cache", True)
    return EvalContext(device=str(pick_device(device)), cache_dir=feature_cache_dir() if use_cache else None,
                       workers=int(getattr(p.settings, "workers", 0)), progress=progress)


def run(p: Plan, ckpt: LoadedCheckpoint, ctx: EvalContext) -> Result:
    """Run the protocol and wrap its output into a full :class:`Result` record."""
    started, t0 = utc_now(), time.perf_counter()
    output = p.protocol.run(ckpt, p.settings, p.root, ctx)
    return Result(protocol=p.protocol.name, protocol_version=p.protocol.version, checkpoint=ckpt.identity(),
                  settings=p.plain_settings, data={"root": str(p.root.resolve()), "fingerprint": output.data_fingerprint},
                  metrics=list(output.metrics), versions=software_versions(), git=git_hash(), started=started,
                  wall_s=round(time.perf_counter() - t0, 3),
                  extra={**output.extra, "checkpoint_format": ckpt.format, "device": ctx.device,
                         **({"checkpoint_file_sha256": ckpt.meta["file_sha256"]} if "file_sha256" in ckpt.meta else {})})


def run_and_store(p: Plan, ckpt: LoadedCheckpoint, store: ResultStore, ctx: EvalContext) -> Result:
    result = run(p, ckpt, ctx)
    store.add(result)
    return result


def stored(p: Plan, ckpt: LoadedCheckpoint, store: ResultStore) -> Result | None:
    """The latest stored result for this checkpoint, protocol and settings, if any."""
    found = store.find(ckpt.sha256, p.protocol.name, p.plain_settings)
    return found[-1] if found else None
