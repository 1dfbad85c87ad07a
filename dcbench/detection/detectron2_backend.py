"""The optional detectron2 backend of ``voc-det`` (``--set backend=detectron2``).

detectron2 is not on the package registries, so dcbench never depends on it: this module
imports it lazily. When it is importable, a ResNet backbone is exported with
:func:`dcbench.export_detectron2.export_detectron2`, detectron2's R-C4 Faster R-CNN is
configured from the same recipe as the built-in backend (MoCo's ``Res5ROIHeadsExtraNorm``
when the recipe asks for the extra norm), trained with detectron2's ``DefaultTrainer`` on
the VOC records dcbench read, and its test-set predictions are scored by dcbench's own VOC
evaluation (:mod:`dcbench.detection.evaluation`), so both backends report the same metrics.
"""
from __future__ import annotations

import importlib.util
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dcbench.detection.data import DetectionRecord
from dcbench.detection.engine import SolverSpec
from dcbench.detection.evaluation import Detections
from dcbench.detection.model import DetectorSpec
from dcbench.errors import UsageError

log = logging.getLogger("dcbench")

INSTALL_HINT = ("backend=detectron2 needs detectron2, which is not on the package registries: install it with "
                "pip install 'git+https://github.com/facebookresearch/detectron2.git' (matching your torch/CUDA, see "
                "https://detectron2.readthedocs.io/en/latest/tutorials/install.html), or use backend=torchvision")


def detectron2_available() -> bool:
    """Whether ``import detectron2`` would succeed (without importing it)."""
    return importlib.util.find_spec("detectron2") is not None


def require_detectron2() -> None:
    """UsageError (one line saying how to install it) when detectron2 is not importable."""
    if not detectron2_available():
        raise UsageError(INSTALL_HINT)


def _register_extra_norm_head() -> str:
    """Register MoCo's C4 head with a BatchNorm after res5 (once); its registry name."""
    from detectron2.layers import get_norm
    from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads

    name = "Res5ROIHeadsExtraNorm"
    if name in ROI_HEADS_REGISTRY:  # MoCo's own train_net.py (or an earlier run) registered it
        return name

    class Res5ROIHeadsExtraNorm(Res5ROIHeads):
        """res5 followed by one more norm layer (MoCo's detection recipe)."""

        @classmethod
        def _build_res5_block(cls, cfg):  # noqa: ANN001, ANN206 - detectron2's signature
            # a classmethod in detectron2 >= 0.3 (called from from_config); an instance
            # method before, which a classmethod override also serves
            seq, out_channels = super()._build_res5_block(cfg)
            seq.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, out_channels))
            return seq, out_channels

    ROI_HEADS_REGISTRY.register(Res5ROIHeadsExtraNorm)
    return name


def detectron2_depth(loaded: Any) -> int:
    """detectron2's RESNETS.DEPTH for ``loaded``'s backbone; UsageError unless it is a
    bottleneck ResNet (50/101/152) without Sobel, the backbones detectron2's R-C4 takes."""
    from dcbench.errors import CheckpointError
    from dcbench.export_detectron2 import detectron2_state_dict, resnet_depth

    try:
        depth = resnet_depth(detectron2_state_dict(loaded))
    except CheckpointError as exc:
        depth, reason = None, str(exc).split(";")[0]
    else:
        reason = f"{loaded.backbone.arch} has no bottleneck blocks"
    if depth is None:
        raise UsageError(f"backend=detectron2 runs R-C4 on ResNet-50/101/152 ({reason}); use backend=torchvision")
    return depth


def _dataset_dicts(records: Sequence[DetectionRecord]) -> list[dict[str, Any]]:
    from detectron2.structures import BoxMode

    return [{"file_name": r.path, "image_id": r.image_id, "height": r.height, "width": r.width,
             "annotations": [{"bbox": [float(v) for v in box], "bbox_mode": BoxMode.XYXY_ABS,
                              "category_id": int(label) - 1} for box, label in zip(r.boxes, r.labels)]}
            for r in records]


def _register(name: str, records: Sequence[DetectionRecord], classes: Sequence[str]) -> str:
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    dicts = _dataset_dicts(records)
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(thing_classes=list(classes))
    return name


