"""Semantic segmentation on mmsegmentation (the ``voc-seg`` protocol's machinery).

- :mod:`.config`: what a preset (``mmselfsup``, ``deepcluster``) resolves to for a backbone
  (:func:`resolve_recipe`), and the mmseg model / pipeline / schedule configs built from it;
- :mod:`.backbone`: ``DCBenchBackbone``, any dcbench backbone as an mmseg backbone (registered in
  mmseg's ``MODELS``), FCN's fc6/fc7-as-convolutions and ResNet dilation;
- :mod:`.data`: VOC2012 segmentation splits (+ optional SBD aug), class subsets, the Dataset;
- :mod:`.engine`: building the segmentor, the loaders, the training loop, evaluation to a
  confusion matrix.

Importing this package does not import mmseg (``dcbench protocols`` stays fast and works
without the ``seg`` extra); :func:`prepare_mmseg` does, installing the ``mmcv.ops`` stand-in
(:mod:`dcbench.compat`) first when the compiled ops are absent.
"""
from __future__ import annotations

import importlib.util
from importlib import metadata
from typing import Any

from dcbench.segmentation.config import (SegRecipe, eval_pipeline, model_config, resolve_recipe, schedule_config,
                                         train_pipeline)
from dcbench.segmentation.data import SegData, SegDataset, label_map_for, load_seg_data
from dcbench.seeding import seeded
from dcbench.segmentation.engine import (build_pipeline, build_segmentor, eval_loader, evaluate, prepare_mmseg,
                                         train, train_loader)

#: the packages of the ``seg`` extra, as pip names them
SEG_PACKAGES: tuple[str, ...] = ("mmsegmentation", "mmengine", "mmcv-lite", "mmcv", "ftfy", "regex")


def missing_packages() -> list[str]:
    """Import names of the ``seg`` extra that cannot be found (cheap: no import happens)."""
    return [name for name in ("mmseg", "mmengine", "mmcv", "ftfy", "regex") if importlib.util.find_spec(name) is None]


def versions() -> dict[str, str]:
    """Installed versions of the segmentation stack (recorded in every ``voc-seg`` result)."""
    out = {}
    for name in SEG_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def __getattr__(name: str) -> Any:
    # DCBenchBackbone needs mmseg: imported on first use only
    if name == "DCBenchBackbone":
        prepare_mmseg()
        from dcbench.segmentation.backbone import DCBenchBackbone
        return DCBenchBackbone
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DCBenchBackbone", "SegData", "SegDataset", "SegRecipe", "build_pipeline", "build_segmentor", "eval_loader",
           "eval_pipeline", "evaluate", "label_map_for", "load_seg_data", "missing_packages", "model_config",
           "prepare_mmseg", "resolve_recipe", "schedule_config", "seeded", "train", "train_loader", "train_pipeline",
           "versions"]
