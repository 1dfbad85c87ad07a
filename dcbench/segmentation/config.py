"""The mmsegmentation config of a ``voc-seg`` run, built in code from the preset.

Presets (what each resolves to is recorded in the result):

``mmselfsup`` (MMSelfSup's ``fcn_r50-d8_4xb4-20k_voc12aug-512x512``):
    ResNets: dilated to output stride 8 (res4 dilation 2, res5 dilation 4), ``FCNHead`` on res5
    (2 3x3 convs of 512 channels + BN + ReLU, input concatenated, dropout 0.1) and an auxiliary
    ``FCNHead`` on res4 (1 conv of 256 channels, loss weight 0.4); other backbones: the same main
    head on their last conv tap, no auxiliary head (a timm ViT: ``blockN``, the last block's patch
    tokens as one stride-p map, without the final norm: the single-scale input of ViTDet's simple
    feature pyramid, facebookresearch/detectron2 modeling/backbone/vit.py ViT ->
    SimpleFeaturePyramid). Whole network trained (mode ``all``), BatchNorm
    in train mode (mmseg's ``norm_eval=False``). MMSelfSup's SyncBN over 4 GPUs x 4 images is
    plain BN over the 16 images of a batch here (one process sees the whole batch: the same
    statistics).
``deepcluster`` (the paper's FCN, Long et al.'s "convolutionalised" classifier, FCN-32s):
    AlexNet/VGG16: fc6/fc7 of the checkpoint as convolutions over pool5 (see
    :class:`dcbench.segmentation.backbone.FcAsConv`), then dropout 0.5 (FCN's drop7) and a 1x1
    score convolution (fc8), upsampled bilinearly; mode ``fc6-8`` (convs frozen) by default;
    BatchNorm keeps its running statistics (as in ``voc07-cls``). Other backbones: a 1x1 score
    convolution on the last tap.

Both use cross-entropy with ignore label 255 (mmseg's mean over all pixels of the crop), the
data preprocessor with ImageNet mean/std (the pipeline loads BGR, the preprocessor flips it to
RGB, as dcbench backbones expect) and whole-image inference.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from dcbench.errors import UsageError
from dcbench.finetune import design_family

IGNORE_INDEX = 255
MEAN = [123.675, 116.28, 103.53]  # ImageNet mean/std in 0..255, RGB
STD = [58.395, 57.12, 57.375]
PRESET_MODE = {"mmselfsup": "all", "deepcluster": "fc6-8"}
PRESET_NORM_EVAL = {"mmselfsup": False, "deepcluster": True}
#: the training crop's scale is (RESIZE_RATIO * crop, crop): mmseg's (2048, 512) for crop 512
RESIZE_RATIO = 4
CAT_MAX_RATIO = 0.75


@dataclass
class SegRecipe:
    """What a preset resolves to for one backbone (JSON-safe through :meth:`describe`)."""

    preset: str
    mode: str
    family: str  # deepcluster | resnet | vit | other
    taps: list[str]
    norm_eval: bool
    output_stride: int | None
    decode_head: dict[str, Any]
    auxiliary_head: dict[str, Any] | None = None
    head: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """The recipe as recorded in the result."""
        return asdict(self)


def _loss(weight: float) -> dict[str, Any]:
    return dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=weight)


def fcn_head(in_channels: int, num_classes: int, channels: int, num_convs: int, concat_input: bool,
             dropout: float, in_index: int, loss_weight: float = 1.0) -> dict[str, Any]:
    """mmseg's ``FCNHead`` config (BN after its convs; a pure 1x1 score layer when ``num_convs`` is 0)."""
    return dict(type="FCNHead", in_channels=in_channels, in_index=in_index, channels=channels,
                num_convs=num_convs, kernel_size=1 if num_convs == 0 else 3, concat_input=concat_input,
                dropout_ratio=dropout, num_classes=num_classes,
                norm_cfg=dict(type="BN", requires_grad=True) if num_convs else None,
                align_corners=False, ignore_index=IGNORE_INDEX, loss_decode=_loss(loss_weight))


def tap_channels(net: nn.Module, taps: list[str], size: int = 96) -> dict[str, int]:
    """Channels of each tap, from one small forward pass (eval mode, no gradients)."""
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            out = net(torch.zeros(1, 3, size, size, device=next(net.parameters()).device), taps=taps)
    finally:
        net.train(was_training)
    return {t: int(out[t].shape[1]) for t in taps}


