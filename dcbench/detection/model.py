"""Faster R-CNN (torchvision's implementation) on a dcbench backbone.

Two designs, chosen by the backbone:

- DeepCluster AlexNet / VGG16 (the paper's Fast R-CNN setup): the trunk is the Sobel front
  end and the conv layers up to conv5's ReLU (pool5 removed, stride 16); RoI pooling replaces
  pool5, and the box head is the checkpoint's OWN classifier (fc6, fc7, with their dropout),
  weights kept, as Fast R-CNN initialises fc6/fc7 from the pre-trained network. fc6 takes a
  ``channels x grid x grid`` input, where ``grid`` is the side of pool5's output at the input
  size the checkpoint was built for (6 for AlexNet and 7 for VGG16 at 224 px; 1 for AlexNet
  built at 64 px). The RoI output size is therefore the backbone's grid, whatever the
  detection image size: fc6 fits without re-initialisation.
- ResNets (torchvision ``tv:resnet*`` or timm ResNets with the torchvision layout): the C4
  design of Faster R-CNN / detectron2 / MoCo: the trunk is stem + res2..res4 (stride 16), the
  RoI head is res5 (its first block strides 2) on 14 x 14 RoI features, globally averaged,
  optionally followed by an extra BatchNorm after res5 (MoCo's ``Res5ROIHeadsExtraNorm``).
- timm ViTs: ViTDet's backbone (Li et al., ECCV 2022; facebookresearch/detectron2
  ``modeling/backbone/vit.py``): the trunk is the whole ViT, whose last block's patch tokens
  (no final norm) are ONE map at the patch stride; the neck is the scale-1 level of ViTDet's
  ``SimpleFeaturePyramid`` (1x1 conv to 256 channels + LayerNorm, 3x3 conv + LayerNorm, no bias),
  so the detector is single-scale (ViTDet builds strides 4..32 from that map); RoIAlign 7 x 7 and
  detectron2's FPN box head (``FastRCNNConvFCHead``, two fc of 1024, c2_xavier_fill; ViTDet uses 4
  convs + 1 fc). ``fc6-8`` freezes the ViT; the neck trains in both modes.

Both: an RPN with one 3x3 conv on the trunk's map, anchors of the given sizes and aspect
ratios, box losses with the recipe's smooth-L1 betas (:mod:`dcbench.detection.losses`); a new box predictor (class scores N(0, 0.01), class-specific box deltas N(0, 0.001),
biases 0, as Fast R-CNN and detectron2 initialise it) over ``n_classes + 1`` outputs (0 is
the background). The detector works on a deep COPY of the backbone. Images enter as RGB in
[0, 1]; torchvision's transform resizes them (short side ``min_size``, long side at most
``max_size``) and normalises them with the ImageNet mean/std, which is what every dcbench
backbone expects.
"""
from __future__ import annotations

import copy
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import roi_align, roi_pool

from dcbench import finetune as ft
from dcbench.data import IMAGENET_MEAN, IMAGENET_STD
from dcbench.detection.losses import TORCHVISION_BETA, set_box_loss
from dcbench.errors import UsageError

#: RoI output side of the C4 head (detectron2's POOLER_RESOLUTION for R50-C4)
C4_ROI_SIZE = 14
#: side of the probe image used to measure the trunk's stride and channels
_PROBE_SIDE = 128
#: ViTDet: SimpleFeaturePyramid out_channels 256; detectron2 ROI_BOX_HEAD POOLER_RESOLUTION 7, FC_DIM 1024
VIT_NECK_CHANNELS, VIT_ROI_SIZE, VIT_FC_DIM = 256, 7, 1024


