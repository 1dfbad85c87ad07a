"""Provenance of the linear-probe protocols (``linear``, ``imagenet-linear``, ``places-linear``):
where each default of each preset comes from and the known deviations from those sources
(shown by ``dcbench protocols NAME`` and docs/protocols.md; kept apart so that
:mod:`dcbench.protocols.linear` stays a short recipe)."""
from __future__ import annotations

from dcbench.protocol import Deviation
from dcbench.provenance import FROZEN_FEATURE_SOURCES

_DC = "facebookresearch/deepcluster"
_VISSL_CFG = ("facebookresearch/vissl configs/config/benchmark/linear_image_classification/imagenet1k/"
              "eval_alexnet_8gpu_transfer_in1k_linear.yaml")
_COMMON_SOURCES = {**FROZEN_FEATURE_SOURCES,
    "seed": "dcbench choice: the trial's seed (head init, shuffling, augmentation); cannot be a deviation",
    "cached": "dcbench choice: false = the sources' augmented training; true trains on centre-crop features "
              "(faster, not the sources' protocol)",
    "lr": f"0.01: {_DC} eval_linear.sh --lr 0.01; VISSL OPTIMIZER.param_schedulers.lr.base_value 0.01 "
          "(base_lr_batch_size 256)",
    "momentum": "0.9: deepcluster eval_linear.py --momentum; VISSL OPTIMIZER.momentum",
    "batch_size": "256: deepcluster eval_linear.py --batch_size; VISSL BATCHSIZE_PER_REPLICA 32 x 8 GPUs",
    "image_size": "224: RandomCrop(224) / CenterCrop or TenCrop(224) after Resize(256) in both sources",
    "head_init": f"torch's default nn.Linear init: {_DC} eval_linear.py RegLog (no init call); vissl/models/heads/"
                 "mlp.py ('we use the default normal or uniform initialization', PARAMS_MULTIPLIER 1.0)",
}
PRESET_SOURCES: dict[str, dict[str, str]] = {
    "deepcluster": {**_COMMON_SOURCES,
        "preset": f"the DeepCluster paper's Table 1 protocol, {_DC} eval_linear.py + eval_linear.sh",
        "taps": f"{_DC} eval_linear.py --conv 1..5 (the ReLU after each conv, forward()), pools RegLog.av_pool, one "
                "tap per run (dcbench: all in one run; the heads are independent, each seeded by its tap); other "
                "architectures: adaptive average pooling to the table's grids (dcbench choice)",
        "epochs": f"{_DC} eval_linear.py --epochs 90",
        "weight_decay": f"{_DC} eval_linear.sh --wd -7 (10**-7); lr_t = lr0 / sqrt(1 + lr0 * wd * t), "
                        "util.py learning_rate_decay",
        "crops": f"{_DC} eval_linear.sh --tencrops (Resize(256), TenCrop(224), softmax averaged: validate())",
        "train_center_crop": f"{_DC} eval_linear.py transformations_train: Resize(256), CenterCrop(256), "
                             "RandomCrop(224), RandomHorizontalFlip",
    },
    "vissl": {**_COMMON_SOURCES,
        "preset": f"{_VISSL_CFG} (Places205: places205/eval_alexnet_8gpu_transfer_places205_linear.yaml)",
        "taps": "VISSL MODEL.EVAL_FEATURES conv1..conv5 (AlexNet) / LINEAR_EVAL_FEAT_POOL_OPS_MAP conv1, res2..res5 "
                "(eval_resnet_8gpu_transfer_in1k_linear.yaml) + res5avg (vissl/models/trunks/resnext.py) as avgpool",
        "epochs": f"{_VISSL_CFG} OPTIMIZER.num_epochs 28 (Places205: 14), milestones [8, 16, 24]",
        "weight_decay": f"{_VISSL_CFG} OPTIMIZER.weight_decay 0.0005, regularize_bn False",
        "crops": f"{_VISSL_CFG} DATA.TEST.TRANSFORMS: Resize 256, CenterCrop 224",
        "train_center_crop": f"{_VISSL_CFG} DATA.TRAIN.TRANSFORMS: Resize 256, RandomCrop 224, RandomHorizontalFlip",
    },
}
PRESET_DEVIATIONS: dict[str, tuple[Deviation, ...]] = {
    "deepcluster": (),
    "vissl": (
        Deviation("ResNets only: Resize + RandomCrop training and plain momentum, as VISSL's AlexNet config",
                  "VISSL's ResNet-50 config (eval_resnet_8gpu_transfer_in1k_linear.yaml) trains with "
                  "RandomResizedCrop(224) and nesterov: True; dcbench uses one recipe for every architecture"),
        Deviation("ResNets only: avgpool trained with the BatchNorm + Linear head and schedule of the stage taps",
                  "VISSL's res5-avgpool config (other_styles/eval_resnet_res5_avgpool_output_8gpu_transfer_in1k_"
                  "linear.yaml) trains a Linear head without BatchNorm for 100 epochs (cosine lr 0.3, wd 1e-6); "
                  "dcbench probes every tap in one run"),
    ),
}


def places_epochs_source(epochs: int) -> str:
    """The epochs source of the vissl preset on Places205."""
    return (f"VISSL places205/eval_alexnet_8gpu_transfer_places205_linear.yaml OPTIMIZER.num_epochs {epochs}, "
            "milestones [4, 8, 12]")
