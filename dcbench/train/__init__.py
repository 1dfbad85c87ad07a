"""DeepCluster training: configuration and the alternating cluster/train loop."""
from dcbench.train.config import TrainConfig
from dcbench.train.loop import train

__all__ = ["TrainConfig", "train"]
