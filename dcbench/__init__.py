"""dcbench: DeepCluster trainer and evaluation suite."""
__version__ = "0.1.0"

from dcbench.checkpoint import load_backbone, resolve_checkpoint, save_checkpoint  # noqa: E402

__all__ = ["__version__", "load_backbone", "resolve_checkpoint", "save_checkpoint"]
