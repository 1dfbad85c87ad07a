"""Provenance of ``voc-det``: where each default of each preset comes from and the known
deviations from those sources (shown by ``dcbench protocols voc-det`` and docs/protocols.md;
kept apart so that :mod:`dcbench.protocols.voc_det` stays a short recipe).

``deepcluster``: the paper's Fast R-CNN (rbgirshick/fast-rcnn, whose VOC2007 solver the paper
used) with the RPN of py-faster-rcnn (rbgirshick/py-faster-rcnn) in place of selective search.
``moco``: facebookresearch/moco ``detection/configs/pascal_voc_R_50_C4_24k_moco.yaml`` on
``Base-RCNN-C4-BN.yaml``, everything else detectron2's defaults (``detectron2/config/defaults.py``).
"""
from __future__ import annotations

from dcbench.protocol import Deviation
from dcbench.provenance import FROZEN_FEATURE_SOURCES, WORKERS_SOURCE

_FRCN = "rbgirshick/fast-rcnn"
_PYFRCN = "rbgirshick/py-faster-rcnn"
_MOCO = "facebookresearch/moco detection/configs/pascal_voc_R_50_C4_24k.yaml (base of ..._moco.yaml)"
_C4BN = "facebookresearch/moco detection/configs/Base-RCNN-C4-BN.yaml"
_D2 = "detectron2 config/defaults.py"

COMMON_SOURCES = {
    "seed": "dcbench choice: the trial's seed (new layers, sampling, flips, shuffling); cannot be a deviation",
    "workers": WORKERS_SOURCE,
    "micro_batch": "dcbench choice: 0 = the whole batch in one forward pass (smaller: gradient accumulation)",
    "momentum": f"0.9: {_FRCN} models/*/solver.prototxt momentum; {_D2} SOLVER.MOMENTUM",
    "test_set": f"VOC2007 test: {_FRCN} experiments/scripts (--imdb voc_2007_test); {_MOCO} DATASETS.TEST",
    "classes": "dcbench choice: the VOC classes whose ImageSets/Main/<cls>_test.txt exist (all 20 on VOC2007)",
    "backend": "dcbench choice: torchvision's Faster R-CNN (any supported backbone); detectron2 runs detectron2 "
               "itself for ResNets",
    "bn_recalibrate": FROZEN_FEATURE_SOURCES["bn_recalibrate"],
    "ap_rule": f"VOC07 11-point on np.arange(0, 1.1, 0.1): {_PYFRCN} lib/datasets/voc_eval.py voc_ap "
               "(use_07_metric for VOC2007, pascal_voc.py) and detectron2 evaluation/pascal_voc_evaluation.py",
}
_AUTO = "dcbench choice: auto = deepcluster for DeepCluster's AlexNet/VGG16, moco for every other backbone"
DEEPCLUSTER_SOURCES = {
    "preset": f"the DeepCluster paper's Table 2 detection: Fast R-CNN ({_FRCN}) on the checkpoint's conv5 + fc6/fc7",
    "mode": "DeepCluster paper (Caron et al., ECCV 2018) Table 2, Pascal VOC detection column FC6-8 (ALL: mode=all)",
    "iterations": f"{_FRCN} experiments/scripts/default_*.sh --iters 40000",
    "batch_size": f"{_FRCN} lib/fast_rcnn/config.py TRAIN.IMS_PER_BATCH 2",
    "lr": f"{_FRCN} models/*/solver.prototxt base_lr 0.001",
    "lr_steps": f"{_FRCN} models/*/solver.prototxt lr_policy step, stepsize 30000, gamma 0.1",
    "warmup_iters": f"{_FRCN} solver.prototxt: no warm-up",
    "weight_decay": f"{_FRCN} solver.prototxt weight_decay 0.0005; train.prototxt biases lr_mult 2, decay_mult 0",
    "min_size": f"{_FRCN} lib/fast_rcnn/config.py TRAIN.SCALES (600,)",
    "test_size": f"{_FRCN} lib/fast_rcnn/config.py TEST.SCALES (600,)",
    "max_size": f"{_FRCN} lib/fast_rcnn/config.py TRAIN.MAX_SIZE / TEST.MAX_SIZE 1000",
    "anchor_sizes": f"{_PYFRCN} lib/rpn/generate_anchors.py scales (8, 16, 32) x stride 16, ratios (0.5, 1, 2)",
    "roi_pool": f"{_FRCN} train.prototxt ROIPooling (pool5 replaced, its grid kept)",
    "rois_per_image": f"{_FRCN} config.py TRAIN.BATCH_SIZE 128 / IMS_PER_BATCH 2, FG_FRACTION 0.25",
    "proposals_train": f"{_PYFRCN} config.py TRAIN.RPN_PRE_NMS_TOP_N 12000, RPN_POST_NMS_TOP_N 2000, NMS 0.7",
    "proposals_test": f"{_PYFRCN} config.py TEST.RPN_PRE_NMS_TOP_N 6000, RPN_POST_NMS_TOP_N 300",
    "bn": "dcbench choice: Fast R-CNN's networks have no BatchNorm; DeepCluster's use running statistics (frozen)",
    "precise_bn": "dcbench choice: 0 (nothing to re-estimate with frozen BatchNorm)",
    "rpn_loss_beta": f"{_PYFRCN} models/pascal_voc/*/faster_rcnn_end2end/train.prototxt rpn_loss_bbox "
                     "smooth_l1_loss_param sigma 3.0 (beta = 1 / sigma^2 = 1/9)",
    "box_loss_beta": f"{_FRCN} train.prototxt loss_bbox SmoothL1Loss (sigma 1: beta 1)",
    "train_difficult": f"{_FRCN} lib/datasets/pascal_voc.py config use_diff False",
    "train_sets": f"VOC2007 trainval: {_FRCN} experiments/scripts (--imdb voc_2007_trainval)",
}
MOCO_SOURCES = {
    "preset": f"{_MOCO}: MoCo's (He et al., CVPR 2020 paper) R50-C4 VOC recipe, also VISSL's",
    "mode": f"all: {_C4BN} (MoCo fine-tunes every layer, FREEZE_AT 0)",
    "iterations": f"{_MOCO} SOLVER.MAX_ITER 24000",
    "batch_size": f"{_C4BN} SOLVER.IMS_PER_BATCH 16",
    "lr": f"{_C4BN} SOLVER.BASE_LR 0.02",
    "lr_steps": f"{_MOCO} SOLVER.STEPS (18000, 22000), {_D2} GAMMA 0.1",
    "warmup_iters": f"{_MOCO} SOLVER.WARMUP_ITERS 100 (linear from WARMUP_FACTOR 0.001)",
    "weight_decay": f"{_D2} SOLVER.WEIGHT_DECAY 0.0001, WEIGHT_DECAY_NORM 0.0",
    "min_size": f"{_MOCO} INPUT.MIN_SIZE_TRAIN (480, 512, ..., 800)",
    "test_size": f"{_MOCO} INPUT.MIN_SIZE_TEST 800",
    "max_size": f"{_D2} INPUT.MAX_SIZE_TRAIN / MAX_SIZE_TEST 1333",
    "anchor_sizes": f"{_D2} ANCHOR_GENERATOR.SIZES [[32, 64, 128, 256, 512]], ASPECT_RATIOS [[0.5, 1.0, 2.0]]",
    "roi_pool": f"{_D2} ROI_BOX_HEAD.POOLER_TYPE ROIAlignV2",
    "rois_per_image": f"{_D2} ROI_HEADS.BATCH_SIZE_PER_IMAGE 512, POSITIVE_FRACTION 0.25",
    "proposals_train": f"{_D2} RPN.PRE_NMS_TOPK_TRAIN 12000, POST_NMS_TOPK_TRAIN 2000, NMS_THRESH 0.7",
    "proposals_test": f"{_C4BN} RPN.PRE_NMS_TOPK_TEST 6000, POST_NMS_TOPK_TEST 1000",
    "bn": f"{_C4BN} RESNETS.NORM naiveSyncBN over IMS_PER_BATCH 16 = BatchNorm over the batch on one device "
          "(+ ROI_HEADS.NAME Res5ROIHeadsExtraNorm, detection/train_net.py)",
    "precise_bn": f"{_C4BN} TEST.PRECISE_BN.ENABLED True, {_D2} NUM_ITER 200",
    "rpn_loss_beta": f"{_D2} MODEL.RPN.SMOOTH_L1_BETA 0.0 (L1)",
    "box_loss_beta": f"{_D2} MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA 0.0 (L1)",
    "train_difficult": "detectron2 data/datasets/pascal_voc.py load_voc_instances keeps difficult objects",
    "train_sets": f"{_MOCO} DATASETS.TRAIN ('voc_2007_trainval', 'voc_2012_trainval')",
}
PRESET_SOURCES = {"deepcluster": {**COMMON_SOURCES, **DEEPCLUSTER_SOURCES},
                  "moco": {**COMMON_SOURCES, **MOCO_SOURCES}}

