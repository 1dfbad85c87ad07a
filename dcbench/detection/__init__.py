"""Object detection on dcbench backbones (the engine of the ``voc-det`` protocol).

- :mod:`dcbench.detection.model`: Faster R-CNN (torchvision) on a DeepCluster AlexNet/VGG16
  (conv5 + RoI pooling + the checkpoint's own fc6/fc7) or a ResNet (C4: res5 as RoI head);
  what trains in ``fc6-8`` / ``all`` mode.
- :mod:`dcbench.detection.data`: VOC annotations -> training records, a Dataset with flips.
- :mod:`dcbench.detection.engine`: the iteration-based SGD solver, PreciseBN, inference.
- :mod:`dcbench.detection.evaluation`: VOC devkit AP (AP50, AP75, AP over 0.50:0.95, per class).
- :mod:`dcbench.detection.voc`: the VOC image sets of a run (``YEAR:SPLIT``), classes, annotations.
- :mod:`dcbench.detection.finetune`: one fine-tune with the torchvision backend (build, freeze,
  train, trunk check, detect), on :mod:`dcbench.finetune`'s toolkit.
- :mod:`dcbench.detection.detectron2_backend`: the optional detectron2 backend.

The weight export to detectron2's format is :mod:`dcbench.export_detectron2`.
"""
from dcbench.detection.data import DetectionDataset, DetectionRecord, records_from_annotations
from dcbench.detection.engine import SolverSpec, detect, lr_factor, precise_bn, train_detector
from dcbench.detection.evaluation import (COCO_THRESHOLDS, DetectionAP, Detections, ap_rows, box_iou_devkit,
                                          evaluate_detections)
from dcbench.detection.finetune import finetune_torchvision
from dcbench.detection.model import Detector, DetectorSpec, build_detector, require_supported, set_trainable, supported
from dcbench.detection.voc import DetData, load_det_data, parse_set

__all__ = ["COCO_THRESHOLDS", "DetData", "DetectionAP", "DetectionDataset", "DetectionRecord", "Detections",
           "Detector", "DetectorSpec", "SolverSpec", "ap_rows", "box_iou_devkit", "build_detector", "detect",
           "evaluate_detections", "finetune_torchvision", "load_det_data", "lr_factor", "parse_set", "precise_bn",
           "records_from_annotations", "require_supported", "set_trainable", "supported", "train_detector"]
