"""Provenance of the linear-probe protocols (``linear``, ``imagenet-linear``, ``places-linear``):
where each default of each preset comes from and the known deviations from those sources
(shown by ``dcbench protocols NAME`` and docs/protocols.md; kept apart so that
:mod:`dcbench.protocols.linear` stays a short recipe)."""
from __future__ import annotations

from dcbench.protocol import Deviation
from dcbench.provenance import DECODE_CACHE_SOURCE, FROZEN_FEATURE_SOURCES

_DC = "facebookresearch/deepcluster"
_DINO = "facebookresearch/dino eval_linear.py"
_VISSL_CFG = ("facebookresearch/vissl configs/config/benchmark/linear_image_classification/imagenet1k/"
              "eval_alexnet_8gpu_transfer_in1k_linear.yaml")
_COMMON_SOURCES = {**FROZEN_FEATURE_SOURCES,
    "seed": "dcbench choice: the trial's seed (head init, shuffling, augmentation); cannot be a deviation",
    "cached": "dcbench choice: false = the sources' augmented training; true trains on centre-crop features "
              "(faster, not the sources' protocol)",
    "decode_cache_gb": DECODE_CACHE_SOURCE,
    "lr": f"0.01: {_DC} eval_linear.sh --lr 0.01; VISSL OPTIMIZER.param_schedulers.lr.base_value 0.01 "
          "(base_lr_batch_size 256)",
    "momentum": "0.9: deepcluster eval_linear.py --momentum; VISSL OPTIMIZER.momentum",
    "batch_size": "256: deepcluster eval_linear.py --batch_size; VISSL BATCHSIZE_PER_REPLICA 32 x 8 GPUs",
    "image_size": "224: RandomCrop(224) / CenterCrop or TenCrop(224) after Resize(256) in both sources",
    "head_init": f"torch's default nn.Linear init: {_DC} eval_linear.py RegLog (no init call); vissl/models/heads/"
                 "mlp.py ('we use the default normal or uniform initialization', PARAMS_MULTIPLIER 1.0)",
    "interpolation": f"torchvision's default Resize (bilinear): {_DC} eval_linear.py transformations, VISSL Resize 256",
    "input_convention": "dcbench choice (issue 19): published weights (timm pretrained_cfg, torchvision "
                        "weights.transforms()) are read the way they were trained; random inits and "
                        "dcbench/DeepCluster checkpoints have no convention of their own and get the preset's "
                        "(ImageNet mean/std)",
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
_DINO_SOURCES = {**_COMMON_SOURCES,
    "preset": f"the DINO paper's linear evaluation (Caron et al. 2021, Sec. 4.1), {_DINO} and its README command "
              "(8 GPUs, default arguments); DINO reports the best epoch's val top-1 (best_acc), dcbench's "
              "selection=best",
    "taps": f"{_DINO} --n_last_blocks ('n=4 when evaluating ViT-Small and n=1 with ViT-Base') and "
            "--avgpool_patchtokens ('False for ViT-Small and True with ViT-Base'), each block through the final norm "
            "(vision_transformer.py get_intermediate_layers): tap cls4 for embed dim < 768, cls+avgpool otherwise; "
            "torchvision ResNets: fc = nn.Identity(), the 2048-d average (tap avgpool); other architectures: every "
            "conv tap, adaptively pooled (dcbench choice)",
    "epochs": f"{_DINO} --epochs 100",
    "lr": f"{_DINO} --lr 0.001 for batch 256 (lr * batch_size_per_gpu * world_size / 256: the linear scaling rule)",
    "batch_size": f"dcbench choice: 256, the batch {_DINO} --lr refers to (DINO: --batch_size_per_gpu 128 x 8 GPUs "
                  "= 1024 with lr 0.004)",
    "momentum": f"{_DINO}: torch.optim.SGD(momentum=0.9)",
    "weight_decay": f"{_DINO}: weight_decay=0 ('we do not apply weight decay'); CosineAnnealingLR(epochs, eta_min=0) "
                    "stepped per epoch",
    "head_init": f"{_DINO} LinearClassifier: weight normal_(0, 0.01), bias zero_()",
    "crops": f"{_DINO} val_transform: Resize(256, interpolation=3), CenterCrop(224)",
    "train_center_crop": f"{_DINO} train_transform: RandomResizedCrop(224), RandomHorizontalFlip (no Resize + "
                         "RandomCrop, so false: the setting does not apply)",
    "interpolation": f"{_DINO} val_transform: Resize(256, interpolation=3) (bicubic); RandomResizedCrop keeps "
                     "torchvision's bilinear default",
    "image_size": f"{_DINO}: RandomResizedCrop(224) / Resize(256) + CenterCrop(224), ImageNet mean/std",
}
PRESET_SOURCES["dino"] = _DINO_SOURCES

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
    "dino": (
        Deviation("batch 256 with lr 0.001 (4x the steps of DINO's batch 1024 with lr 0.004)",
                  "dcbench runs on one process by default; DINO's --lr is defined for batch 256 and scaled linearly "
                  "with the batch, so 256 at 0.001 is its own rule at 256"),
        Deviation("features concatenated as [CLS_1 .. CLS_n, avgpool], DINO interleaves them",
                  "DINO's torch.cat((output.unsqueeze(-1), avg.unsqueeze(-1)), -1).reshape is a permutation of the "
                  "same features (a linear head is indifferent to it); it only runs with n_last_blocks=1, as "
                  "cls+avgpool"),
    ),
}