_TIES = Deviation(
    "detections with tied scores ranked in input order (a stable sort)",
    "py-faster-rcnn's / detectron2's voc_eval rank by np.argsort(-confidence), which is not stable: tied "
    "scores may come in another order there (AP differs only when tied detections differ in correctness)")
PRESET_DEVIATIONS = {
    "deepcluster": (
        Deviation("region proposals from an RPN trained jointly with the detector (Faster R-CNN, torchvision), "
                  "not selective search",
                  "the paper's Fast R-CNN read precomputed selective-search boxes; an RPN makes every backbone "
                  "evaluable end to end (background RoIs then come from IoU [0, 0.5), as py-faster-rcnn's "
                  "faster_rcnn_end2end.yml BG_THRESH_LO 0.0): numbers are close to, not equal to, Table 2"),
        _TIES),
    "moco": (
        Deviation("backend=torchvision: detectron2's recipe on torchvision's Faster R-CNN",
                  "anchor matching, RoI sampling and proposal filtering are torchvision's implementations of the "
                  "same rules; backend=detectron2 runs detectron2 itself (ResNets)"),
        _TIES),
}


def auto_sources() -> dict[str, str]:
    """Sources of preset ``auto``: both presets' per setting."""
    keys = dict.fromkeys([*PRESET_SOURCES["deepcluster"], *PRESET_SOURCES["moco"]])
    return {k: (PRESET_SOURCES["deepcluster"][k] if PRESET_SOURCES["deepcluster"][k] == PRESET_SOURCES["moco"][k]
                else f"deepcluster: {PRESET_SOURCES['deepcluster'][k]} | moco: {PRESET_SOURCES['moco'][k]}")
            for k in keys} | {"preset": _AUTO}


def auto_deviations() -> list[Deviation]:
    """Deviations of preset ``auto``: each preset's, named, the shared ones once."""
    out: list[Deviation] = []
    for preset, deviations in PRESET_DEVIATIONS.items():
        for d in deviations:
            shared = all(d in other for other in PRESET_DEVIATIONS.values())
            item = d if shared else Deviation(f"{preset} preset: {d.what}", d.why, d.source)
            if item not in out:
                out.append(item)
    return out
