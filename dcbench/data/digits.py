"""The embedded real dataset used by ``dcbench demo`` and end-to-end tests.

scikit-learn ships the UCI handwritten digits (1,797 real 8x8 greyscale scans, 10
classes) inside its wheel, so the demo needs no download.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from dcbench.data.datasets import DataError, InMemoryImageDataset
from dcbench.fileio import atomic_write, atomic_write_text

logger = logging.getLogger("dcbench")

DIGIT_CLASSES = [str(d) for d in range(10)]
_MARKER = ".dcbench-digits.json"


@lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N x 8 x 8 in 0..255, labels N) from scikit-learn's bundled file."""
    from sklearn.datasets import load_digits  # local: sklearn import is slow

    bunch = load_digits()
    # Pixel values are counts 0..16 of set pixels in a 4x4 block; map to 0..255 grey.
    images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return images, bunch.target.astype(np.int64)


def _digit_image(pixels: np.ndarray, image_size: int) -> Image.Image:
    """One 8x8 digit, bilinearly upsampled to ``image_size`` and made 3-channel."""
    grey = Image.fromarray(pixels).resize((image_size, image_size), Image.Resampling.BILINEAR)
    return grey.convert("RGB")


def digits_dataset(image_size: int = 32, transform: Callable | None = None) -> InMemoryImageDataset:
    """scikit-learn's digits as an in-memory labelled :class:`ImageDataset`.

    1,797 images, classes ``"0"``..``"9"``, each upsampled (bilinear) to
    ``image_size`` x ``image_size`` RGB (grey replicated). Items are
    ``(transform(img), target, index)`` like every dcbench dataset.
    """
    images, labels = _raw_digits()
    pil = [_digit_image(px, image_size) for px in images]
    names = [f"sklearn-digits/{int(t)}/{i:04d}" for i, t in enumerate(labels)]
    return InMemoryImageDataset(pil, labels.tolist(), DIGIT_CLASSES, names=names,
                                transform=transform, root="sklearn-digits")


def _split_indices(
    labels: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/val split (each class keeps the same val fraction)."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    train, val = train_test_split(indices, test_size=val_fraction, random_state=seed,
                                  stratify=labels)
    return np.sort(train), np.sort(val)


def _save_png(img: Image.Image, path: Path) -> None:
    """Write atomically, so a concurrent reader or an interrupted run never sees half a file."""
    atomic_write(path, lambda f: img.save(f, format="PNG"))


def _is_complete(out_dir: Path, params: dict) -> bool:
    marker = out_dir / _MARKER
    if not marker.is_file():
        return False
    try:
        written = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if written != params:
        raise DataError(
            f"{out_dir} already holds digits written with {written}, not {params}: "
            "pass another folder or delete this one"
        )
    return True


def write_digits_imagefolder(
    out_dir: str | os.PathLike, image_size: int = 32, val_fraction: float = 0.25, seed: int = 0
) -> Path:
    """Write the digits as ``out_dir/{train,val}/<digit>/<index>.png`` (stratified split).

    Idempotent: a marker file records the parameters once every image is written, and a
    later call with the same parameters returns at once (different parameters raise
    :class:`DataError` rather than mixing two datasets in one folder).

    Returns:
        ``out_dir`` as a Path.
    """
    out_dir = Path(os.path.expanduser(str(out_dir)))
    params = {"image_size": int(image_size), "val_fraction": float(val_fraction), "seed": int(seed)}
    if _is_complete(out_dir, params):
        return out_dir
    images, labels = _raw_digits()
    train, val = _split_indices(labels, val_fraction, seed)
    for split, indices in (("train", train), ("val", val)):
        for digit in DIGIT_CLASSES:
            (out_dir / split / digit).mkdir(parents=True, exist_ok=True)
        for i in indices:
            target = out_dir / split / str(int(labels[i])) / f"{i:04d}.png"
            _save_png(_digit_image(images[i], image_size), target)
    atomic_write_text(out_dir / _MARKER, json.dumps(params))
    logger.info("wrote %d train and %d val digit images to %s", len(train), len(val), out_dir)
    return out_dir
