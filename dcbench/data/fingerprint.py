"""Dataset fingerprint: a short hash that identifies the files a result was computed on.

The hash covers relative paths and file sizes only (not contents), so it is cheap on
ImageNet-sized trees yet still changes when a file is added, removed, renamed or resized,
and it does not depend on where the tree lives on disk.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

from dcbench.errors import DataError

FINGERPRINT_CHARS = 16


def _posix(rel_path: str) -> str:
    """Normalise a relative path so the same tree hashes equally on every OS."""
    return os.path.normpath(rel_path).replace(os.sep, "/")


def fingerprint_pairs(pairs: Iterable[tuple[str, int]]) -> str:
    """Hash (relative path, size) pairs, order-independent; 16 hex characters."""
    digest = hashlib.sha256()
    for rel_path, size in sorted(pairs):
        # NUL and newline cannot appear in a file name's components here, so no ambiguity.
        digest.update(f"{rel_path}\0{size}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:FINGERPRINT_CHARS]


def dataset_fingerprint(root: str, rel_paths: list[str]) -> str:
    """Fingerprint a dataset: sha256 over sorted (relative path, file size) pairs.

    Args:
        root: folder the paths are relative to (absolute paths are accepted too, but then
            the fingerprint depends on the location).
        rel_paths: the dataset's files, relative to ``root``.

    Returns:
        16 lowercase hex characters.

    Raises:
        DataError: a listed file no longer exists.
    """
    pairs = []
    for rel_path in rel_paths:
        full = os.path.join(root, rel_path)
        try:
            size = os.path.getsize(full)
        except OSError:
            raise DataError(
                f"cannot fingerprint the dataset: {full} is missing; "
                "restore it or rebuild the dataset listing"
            ) from None
        pairs.append((_posix(rel_path), size))
    return fingerprint_pairs(pairs)


def tree_signature(root: str | os.PathLike) -> str | None:
    """16 hex characters over the modification times of ``root`` and every folder below it
    (symbolic links followed, each folder once), or None when ``root`` cannot be read.

    Adding, removing or renaming a file changes its folder's modification time, so a stored
    result whose signature differs was computed on other data at the same path. Only folders
    are stat-ed (files are listed, never opened): cheap enough to check before reusing a result.
    """
    pairs: list[tuple[str, int]] = []
    seen: set[tuple[int, int]] = set()
    pending = [os.fspath(root)]
    try:
        while pending:
            folder = pending.pop()
            info = os.stat(folder)
            if (info.st_dev, info.st_ino) in seen:
                continue
            seen.add((info.st_dev, info.st_ino))
            pairs.append((_posix(os.path.relpath(folder, root)), info.st_mtime_ns))
            with os.scandir(folder) as entries:
                pending += [entry.path for entry in entries if entry.is_dir()]
    except OSError:
        return None
    return fingerprint_pairs(pairs)
