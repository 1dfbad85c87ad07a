"""Building the mmseg segmentor, and the training / evaluation loops of ``voc-seg``.

Why a small loop of our own rather than mmengine's ``Runner``: the Runner would write a work
folder (logs, checkpoints, visualisations, a dumped config) for every evaluation, pick its own
seeding, and register hooks dcbench does not need; dcbench needs instead an exact iteration
count, its own progress bar and log, a frozen-trunk self-check and "a failed run writes
nothing". Everything that affects the numbers is still mmseg's / mmengine's own code: the
``EncoderDecoder`` with its heads and losses, ``SegDataPreProcessor``, the data transforms,
``model.train_step`` with an ``OptimWrapper``, the ``PolyLR`` scheduler stepped once per
iteration (as the Runner's ``ParamSchedulerHook`` does with ``by_epoch=False``), and
``test_step``'s whole-image inference. The training order and the transforms' random draws are
dcbench's (:class:`~dcbench.data.seeded.SeededStream`, not ``InfiniteSampler`` and
``worker_init_fn``): the same numbers with any number of loader workers or processes.

Data parallelism (torchrun): the global batch is the preset's ``batch_size``, each of the N ranks
reads ``batch_size / N`` images of it (every N-th item of the one-process stream), the gradients
are averaged over the global batch, weighted by each rank's readable images, before every SGD
step (:func:`dcbench.parallel.average_gradients_`, DistributedDataParallel's averaging), and
BatchNorm layers that train are SyncBatchNorm on GPUs (MMSelfSup's own SyncBN over 4 GPUs x 4
images) -- on the CPU (gloo) torch has no SyncBatchNorm and their batch statistics are per rank
(recorded). Val images are scored in contiguous blocks per rank
and the per-image confusion matrices gathered back into dataset order.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from dcbench import parallel
from dcbench.data import DataError, MeteredLoader
from dcbench.progress import Progress
from dcbench.metrics.segmentation import confusion_matrix

log = logging.getLogger("dcbench")
#: consecutive batches without a readable image before the run stops with a DataError
MAX_EMPTY_BATCHES = 50


def prepare_mmseg() -> str:
    """Import mmseg's models and transforms (with the ``mmcv.ops`` stand-in when the compiled
    ops are missing) and register ``DCBenchBackbone``; returns who provides ``mmcv.ops``."""
    from dcbench.compat import ensure_mmcv_ops

    source = ensure_mmcv_ops()
    with warnings.catch_warnings():
        # mmcv-lite: "Fail to import MultiScaleDeformableAttention" (a transformer op dcbench never uses)
        warnings.filterwarnings("ignore", message=".*MultiScaleDeformableAttention.*")
        import mmseg.datasets  # noqa: F401  (registers the transforms)
        import mmseg.models  # noqa: F401  (registers EncoderDecoder, FCNHead, losses)

        import dcbench.segmentation.backbone  # noqa: F401  (registers DCBenchBackbone)
    return source


@contextlib.contextmanager
def mmseg_scope() -> Iterator[None]:
    """mmseg's registries as the default scope (type names like 'RandomCrop' resolve there)."""
    from mmengine.registry import DefaultScope

    with DefaultScope.overwrite_default_scope("mmseg"):
        yield


@contextlib.contextmanager
def quiet_mmengine(level: int = logging.WARNING) -> Iterator[None]:
    """Raise mmengine's current logger to ``level`` (its ``init_weights`` logs one INFO
    paragraph per parameter to stdout); the previous level comes back afterwards."""
    from mmengine.logging import MMLogger

    logger = MMLogger.get_current_instance()
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


def build_segmentor(net: nn.Module, config: dict[str, Any]) -> nn.Module:
    """The mmseg ``EncoderDecoder`` of ``config`` around ``net`` (modified in place: pass a
    copy), heads initialised as mmseg initialises them (``init_weights``)."""
    from mmengine.config import ConfigDict
    from mmseg.registry import MODELS

    cfg = copy.deepcopy(config)
    cfg["backbone"] = {**cfg["backbone"], "net": net}
    for key in ("train_cfg", "test_cfg"):  # mmseg reads these with attribute access
        cfg[key] = ConfigDict(cfg.get(key) or {})
    with mmseg_scope(), quiet_mmengine(), warnings.catch_warnings():
        # mmseg 1.2.2 warns on every build that its own heads call the deprecated build_loss, and
        # that avg_non_ignore defaults to False: the mean over all crop pixels is its (and
        # MMSelfSup's) standard, kept on purpose
        warnings.filterwarnings("ignore", message=".*build_loss.*would be deprecated.*")
        warnings.filterwarnings("ignore", message=".*avg_non_ignore.*")
        model = MODELS.build(cfg)
        model.init_weights()
    return model