def resolve_recipe(net: nn.Module, preset: str, num_classes: int, mode: str | None = None,
                   norm_eval: bool | None = None, output_stride: int | None = None) -> SegRecipe:
    """The taps, heads, mode and BN handling of ``preset`` for backbone ``net``."""
    from dcbench.segmentation.backbone import FC_TAP

    mode = mode or PRESET_MODE[preset]
    norm_eval = PRESET_NORM_EVAL[preset] if norm_eval is None else norm_eval
    family = design_family(net)
    if output_stride is not None and family != "resnet":
        raise UsageError(f"output_stride={output_stride} needs a ResNet backbone (res4/res5 taps); "
                         f"{getattr(net, 'arch', 'this backbone')} keeps its own stride: drop the setting")
    last = net.conv_tap_names[-1]
    if preset == "deepcluster":
        if family == "deepcluster":
            head = fcn_head(net.feature_dim, num_classes, net.feature_dim, 0, False, 0.5, 0)
            return SegRecipe(preset, mode, family, [FC_TAP], norm_eval, None, head,
                             head="FCN-32s: fc6/fc7 as convolutions + dropout 0.5 + 1x1 score conv, bilinear x32")
        channels = tap_channels(net, [last])[last]
        head = fcn_head(channels, num_classes, channels, 0, False, 0.1, 0)
        return SegRecipe(preset, mode, family, [last], norm_eval, output_stride, head,
                         head=f"1x1 score conv on {last}, bilinear upsampling")
    if family == "resnet":
        stride = 8 if output_stride is None else output_stride
        ch = tap_channels(net, ["res4", "res5"])  # channels do not depend on the dilation
        decode = fcn_head(ch["res5"], num_classes, 512, 2, True, 0.1, 1)
        aux = fcn_head(ch["res4"], num_classes, 256, 1, False, 0.1, 0, loss_weight=0.4)
        return SegRecipe(preset, mode, family, ["res4", "res5"], norm_eval, stride, decode, aux,
                         head=f"FCNHead on res5 (2x conv 512, concat) + auxiliary FCNHead on res4 (0.4); "
                              f"output stride {stride}")
    channels = tap_channels(net, [last])[last]
    decode = fcn_head(channels, num_classes, 512, 2, True, 0.1, 0)
    where = f"{last}, the last block's patch tokens as one map (ViTDet's input)" if family == "vit" else last
    return SegRecipe(preset, mode, family, [last], norm_eval, None, decode,
                     head=f"FCNHead on {where} (2x conv 512, concat)")


def model_config(recipe: SegRecipe, crop_size: int) -> dict[str, Any]:
    """The mmseg ``EncoderDecoder`` config (plain dicts, JSON-safe; the backbone module itself
    is added at build time, see :func:`dcbench.segmentation.build_segmentor`)."""
    return dict(
        type="EncoderDecoder",
        data_preprocessor=dict(type="SegDataPreProcessor", mean=MEAN, std=STD, bgr_to_rgb=True, pad_val=0,
                               seg_pad_val=IGNORE_INDEX, size=(crop_size, crop_size)),
        backbone=dict(type="DCBenchBackbone", taps=list(recipe.taps), frozen=recipe.mode == "fc6-8",
                      norm_eval=recipe.norm_eval, output_stride=recipe.output_stride),
        decode_head=recipe.decode_head,
        auxiliary_head=recipe.auxiliary_head,
        train_cfg=dict(),
        test_cfg=dict(mode="whole"))


def train_pipeline(crop_size: int, scale_range: tuple[float, float]) -> list[dict[str, Any]]:
    """mmseg's VOC training pipeline (``pascal_voc12_aug.py``) at ``crop_size``."""
    return [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations"),
            dict(type="RandomResize", scale=(RESIZE_RATIO * crop_size, crop_size), ratio_range=tuple(scale_range),
                 keep_ratio=True),
            dict(type="RandomCrop", crop_size=(crop_size, crop_size), cat_max_ratio=CAT_MAX_RATIO),
            dict(type="RandomFlip", prob=0.5), dict(type="PhotoMetricDistortion"), dict(type="PackSegInputs")]


def eval_pipeline(crop_size: int) -> list[dict[str, Any]]:
    """mmseg's VOC test pipeline: resize into (4 * crop, crop) keeping the aspect ratio; the
    labels are loaded at the original size (predictions are resized back to it)."""
    return [dict(type="LoadImageFromFile"),
            dict(type="Resize", scale=(RESIZE_RATIO * crop_size, crop_size), keep_ratio=True),
            dict(type="LoadAnnotations"), dict(type="PackSegInputs")]


def schedule_config(iterations: int, lr: float, momentum: float, weight_decay: float, power: float,
                    min_lr: float) -> dict[str, Any]:
    """mmseg's ``schedule_20k.py`` with the run's numbers (recorded in the result)."""
    return dict(optimizer=dict(type="SGD", lr=lr, momentum=momentum, weight_decay=weight_decay),
                param_scheduler=dict(type="PolyLR", eta_min=min_lr, power=power, begin=0, end=iterations,
                                     by_epoch=False),
                max_iters=iterations)
