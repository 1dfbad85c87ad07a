"""The protocol registry (plugin API).

A protocol is a class derived from :class:`Protocol` and decorated with
:func:`register_protocol`. Contract of what is registered:

- ``name`` (unique, kebab-case, what ``--protocol`` takes), ``description`` (one line),
  ``version`` (bump when a change can move its numbers), ``data_layout`` (text shown by
  ``dcbench protocols NAME``: the folders and files it expects under ``--data``);
- ``Settings``: a dataclass whose field defaults ARE the protocol's standard settings
  (../shared/PROTOCOLS.md), each field documented with ``metadata={"help": ...}``; an optional
  ``validate()`` method raises :class:`dcbench.errors.UsageError` for impossible combinations;
- ``check_data(root, settings)``: raise :class:`dcbench.data.DataError` (one line naming the
  missing piece and the expected layout) BEFORE any expensive work;
- ``run(ckpt, settings, root, ctx) -> ProtocolOutput``: metric rows plus the metadata needed to
  reproduce them; it must leave the checkpoint's backbone weights unchanged unless the protocol
  is a fine-tune (then it works on a copy).

Built-in protocols are the modules of this package (discovered, never imported by name);
third-party packages add theirs through the ``dcbench.protocols`` entry-point group, whose
entries name a module to import.
"""
from __future__ import annotations

import importlib
import logging
import pkgutil
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar

from dcbench.errors import UsageError

log = logging.getLogger("dcbench")
ENTRY_POINT_GROUP = "dcbench.protocols"


@dataclass
class EvalContext:
    """What the runner hands a protocol besides its settings."""

    device: str = "cpu"
    cache_dir: Path | None = None  # feature cache folder, None when caching is off
    workers: int = 0
    progress: bool = False


@dataclass
class ProtocolOutput:
    """What ``Protocol.run`` returns: metric rows and reproduction metadata."""

    metrics: list  # list[dcbench.results.MetricRow]
    data_fingerprint: str
    extra: dict[str, Any] = field(default_factory=dict)


class Protocol:
    """Base class of every protocol; see the module docstring for the contract."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    data_layout: ClassVar[str] = ""
    Settings: ClassVar[type]

    def default_settings(self) -> Any:
        return self.Settings()

    def model_input_size(self, settings: Any) -> int | None:
        """The input size the backbone's fully connected layers are built for when a random
        init is created (and the size foreign checkpoints are loaded at); None = the
        checkpoint's own size (224 for random inits). Default: the ``image_size`` setting."""
        return getattr(settings, "image_size", None)

    def check_data(self, root: Path, settings: Any) -> None:
        if not root.is_dir():
            from dcbench.data import DataError
            raise DataError(f"data root {root} is not a folder; {self.name} expects: {self.data_layout.strip().splitlines()[0]}")

    def run(self, ckpt: Any, settings: Any, root: Path, ctx: EvalContext) -> ProtocolOutput:
        raise NotImplementedError


_REGISTRY: dict[str, type[Protocol]] = {}
_discovered = False


def register_protocol(cls: type[Protocol]) -> type[Protocol]:
    """Class decorator: register ``cls`` under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"protocol {cls.name!r} is registered twice "
                         f"({_REGISTRY[cls.name].__module__} and {cls.__module__})")
    _REGISTRY[cls.name] = cls
    return cls


def discover() -> None:
    """Import the built-in protocol modules and the entry-point plugins (once)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as exc:  # a broken plugin must not break dcbench
            log.warning("protocol plugin %s failed to load: %s", ep.value, exc)


def list_protocols() -> list[str]:
    """Names of every registered protocol, sorted."""
    discover()
    return sorted(_REGISTRY)


def get_protocol(name: str) -> Protocol:
    """An instance of the protocol called ``name``; UsageError naming the choices otherwise."""
    discover()
    if name not in _REGISTRY:
        raise UsageError(f"unknown protocol '{name}'; available: {', '.join(sorted(_REGISTRY))} "
                         f"(see `dcbench protocols`)")
    return _REGISTRY[name]()
