"""torch.distributed plumbing for ``torchrun --nproc-per-node N -m dcbench train`` (and
``... eval`` / ``... compare``: the runner joins the group with :func:`init_distributed` too).

Single-process runs use the same calls; each collapses to the identity when the world has
one process, so the training loop has a single code path.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from dcbench.errors import DcbenchError, UsageError


@dataclass
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(setting: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> this process's GPU when CUDA works, else the CPU."""
    if setting == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(setting)
    except RuntimeError:
        raise UsageError(f"bad device '{setting}': use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DcbenchError(f"device {setting} asked for but CUDA is not available here; use --device cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def env_world_size() -> int:
    """The number of processes the launcher (torchrun, submitit's torch environment) announces."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launcher_name() -> str:
    """Who started this process: ``torchrun``, ``submitit-local``, ``submitit-slurm`` or
    ``process`` (a plain command)."""
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        return "torchrun"
    executor = os.environ.get("SUBMITIT_EXECUTOR")
    return f"submitit-{executor}" if executor else "process"


def init_distributed(device_setting: str) -> DistInfo:
    """Join the process group torchrun describes in the environment, if any (gloo on the CPU,
    NCCL on GPUs)."""
    world_size = env_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_setting, local_rank)
    if world_size == 1:
        return DistInfo(device=device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def gather_to_main(info: DistInfo, obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0 (a list in rank order), None elsewhere."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(info: DistInfo, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(info: DistInfo, value: float) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())