@dataclass
class DetectorSpec:
    """The architecture-level recipe of a detector (the protocol's presets fill it)."""

    min_size: tuple[int, ...] = (800,)  # training short sides (one drawn per image)
    test_size: int = 800  # test short side
    max_size: int = 1333  # long-side cap, train and test
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    roi_pool: str = "align"  # "align": RoIAlign (aligned, adaptive sampling) | "pool": RoIPool (max)
    rpn_pre_nms_train: int = 12000
    rpn_post_nms_train: int = 2000
    rpn_pre_nms_test: int = 6000
    rpn_post_nms_test: int = 1000
    rois_per_image: int = 512  # RoIs sampled per image for the box head
    fg_fraction: float = 0.25
    extra_norm: bool = False  # C4 only: BatchNorm after res5 (MoCo)
    rpn_loss_beta: float = TORCHVISION_BETA  # smooth-L1 beta of the RPN's box loss (0: L1)
    box_loss_beta: float = TORCHVISION_BETA  # smooth-L1 beta of the box head's loss (0: L1)
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_image: int = 100
    # the normalisation of GeneralizedRCNNTransform: ImageNet's, or published weights' own (issue 19)
    image_mean: tuple[float, ...] = tuple(IMAGENET_MEAN)
    image_std: tuple[float, ...] = tuple(IMAGENET_STD)

    def describe(self) -> dict[str, Any]:
        """JSON-safe, for the result record."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


class FeatureTrunk(ft.Trunk):
    """Sobel (when the backbone has it) + the layers up to the detection feature map, as the
    one-map dict torchvision's FasterRCNN takes."""

    def __init__(self, sobel: nn.Module | None, body: nn.Module) -> None:
        super().__init__(sobel, body)
        self.out_channels = 0  # set by build_detector (torchvision's FasterRCNN reads it)
        self.stride = 0

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return OrderedDict([("0", super().forward(x))])


class FcBoxHead(nn.Module):
    """Flatten the pooled RoI features, then the checkpoint's classifier (fc6, fc7)."""

    def __init__(self, classifier: nn.Sequential) -> None:
        super().__init__()
        self.classifier = classifier
        self.out_features = [m for m in classifier if isinstance(m, nn.Linear)][-1].out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(x, 1))


class Res5BoxHead(nn.Module):
    """res5 on the RoI features, [extra BatchNorm], global average (the C4 box head)."""

    def __init__(self, res5: nn.Module, out_features: int, extra_norm: bool) -> None:
        super().__init__()
        self.res5 = res5
        self.norm = nn.BatchNorm2d(out_features) if extra_norm else None
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.res5(x)
        if self.norm is not None:
            x = self.norm(x)
        return x.mean(dim=(2, 3))


class ViTMap(nn.Module):
    """A dcbench ViT backbone up to block ``tap``: its patch tokens as one N x D x h x w map."""

    def __init__(self, net: nn.Module, tap: str) -> None:
        super().__init__()
        self.net, self.tap = net, tap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x, taps=[self.tap])[self.tap]


class NeckedTrunk(nn.Module):
    """The trunk's map through a neck (ViTDet's pyramid level), as the one-map dict of FasterRCNN;
    the trunk alone is what ``fc6-8`` freezes."""

    def __init__(self, trunk: FeatureTrunk, neck: nn.Module, out_channels: int) -> None:
        super().__init__()
        self.trunk, self.neck, self.out_channels = trunk, neck, out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return OrderedDict([("0", self.neck(self.trunk(x)["0"]))])


def simple_pyramid_level(in_channels: int, out_channels: int = VIT_NECK_CHANNELS) -> nn.Sequential:
    """ViTDet SimpleFeaturePyramid's scale-1.0 stage: Conv 1x1 + LN, Conv 3x3 + LN (norm "LN", so no
    conv bias; detectron2 inits these convs with c2_msra_fill = kaiming normal, fan_out)."""
    from timm.layers import LayerNorm2d

    convs = [nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.Conv2d(out_channels, out_channels, 3,
                                                                            padding=1, bias=False)]
    for conv in convs:
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(convs[0], LayerNorm2d(out_channels), convs[1], LayerNorm2d(out_channels))


