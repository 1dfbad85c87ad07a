"""Tensor hashing: the one way dcbench turns weights into digests.

Two uses share :func:`hash_tensor`: the identity of a checkpoint (:func:`weights_sha256`,
part of every result and of every feature-cache key) and the cheap per-tensor snapshot that
proves a frozen backbone did not change (:func:`tensor_digests`, MoCo's sanity check).
A leaf module (torch and hashlib only), so any engine module can import it.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

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