def build_config(weights: Path, depth: int, n_classes: int, spec: DetectorSpec, solver: SolverSpec, mode: str,
                 bn: str, precise_bn_iters: int, train_names: Sequence[str], test_name: str, out_dir: Path,
                 device: str) -> Any:
    """detectron2's config for R-C4 Faster R-CNN with dcbench's recipe."""
    from detectron2.config import get_cfg

    from dcbench.export_detectron2 import DETECTRON2_CONFIG

    cfg = get_cfg()
    cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    cfg.MODEL.WEIGHTS = str(weights)
    cfg.MODEL.DEVICE = device
    cfg.MODEL.MASK_ON = False
    cfg.MODEL.PIXEL_MEAN = DETECTRON2_CONFIG["MODEL.PIXEL_MEAN"]
    cfg.MODEL.PIXEL_STD = DETECTRON2_CONFIG["MODEL.PIXEL_STD"]
    cfg.INPUT.FORMAT = DETECTRON2_CONFIG["INPUT.FORMAT"]
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = DETECTRON2_CONFIG["MODEL.RESNETS.STRIDE_IN_1X1"]
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res4"]
    cfg.MODEL.RESNETS.NORM = "SyncBN" if bn == "train" else "FrozenBN"
    cfg.MODEL.BACKBONE.NAME = "build_resnet_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = 4 if mode == "fc6-8" else 0  # fc6-8: stem..res4 frozen
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [list(spec.anchor_sizes)]
    cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [list(spec.aspect_ratios)]
    cfg.MODEL.RPN.IN_FEATURES = ["res4"]
    cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = spec.rpn_pre_nms_train
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = spec.rpn_post_nms_train
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = spec.rpn_pre_nms_test
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = spec.rpn_post_nms_test
    cfg.MODEL.ROI_HEADS.NAME = _register_extra_norm_head() if spec.extra_norm else "Res5ROIHeads"
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["res4"]
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = n_classes
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = spec.rois_per_image
    cfg.MODEL.ROI_HEADS.POSITIVE_FRACTION = spec.fg_fraction
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = spec.score_thresh
    cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST = spec.nms_thresh
    cfg.TEST.DETECTIONS_PER_IMAGE = spec.detections_per_image
    cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE = "ROIAlignV2" if spec.roi_pool == "align" else "ROIPool"
    cfg.MODEL.RPN.SMOOTH_L1_BETA = spec.rpn_loss_beta  # detectron2's default 0.0 = L1 (the moco preset's)
    cfg.MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA = spec.box_loss_beta
    cfg.INPUT.MIN_SIZE_TRAIN = tuple(spec.min_size)
    cfg.INPUT.MIN_SIZE_TEST = spec.test_size
    cfg.INPUT.MAX_SIZE_TRAIN = cfg.INPUT.MAX_SIZE_TEST = spec.max_size
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = tuple(train_names), (test_name,)
    cfg.DATALOADER.NUM_WORKERS = solver.workers
    cfg.SOLVER.IMS_PER_BATCH = solver.batch_size
    cfg.SOLVER.BASE_LR, cfg.SOLVER.MOMENTUM = solver.lr, solver.momentum
    cfg.SOLVER.WEIGHT_DECAY, cfg.SOLVER.WEIGHT_DECAY_NORM = solver.weight_decay, solver.norm_weight_decay
    cfg.SOLVER.BIAS_LR_FACTOR, cfg.SOLVER.WEIGHT_DECAY_BIAS = solver.bias_lr_factor, solver.bias_weight_decay
    cfg.SOLVER.STEPS, cfg.SOLVER.GAMMA = tuple(solver.steps), solver.gamma
    cfg.SOLVER.MAX_ITER = solver.iterations
    cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.WARMUP_FACTOR = solver.warmup_iters, solver.warmup_factor
    cfg.SOLVER.CHECKPOINT_PERIOD = max(1, solver.iterations) * 10  # no intermediate checkpoints
    cfg.TEST.EVAL_PERIOD = 0
    cfg.TEST.PRECISE_BN.ENABLED = precise_bn_iters > 0
    cfg.TEST.PRECISE_BN.NUM_ITER = max(1, precise_bn_iters)
    cfg.SEED = solver.seed
    cfg.OUTPUT_DIR = str(out_dir)
    return cfg


def run_detectron2(loaded: Any, train_records: Sequence[DetectionRecord], test_records: Sequence[DetectionRecord],
                   classes: Sequence[str], spec: DetectorSpec, solver: SolverSpec, mode: str, bn: str,
                   precise_bn_iters: int, device: str) -> tuple[list[Detections], dict[str, Any]]:
    """Train detectron2's R-C4 on ``train_records`` and predict ``test_records``.

    Returns one :class:`Detections` per test record and facts for the result record.
    Raises UsageError when detectron2 is missing or the backbone is not a bottleneck ResNet.
    """
    require_detectron2()
    import detectron2
    import torch
    from detectron2.data import DatasetCatalog
    from detectron2.engine import DefaultTrainer, hooks

    from dcbench.export_detectron2 import export_detectron2

    class _Trainer(DefaultTrainer):
        """DefaultTrainer without its evaluation hook: dcbench scores the predictions itself."""

        def build_hooks(self):  # noqa: ANN202 - detectron2's signature
            return [h for h in super().build_hooks() if not isinstance(h, hooks.EvalHook)]

    depth = detectron2_depth(loaded)
    with tempfile.TemporaryDirectory(prefix="dcbench-d2-") as tmp:
        weights = export_detectron2(loaded, Path(tmp) / "backbone.pkl")
        train_name = _register("dcbench_voc_det_train", train_records, classes)
        test_name = _register("dcbench_voc_det_test", test_records, classes)
        cfg = build_config(weights, depth, len(classes), spec, solver, mode, bn, precise_bn_iters, [train_name],
                           test_name, Path(tmp), device)
        trainer = _Trainer(cfg)
        trainer.resume_or_load(resume=False)  # loads the exported backbone (matching heuristics)
        trainer.train()  # PreciseBN, when enabled, runs after the last iteration
        detections = _predict(trainer.model, DatasetCatalog.get(test_name), cfg)
    return detections, {"detectron2_version": detectron2.__version__, "torch": torch.__version__,
                        "resnet_depth": depth, "config": cfg.dump()}


def _predict(model: Any, dicts: list[dict[str, Any]], cfg: Any) -> list[Detections]:
    """Test-set predictions with detectron2's test loader (its resize), labels 0-based."""
    import torch
    from detectron2.data import build_detection_test_loader

    loader = build_detection_test_loader(cfg, cfg.DATASETS.TEST[0])
    by_id: dict[str, Detections] = {}
    model.eval()
    with torch.no_grad():
        for inputs in loader:
            for inp, out in zip(inputs, model(inputs)):
                inst = out["instances"].to("cpu")
                by_id[inp["image_id"]] = Detections(inst.pred_boxes.tensor.numpy().astype(np.float64),
                                                    inst.scores.numpy().astype(np.float64),
                                                    inst.pred_classes.numpy().astype(np.int64))
    return [by_id.get(d["image_id"], Detections.empty()) for d in dicts]