class MLPBoxHead(nn.Module):
    """detectron2's FastRCNNConvFCHead with NUM_FC 2: flatten, (fc + ReLU) x 2, c2_xavier_fill."""

    def __init__(self, in_features: int, fc_dim: int = VIT_FC_DIM) -> None:
        super().__init__()
        self.fc6, self.fc7 = nn.Linear(in_features, fc_dim), nn.Linear(fc_dim, fc_dim)
        for fc in (self.fc6, self.fc7):
            nn.init.kaiming_uniform_(fc.weight, a=1)
            nn.init.zeros_(fc.bias)
        self.out_features = fc_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc7(torch.relu(self.fc6(torch.flatten(x, 1)))))


class RoIPooler(nn.Module):
    """RoI features of the trunk's single map at a fixed stride (torchvision's RoIHeads call)."""

    def __init__(self, kind: str, output_size: int, stride: int) -> None:
        super().__init__()
        if kind not in ("align", "pool"):
            raise ValueError(f"roi_pool must be 'align' or 'pool', got {kind!r}")
        self.kind, self.output_size, self.scale = kind, output_size, 1.0 / stride

    def forward(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
                image_shapes: list[tuple[int, int]]) -> torch.Tensor:
        x = features["0"]
        boxes = [p.to(x.dtype) for p in proposals]
        if self.kind == "pool":  # Fast R-CNN's max pooling over bins
            return roi_pool(x, boxes, self.output_size, self.scale)
        # detectron2's ROIAlignV2: half-pixel aligned, adaptive sampling
        return roi_align(x, boxes, self.output_size, self.scale, sampling_ratio=0, aligned=True)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, output_size={self.output_size}, spatial_scale={self.scale}"


class Detector(nn.Module):
    """A torchvision Faster R-CNN whose parts dcbench names: ``trunk`` (what ``fc6-8`` freezes),
    ``box_head`` (fc6/fc7 or res5), ``model`` (the whole detector).

    ``train()`` uses the training short sides, ``eval()`` the test size; modules listed in
    ``frozen_modules`` stay in eval mode in both (BatchNorm with running statistics).
    """

    def __init__(self, model: FasterRCNN, trunk: FeatureTrunk, box_head: nn.Module, spec: DetectorSpec,
                 design: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.spec = spec
        self.design = design
        self.frozen_modules: list[nn.Module] = []
        # plain references (not registered twice): they live inside ``model``
        object.__setattr__(self, "_trunk", trunk)
        object.__setattr__(self, "_box_head", box_head)

    @property
    def trunk(self) -> FeatureTrunk:
        """The feature trunk (shared with ``model.backbone``)."""
        return self._trunk

    @property
    def box_head(self) -> nn.Module:
        """The RoI box head (shared with ``model.roi_heads.box_head``)."""
        return self._box_head

    def train(self, mode: bool = True) -> "Detector":
        super().train(mode)
        self.model.transform.min_size = tuple(self.spec.min_size) if mode else (self.spec.test_size,)
        for module in self.frozen_modules:
            module.eval()
        return self

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None) -> Any:
        """Training (targets given): the dict of losses; eval: one dict of boxes/labels/scores per image."""
        return self.model(images, targets)


# ----------------------------------------------------------------------------- building
def _conv5_parts(net: nn.Module) -> tuple[FeatureTrunk, nn.Module, int, str]:
    trunk = FeatureTrunk(net.sobel, ft.conv_body(net, net.conv_tap_names[-1]))  # to conv5's ReLU: pool5 dropped
    head = FcBoxHead(net.classifier)
    kind = (f"{net.arch}: conv trunk to {net.conv_tap_names[-1]} (stride 16), RoI {net.grid}x{net.grid} = the "
            f"checkpoint's pool5 grid, box head = its own fc6/fc7")
    return trunk, head, net.grid, kind


