"""dcbench: DeepCluster trainer and evaluation suite."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load_backbone", "resolve_checkpoint", "save_checkpoint"]

#: public names re-exported lazily (PEP 562): ``import dcbench`` must not import torch, so
#: that ``dcbench --help`` and ``dcbench --version`` start in well under a second.
_LAZY = {"load_backbone": "dcbench.checkpoint", "resolve_checkpoint": "dcbench.checkpoint",
         "save_checkpoint": "dcbench.checkpoint"}


def __getattr__(name: str):
    """Import ``dcbench.checkpoint`` on first use of one of its re-exported functions."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dcbench' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
