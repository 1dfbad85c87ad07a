"""Training: DeepCluster (v1, the alternating cluster/train loop) and DeepCluster-v2, their
configurations and the small-data preset."""
from __future__ import annotations

from pathlib import Path

from dcbench.train import dcv2, loop
from dcbench.train.config import AnyTrainConfig, DCv2Config, TrainConfig, config_class
from dcbench.train.presets import resolve_config


def train(cfg: AnyTrainConfig, resume: bool = False) -> Path:
    """Run (or resume) the training ``cfg`` describes (its class says the method); returns the run folder."""
    if isinstance(cfg, DCv2Config):
        return dcv2.train(cfg, resume)
    return loop.train(cfg, resume)


__all__ = ["DCv2Config", "TrainConfig", "config_class", "resolve_config", "train"]