def _vit_parts(net: nn.Module) -> tuple[FeatureTrunk, nn.Module, int, str]:
    tap = net.conv_tap_names[-1]
    ft.freeze_native_head(net)  # the ViT's own classifier never runs
    trunk = FeatureTrunk(None, ViTMap(net, tap))  # a ViT backbone applies its own Sobel front end
    head = MLPBoxHead(VIT_NECK_CHANNELS * VIT_ROI_SIZE * VIT_ROI_SIZE)
    kind = (f"{net.arch}: ViTDet single-scale (trunk: the ViT to {tap}, patch tokens as one map; neck: "
            f"SimpleFeaturePyramid scale 1, {VIT_NECK_CHANNELS} ch; RoI {VIT_ROI_SIZE}x{VIT_ROI_SIZE}, "
            f"box head 2 fc {VIT_FC_DIM})")
    return trunk, head, VIT_ROI_SIZE, kind


def _c4_parts(net: nn.Module, extra_norm: bool) -> tuple[FeatureTrunk, nn.Module, int, str]:
    body, res5 = ft.c4_split(net)
    trunk = FeatureTrunk(net.sobel, body)
    width = _probe_channels(res5, _probe_channels(trunk, None))
    head = Res5BoxHead(res5, width, extra_norm)
    kind = (f"{net.arch}: C4 (trunk stem..res4, RoI {C4_ROI_SIZE}x{C4_ROI_SIZE}, box head res5"
            f"{' + BatchNorm' if extra_norm else ''} + global average)")
    return trunk, head, C4_ROI_SIZE, kind


@torch.no_grad()
def _probe_channels(module: nn.Module, in_channels: int | None) -> int:
    """Output channels of ``module`` (a trunk when ``in_channels`` is None, else a res5 stage)."""
    was = module.training
    module.eval()
    x = torch.zeros(1, 3, _PROBE_SIDE, _PROBE_SIDE) if in_channels is None else torch.zeros(1, in_channels, 8, 8)
    out = module(x)
    module.train(was)
    return int((out["0"] if isinstance(out, dict) else out).shape[1])


@torch.no_grad()
def _measure_trunk(trunk: FeatureTrunk) -> tuple[int, int]:
    """(channels, stride) of the trunk's map; the stride is the power of two nearest to input/output."""
    was = trunk.training
    trunk.eval()
    out = trunk(torch.zeros(1, 3, _PROBE_SIDE, _PROBE_SIDE))["0"]
    trunk.train(was)
    stride = 2 ** round(math.log2(_PROBE_SIDE / out.shape[-1]))
    return int(out.shape[1]), int(stride)


def _predictor(in_features: int, n_outputs: int) -> FastRCNNPredictor:
    predictor = FastRCNNPredictor(in_features, n_outputs)
    nn.init.normal_(predictor.cls_score.weight, 0.0, 0.01)
    nn.init.normal_(predictor.bbox_pred.weight, 0.0, 0.001)
    nn.init.zeros_(predictor.cls_score.bias)
    nn.init.zeros_(predictor.bbox_pred.bias)
    return predictor


def supported(backbone: nn.Module) -> bool:
    """Whether :func:`build_detector` has a design for ``backbone``."""
    return ft.design_family(backbone) in ("deepcluster", "resnet", "vit")


def require_supported(backbone: nn.Module) -> None:
    """UsageError naming the supported designs when ``backbone`` has none."""
    if not supported(backbone):
        arch = getattr(backbone, "arch", type(backbone).__name__)
        raise UsageError(f"voc-det has no detector design for {arch}: it supports DeepCluster alexnet/vgg16 "
                         f"(conv5 + RoI pooling + fc6/fc7), ResNets (tv:resnet*, timm ResNets; C4) and timm ViTs "
                         f"(timm:vit_*; ViTDet single-scale)")


