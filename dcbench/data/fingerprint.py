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
