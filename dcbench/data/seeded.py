"""Augmentations that depend on (seed, epoch, image) only, never on loader workers or processes.

A DataLoader's workers each draw from their own random stream (seeded from the loader's base
seed and the worker id) and receive batches in turn, so the random crop an image gets depends on
how many workers there are, and under torchrun on how many processes. Here the sampler, which
runs in the main process, pairs every dataset index with its own augmentation seed, a function of
(run seed, epoch, index); :class:`SeededViews` seeds torch's CPU generator with it around the
read. The crop of image ``i`` in epoch ``e`` is then the same with 0, 2 or 8 workers and on every
rank that reads it (the trainer does the same per position: :mod:`dcbench.train.common`).
Iteration-based training (``voc-seg``) reads an endless :class:`SeededStream` instead of epochs.
"""
from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dcbench.data.datasets import MeteredLoader, Padding, skip_collate


def read_seeded(dataset: Any, index: int, seed: int, all_generators: bool = False) -> Any:
    """Item ``index`` of ``dataset`` with its random transforms drawn from torch's CPU generator
    seeded by ``seed`` (the caller's RNG state untouched).

    Only the CPU generator: torchvision's transforms draw from it alone, and ``torch.manual_seed``
    would also seed every accelerator backend (before CUDA is initialised each call queues a lazy
    seeding). ``all_generators`` also seeds numpy's global generator and Python's ``random``, which
    mmcv's and mmseg's transforms draw from (~75 us more per item, hence opt-in).
    """
    if all_generators:
        numpy_state, python_state = np.random.get_state(), random.getstate()
        try:
            np.random.seed(seed % 2**32)
            random.seed(seed)
            return read_seeded(dataset, index, seed)
        finally:
            np.random.set_state(numpy_state)
            random.setstate(python_state)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return dataset[index]


def augmentation_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of dataset item ``index`` in ``epoch`` of a run seeded ``seed``."""
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % 2**63


#: the index of a padding item (:class:`SeededOrder`): it reads as a :class:`~dcbench.data.datasets.Padding`
PAD = -1


class SeededViews(Dataset):
    """``dataset`` read through ``(index, augmentation seed)`` items (see :class:`SeededOrder`);
    ``all_generators``: see :func:`read_seeded`."""

    def __init__(self, dataset: Any, all_generators: bool = False) -> None:
        self.dataset, self.all_generators = dataset, all_generators

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, seed = item
        return Padding() if index == PAD else read_seeded(self.dataset, index, seed, self.all_generators)


class SeededOrder(Sampler):
    """One whole-dataset permutation per epoch (torch.randperm seeded with ``seed`` + epoch, as
    :class:`~torch.utils.data.DistributedSampler` draws it), rank ``r`` of ``num_replicas`` reading
    its entries ``r, r + N, ...``, each paired with :func:`augmentation_seed`.

    A global batch of N ranks therefore holds the images, and the crops, of one process's batch.
    Where N does not divide the dataset, the shares are evened out with :data:`PAD` items (read as
    a ``Padding``, dropped), not with repeated images as DistributedSampler does: every image is
    seen once per epoch, as in one process. Call :meth:`set_epoch` before each epoch.
    """

    def __init__(self, dataset: Any, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__()
        self.n, self.seed, self.epoch = len(dataset), seed, 0
        self.num_replicas, self.rank = num_replicas, rank
        self._drawn: tuple[int, list[tuple[int, int]]] | None = None  # (epoch, its items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.n / self.num_replicas)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.items())

    def items(self) -> list[tuple[int, int]]:
        """This rank's ``(index, augmentation seed)`` items of the current epoch, pads included
        (drawn once per epoch)."""
        if self._drawn is None or self._drawn[0] != self.epoch:
            self._drawn = (self.epoch, self._draw())
        return self._drawn[1]

    def _draw(self) -> list[tuple[int, int]]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=generator).tolist()
        positions = range(self.rank, len(self) * self.num_replicas, self.num_replicas)
        return [(order[p], augmentation_seed(self.seed, self.epoch, order[p])) if p < self.n else (PAD, 0)
                for p in positions]

    def indices(self) -> list[int]:
        """This rank's dataset indices of the current epoch (pads left out)."""
        return [index for index, _seed in self.items() if index != PAD]


class SeededBatches(Sampler):
    """Fixed batches of dataset indices (a ``batch_sampler``), each index paired with its
    :func:`augmentation_seed` for the current epoch: random test-time crops (e.g. DeepCluster's
    10 passes of random crops on VOC07 test) that do not depend on the loader workers."""

    def __init__(self, batches: list[list[int]], seed: int) -> None:
        super().__init__()
        self.batches, self.seed, self.epoch = [list(b) for b in batches], seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter([[(i, augmentation_seed(self.seed, self.epoch, i)) for i in batch] for batch in self.batches])


class SeededStream(Sampler):
    """Endless ``(index, augmentation seed)`` items: the permutations of epochs 0, 1, 2, ... that
    :class:`SeededOrder` draws for one process, one after another; rank ``r`` of ``num_replicas``
    reads positions ``r, r + N, ...`` of that sequence.

    For iteration-based training (``voc-seg``): consecutive per-rank batches of ``B / N`` items
    make up, together, exactly the items and seeds of one process's batch of ``B``, so the run
    does not depend on workers or world size. No padding: the stream never ends.
    """

    def __init__(self, dataset: Any, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__()
        self.dataset, self.seed, self.num_replicas, self.rank = dataset, seed, num_replicas, rank

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return itertools.islice(self._one_process(), self.rank, None, self.num_replicas)

    def _one_process(self) -> Iterator[tuple[int, int]]:
        order = SeededOrder(self.dataset, self.seed)
        for epoch in itertools.count():
            order.set_epoch(epoch)
            yield from order.items()


def seeded_loader(dataset: Any, order: SeededOrder | SeededStream | SeededBatches, batch_size: int | None,
                  workers: int, device: str | torch.device = "cpu", collate_fn: Callable = skip_collate,
                  all_generators: bool = False) -> DataLoader:
    """Batches of ``dataset`` with seeded views: ``batch_size`` items at a time in ``order``, or the
    fixed batches of a :class:`SeededBatches` (``batch_size`` None); unreadable images and pads are
    dropped by ``collate_fn`` (:func:`dcbench.data.skip_collate`); ``all_generators``: see
    :func:`read_seeded`. Persistent workers: ``order.set_epoch`` still applies, the sampler runs
    in this process."""
    batching = {"batch_sampler": order} if isinstance(order, SeededBatches) else {"sampler": order,
                                                                                 "batch_size": batch_size}
    return MeteredLoader(SeededViews(dataset, all_generators), **batching, num_workers=workers,
                         collate_fn=collate_fn, pin_memory=torch.device(device).type == "cuda",
                         persistent_workers=workers > 0)