def build_pipeline(transforms: Sequence[dict[str, Any]]) -> Any:
    """mmengine ``Compose`` of mmseg/mmcv transforms."""
    from mmengine.dataset import Compose

    with mmseg_scope():
        return Compose([copy.deepcopy(t) for t in transforms])


def train_loader(dataset: Any, batch_size: int, workers: int, seed: int) -> DataLoader:
    """Endless shuffled batches whose random transforms depend on (seed, pass, image) only.

    mmengine's ``InfiniteSampler`` + ``worker_init_fn`` (MMSelfSup's loader) let the crops depend on
    the number of workers (each worker seeds numpy / random from its id) and on the world size;
    :class:`~dcbench.data.seeded.SeededStream` seeds torch, numpy and ``random`` per image in the
    main process instead (a new shuffle per pass over the data, seeded ``seed + pass``).
    """
    from dcbench.data.seeded import SeededStream, seeded_loader
    from dcbench.segmentation.data import collate

    # under torchrun each rank takes batch_size / N of every global batch, in stream order
    stream = SeededStream(dataset, seed, parallel.world_size(), parallel.rank())
    return seeded_loader(dataset, stream, parallel.per_rank_batch(batch_size, parallel.world_size()), workers,
                         collate_fn=collate, all_generators=True)


def eval_loader(dataset: Any, workers: int) -> DataLoader:
    """One image per batch, in order (test images differ in size; mmseg's val batch is 1)."""
    from dcbench.features import rank_batches
    from dcbench.segmentation.data import collate

    if parallel.world_size() > 1:  # this rank's contiguous block of the images
        blocks = rank_batches(len(dataset), 1, (parallel.rank(), parallel.world_size()))
        return MeteredLoader(dataset, batch_sampler=blocks, num_workers=workers, collate_fn=collate)
    return MeteredLoader(dataset, batch_size=1, shuffle=False, num_workers=workers, collate_fn=collate)


def _bar(total: int, desc: str, progress: bool) -> Progress | None:
    """A bar on a terminal, periodic log lines otherwise (:mod:`dcbench.progress`); None when off."""
    return Progress(total, desc, "it") if progress else None


def _model_batch(data: dict[str, Any]) -> dict[str, Any]:
    return {"inputs": data["inputs"], "data_samples": data["data_samples"]}


def _empty_batch(empty: int, failed: list[str]) -> int:
    """Count one more batch in a row without a readable image; DataError at MAX_EMPTY_BATCHES."""
    empty += 1
    if empty >= MAX_EMPTY_BATCHES:
        raise DataError(f"{empty} batches in a row without a readable training image "
                        f"(last error: {failed[-1] if failed else 'none'})")
    return empty


