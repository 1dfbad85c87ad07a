"""Provenance recorded with every checkpoint and result: library versions and git hash."""
from __future__ import annotations

import platform
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

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
