"""The box-regression loss of torchvision's Faster R-CNN with the smooth-L1 ``beta`` of a recipe.

torchvision hard-codes ``F.smooth_l1_loss(..., beta=1/9)`` in both the RPN
(``RegionProposalNetwork.compute_loss``) and the box head (``roi_heads.fastrcnn_loss``). The
published recipes differ:

- detectron2 (MoCo / VISSL's R50-C4): ``MODEL.RPN.SMOOTH_L1_BETA = 0.0`` and
  ``MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA = 0.0``, i.e. L1 in both;
- py-faster-rcnn (``models/pascal_voc/*/faster_rcnn_end2end/train.prototxt``): the RPN's
  ``SmoothL1Loss`` has ``sigma: 3`` (beta = 1 / sigma^2 = 1/9), the box head's the default
  ``sigma: 1`` (beta 1, Fast R-CNN's loss).

:class:`SmoothL1RPN` and :class:`SmoothL1RoIHeads` are torchvision's modules with ``beta`` as
a parameter; everything else, the normalisation included (sum over the positives divided by
the number of sampled anchors / RoIs, as in all three), is torchvision's. With beta = 1/9 they
compute exactly what torchvision does, so :func:`set_box_loss` only installs them where a
recipe asks for another beta.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork

#: the beta torchvision uses in both losses
TORCHVISION_BETA = 1.0 / 9.0


def box_head_loss(class_logits: torch.Tensor, box_regression: torch.Tensor, labels: list[torch.Tensor],
                  regression_targets: list[torch.Tensor], beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's ``fastrcnn_loss`` with ``beta``: cross-entropy over the sampled RoIs and
    smooth-L1 on the class-specific deltas of the foreground ones, summed, / number of RoIs."""
    labels_all = torch.cat(labels, dim=0)
    targets = torch.cat(regression_targets, dim=0)
    classification_loss = F.cross_entropy(class_logits, labels_all)
    positive = torch.where(labels_all > 0)[0]
    deltas = box_regression.reshape(class_logits.shape[0], box_regression.size(-1) // 4, 4)
    box_loss = F.smooth_l1_loss(deltas[positive, labels_all[positive]], targets[positive], beta=beta,
                                reduction="sum")
    return classification_loss, box_loss / labels_all.numel()


class SmoothL1RPN(RegionProposalNetwork):
    """torchvision's RPN (the same parts and thresholds as ``rpn``) with the box loss's ``beta``."""

    def __init__(self, rpn: RegionProposalNetwork, beta: float) -> None:
        super().__init__(rpn.anchor_generator, rpn.head, rpn.proposal_matcher.high_threshold,
                         rpn.proposal_matcher.low_threshold, rpn.fg_bg_sampler.batch_size_per_image,
                         rpn.fg_bg_sampler.positive_fraction, dict(rpn._pre_nms_top_n), dict(rpn._post_nms_top_n),
                         rpn.nms_thresh, rpn.score_thresh)
        self.beta = beta

    def compute_loss(self, objectness: torch.Tensor, pred_bbox_deltas: torch.Tensor, labels: list[torch.Tensor],
                     regression_targets: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Objectness BCE over the sampled anchors; smooth-L1 (``beta``) on the positives / sampled."""
        pos, neg = self.fg_bg_sampler(labels)
        pos = torch.where(torch.cat(pos, dim=0))[0]
        sampled = torch.cat([pos, torch.where(torch.cat(neg, dim=0))[0]], dim=0)
        labels_all = torch.cat(labels, dim=0)
        targets = torch.cat(regression_targets, dim=0)
        box_loss = F.smooth_l1_loss(pred_bbox_deltas[pos], targets[pos], beta=self.beta,
                                    reduction="sum") / sampled.numel()
        objectness_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], labels_all[sampled])
        return objectness_loss, box_loss


class SmoothL1RoIHeads(RoIHeads):
    """torchvision's box RoI heads (the same parts and thresholds as ``heads``) with the box
    loss's ``beta``; inference is torchvision's own."""

    def __init__(self, heads: RoIHeads, beta: float) -> None:
        super().__init__(heads.box_roi_pool, heads.box_head, heads.box_predictor, heads.proposal_matcher.high_threshold,
                         heads.proposal_matcher.low_threshold, heads.fg_bg_sampler.batch_size_per_image,
                         heads.fg_bg_sampler.positive_fraction, heads.box_coder.weights, heads.score_thresh,
                         heads.nms_thresh, heads.detections_per_img)
        self.beta = beta

    def forward(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
                image_shapes: list[tuple[int, int]], targets: list[dict[str, torch.Tensor]] | None = None) -> Any:
        """Training: the sampled RoIs' losses (``beta`` for the boxes); eval: torchvision's detections."""
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        proposals, _, labels, regression_targets = self.select_training_samples(proposals, targets)
        class_logits, box_regression = self.box_predictor(self.box_head(self.box_roi_pool(features, proposals,
                                                                                          image_shapes)))
        loss_classifier, loss_box_reg = box_head_loss(class_logits, box_regression, labels, regression_targets,
                                                      self.beta)
        return [], {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}


def set_box_loss(model: Any, rpn_beta: float, box_beta: float) -> None:
    """Give ``model`` (a torchvision FasterRCNN) these smooth-L1 betas (0 = L1); a part whose
    beta is torchvision's keeps torchvision's module."""
    if rpn_beta != TORCHVISION_BETA:
        model.rpn = SmoothL1RPN(model.rpn, rpn_beta)
    if box_beta != TORCHVISION_BETA:
        model.roi_heads = SmoothL1RoIHeads(model.roi_heads, box_beta)
