"""Training, BatchNorm re-estimation and inference of a :class:`~dcbench.detection.model.Detector`.

The solver is detectron2's (and Fast R-CNN's) iteration-based SGD: learning rate ``lr``
times ``gamma`` per step passed, times a linear warm-up factor over the first
``warmup_iters`` iterations (from ``warmup_factor`` to 1); momentum; weight decay on weights,
``norm_weight_decay`` on normalisation parameters, biases with ``bias_lr_factor`` x lr and
``bias_weight_decay``. One iteration = ``batch_size`` images; with ``micro_batch`` smaller
than the batch the gradients of several forward passes are accumulated (same update,
BatchNorm statistics then come from each micro-batch).

Data parallelism (torchrun): the global batch is ``batch_size``; each of the N ranks reads
``batch_size / N`` images of every batch (every N-th image of the one-process order, reshuffled per
epoch from the seed, with the one-process flips: :func:`~dcbench.detection.data.endless_batches`;
the ragged last batch dropped as one process drops it), the gradients are averaged over
the global batch, weighted by each rank's readable images (:func:`dcbench.parallel.average_gradients_`:
DistributedDataParallel's averaging, exact for unequal shares), and every rank steps the same
update. BatchNorm layers that train (``bn=train``) see each rank's share (micro-batch semantics).
PreciseBN runs identically on every rank and rank 0's statistics are broadcast; test images are
detected in contiguous blocks per rank and the detections gathered in dataset order.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from dcbench import parallel
from dcbench.data.datasets import DataError
from dcbench.detection.data import DetectionDataset, collate_detection, detection_loader, endless_batches
from dcbench.detection.evaluation import Detections
from dcbench.detection.model import Detector

log = logging.getLogger("dcbench")


@dataclass
class SolverSpec:
    """The optimisation recipe of a fine-tune."""

    iterations: int = 24000
    batch_size: int = 16
    micro_batch: int = 0  # 0: the whole batch in one forward pass
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    norm_weight_decay: float = 0.0
    bias_lr_factor: float = 1.0
    bias_weight_decay: float = 1e-4
    steps: tuple[int, ...] = (18000, 22000)
    gamma: float = 0.1
    warmup_iters: int = 100
    warmup_factor: float = 0.001
    seed: int = 0
    workers: int = 4
    log_points: int = 10  # losses recorded this many times over the run
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """JSON-safe, for the result record."""
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if k != "extra"}
        return {**out, **self.extra}


def lr_factor(iteration: int, solver: SolverSpec) -> float:
    """Multiplier of the base learning rate at ``iteration`` (0-based): steps, then warm-up."""
    factor = solver.gamma ** sum(1 for s in solver.steps if iteration >= s)
    if iteration < solver.warmup_iters:
        alpha = iteration / solver.warmup_iters
        factor *= solver.warmup_factor * (1.0 - alpha) + alpha
    return factor


def param_groups(det: Detector, solver: SolverSpec) -> list[dict[str, Any]]:
    """SGD parameter groups of the trainable parameters: weights, biases, normalisation parameters."""
    norm_params = {id(p) for m in det.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                                                                   nn.LayerNorm)) for p in m.parameters()}
    groups: dict[str, list[nn.Parameter]] = {"weight": [], "bias": [], "norm": []}
    for name, p in det.named_parameters():
        if not p.requires_grad:
            continue
        kind = "norm" if id(p) in norm_params else ("bias" if name.endswith(".bias") else "weight")
        groups[kind].append(p)
    settings = {"weight": (solver.lr, solver.weight_decay),
                "bias": (solver.lr * solver.bias_lr_factor, solver.bias_weight_decay),
                "norm": (solver.lr, solver.norm_weight_decay)}
    return [{"params": ps, "lr": settings[k][0], "base_lr": settings[k][0], "weight_decay": settings[k][1],
             "name": k} for k, ps in groups.items() if ps]


def _sgd(groups: list[dict[str, Any]], solver: SolverSpec, device: str) -> torch.optim.SGD:
    """SGD with momentum; the fused kernel where torch has one (several times faster on CPU, same update)."""
    if torch.device(device).type in ("cpu", "cuda"):
        try:
            return torch.optim.SGD(groups, lr=solver.lr, momentum=solver.momentum, fused=True)
        except (RuntimeError, TypeError, ValueError):
            pass  # an older torch or an unsupported dtype: the default implementation
    return torch.optim.SGD(groups, lr=solver.lr, momentum=solver.momentum)


def _to_device(images: list[torch.Tensor], targets: list[dict], device: str) -> tuple[list, list]:
    return ([im.to(device, non_blocking=True) for im in images],
            [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets])


def _next_batch(batches: Any, dataset: DetectionDataset, skipped: list[int]) -> tuple[list, list]:
    """The next non-empty batch; DataError when a whole epoch's worth of batches was unreadable."""
    for _ in range(max(1, len(dataset))):
        images, targets, _idx, n_skipped = next(batches)
        skipped[0] += n_skipped
        if images:
            return images, targets
    raise DataError("no readable training image (every JPEG failed to decode); check JPEGImages")


