"""dcbench's built-in protocols (installed as ``dcbench.protocols``).

Each module is one protocol family: its settings with their sources, presets, data check and
a short ``run``; the contract and every shared step live in the engine (:mod:`dcbench.protocol`).
The package registers through the ``dcbench.protocols`` entry-point group like any
third-party plugin: the entry names :func:`register_builtins`, so a new module here needs no
other change.
"""
from __future__ import annotations

import importlib
import pkgutil


def register_builtins() -> None:
    """Import every module of this package (each registers its protocols on import)."""
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")
