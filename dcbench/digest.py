"""Tensor hashing: the one way dcbench turns weights into digests.

Two uses share :func:`hash_tensor`: the identity of a checkpoint (:func:`weights_sha256`,
part of every result and of every feature-cache key) and the cheap per-tensor snapshot that
proves a frozen backbone did not change (:func:`tensor_digests`, MoCo's sanity check).

File checksums of cache entries (:class:`HashingWriter` at write time, :func:`file_sha256` /
:func:`read_verified` at read time): sha256 because hashlib's is the fastest of its hashes
on CPUs with SHA extensions (measured on the 2-core CI machine: sha256 1.4 GB/s, blake2b
0.9 GB/s, md5 0.7 GB/s in memory; 0.8 GB/s hashing a file in 16 MiB reads, against 0.4 GB/s
for ``np.load`` of the same file), so verifying an entry costs less than reading it.
A leaf module (torch and hashlib only), so any engine module can import it.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import IO, Any

import torch
from torch import nn


def hash_tensor(h: Any, tensor: torch.Tensor, prefix: str = "") -> None:
    """Feed ``prefix``, dtype, shape and the raw bytes of ``tensor`` into the hashlib object ``h``."""
    t = tensor.detach().cpu().contiguous()
    h.update(f"{prefix}{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy())  # buffer protocol: no copy


def weights_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in sorted key order."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        hash_tensor(h, state_dict[key], prefix=f"{key}|")
    return h.hexdigest()


def tensor_digests(module: nn.Module) -> dict[str, str]:
    """A digest of every parameter and buffer (weights AND BN running stats) of ``module``.

    Small to keep (a few bytes per tensor, unlike a copy of the weights), and it can name
    the tensors that changed; see :func:`dcbench.features.assert_unchanged`.
    """
    out = {}
    for name, tensor in module.state_dict().items():
        h = hashlib.blake2b(digest_size=16)
        hash_tensor(h, tensor)
        out[name] = h.hexdigest()
    return out


#: bytes per read when hashing a file (bounded memory whatever the file's size)
FILE_CHUNK_BYTES = 1 << 24


class HashingWriter:
    """A write-only file object that feeds every byte written to ``f`` into a sha256, so an
    entry's checksum costs no second pass over the data (``np.save(HashingWriter(f), a)``)."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.sha = hashlib.sha256()

    def write(self, data: Any) -> int:
        """Write ``data`` (any buffer) and hash it."""
        self.sha.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        """Flush the wrapped file."""
        self.f.flush()

    def hexdigest(self) -> str:
        """sha256 of everything written so far."""
        return self.sha.hexdigest()


def file_sha256(path: str | os.PathLike, chunk: int = FILE_CHUNK_BYTES) -> str:
    """sha256 of a file's bytes, read in ``chunk``-byte pieces (for files too large to load)."""
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def read_verified(path: str | os.PathLike, sha256: str) -> bytearray | None:
    """The whole file as a (writable) bytearray when its sha256 is ``sha256``, else None:
    one read, hashed in memory, no second copy."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        buf = bytearray(size)
        view, done = memoryview(buf), 0
        while done < size and (n := f.readinto(view[done:])):
            done += n
    if done != size or hashlib.sha256(buf).hexdigest() != sha256:
        return None
    return buf