def _chunks(n: int, micro_batch: int) -> list[slice]:
    size = n if micro_batch <= 0 else micro_batch
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def train_detector(det: Detector, dataset: DetectionDataset, solver: SolverSpec, device: str = "cpu",
                   progress: Any = None) -> dict[str, Any]:
    """Fine-tune ``det`` (already frozen per mode, see :func:`~dcbench.detection.model.set_trainable`).

    Returns a small log: the losses at ``log_points`` iterations and the unreadable-image
    count. Raises FloatingPointError when a loss stops being finite (lower the lr).
    """
    det.to(device)
    det.train()
    groups = param_groups(det, solver)
    if solver.iterations and not groups:
        raise RuntimeError("nothing to train: every detector parameter is frozen")
    optimizer = _sgd(groups, solver, device) if groups else None
    if parallel.world_size() > 1:
        return _train_parallel(det, dataset, solver, device, optimizer, progress)
    batches = endless_batches(dataset, solver.batch_size, solver.workers, solver.seed)
    every = max(1, solver.iterations // max(1, solver.log_points))
    losses: list[dict[str, float]] = []
    skipped = [0]
    for it in range(solver.iterations):
        images, targets = _next_batch(batches, dataset, skipped)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(it, solver)
        optimizer.zero_grad(set_to_none=True)
        parts = _step(det, images, targets, solver.micro_batch, device, it)
        optimizer.step()
        if (it + 1) % every == 0 or it + 1 == solver.iterations:
            losses.append({"iteration": it + 1, **{k: round(v, 5) for k, v in parts.items()}})
        if progress is not None:
            progress.update(1)
    return {"loss": losses, "skipped_train_images": skipped[0]}


def _train_parallel(det: Detector, dataset: DetectionDataset, solver: SolverSpec, device: str,
                    optimizer: torch.optim.Optimizer, progress: Any) -> dict[str, Any]:
    """:func:`train_detector`'s loop on one rank of a torchrun job (the module docstring)."""
    import zlib  # noqa: PLC0415

    torch.manual_seed(zlib.crc32(f"{solver.seed}:voc-det:{parallel.rank()}".encode()))  # RPN / RoI box sampling per rank
    params = [p for group in optimizer.param_groups for p in group["params"]]
    shard = (parallel.rank(), parallel.world_size())
    batches = endless_batches(dataset, solver.batch_size, solver.workers, solver.seed, shard)
    every = max(1, solver.iterations // max(1, solver.log_points))
    losses: list[dict[str, float]] = []
    skipped, it, empty = 0, 0, 0
    while it < solver.iterations:
        images, targets, _idx, n_skipped = next(batches)
        skipped += n_skipped
        optimizer.zero_grad(set_to_none=True)
        error: FloatingPointError | None = None
        try:
            parts = _step(det, images, targets, solver.micro_batch, device, it) if images else {}
        except FloatingPointError as exc:  # every rank must stop, not wait for this one in the all-reduce
            error, parts = exc, {}
        if parallel.all_reduce_sum([error is not None])[0]:
            raise error or FloatingPointError(f"detection loss is not finite on another rank at iteration {it + 1}; "
                                              f"lower lr or check the boxes")
        if not parallel.average_gradients_(params, len(images)):
            empty += 1
            if empty > max(1, len(dataset)):
                raise DataError("no readable training image (every JPEG failed to decode); check JPEGImages")
            continue  # the whole global batch was unreadable: no rank steps
        empty = 0
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(it, solver)
        optimizer.step()
        it += 1
        if it % every == 0 or it == solver.iterations:
            losses.append({"iteration": it, **{k: round(v, 5) for k, v in parts.items()}})  # this rank's share
        if progress is not None:
            progress.update(1)
    return {"loss": losses, "skipped_train_images": int(parallel.all_reduce_sum([skipped])[0])}


def _step(det: Detector, images: list, targets: list, micro_batch: int, device: str, it: int) -> dict[str, float]:
    """Forward + backward of one batch (accumulated over micro-batches); the mean losses."""
    totals: dict[str, float] = {}
    n = len(images)
    for part in _chunks(n, micro_batch):
        ims, tgs = _to_device(images[part], targets[part], device)
        loss_dict = det(ims, tgs)
        weight = len(ims) / n  # torchvision's losses are means over the chunk's images/samples
        loss = sum(loss_dict.values()) * weight
        if not torch.isfinite(loss):
            raise FloatingPointError(f"detection loss is {loss.item()} at iteration {it + 1} "
                                     f"({', '.join(f'{k}={v.item():.4g}' for k, v in loss_dict.items())}); "
                                     f"lower lr or check the boxes")
        loss.backward()
        for k, v in loss_dict.items():
            totals[k] = totals.get(k, 0.0) + float(v.detach()) * weight
    totals["total"] = sum(v for k, v in totals.items())
    return totals


@torch.no_grad()
def precise_bn(det: Detector, dataset: DetectionDataset, iterations: int, batch_size: int, workers: int,
               device: str = "cpu", seed: int = 0) -> dict[str, Any]:
    """detectron2's PreciseBN: re-estimate the running statistics of the BatchNorm layers that
    train (those in train mode under ``det.train()``) as the true average over ``iterations``
    training batches, forwarding without gradients. Frozen BatchNorm layers are untouched."""
    det.to(device)
    det.train()
    norms = [m for m in det.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if not norms or iterations <= 0:
        return {"ran": False, "reason": "no BatchNorm in train mode" if not norms else "off"}
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    batches = endless_batches(dataset, batch_size, workers, seed + 7919)
    skipped = [0]
    for _ in range(iterations):
        images, targets = _next_batch(batches, dataset, skipped)
        det(*_to_device(images, targets, device))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    parallel.broadcast_module_(det)  # under torchrun: rank 0's statistics everywhere (the same batches ran)
    return {"ran": True, "iterations": iterations, "batch_size": batch_size, "layers": len(norms)}


@torch.no_grad()
def detect(det: Detector, dataset: DetectionDataset, batch_size: int = 1, workers: int = 0, device: str = "cpu",
           progress: Any = None) -> list[Detections | None]:
    """Detections for every image of ``dataset`` (None for unreadable images), labels 0-based."""
    det.to(device)
    det.eval()
    out: list[Detections | None] = [None] * len(dataset)
    loader = detection_loader(dataset, batch_size, workers, shuffle=False)
    if parallel.world_size() > 1:  # this rank's contiguous block of the test batches
        from dcbench.data import MeteredLoader  # noqa: PLC0415

        from dcbench.features import rank_batches  # noqa: PLC0415

        blocks = rank_batches(len(dataset), batch_size, (parallel.rank(), parallel.world_size()))
        loader = MeteredLoader(dataset, batch_sampler=blocks, num_workers=workers, collate_fn=collate_detection)
    for images, _targets, indices, _n in loader:
        if not images:
            continue
        results = det([im.to(device, non_blocking=True) for im in images])
        for i, res in zip(indices, results):
            out[i] = Detections(res["boxes"].double().cpu().numpy(), res["scores"].double().cpu().numpy(),
                                res["labels"].cpu().numpy().astype("int64") - 1)
        if progress is not None:
            progress.update(len(images))
    if parallel.world_size() > 1:  # every rank's detections, in dataset order
        for part in parallel.all_gather_objects([(i, d) for i, d in enumerate(out) if d is not None]):
            for i, d in part:
                out[i] = d
    return out
