"""The architecture registry.

Contract of a registered factory: ``factory(sobel: bool, input_size: int) -> Backbone``,
deterministic given the torch RNG state (so ``random:ARCH`` seeds reproduce), returning a model
in train mode on the CPU whose ``arch`` equals the registered name. Names with a prefix
(``timm:NAME``, ``tv:NAME``) go to the prefix's factory with NAME as first argument.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from dcbench.errors import ArchError
from dcbench.models.base import Backbone

Factory = Callable[..., Backbone]
_ARCHS: dict[str, Factory] = {}
_PREFIXES: dict[str, Factory] = {}
#: Sobel default per arch: DeepCluster's nets were trained with it, others without.
_SOBEL_DEFAULT: dict[str, bool] = {}


def register_arch(name: str, sobel_default: bool = False) -> Callable[[Factory], Factory]:
    """Decorator registering a backbone factory under ``name``."""
    def decorate(factory: Factory) -> Factory:
        if name in _ARCHS:
            raise ValueError(f"arch {name!r} is already registered")
        _ARCHS[name] = factory
        _SOBEL_DEFAULT[name] = sobel_default
        return factory
    return decorate


def register_prefix(prefix: str, factory: Factory) -> None:
    """Register a factory for every name ``prefix:NAME``."""
    _PREFIXES[prefix] = factory


def list_archs() -> list[str]:
    """Registered arch names plus the accepted prefixes (``timm:*``, ``tv:*``)."""
    return sorted(_ARCHS) + [f"{p}:NAME" for p in sorted(_PREFIXES)]


def default_sobel(arch: str) -> bool:
    """Whether ``arch`` uses the Sobel front end by default."""
    return _SOBEL_DEFAULT.get(arch, False)


def build_backbone(arch: str, sobel: bool | None = None, input_size: int = 224,
                   seed: int | None = None) -> Backbone:
    """Build ``arch`` with random weights (seeded when ``seed`` is given)."""
    sobel = default_sobel(arch) if sobel is None else sobel
    prefix, sep, name = arch.partition(":")
    if sep and prefix in _PREFIXES:
        factory, args = _PREFIXES[prefix], (name,)
    elif arch in _ARCHS:
        factory, args = _ARCHS[arch], ()
    else:
        raise ArchError(f"unknown arch '{arch}'; choose one of: {', '.join(list_archs())}")
    if seed is None:
        return factory(*args, sobel=sobel, input_size=input_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory(*args, sobel=sobel, input_size=input_size)
