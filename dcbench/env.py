"""The process environment dcbench reads: provenance recorded with every checkpoint and result
(library versions, git hash), the loader workers a process starts by default, and the one cache
root every module keeps its files under."""
from __future__ import annotations

import os
import platform
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

#: environment variable naming the cache root (:func:`cache_root`)
CACHE_ENV = "DCBENCH_CACHE"


#: most loader workers a process starts by default (issue 17: min(available cores, 8); each worker
#: is a forked process with its own memory, so a large machine should not start one per core)
MAX_DEFAULT_WORKERS = 8


def affinity_cores() -> int:
    """CPU cores this process may run on: its affinity mask (what a container, taskset or SLURM
    grants, not the machine's count), else the machine's count (not Linux)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def usable_cores() -> int:
    """:func:`affinity_cores` shared by the processes of a torchrun job on this node
    (LOCAL_WORLD_SIZE); at least 1."""
    cores = affinity_cores()
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(1, cores // local)


def default_workers() -> int:
    """Loader workers per process: :func:`usable_cores`, at most 8. The crops are a function of
    (seed, epoch, position), so the number of workers never changes what is computed (likewise
    every protocol's: :mod:`dcbench.data.seeded`).
    """
    return min(usable_cores(), MAX_DEFAULT_WORKERS)


#: the default budget of the decoded-image cache (``decode_cache_gb``), capped at half the memory
#: available when the run starts (the block lives in RAM, shared by the loader workers)
DEFAULT_BUDGET_GB = 4.0


def resolve_workers(workers: int | str) -> int:
    """A ``workers`` setting as a DataLoader count: ``"auto"`` is :func:`default_workers`."""
    return default_workers() if workers == "auto" else int(workers)


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