_MOCO = "facebookresearch/moco-v3 main_lincls.py"
_MOCO_SOURCES = {**_DINO_SOURCES,
    "preset": "the simple ViT linear probe, last-block CLS: MoCo v3 (Chen, Xie and He 2021, 'An Empirical Study "
              f"of Training Self-Supervised Vision Transformers'), {_MOCO} with facebookresearch/moco-v3 CONFIG.md "
              "'ViT-Small/ViT-Base, linear classification' (-a vit_small --lr=3, default batch 1024); MoCo v3 "
              "reports the best epoch's val top-1 (best_acc1), dcbench's selection=best",
    "taps": f"{_MOCO}: the ViT's own head (linear_keyword 'head') on timm VisionTransformer's pre-logits, the "
            "final-normed CLS token of the last block (tap cls); torchvision ResNets: fc on the 2048-d average "
            "(tap avgpool); other architectures: every conv tap, adaptively pooled (dcbench choice)",
    "epochs": f"{_MOCO} --epochs 90",
    "lr": "facebookresearch/moco-v3 CONFIG.md ViT linear classification --lr=3, a base lr for batch 256 "
          f"({_MOCO}: init_lr = args.lr * args.batch_size / 256)",
    "batch_size": f"dcbench choice: 256, the batch {_MOCO}'s base lr refers to (MoCo v3: -b 1024, lr 12)",
    "momentum": f"{_MOCO} --momentum 0.9",
    "weight_decay": f"{_MOCO} --wd default 0.; adjust_learning_rate: init_lr * 0.5 * (1 + cos(pi * epoch / "
                    "epochs)) per epoch",
    "head_init": f"{_MOCO}: weight.data.normal_(mean=0.0, std=0.01), bias.data.zero_()",
    "crops": f"{_MOCO} val: Resize(256), CenterCrop(224)",
    "train_center_crop": f"{_MOCO} train: RandomResizedCrop(224), RandomHorizontalFlip (no Resize + RandomCrop, "
                         "so false: the setting does not apply)",
    "interpolation": f"torchvision's default (bilinear): {_MOCO} Resize(256) and RandomResizedCrop(224)",
    "image_size": f"{_MOCO}: RandomResizedCrop(224) / Resize(256) + CenterCrop(224), ImageNet mean/std",
}
PRESET_SOURCES["mocov3"] = _MOCO_SOURCES
PRESET_DEVIATIONS["mocov3"] = (
    Deviation("batch 256 with lr 3 (4x the steps of MoCo v3's batch 1024 with lr 12)",
              "dcbench runs on one process by default; MoCo v3's --lr is a base lr for batch 256 scaled linearly "
              "with the batch, so 256 at 3 is its own rule at 256"),
    Deviation("ResNets keep the ViT lr 3 (MoCo v3's ResNet-50 probe uses its --lr default 0.1)",
              "one preset value per setting; on a ResNet pass --set lr=0.1 for MoCo v3's ResNet-50 command"),
)


def places_epochs_source(epochs: int) -> str:
    """The epochs source of the vissl preset on Places205."""
    return (f"VISSL places205/eval_alexnet_8gpu_transfer_places205_linear.yaml OPTIMIZER.num_epochs {epochs}, "
            "milestones [4, 8, 12]")
