"""The process environment dcbench reads: provenance recorded with every checkpoint and result
(library versions, git hash) and the one cache root every module keeps its files under."""
from __future__ import annotations

import os
import platform
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

#: environment variable naming the cache root (:func:`cache_root`)
CACHE_ENV = "DCBENCH_CACHE"


def cache_root() -> Path:
    """dcbench's cache root: ``$DCBENCH_CACHE``, else ``~/.cache/dcbench``.

    Every cache lives in its own folder below it: :func:`features_cache_dir` (extracted
    features) and :func:`pretrained_cache_dir` (published checkpoints and their lock file).
    Read on every call, so a changed environment takes effect at once.
    """
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dcbench").expanduser()


def features_cache_dir() -> Path:
    """``<cache root>/features``: the feature cache (a cache only; safe to delete)."""
    return cache_root() / "features"


def pretrained_cache_dir() -> Path:
    """``<cache root>/pretrained``: downloaded checkpoints and ``lock.json``."""
    return cache_root() / "pretrained"


_PACKAGES = ("dcbench", "torch", "torchvision", "timm", "faiss-cpu", "faiss-gpu", "numpy", "scikit-learn",
             "mmsegmentation", "mmengine", "mmcv-lite", "mmcv", "detectron2")


@lru_cache(maxsize=1)
def software_versions() -> dict[str, str]:
    """Versions of Python and the libraries whose behaviour affects numbers."""
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


@lru_cache(maxsize=1)
def git_hash() -> str | None:
    """The commit of the dcbench source tree in use (with ``-dirty`` when modified), or None."""
    src = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True,
                             text=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=src,
                               capture_output=True, text=True, timeout=5)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None
