"""One detection fine-tune with the built-in torchvision backend: build the detector on a
copy of the backbone (its BatchNorm statistics first re-estimated when asked), freeze per
mode (:func:`dcbench.detection.model.set_trainable`), train, PreciseBN, check the trunk
(:mod:`dcbench.finetune`), detect on the test set.

The run's numbers come from a recipe object with the fields ``mode``, ``bn``,
``bn_recalibrate``, ``precise_bn``, ``seed`` and ``workers`` (the ``voc-det`` recipe), plus the
architecture (:class:`DetectorSpec`) and optimisation (:class:`SolverSpec`) specs.
"""
from __future__ import annotations

from typing import Any

import torch

from dcbench import finetune as ft
from dcbench import parallel
from dcbench.data.transforms import center_transform
from dcbench.data.voc import VOCSplit
from dcbench.detection.data import DetectionDataset
from dcbench.detection.engine import SolverSpec, detect, precise_bn, train_detector
from dcbench.detection.model import Detector, DetectorSpec, build_detector, set_trainable
from dcbench.features import prepared_backbone

#: images per batch of the BatchNorm re-estimation before the detector is built
RECALIBRATION_BATCH = 16


def prepare_detector(ckpt: Any, n_classes: int, calibration: VOCSplit, spec: DetectorSpec, recipe: Any,
                     device: str, progress: bool) -> tuple[Detector, dict[str, Any]]:
    """The detector on the checkpoint's backbone, whose BatchNorm statistics are first
    re-estimated on ``calibration``'s images (centre crops at the test size) when
    ``recipe.bn_recalibrate`` asks for it (random inits by default); and what was done."""
    recal_ds = calibration.dataset(center_transform(spec.test_size))
    shard = (parallel.rank(), parallel.world_size()) if parallel.world_size() > 1 else None
    with torch.random.fork_rng(devices=[]), prepared_backbone(
            ckpt, recipe.bn_recalibrate, recal_ds, RECALIBRATION_BATCH, recipe.workers, device, recipe.seed,
            progress, shard=shard) as (backbone, _sha, bn_info):
        det = build_detector(backbone, n_classes, spec, recipe.seed)
    parallel.broadcast_module_(det)  # under torchrun: one starting point on every rank (rank 0's)
    return det, bn_info


def finetune_torchvision(ckpt: Any, train_ds: DetectionDataset, test_ds: DetectionDataset, n_classes: int,
                         calibration: VOCSplit, spec: DetectorSpec, solver: SolverSpec, recipe: Any, device: str,
                         progress: bool) -> tuple[list, dict[str, Any]]:
    """Fine-tune a detector and detect on ``test_ds``: the detections (None for an unreadable
    image) and the facts recorded in the result (design, specs, trunk check, training log).
    Raises RuntimeError when the trunk check fails. The torch RNG is seeded from
    ``recipe.seed`` and restored afterwards."""
    det, bn_info = prepare_detector(ckpt, n_classes, calibration, spec, recipe, device, progress)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        allowed = set_trainable(det, recipe.mode, recipe.bn)
        det.to(device)
        guard = ft.TrunkGuard(det.trunk, allowed, recipe.mode)
        bar = ft.progress_bar(solver.iterations, "detection fine-tune", "it", progress)
        train_log = train_detector(det, train_ds, solver, device, bar)
        ft.close_bar(bar)
        pbn = precise_bn(det, train_ds, recipe.precise_bn, solver.batch_size, recipe.workers, device, recipe.seed)
        check = guard.check(solver.iterations)
        bar = ft.progress_bar(len(test_ds), "detect", "img", progress)
        detections = detect(det, test_ds, max(1, min(solver.batch_size, 8)), recipe.workers, device, bar)
        ft.close_bar(bar)
    facts = {"detector": det.design, "detector_spec": spec.describe(), "solver": solver.describe(),
             "trunk_check": check, "bn_recalibrate": bn_info, "precise_bn": pbn, **train_log,
             "skipped_test_images": sum(d is None for d in detections)}
    return detections, facts
