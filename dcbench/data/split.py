"""Turn a labelled folder (``SRC/CLASS/IMG``) into the ``train/`` + ``val/`` layout the probes use.

A stratified, seeded split: each class keeps its share in both splits, so a 10-class set of
8,000 images split with ``val_fraction=0.25`` gives 6,000 train / 2,000 val images, 600/200
per class. Images are copied (optionally resized so their short side is ``image_size``, and
saved as PNG) under ``DST/train/CLASS/`` and ``DST/val/CLASS/``. The split is a pure function
of (file list, seed), so rerunning it reproduces the same folders.

Command line: ``python -m dcbench.data.split SRC DST [--val-fraction 0.25] [--per-class N]
[--image-size PX] [--seed 0]``.
"""
from __future__ import annotations

import argparse
import shutil
from collections import Counter
from pathlib import Path

import numpy as np

from dcbench.data.datasets import DataError, image_folder, load_rgb


def split_indices(targets: list[int], val_fraction: float, seed: int = 0,
                  per_class: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stratified ``(train, val)`` index arrays: per class, a seeded permutation of its images
    (the first ``per_class`` when given), ``round(val_fraction * n)`` of them to val."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    targets_arr = np.asarray(targets)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(targets_arr):
        members = rng.permutation(np.flatnonzero(targets_arr == label))[:per_class]
        n_val = int(round(val_fraction * len(members)))
        val.append(members[:n_val])
        train.append(members[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _copy(src: str, dst: Path, image_size: int | None) -> None:
    if image_size is None:
        shutil.copyfile(src, dst.with_suffix(Path(src).suffix))
        return
    image = load_rgb(src)
    w, h = image.size
    scale = image_size / min(w, h)
    image.resize((max(1, round(w * scale)), max(1, round(h * scale))), resample=3).save(dst.with_suffix(".png"))


def split_labelled_folder(src: str | Path, dst: str | Path, val_fraction: float = 0.25, seed: int = 0,
                          per_class: int | None = None, image_size: int | None = None) -> dict[str, Counter]:
    """Write ``dst/train/CLASS/*`` and ``dst/val/CLASS/*`` from the ImageFolder ``src``.

    Returns the number of images per class in each split. Refuses to write into a ``dst``
    that already has a ``train/`` or ``val/`` folder (a mixed split would leak val images).
    """
    dataset = image_folder(src)
    dst = Path(dst)
    if (dst / "train").exists() or (dst / "val").exists():
        raise DataError(f"{dst} already holds train/ or val/; choose an empty destination")
    train, val = split_indices(dataset.targets, val_fraction, seed, per_class)
    counts: dict[str, Counter] = {}
    for split, indices in (("train", train), ("val", val)):
        counts[split] = Counter()
        for i in indices:
            name = dataset.classes[dataset.targets[i]]
            folder = dst / split / name
            folder.mkdir(parents=True, exist_ok=True)
            _copy(dataset.paths[i], folder / f"{i:07d}", image_size)
            counts[split][name] += 1
    return counts


def main(argv: list[str] | None = None) -> None:
    """``python -m dcbench.data.split SRC DST ...``"""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="labelled folder SRC/CLASS/IMG")
    parser.add_argument("dst", help="output folder (gets train/ and val/)")
    parser.add_argument("--val-fraction", type=float, default=0.25)
    parser.add_argument("--per-class", type=int, default=None, help="use at most N images per class")
    parser.add_argument("--image-size", type=int, default=None, help="resize the short side to PX (PNG)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    counts = split_labelled_folder(args.src, args.dst, args.val_fraction, args.seed, args.per_class,
                                   args.image_size)
    for split, per_class in counts.items():
        print(f"{split}: {sum(per_class.values())} images in {len(per_class)} classes")


if __name__ == "__main__":
    main()
