"""Decode each image once: decoded RGB pixels (uint8) of a dataset in one shared memory block.

DeepCluster reads every image twice per epoch (the extraction pass, then the training pass) and
again every epoch; the original code decodes the JPEG each time (facebookresearch/deepcluster
``clustering.py``: ``pil_loader`` in ``ReassignedDataset.__getitem__``). When the decoded pixels
of the whole dataset fit the memory budget, :class:`DecodedImages` keeps them in one anonymous
shared mapping: whichever process decodes an image first (the main process or a forked
DataLoader worker: fork shares the mapping) stores its pixels and every later read rebuilds the
same PIL image from them, so the transforms see bit-identical input.

The layout is fixed before any decoding: the image sizes come from the file headers (PIL reads
them without decoding), read until the total passes the budget, in which case no block is made
and images are decoded from disk as before. Processes that do not share the block (a
``spawn``/``forkserver`` worker gets a pickled copy) decode from disk: same pixels, no reuse.
"""
from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from dcbench.env import DEFAULT_BUDGET_GB  # noqa: F401 (re-exported: its historical home)

log = logging.getLogger("dcbench")


def available_memory_bytes() -> int | None:
    """``MemAvailable`` of /proc/meminfo in bytes (None where there is none: not Linux)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def cache_budget_bytes(budget_gb: float) -> int:
    """Bytes the cache may take: ``budget_gb`` (decimal GB) capped at half the available memory,
    shared by the processes of a torchrun job on this node (LOCAL_WORLD_SIZE: each has its own)."""
    budget = int(max(0.0, budget_gb) * 1e9)
    available = available_memory_bytes()
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return budget if available is None else min(budget, available // (2 * local))


def header_sizes(paths: Sequence[str], budget_bytes: int) -> list[tuple[int, int]] | None:
    """``(width, height)`` of each image from its header, or None as soon as the decoded total
    would pass ``budget_bytes`` (such data stays on disk). An unreadable header gets (0, 0): that
    image is never stored, the loader reports it as usual."""
    sizes: list[tuple[int, int]] = []
    total = 0
    for path in paths:
        try:
            with Image.open(path) as img:
                width, height = img.size
        except Exception:  # noqa: BLE001 - PIL plugins raise many types for bad files
            width, height = 0, 0
        total += width * height * 3
        if total > budget_bytes:
            return None
        sizes.append((width, height))
    return sizes


class DecodedImages:
    """Decoded RGB uint8 pixels of ``len(sizes)`` images in one shared anonymous mapping."""

    def __init__(self, sizes: Sequence[tuple[int, int]]) -> None:
        self.sizes = [(int(w), int(h)) for w, h in sizes]
        nbytes = np.array([w * h * 3 for w, h in self.sizes], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(nbytes)]).astype(np.int64)
        self.nbytes = int(self.offsets[-1])
        # MAP_SHARED | MAP_ANONYMOUS: forked workers write into the same pages, and (unlike
        # /dev/shm, 64 MB in a default container) its size is bounded by RAM only
        self._pixels = mmap.mmap(-1, max(1, self.nbytes))
        self._filled = mmap.mmap(-1, max(1, len(self.sizes)))
        self._shared = True

    def __len__(self) -> int:
        return len(self.sizes)

    def __getstate__(self) -> dict:
        # a pickled copy (spawn/forkserver workers) cannot share the mapping: it decodes from disk
        state = self.__dict__.copy()
        state.update(_pixels=None, _filled=None, _shared=False)
        return state

    def get(self, index: int) -> Image.Image | None:
        """Image ``index`` as an RGB PIL image, or None if no process has stored it yet."""
        if not self._shared or not self._filled[index]:
            return None
        width, height = self.sizes[index]
        start = int(self.offsets[index])
        return Image.frombytes("RGB", (width, height), self._pixels[start:start + width * height * 3])

    def put(self, index: int, img: Image.Image) -> None:
        """Store the decoded RGB ``img`` as image ``index`` (ignored if its size is not the header's)."""
        if (not self._shared or self._filled[index] or img.mode != "RGB" or img.size != self.sizes[index]
                or not img.size[0] * img.size[1]):
            return
        start = int(self.offsets[index])
        data = img.tobytes()
        self._pixels[start:start + len(data)] = data
        self._filled[index] = 1  # set after the pixels: a reader never sees a half-written image

    def n_filled(self) -> int:
        """How many images are stored."""
        return 0 if not self._shared else self._filled[: len(self.sizes)].count(1)


def open_decoded_cache(paths: Sequence[str], budget_gb: float) -> DecodedImages | None:
    """A :class:`DecodedImages` for ``paths`` when their decoded pixels fit the budget (see
    :func:`cache_budget_bytes`), else None (logged: the images are decoded from disk each time)."""
    budget = cache_budget_bytes(budget_gb)
    if budget <= 0 or not paths:
        return None
    sizes = header_sizes(paths, budget)
    if sizes is None:
        log.debug("decoded-image cache off: %d images do not fit %.2f GB (decode_cache_gb, capped at half the "
                 "available memory); images are decoded from disk", len(paths), budget / 1e9)
        return None
    cache = DecodedImages(sizes)
    log.debug("decoded-image cache: %d images, %.2f GB in memory (decode_cache_gb=%g)", len(paths), cache.nbytes / 1e9,
             budget_gb)
    return cache
