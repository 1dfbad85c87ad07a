"""One way to seed a run: torch, numpy and ``random`` together, the caller's states restored.

The runner seeds every protocol run with it, and the segmentation engine its mmseg loop
(mmseg's transforms draw from numpy and ``random``).
"""
from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


@contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Seed torch, numpy and ``random`` for the duration; the caller's RNG states come back after."""
    if seed is None:
        yield
        return
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
