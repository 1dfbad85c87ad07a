"""Collectives of data-parallel evaluation on torch.distributed (gloo on CPU, NCCL on GPU).

The process group is the one ``torchrun`` (or submitit's torch environment) describes, joined
by the runner (:func:`dcbench.evaluate.join`) with the trainer's backend rule
(:func:`dcbench.train.distributed.init_distributed`). Every function here is the identity
when no group of more than one process exists, so callers keep one code path.

Everything that travels is exact: rows are copied bit for bit (float32 in, float32 out),
counts are summed as int64, other sums as float64, so a metric reduced over ranks equals the
one-process metric (counts, never averages of averages).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

#: one all_gather moves at most about this many bytes per rank (bounded GPU / gloo buffers)
GATHER_CHUNK_BYTES = 64 * 2**20


def per_rank_batch(batch_size: int, world: int) -> int:
    """``batch_size / world``: the global batch of a data-parallel step is the preset's
    ``batch_size`` whatever the number of processes, and each rank reads this share of it.
    UsageError (one line) when ``world`` does not divide ``batch_size``."""
    if batch_size % world:
        from dcbench.errors import UsageError  # noqa: PLC0415

        raise UsageError(f"batch_size {batch_size} is not divisible by the {world} processes of this torchrun job "
                         f"(the global batch is batch_size, each process takes batch_size / {world}): "
                         f"pass --set batch_size=N with N a multiple of {world}, or run torchrun with a "
                         f"process count that divides {batch_size}")
    return batch_size // world


def world_size() -> int:
    """Processes in the joined group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the joined group (0 without one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def group_device() -> torch.device:
    """Where every tensor handed to a collective must live: this process's GPU when the joined
    group's backend is NCCL (it takes CUDA tensors only: torch ``distributed_c10d`` docs, "Backends"),
    the CPU otherwise (gloo, or no group). Under NCCL the current CUDA device is this rank's
    (``init_distributed`` calls ``torch.cuda.set_device(cuda:LOCAL_RANK)`` before joining).

    The one place that says where collective tensors go; tests replace it by a fake device to
    check that no collective is handed a tensor elsewhere (tests/test_train_distributed.py).
    """
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def comm_device() -> torch.device:
    """:func:`group_device` (kept under its older name)."""
    return group_device()


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A collective's result brought back to the CPU (the one way results leave the group's device)."""
    return tensor.detach().cpu()


def barrier() -> None:
    """Wait for every rank."""
    if world_size() > 1:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=group_device())
    return box[0]


def gather_objects(obj: Any) -> list[Any] | None:
    """Every rank's picklable ``obj`` on rank 0 (a list in rank order), None elsewhere."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size() if rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_reduce_sum(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Exact elementwise sums over ranks: int64 for integer input (counts), float64 otherwise."""
    arr = np.asarray(values)
    exact = np.int64 if arr.dtype.kind in "biu" else np.float64
    if world_size() == 1:
        return arr.astype(exact)
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=exact)).to(group_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return to_host(t).numpy()


def broadcast_module_(module: nn.Module, src: int = 0) -> None:
    """Overwrite every parameter and buffer of ``module`` with rank ``src``'s, in place."""
    if world_size() == 1:
        return
    device = group_device()
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            box = tensor.detach().to(device).contiguous()
            dist.broadcast(box, src=src)
            tensor.copy_(to_host(box).to(tensor.device))


def all_gather_rows(rows: np.ndarray, owner: np.ndarray,
                    chunk_bytes: int = GATHER_CHUNK_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's ``rows`` (float32 ``R_r x D``) and ``owner`` (int64 ``R_r``), concatenated in
    rank order, on every rank. A rank may hold no row (its ``D`` is then taken from the others).

    Rows travel in chunks of about ``chunk_bytes`` per rank, padded to the longest rank's
    length, so neither gloo nor NCCL ever needs a buffer of the whole dataset at once.
    """
    world = world_size()
    if world == 1:
        return rows, owner
    device = group_device()
    counts, widths = _gather_shapes(rows, device)
    width = max(widths)
    if any(c and w != width for c, w in zip(counts, widths)):
        raise RuntimeError(f"ranks extracted rows of different widths {widths}")
    total, longest = int(sum(counts)), int(max(counts))
    out_rows = np.empty((total, width), dtype=np.float32)
    out_owner = np.empty(total, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    _gather_into(out_owner[:, None], owner.astype(np.int64)[:, None], counts, offsets, longest, device, chunk_bytes)
    _gather_into(out_rows, rows.reshape(len(rows), -1) if rows.size else np.zeros((0, width), np.float32),
                 counts, offsets, longest, device, chunk_bytes)
    return out_rows, out_owner


def _gather_shapes(rows: np.ndarray, device: torch.device) -> tuple[list[int], list[int]]:
    """``(rows per rank, width per rank)``."""
    mine = torch.tensor([rows.shape[0], rows.shape[1] if rows.ndim == 2 and rows.shape[0] else 0],
                        dtype=torch.int64, device=device)
    shapes = [torch.zeros_like(mine) for _ in range(world_size())]
    dist.all_gather(shapes, mine)
    shapes = [to_host(s) for s in shapes]
    return [int(s[0]) for s in shapes], [int(s[1]) for s in shapes]


def _gather_into(out: np.ndarray, mine: np.ndarray, counts: list[int], offsets: np.ndarray, longest: int,
                 device: torch.device, chunk_bytes: int) -> None:
    """All-gather ``mine`` (``R_r x W``) into ``out`` at each rank's offset, chunk by chunk."""
    width = out.shape[1]
    step = max(1, chunk_bytes // max(1, width * out.itemsize))
    dtype = torch.from_numpy(out[:0]).dtype
    for start in range(0, longest, step):
        stop = min(start + step, longest)
        send = torch.zeros((stop - start, width), dtype=dtype, device=device)
        part = mine[start:stop]
        if len(part):
            send[:len(part)] = torch.from_numpy(np.ascontiguousarray(part)).to(device)
        boxes = [torch.empty_like(send) for _ in counts]
        dist.all_gather(boxes, send)
        for r, box in enumerate(boxes):
            n = max(0, min(counts[r], stop) - start)
            if n:
                out[offsets[r] + start:offsets[r] + start + n] = to_host(box[:n]).numpy()


def all_gather_batch(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's ``rows`` (``R_r x D`` with the same ``D`` and dtype on every rank; ``R_r`` may
    differ and be 0), concatenated in rank order, on every rank, on ``rows``' device.

    The global batch of a data-parallel probe step: pooled features are small next to the
    backbone's forward, so they travel whole (padded to the longest rank) and stay on the GPU
    under NCCL. Bits are copied, not reduced: every rank then holds the exact global batch.
    """
    if world_size() == 1:
        return rows
    device = group_device()
    mine = torch.tensor([rows.shape[0]], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(mine) for _ in range(world_size())]
    dist.all_gather(sizes, mine)
    counts = [int(to_host(s)[0]) for s in sizes]
    send = torch.zeros((max(counts), *rows.shape[1:]), dtype=rows.dtype, device=device)
    send[:rows.shape[0]] = rows.detach().to(device)
    boxes = [torch.empty_like(send) for _ in counts]
    dist.all_gather(boxes, send)
    return _back(torch.cat([box[:n] for box, n in zip(boxes, counts)]), rows.device)


def _back(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A collective's result on ``device``: as is when it is already there (a GPU tensor of an
    NCCL group stays on the GPU), else through :func:`to_host`."""
    return tensor if tensor.device == device else to_host(tensor).to(device)


def all_gather_indexed(rows: np.ndarray, owner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`all_gather_rows`, then sorted by ``owner`` (dataset order for owners that are
    dataset indices): per-image outcomes computed on each rank's share, put back in order."""
    rows, owner = all_gather_rows(rows, owner)
    order = np.argsort(owner, kind="stable")
    return rows[order], owner[order]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj`` on every rank (a list in rank order)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)  # under NCCL it stages through the current CUDA device (set per rank)
    return out


def split_map(run: Callable[[Sequence[tuple]], list], tasks: Sequence[tuple]) -> list:
    """``run(tasks)`` (a list of one result per task) shared by the ranks: rank r runs tasks
    r, r + N, r + 2N, ... (N ranks; interleaved so that each rank gets a share of every kind of
    task in the list), and every rank gets every result, in task order. For independent,
    deterministic work (one SVM fit per class): the results are the one-process ones."""
    world = world_size()
    if world == 1:
        return run(tasks)
    parts = all_gather_objects(run(list(tasks[rank()::world])))
    out: list[Any] = [None] * len(tasks)
    for r, part in enumerate(parts):
        out[r::world] = part
    return out


def average_gradients_(params: Sequence[torch.Tensor], count: int) -> int:
    """Make every rank's gradients the gradient of the mean loss over the GLOBAL batch, in place:
    ``grad := sum_r(count_r * grad_r) / sum_r(count_r)``, where ``grad_r`` is rank r's gradient of
    its mean loss over its ``count_r`` samples (a missing grad counts as zeros). Returns the
    global count (0: nobody had a sample; the gradients are then left zero: skip the step).

    What DistributedDataParallel does (its bucketed all-reduce averages over ranks), except that
    the ranks are weighted by their sample counts, so it stays exact when the shares differ
    (unreadable images, the last partial batch) and a rank with no sample still takes part
    instead of leaving the others waiting in the all-reduce. Identity in one process.
    """
    if world_size() == 1:
        return count
    device = group_device()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.detach().reshape(-1).to(device, torch.float32) for g in grads] +
                     [torch.ones(1, device=device)]) * float(count)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat = _back(flat, params[0].device) if params else flat
    total = int(round(float(flat[-1])))
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = (flat[offset:offset + n] / total).view_as(g).to(g.dtype) if total else torch.zeros_like(p)
        offset += n
    return total