def train(model: nn.Module, loader: DataLoader, schedule: dict[str, Any], progress: bool = False) -> dict[str, Any]:
    """``schedule['max_iters']`` iterations of ``model.train_step``; returns the loss log
    (every 10% of the run) and the images that could not be read."""
    from mmengine.optim import OptimWrapper, PolyLR

    iterations = int(schedule["max_iters"])
    opt_cfg = {k: v for k, v in schedule["optimizer"].items() if k != "type"}
    sched_cfg = {k: v for k, v in schedule["param_scheduler"].items() if k != "type"}
    params = [p for p in model.parameters() if p.requires_grad]
    if parallel.world_size() > 1:
        return _train_parallel(model, loader, iterations, opt_cfg, sched_cfg, params, progress)
    wrapper = OptimWrapper(torch.optim.SGD(params, **opt_cfg))
    scheduler = PolyLR(wrapper.optimizer, **sched_cfg)
    every, losses, failed, empty = max(1, iterations // 10), [], [], 0
    bar = _bar(iterations, "voc-seg train", progress)
    model.train()
    batches = iter(loader)
    iteration = 0
    while iteration < iterations:
        data = next(batches)
        failed += data["failed"]
        if not data["indices"]:
            empty = _empty_batch(empty, failed)
            continue
        empty = 0
        log_vars = model.train_step(_model_batch(data), wrapper)
        scheduler.step()
        iteration += 1
        if iteration % every == 0 or iteration == iterations:
            losses.append([iteration, round(float(torch.as_tensor(log_vars["loss"]).detach()), 5)])
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if failed:
        log.warning("voc-seg: %d unreadable training images skipped (first: %s)", len(failed), failed[0])
    return {"loss": losses, "skipped_train_images": len(failed), "final_lr": wrapper.get_lr()["lr"][0]}


def _train_parallel(model: nn.Module, loader: DataLoader, iterations: int, opt_cfg: dict[str, Any],
                    sched_cfg: dict[str, Any], params: list[nn.Parameter], progress: bool) -> dict[str, Any]:
    """:func:`train` on one rank of a torchrun job: this rank's share of every global batch, the
    gradients averaged over the global batch before each step (the module docstring)."""
    import random
    import zlib

    from mmengine.optim import PolyLR

    seed = zlib.crc32(f"{getattr(loader.sampler, 'seed', 0)}:voc-seg:{parallel.rank()}".encode())
    random.seed(seed)  # each rank its own augmentation stream (mmcv transforms draw from numpy)
    np.random.seed(seed)
    torch.manual_seed(seed)
    wrapper = _global_batch_wrapper(torch.optim.SGD(params, **opt_cfg))
    wrapper.params = params
    scheduler = PolyLR(wrapper.optimizer, **sched_cfg)
    every, losses, failed, empty = max(1, iterations // 10), [], [], 0
    bar = _bar(iterations, "voc-seg train", progress)
    model.train()
    batches = iter(loader)
    iteration = 0
    while iteration < iterations:
        data = next(batches)
        failed += data["failed"]
        wrapper.count = len(data["indices"])
        if wrapper.count:
            loss = model.train_step(_model_batch(data), wrapper)["loss"]  # its step averages first
        else:  # nothing readable here: take part in the average with no sample
            wrapper.zero_grad()
            wrapper.step()
            wrapper.zero_grad()
            loss = 0.0
        if not wrapper.stepped:
            empty = _empty_batch(empty, failed)
            continue
        empty = 0
        scheduler.step()
        iteration += 1
        if iteration % every == 0 or iteration == iterations:
            losses.append([iteration, round(float(torch.as_tensor(loss).detach()), 5)])  # this rank's share
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    failed = [f for part in parallel.all_gather_objects(failed) for f in part]  # every rank's, rank order
    if failed:
        log.warning("voc-seg: %d unreadable training images skipped (first: %s)", len(failed), failed[0])
    parallel.broadcast_module_(model)  # rank 0's BatchNorm statistics for every rank's val share
    return {"loss": losses, "skipped_train_images": len(failed), "final_lr": wrapper.get_lr()["lr"][0]}


def _global_batch_wrapper_class() -> type:
    """mmengine's OptimWrapper, averaging over the global batch before each step."""
    from mmengine.optim import OptimWrapper

    class GlobalBatchWrapper(OptimWrapper):
        """mmengine's ``OptimWrapper`` whose step first averages the gradients over the ranks'
        global batch (weighted by ``count``, this rank's readable images); no rank steps when
        the whole global batch was unreadable (``stepped`` says whether it did)."""

        params: list[nn.Parameter] = []
        count = 0
        stepped = False

        def step(self, **kwargs: Any) -> None:
            self.stepped = bool(parallel.average_gradients_(self.params, self.count))
            if self.stepped:
                super().step(**kwargs)

    return GlobalBatchWrapper


def _global_batch_wrapper(optimizer: torch.optim.Optimizer) -> Any:
    """A GlobalBatchWrapper around ``optimizer`` (the class is built on first use: mmengine is heavy)."""
    return _global_batch_wrapper_class()(optimizer)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, num_classes: int,
             progress: bool = False) -> tuple[np.ndarray, int, list[str]]:
    """Whole-image predictions at the original size (``test_step``) against the label maps:
    one confusion matrix per evaluated image (images x C x C, in dataset order; their sum is the
    protocol's matrix, the rows feed the bootstrap over images), the images evaluated, the failures."""
    model.eval()
    per_image: list[np.ndarray] = []
    count, failed, order = 0, [], []
    bar = _bar(len(loader), "voc-seg eval", progress)
    for data in loader:
        failed += data["failed"]
        if data["indices"]:
            for sample in model.test_step(_model_batch(data)):
                pred = sample.pred_sem_seg.data.squeeze(0).cpu().numpy()
                gt = sample.gt_sem_seg.data.squeeze(0).cpu().numpy()
                per_image.append(confusion_matrix(pred, gt, num_classes))
                count += 1
            order += list(data["indices"])
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if parallel.world_size() > 1:  # every rank's block, back in dataset order
        parts = parallel.all_gather_objects((order, per_image, failed))
        ranked = sorted((i, cm) for idx, cms, _ in parts for i, cm in zip(idx, cms))
        per_image, count = [cm for _, cm in ranked], len(ranked)
        failed = [f for _, _, fails in parts for f in fails]
    if failed:
        log.warning("voc-seg: %d unreadable test images skipped (first: %s)", len(failed), failed[0])
    stacked = np.stack(per_image) if per_image else np.zeros((0, num_classes, num_classes), dtype=np.int64)
    return stacked, count, failed
