"""Metric functions (public API): AP variants, revisited-Oxford mAP, mIoU, NMI, top-k accuracy.

Each submodule holds one family; this module re-exports the public functions.
"""
from dcbench.cluster.nmi import nmi
from dcbench.metrics.ap import mean_ap, voc_ap, voc_class_ap
from dcbench.metrics.classification import hits_of, topk_accuracy, topk_correct, topk_hits
from dcbench.metrics.retrieval import old_protocol_map, revisited_map
from dcbench.metrics.segmentation import confusion_matrix, mean_iou, pixel_accuracy

__all__ = ["confusion_matrix", "hits_of", "mean_ap", "mean_iou", "nmi", "old_protocol_map", "pixel_accuracy",
           "revisited_map", "topk_accuracy", "topk_correct", "topk_hits", "voc_ap", "voc_class_ap"]
