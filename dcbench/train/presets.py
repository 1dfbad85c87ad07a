"""``--preset small-data``: the published recipes rescaled to a few thousand images, by stated rules.

The papers' settings assume ImageNet (1.28M images). On N of a few thousand they give a handful
of SGD steps per clustering and a network that learns nothing. The rules (also in the README,
Training) were fixed before any evaluation run and are never tuned on evaluation data:

- batch: the largest power of two <= N / (100 x processes), within [16, 256], so one pass over
  the data gives >= ~100 SGD steps (below ~100 steps per clustering nothing is learned);
- a batch given with ``--batch-size`` (or ``--set batch_size``) replaces the computed one in the
  rules below (learning rate, ``reassign``, epochs), as it does in the run;
- v1 ``reassign``: passes per clustering, ceil(100 x total batch / N) (at least 1);
- learning rate: linear in the total batch from the recipe's anchor (v1: 0.05 at 256, top layer
  too; v2: 0.6 at 256, final lr = lr / 1000, with the LARS of solo-learn's CIFAR recipe: trust
  0.02, rate clipped at the learning rate, biases and BN weights excluded; the ImageNet
  recipe's trust 0.001 moves each layer by ~1e-4 of its norm per step at this batch, too
  little to learn anything in a few thousand steps);
- v2 on DeepCluster's own nets (alexnet, vgg16: no BatchNorm in fc6/fc7, published with plain
  SGD): DeepCluster's optimiser instead, plain SGD at 0.05 x total batch / 256 (v1's anchor),
  final lr = lr / 1000. Measured on the training split only (2,000 animal-mnist images, AlexNet,
  5 epochs): at solo-learn's 0.6 x B / 256 the rate clip makes LARS plain SGD (first-epoch loss
  4.623 with LARS, 4.622 with SGD), the loss then sits at ln(K) (the net never fits its own
  assignments), NMI with the labels falls and leave-one-out kNN on the training images drops
  below the random init at every conv layer (conv5 60 vs 76); at 0.05 x B / 256 the loss falls
  below ln(K), NMI rises every epoch and every conv layer ends above the random init;
- v1 PCA dimension: the largest power of two <= sqrt(N), within [8, 256] (256 at ImageNet size;
  fewer whitened dimensions than images by a wide margin), and at most N;
- v1 k: the paper's images per cluster (10,000 clusters for 1,281,167 images), at least 2;
- v2 prototypes: 3 heads of the published small-image recipe's images per prototype (solo-learn's
  CIFAR recipe: 3000 prototypes for 50,000 images), within [2, 3000];
- v2 crops: 2 large crops, scale (0.08, 1), no small crops (the SwAV repository's 2x224 recipe and
  solo-learn's CIFAR one: small images leave no room for 6 smaller views, and DeepCluster's
  AlexNet takes nothing under 63 px); no warm-up (solo-learn warms up for 1% of its epochs);
- image size 64 px (the smallest DeepCluster's AlexNet takes comfortably);
- epochs: a budget of ~120,000 training crops (clustering rounds x crops per round), within
  [3, 200]: about 15-20 minutes of AlexNet at 64 px on a 2-core CPU.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

from dcbench.settings import apply_settings
from dcbench.train.config import AnyTrainConfig, DCv2Config, TrainConfig, config_class

#: below this many SGD steps per clustering the network learns little (measured on small data)
MIN_STEPS_PER_CLUSTERING = 100
#: training crops a small-data run processes in all (sets its epochs)
CROP_BUDGET = 120_000
SMALL_IMAGE_SIZE = 64
IMAGENET_TRAIN_IMAGES = 1_281_167
#: DeepCluster's own nets: v2 trains them with DeepCluster's optimiser (module doc)
DEEPCLUSTER_ARCHS = ("alexnet", "vgg16")
#: fewer images per whitened dimension than this and the v1 trainer warns
MIN_IMAGES_PER_PCA_DIM = 10


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(x, 1.0)))))


def _clamp(x: int, low: int, high: int) -> int:
    return max(low, min(high, x))


def world_size() -> int:
    """Processes of this job (torchrun sets WORLD_SIZE; 1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def small_data_settings(method: str, n_images: int, processes: int = 1, arch: str | None = None,
                        batch_size: int | None = None) -> dict[str, Any]:
    """The ``small-data`` preset's settings for ``n_images`` training images (rules: module doc);
    ``arch`` (v2 only) picks the optimiser: DeepCluster's for its own nets, LARS otherwise.
    ``batch_size``: the user's own batch (``--batch-size``), which the learning rate, v1's
    ``reassign`` and the epochs then follow, as the rules say (linear in the total batch)."""
    n = max(1, n_images)
    batch = batch_size or _clamp(_pow2_floor(n / (MIN_STEPS_PER_CLUSTERING * processes)), 16, 256)
    total_batch = batch * processes
    common = {"preset": "small-data", "image_size": SMALL_IMAGE_SIZE, "batch_size": batch}
    if method == "deepcluster":
        reassign = max(1, math.ceil(MIN_STEPS_PER_CLUSTERING * total_batch / n))
        lr = 0.05 * total_batch / 256
        return {**common, "reassign": float(reassign), "lr": lr, "top_lr": lr,
                # never more whitened dimensions than images (under 8 images the [8, 256] floor would)
                "pca_dim": min(_clamp(_pow2_floor(math.sqrt(n)), 8, 256), n),
                "k": max(2, round(n * 10_000 / IMAGENET_TRAIN_IMAGES)),
                "epochs": _clamp(round(CROP_BUDGET / (reassign * n)), 3, 200)}
    k = _clamp(round(n * 3000 / 50_000), 2, 3000)
    v2 = {**common, "warmup_epochs": 0, "start_warmup": 0.0, "prototypes": [k, k, k], "large_crops": 2,
          "small_crops": 0, "crop_scale": (0.08, 1.0), "epochs": _clamp(round(CROP_BUDGET / (2 * n)), 3, 200)}
    if arch in DEEPCLUSTER_ARCHS:
        lr = 0.05 * total_batch / 256
        return {**v2, "optimizer": "sgd", "lr": lr, "final_lr": lr / 1000}
    lr = 0.6 * total_batch / 256
    return {**v2, "optimizer": "larc", "lr": lr, "final_lr": lr / 1000, "larc_trust": 0.02, "larc_clip": True,
            "larc_exclude_1d": True}


def count_training_images(data: str) -> int:
    """Images ``dcbench train --data DATA`` would train on (raises DataError for bad data)."""
    from dcbench.data import open_training_data

    return len(open_training_data(data))


def resolve_config(overrides: Mapping[str, Any], n_images: int | None = None) -> AnyTrainConfig:
    """Settings of a run: the method's defaults, then the preset's values (small-data: computed
    from ``n_images``, counted in ``overrides["data"]`` when not given), then ``overrides``."""
    method = overrides.get("method") or "deepcluster"
    cls = config_class(method)
    base = cls()
    if overrides.get("preset") == "small-data" and (n_images is not None or overrides.get("data")):
        n = count_training_images(str(overrides["data"])) if n_images is None else n_images
        arch = overrides.get("arch") or base.arch
        batch = _int_or_none(overrides.get("batch_size"))
        base = apply_settings(base, small_data_settings(method, n, world_size(), arch=arch, batch_size=batch),
                              owner=f"train --method {method}")
    return apply_settings(base, overrides, owner=f"train --method {method}")


def _int_or_none(value: Any) -> int | None:
    """A positive batch size given as a flag, ``--set`` or YAML value; None otherwise (a bad value
    is left for the settings' own check, which names it)."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 and str(number) == str(value).strip() else None


def steps_per_clustering(cfg: AnyTrainConfig, n_images: int, processes: int = 1) -> int:
    """SGD steps between two clusterings (v1: reassign x N images; v2: one epoch)."""
    passes = cfg.reassign if isinstance(cfg, TrainConfig) else 1.0
    return int(passes * n_images) // (cfg.batch_size * processes)


def recipe_warnings(cfg: AnyTrainConfig, n_images: int, processes: int = 1) -> list[str]:
    """Settings that make the recipe learn little on this many images, each with the fix."""
    warnings = []
    steps = steps_per_clustering(cfg, n_images, processes)
    if steps < MIN_STEPS_PER_CLUSTERING:
        knobs = "batch size and reassign" if isinstance(cfg, TrainConfig) else "batch size"
        fix = (f"--preset small-data picks the {knobs} from N" if cfg.preset != "small-data" else
               "even --preset small-data cannot reach that with so few images (its smallest batch is 16)")
        warnings.append(f"{steps} SGD steps per clustering ({n_images} images, batch {cfg.batch_size} x "
                        f"{processes} process(es)): under ~{MIN_STEPS_PER_CLUSTERING} the network learns little; {fix}")
    if isinstance(cfg, TrainConfig) and cfg.pca_dim * MIN_IMAGES_PER_PCA_DIM > n_images:
        warnings.append(f"pca_dim={cfg.pca_dim} is close to the number of images ({n_images}): whitening with "
                        f"fewer than {MIN_IMAGES_PER_PCA_DIM} images per dimension amplifies noise; --preset "
                        f"small-data uses the largest power of two <= sqrt(N) "
                        f"({small_data_settings('deepcluster', n_images)['pca_dim']} here)")
    if isinstance(cfg, DCv2Config) and max(cfg.prototypes) * 2 > n_images:
        warnings.append(f"{max(cfg.prototypes)} prototypes for {n_images} images leaves under 2 images per "
                        f"prototype; --preset small-data uses {small_data_settings('deepcluster-v2', n_images)['prototypes'][0]}")
    return warnings