def build_detector(backbone: nn.Module, n_classes: int, spec: DetectorSpec, seed: int = 0) -> Detector:
    """A :class:`Detector` for ``n_classes`` object classes over a deep COPY of ``backbone``.

    Raises UsageError for backbones without a design (see the module docstring). The new
    layers (RPN, predictor, extra norm) are initialised from ``seed`` without touching the
    global RNG.
    """
    require_supported(backbone)
    net = copy.deepcopy(backbone).cpu()
    ft.drop_cluster_head(net)  # DeepCluster's cluster head plays no part in detection
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        family = ft.design_family(net)
        if family == "deepcluster":
            trunk, head, roi_size, kind = _conv5_parts(net)
        elif family == "vit":
            trunk, head, roi_size, kind = _vit_parts(net)
        else:
            trunk, head, roi_size, kind = _c4_parts(net, spec.extra_norm)
        trunk.out_channels, trunk.stride = _measure_trunk(trunk)
        features: nn.Module = trunk
        if family == "vit":  # ViTDet's neck between the ViT and the RPN / RoI heads
            features = NeckedTrunk(trunk, simple_pyramid_level(trunk.out_channels), VIT_NECK_CHANNELS)
        anchors = AnchorGenerator(sizes=(tuple(spec.anchor_sizes),), aspect_ratios=(tuple(spec.aspect_ratios),))
        rpn_head = RPNHead(features.out_channels, anchors.num_anchors_per_location()[0])
        model = FasterRCNN(
            features, num_classes=None, min_size=tuple(spec.min_size), max_size=spec.max_size,
            image_mean=list(spec.image_mean), image_std=list(spec.image_std), rpn_anchor_generator=anchors,
            rpn_head=rpn_head, rpn_pre_nms_top_n_train=spec.rpn_pre_nms_train,
            rpn_post_nms_top_n_train=spec.rpn_post_nms_train, rpn_pre_nms_top_n_test=spec.rpn_pre_nms_test,
            rpn_post_nms_top_n_test=spec.rpn_post_nms_test,
            box_head=head,
            box_predictor=_predictor(head.out_features, n_classes + 1), box_score_thresh=spec.score_thresh,
            box_nms_thresh=spec.nms_thresh, box_detections_per_img=spec.detections_per_image,
            box_batch_size_per_image=spec.rois_per_image, box_positive_fraction=spec.fg_fraction)
        # set after construction: torchvision's constructor accepts only its MultiScaleRoIAlign
        model.roi_heads.box_roi_pool = RoIPooler(spec.roi_pool, roi_size, trunk.stride)
        set_box_loss(model, spec.rpn_loss_beta, spec.box_loss_beta)
    design = {"design": kind, "feature_stride": trunk.stride, "feature_channels": features.out_channels,
              "roi_pool": spec.roi_pool, "roi_size": roi_size, "box_head_features": head.out_features,
              "classes_with_background": n_classes + 1,
              "box_loss": {"rpn_smooth_l1_beta": spec.rpn_loss_beta, "box_head_smooth_l1_beta": spec.box_loss_beta}}
    return Detector(model, trunk, head, spec, design)


# ----------------------------------------------------------------------------- what trains
def set_trainable(det: Detector, mode: str, bn: str) -> set[str]:
    """Freeze per ``mode`` and ``bn``; return the names (in ``det.trunk``) of the trunk
    parameters that train.

    ``fc6-8``: the trunk is frozen and kept in eval mode; everything after it (RPN, RoI head,
    predictor) trains. ``all``: the trunk trains too. Parameters the backbone itself keeps
    fixed (the Sobel filters) never train. ``bn="frozen"``: every BatchNorm stays in eval mode
    with its scale/shift frozen (detectron2's FrozenBN); ``bn="train"``: BatchNorm layers that
    train use the statistics of each (micro-)batch (SyncBN's semantics when the whole batch
    is on one device) and update their running statistics.
    """
    if mode not in ft.MODES or bn not in ("frozen", "train"):
        raise ValueError(f"mode must be fc6-8 or all and bn frozen or train, got {mode!r}, {bn!r}")
    allowed = ft.set_trainable(det.trunk, mode)
    frozen: list[nn.Module] = [det.trunk] if mode == "fc6-8" else []
    if bn == "frozen":
        for norm in (m for m in det.model.modules() if ft.is_norm(m)):
            frozen.append(norm)
            for p in norm.parameters():
                p.requires_grad_(False)
        allowed -= ft.bn_affine_names(det.trunk)
    det.frozen_modules = frozen
    det.train(det.training)
    return allowed
