"""The ``voc-det`` presets' values and the detector's input normalisation (``protocols/voc_det.py``
reads them; the source of every value: ``protocols/_sources_voc_det.py``)."""
from __future__ import annotations

from typing import Any

from dcbench.data.transforms import InputConvention, resolve_uncropped_convention
from dcbench.errors import UsageError

PRESETS: dict[str, dict[str, Any]] = {
    "deepcluster": {
        "mode": "fc6-8", "train_sets": ["2007:trainval"], "test_set": "2007:test", "iterations": 40000,
        "batch_size": 2, "lr": 0.001, "lr_steps": [30000], "warmup_iters": 0, "weight_decay": 5e-4,
        "min_size": [600], "test_size": 600, "max_size": 1000, "anchor_sizes": [128, 256, 512],
        "roi_pool": "pool", "rois_per_image": 64, "proposals_train": 2000, "proposals_test": 300,
        "bn": "frozen", "precise_bn": 0, "train_difficult": False, "rpn_loss_beta": 1 / 9, "box_loss_beta": 1.0,
    },
    "moco": {
        "mode": "all", "train_sets": ["2007:trainval", "2012:trainval"], "test_set": "2007:test",
        "iterations": 24000, "batch_size": 16, "lr": 0.02, "lr_steps": [18000, 22000], "warmup_iters": 100,
        "weight_decay": 1e-4, "min_size": list(range(480, 801, 32)), "test_size": 800, "max_size": 1333,
        "anchor_sizes": [32, 64, 128, 256, 512], "roi_pool": "align", "rois_per_image": 512,
        "proposals_train": 2000, "proposals_test": 1000, "bn": "train", "precise_bn": 200,
        "train_difficult": True, "rpn_loss_beta": 0.0, "box_loss_beta": 0.0,
    },
}
#: recipe constants of each preset that are not settings
PRESET_CONSTANTS: dict[str, dict[str, Any]] = {
    # Caffe's Fast R-CNN: biases at 2x lr without decay (warm-up only when warmup_iters is set)
    "deepcluster": {"bias_lr_factor": 2.0, "bias_decay": False, "norm_weight_decay": 0.0,
                    "warmup_factor": 0.001, "extra_norm": False, "rpn_pre_nms_train": 12000, "rpn_pre_nms_test": 6000,
                    "nms_thresh": 0.3},
    # detectron2 defaults + MoCo's Base-RCNN-C4-BN (Res5ROIHeadsExtraNorm)
    "moco": {"bias_lr_factor": 1.0, "bias_decay": True, "norm_weight_decay": 0.0,
             "warmup_factor": 0.001, "extra_norm": True, "rpn_pre_nms_train": 12000, "rpn_pre_nms_test": 6000,
             "nms_thresh": 0.5},
}


INPUT_CONVENTION_SOURCE = ("dcbench choice (issue 19): published weights (timm pretrained_cfg, torchvision "
                           "weights.transforms()) are normalised with their own mean and std; the resizes stay the "
                           "preset's; random inits and dcbench/DeepCluster checkpoints get ImageNet mean/std "
                           "(torchvision FasterRCNN image_mean / image_std)")


def detection_convention(backbone: Any, settings: Any) -> InputConvention:
    """The normalisation of the detector's input (:func:`dcbench.data.transforms.resolve_convention`,
    mean and std only); UsageError for weights with their own under backend=detectron2, whose
    PIXEL_MEAN / PIXEL_STD dcbench does not change."""
    convention = resolve_uncropped_convention(backbone, settings.input_convention)
    if convention.source is not None and settings.backend == "detectron2":
        raise UsageError(f"voc-det backend=detectron2 keeps detectron2's PIXEL_MEAN/PIXEL_STD, not the weights' input "
                         f"convention ({convention.source}); add --set input_convention=preset or "
                         f"--set backend=torchvision")
    return convention
