"""torch.distributed plumbing for ``torchrun --nproc-per-node N -m dcbench train`` (and
``... eval`` / ``... compare``: the runner joins the group with :func:`init_distributed` too).

Single-process runs use the same calls; each collapses to the identity when the world has
one process, so the training loop has a single code path.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from dcbench.env import affinity_cores
from dcbench.errors import DcbenchError, UsageError
from dcbench.parallel import group_device, to_host

log = logging.getLogger("dcbench")

#: minutes a collective may wait before the job fails (the ``dist_timeout_min`` training setting):
#: ranks wait in a collective while rank 0 alone fits the PCA and clusters, which takes far more
#: than torch's 10-minute NCCL default on ImageNet-sized data
DEFAULT_TIMEOUT_MIN = 120.0


@dataclass
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    joined: bool = False  # this process joined the group here (and leaves it in :func:`shutdown`)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(setting: str, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """The device of this process: ``auto`` -> its GPU when CUDA works, else the CPU;
    ``cuda`` -> GPU ``local_rank``; ``cuda:N`` -> GPU N in a single process.

    Under torchrun (``world_size > 1``) the local rank picks the GPU, one per process: an
    explicit ``cuda:N`` other than this process's ``LOCAL_RANK`` would put several processes on
    one GPU, so it is refused (pass ``cuda`` or ``auto``).
    """
    if setting == "auto":
        device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    else:
        try:
            device = torch.device(setting)
        except RuntimeError:
            raise UsageError(f"bad device '{setting}': use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"bad device '{setting}': use auto, cpu, cuda or cuda:N")
    if device.type == "cpu":
        return device
    if not torch.cuda.is_available():
        raise DcbenchError(f"device {setting} asked for but CUDA is not available here; use --device cpu")
    if device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    elif world_size > 1 and device.index != local_rank:
        raise UsageError(f"--device {setting} under torchrun: each process uses the GPU of its LOCAL_RANK "
                         f"(this one {local_rank}); pass --device cuda (or auto), and choose GPUs with "
                         f"CUDA_VISIBLE_DEVICES")
    if device.index >= torch.cuda.device_count():
        raise DcbenchError(f"device {device} asked for but this machine shows {torch.cuda.device_count()} GPU(s); "
                           f"pass --device cuda:N with N below {torch.cuda.device_count()}")
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


def init_distributed(device_setting: str, timeout_min: float | None = None) -> DistInfo:
    """Join the process group torchrun describes in the environment, if any (gloo on the CPU,
    NCCL on GPUs), with collectives failing after ``timeout_min`` minutes (default
    :data:`DEFAULT_TIMEOUT_MIN`).

    A CUDA device becomes the current device (``torch.cuda.set_device``) in every case, one
    process too: faiss's GPU index and every tensor built without a device go to the GPU
    asked for, not GPU 0.
    """
    world_size = env_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_setting, local_rank, world_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size == 1:
        return DistInfo(device=device)
    joined = not dist.is_initialized()  # a caller's own group (e.g. several runs in one job) is kept
    if joined:
        backend = "nccl" if device.type == "cuda" else "gloo"
        minutes = DEFAULT_TIMEOUT_MIN if timeout_min is None else timeout_min
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=minutes),
                                device_id=device if device.type == "cuda" else None)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, joined)


def shutdown(info: DistInfo) -> None:
    """Leave the process group :func:`init_distributed` joined (one the caller joined is kept)."""
    if info.enabled and info.joined and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait for every rank (NCCL: on this rank's GPU)."""
    if info.enabled:
        dist.barrier(device_ids=[info.device.index] if group_device().type == "cuda" else None)


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
    dist.broadcast_object_list(box, src=0, device=group_device())
    return box[0]


def all_reduce_sum(info: DistInfo, value: float) -> float:
    """``value`` summed over ranks (float64, on the group's device: NCCL takes CUDA tensors only)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=group_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(to_host(t).item())


def all_agree(info: DistInfo, flag: bool) -> bool:
    """True when ``flag`` is true on every rank: ranks that must take the same branch (step or
    skip a batch, stop on a non-finite loss) decide together, or DDP's collectives hang."""
    if not info.enabled:
        return flag
    t = torch.tensor([int(bool(flag))], dtype=torch.int32, device=group_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(to_host(t).item())


@contextlib.contextmanager
def main_rank_threads(info: DistInfo) -> Iterator[int]:
    """While rank 0 alone works (PCA fit, k-means) under torchrun, give torch, faiss and the
    BLAS behind numpy the cores of this node, less one per other local process (they wait in a
    collective meanwhile, and a waiting NCCL rank may spin a core); restored on exit.

    torchrun sets ``OMP_NUM_THREADS=1`` for every process (torch ``distributed/run.py``), which
    leaves faiss-cpu and numpy on one thread for the whole clustering. A single process keeps
    its threads as they are. Yields the thread count used.
    """
    if not (info.enabled and info.is_main):
        yield torch.get_num_threads()
        return
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(info.world_size)))
    threads = max(1, affinity_cores() - (local_world - 1))
    before = torch.get_num_threads()
    with contextlib.ExitStack() as stack:
        torch.set_num_threads(threads)
        stack.callback(torch.set_num_threads, before)
        stack.enter_context(_faiss_threads(threads))
        stack.enter_context(_blas_threads(threads))
        yield threads


@contextlib.contextmanager
def _faiss_threads(threads: int) -> Iterator[None]:
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


@contextlib.contextmanager
def _blas_threads(threads: int) -> Iterator[None]:
    """numpy's BLAS reads OMP_NUM_THREADS once at import; threadpoolctl changes it at run time."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: numpy then keeps torchrun's single thread
        yield
        return
    with threadpool_limits(limits=threads):
        yield
