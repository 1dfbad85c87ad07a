"""The one frozen-feature extractor (trainer, probes, kNN, SVM, retrieval), with its cache.

:func:`extract_rows` runs ONE frozen forward per batch for all the taps that are not cached
yet (eval mode, ``torch.inference_mode``) and returns, per tap, float32 rows and the dataset
index (``owner``) of each row:

- rows per image: a pooling module/callable's output is flattened (``N_kept x D``);
- rows per region: a pooling callable with ``per_region = True`` returns ``B x R x D``
  (e.g. R-MAC regions, :mod:`dcbench.retrieval`), each region becomes a row;
- ``shard=(rank, world_size)``: only this rank's contiguous share of the dataset (the
  trainer under torchrun); with ``gather=True`` (data-parallel evaluation, through
  :meth:`dcbench.protocol.RunContext.extract`) each rank reads its block of the very batches
  one process would read and every rank gets all rows back in one-process order
  (:mod:`dcbench.parallel`); the cache then holds the whole-dataset entry, written by rank 0,
  byte for byte the one a single process writes;
- ``spill_dir``: per-image outputs larger than ``spill_over_bytes`` go to a disk memmap,
  whose file is unlinked as soon as it is mapped, so it disappears with the array and a
  killed run leaves nothing behind;
- ``batch_sampler``: batches other than consecutive ones (retrieval groups same-shape images).

:func:`extract_features` (the per-image API every protocol calls, also through
:meth:`dcbench.protocol.RunContext.extract`) aligns the taps to the same images and adds the
labels. Unreadable images are skipped (their rows and labels are dropped; the kept dataset
indices are returned).

The feature cache: rows are keyed by ``(checkpoint sha256, tap, transform id, dataset
fingerprint, pooling id, numerics)`` (+ the shard when sharded), where numerics
(:func:`numerics_id`) are the device type, the TF32 / float32-matmul precision settings and
bfloat16 autocast, which all change the numbers. Entries are stored as

    <cache_dir>/<sha256[:16]>/<key-hash>.npy        float32, rows x D (pooled, flattened)
    <cache_dir>/<sha256[:16]>/<key-hash>.idx.npy    int64, the dataset index of every row
    <cache_dir>/<sha256[:16]>/<key-hash>.json       the key, shape and sha256 of both files (written last)

Each file is written to a temp file and renamed into place, and the JSON sidecar is written
last, so a reader never sees a half-written entry: no sidecar, no entry. A reader checks both
files against the sidecar's sha256 (hashed while writing, so a write costs no extra pass): a
truncated or corrupted file is reported in one warning line, recomputed and rewritten, never
used. A memory-mapped read hashes the file in chunks once per process (:data:`_VERIFIED`).

This module is protocol-agnostic: the pooling modules, the transform and its id come from
the caller (e.g. the linear-probe tables live in :mod:`dcbench.pooling`).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import math
import os
import sys
import tempfile
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from dcbench import parallel
from dcbench.data import DataError, MeteredLoader, SkipCounter, WaitedBatches, normalised_batches, skip_collate
from dcbench.digest import HashingWriter, file_sha256, read_verified, tensor_digests, weights_sha256
from dcbench.fileio import atomic_write

log = logging.getLogger("dcbench")

#: bump when extraction changes in a way that changes the stored numbers (2: numerics in the
#: key, sha256 of both files in the sidecar; version-1 entries are never matched)
CACHE_VERSION = 2
#: BatchNorm re-estimation stops after this many batches ("a few hundred")
BN_RECALIBRATE_MAX_BATCHES = 200

#: a tap's pooling: ``B x C x H x W -> B x ...`` (flattened to one row per image), or, when
#: it has ``per_region = True``, ``B x R x D`` (one row per region)
Pool = Callable[[torch.Tensor], torch.Tensor]
#: ``(rank, world_size)``: extract only that contiguous share of the dataset
Shard = tuple[int, int]
#: ``(dataset indices to read, batch size) -> batches of dataset indices``
BatchSampler = Callable[[Sequence[int], int], Iterable[Sequence[int]]]
#: device types where ``amp`` turns bfloat16 autocast on (the CPU: oneDNN, fast with AVX512-BF16/AMX)
AMP_DEVICES = ("cuda", "cpu")


class ExtractedFeatures(NamedTuple):
    """What :func:`extract_features` returns (unpacks as ``features, labels, indices``)."""

    features: dict[str, np.ndarray]  # tap -> float32 N_kept x D
    labels: np.ndarray  # int64 N_kept (-1 for unlabelled data)
    indices: np.ndarray  # int64 N_kept, dataset indices of the rows (unreadable images left out)


# ----------------------------------------------------------------------------- keys
def pool_id(pool: Pool | None) -> str:
    """A stable text id of a pooling module or callable, part of the cache key.

    ``nn.Module``: its repr (e.g. ``AvgPool2d(kernel_size=6, stride=6, padding=3)``); a
    callable: its ``pool_id`` attribute, else its qualified name. Lambdas and local functions
    have no stable name, so they need a ``pool_id`` attribute to be cached.
    """
    if pool is None:
        return "identity"
    explicit = getattr(pool, "pool_id", None)
    if isinstance(explicit, str) and explicit:
        return explicit
    if isinstance(pool, nn.Module):
        return " ".join(repr(pool).split())
    name = f"{getattr(pool, '__module__', '')}.{getattr(pool, '__qualname__', '')}"
    if "<lambda>" in name or "<locals>" in name or name == ".":
        raise ValueError(f"pooling callable {pool!r} has no stable name: give it a 'pool_id' "
                         f"attribute (or use an nn.Module) so its features can be cached")
    return name


def numerics_id(device: str | torch.device, amp: bool = False) -> dict[str, Any]:
    """What besides the weights and the data changes extracted numbers: the device type, the
    TF32 switches of cuBLAS and cuDNN, the float32 matmul precision (it also lets oneDNN use
    bfloat16 on the CPU), the newer ``fp32_precision`` switches where torch has them, and
    bfloat16 autocast (``amp``, on CUDA and the CPU: :data:`AMP_DEVICES`). Part of every cache key."""
    kind = torch.device(device).type
    out: dict[str, Any] = {"device": kind,
                           "cuda_matmul_allow_tf32": _flag(lambda: torch.backends.cuda.matmul.allow_tf32),
                           "cudnn_allow_tf32": _flag(lambda: torch.backends.cudnn.allow_tf32),
                           "float32_matmul_precision": _flag(torch.get_float32_matmul_precision)}
    cudnn = torch.backends.cudnn
    for name, owner in (("fp32_precision", torch.backends), ("cuda_matmul_fp32_precision", torch.backends.cuda.matmul),
                        ("cudnn_conv_fp32_precision", getattr(cudnn, "conv", None)),
                        ("cudnn_rnn_fp32_precision", getattr(cudnn, "rnn", None))):
        value = _flag(lambda owner=owner: owner.fp32_precision) if owner is not None else None
        if isinstance(value, str):
            out[name] = value
    out["autocast"] = "bfloat16" if amp and kind in AMP_DEVICES else "off"
    return out


def _flag(read: Callable[[], Any]) -> Any:
    """A precision switch's value; "mixed" where torch refuses to answer (torch 2.14 raises
    RuntimeError from ``cudnn.allow_tf32`` and ``get_float32_matmul_precision()`` once the legacy
    and the ``fp32_precision`` APIs were both used), None if absent."""
    with warnings.catch_warnings():  # newer torch deprecates allow_tf32 in favour of fp32_precision
        warnings.simplefilter("ignore")
        try:
            value = read()
        except RuntimeError:
            return "mixed"
        except AttributeError:
            return None
    return value if isinstance(value, str) else bool(value)


def feature_key(ckpt_sha: str, tap: str, transform_id: str, dataset_fingerprint: str,
                pooling: str, shard: Shard | None = None, device: str | torch.device | None = None,
                amp: bool = False) -> dict[str, Any]:
    """The cache key of one tap's features, as a JSON-safe dict (``shard``: only when sharded,
    so the keys of whole-dataset extractions never change; ``device``: adds
    :func:`numerics_id`, as every extraction does, read when the key is made)."""
    key = {"cache_version": CACHE_VERSION, "checkpoint_sha256": ckpt_sha, "tap": tap,
           "transform": transform_id, "dataset_fingerprint": dataset_fingerprint,
           "pooling": pooling, "dtype": "float32"}
    if device is not None:
        key["numerics"] = numerics_id(device, amp)
    if shard is not None and shard[1] > 1:
        key["shard"] = f"{shard[0]}/{shard[1]}"
    return key


def key_hash(key: Mapping[str, Any]) -> str:
    """32 hex characters identifying ``key`` (the cache file name)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


#: (path, size, mtime_ns, inode, sha256) of the memory-mapped files this process has verified:
#: a file is hashed once per process, not at every open
_VERIFIED: set[tuple[str, int, int, int, str]] = set()


class FeatureCache:
    """The on-disk store under ``root``; see the module docstring for the layout."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def paths(self, key: Mapping[str, Any]) -> tuple[Path, Path, Path]:
        """``(features.npy, indices.idx.npy, sidecar.json)`` of ``key``."""
        folder = self.root / str(key["checkpoint_sha256"])[:16]
        stem = key_hash(key)
        return folder / f"{stem}.npy", folder / f"{stem}.idx.npy", folder / f"{stem}.json"

    def load(self, key: Mapping[str, Any], mmap: bool = False) -> tuple[np.ndarray, np.ndarray] | None:
        """``(features, indices)`` of ``key``, or None when absent, unreadable or corrupted (a
        file whose sha256 differs from the sidecar's: warned about, to be recomputed)."""
        feats_path, idx_path, meta_path = self.paths(key)
        if not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if not isinstance(meta, dict) or meta.get("key") != dict(key):
                return None  # a hash collision or a hand-edited file: treat as absent
            sums = meta.get("sha256") or {}
            indices = _load_verified(idx_path, sums.get("indices"), mmap=False)
            feats = _load_verified(feats_path, sums.get("features"), mmap=mmap)
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable feature cache entry %s: %s; recomputing it", meta_path, exc)
            return None
        if feats is None or indices is None:
            log.warning("feature cache entry %s is corrupted (sha256 mismatch or truncated file); "
                        "recomputing and rewriting it", meta_path)
            return None
        if feats.shape[0] != indices.shape[0] or list(feats.shape) != meta.get("shape"):
            log.warning("ignoring inconsistent feature cache entry %s; recomputing it", meta_path)
            return None
        return feats, indices

    def save(self, key: Mapping[str, Any], feats: np.ndarray, indices: np.ndarray) -> None:
        """Store one entry atomically (features, indices, then the sidecar with their sha256)."""
        feats_path, idx_path, meta_path = self.paths(key)
        feats_path.parent.mkdir(parents=True, exist_ok=True)
        sums = {"features": _save_hashed(feats_path, feats),
                "indices": _save_hashed(idx_path, indices.astype(np.int64))}
        meta = {"key": dict(key), "shape": list(feats.shape), "rows": int(feats.shape[0]), "sha256": sums}
        _atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=1, sort_keys=True).encode()))


def _save_hashed(path: Path, array: np.ndarray) -> str:
    """``np.save`` ``array`` to ``path`` atomically; the sha256 of the bytes written."""
    digest = []

    def write(f: Any) -> None:
        writer = HashingWriter(f)
        np.save(writer, array, allow_pickle=False)
        digest.append(writer.hexdigest())

    _atomic_write(path, write)
    return digest[0]


def _load_verified(path: Path, sha256: Any, mmap: bool) -> np.ndarray | None:
    """The array in ``path`` if the file's sha256 is ``sha256``, else None (no checksum, as in
    entries older than the checksums: None too). ``mmap``: memory-mapped, the file hashed in
    chunks once per process; otherwise read once, hashed in memory and parsed in place."""
    if not isinstance(sha256, str):
        return None
    if mmap:
        stat = path.stat()
        stamp = (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino, sha256)
        if stamp not in _VERIFIED:
            if file_sha256(path) != sha256:
                return None
            _VERIFIED.add(stamp)
        return np.load(path, mmap_mode="r", allow_pickle=False)
    buf = read_verified(path, sha256)
    return None if buf is None else _npy_from_buffer(buf)


def _npy_from_buffer(buf: bytearray) -> np.ndarray:
    """The array of a whole ``.npy`` file held in ``buf``, without copying its data."""
    head = io.BytesIO(bytes(buf[:1 << 17]))  # the header is at most 64 KiB (format 1.0) plus the magic
    version = np.lib.format.read_magic(head)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(head)
    if dtype.hasobject:
        raise ValueError("object arrays are not cache entries")
    count = math.prod(shape)
    flat = np.frombuffer(buf, dtype=dtype, count=count, offset=head.tell())
    return flat.reshape(shape, order="F" if fortran else "C")


def _atomic_write(path: Path, write: Callable[[Any], Any]) -> None:
    """Write through a temp file in the same folder, then rename over ``path``."""
    atomic_write(path, write)


# ----------------------------------------------------------------------------- forward
@contextmanager
def on_device(module: nn.Module, device: str | torch.device) -> Iterator[nn.Module]:
    """Move ``module`` to ``device`` for the duration, then back where it was."""
    first = next(module.parameters(), None)
    before = first.device if first is not None else None
    module.to(device)
    try:
        yield module
    finally:
        if before is not None:
            module.to(before)


@contextmanager
def frozen(backbone: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the duration (BN running stats frozen), previous mode restored after."""
    was_training = backbone.training
    backbone.eval()
    try:
        yield backbone
    finally:
        backbone.train(was_training)


def forward_pooled(backbone: nn.Module, images: torch.Tensor, taps: Sequence[str],
                   pools: Mapping[str, Pool | None]) -> dict[str, torch.Tensor]:
    """ONE frozen forward pass of ``images`` for all ``taps``; each tap pooled and flattened
    to ``B x D`` (a ``per_region`` pool: kept as its ``B x R x D``).

    Runs under ``torch.inference_mode``: the results cannot enter autograd (``clone()`` them
    outside inference mode to train on them). The caller sets eval mode (see :func:`frozen`).
    """
    with torch.inference_mode():
        out = backbone(images, taps=list(taps))
        pooled = {}
        for tap in taps:
            pool = pools.get(tap)
            value = pool(out[tap]) if pool is not None else out[tap]
            pooled[tap] = (value if is_per_region(pool) else value.flatten(1)).float()
        return pooled


def is_per_region(pool: Pool | None) -> bool:
    """Whether ``pool`` returns ``B x R x D`` (one row per region) instead of one row per image."""
    return bool(getattr(pool, "per_region", False))


def show_progress(progress: bool) -> bool:
    """Progress bars only when asked for and stderr is a terminal (quiet in logs and CI)."""
    return bool(progress) and sys.stderr.isatty()


def make_loader(dataset: Any, batch_size: int, workers: int, device: str | torch.device = "cpu",
                shuffle: bool = False, seed: int = 0, drop_last: bool = False,
                persistent: bool = False) -> DataLoader:
    """A DataLoader with :func:`skip_collate` (unreadable images dropped) and seeded shuffling."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return MeteredLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                         num_workers=workers, collate_fn=skip_collate, drop_last=drop_last,
                         pin_memory=torch.device(device).type == "cuda",
                         persistent_workers=persistent and workers > 0)


# ----------------------------------------------------------------------------- extraction
class TapRows(NamedTuple):
    """The rows of one tap: float32 ``R x D`` and the dataset index of each row."""

    rows: np.ndarray  # float32 R x D (R = readable images, or their regions)
    owner: np.ndarray  # int64 R


@dataclass
class Extraction:
    """What :func:`extract_rows` returns."""

    taps: dict[str, TapRows]
    n_items: int  # images the extraction covered (the shard's, when sharded), unreadable ones included
    cached: list[str]  # taps read from the cache
    seconds: float | None  # time of the forward pass; None when every tap came from the cache
    #: of ``seconds``, the time spent waiting for the next batch of images (:class:`WaitedBatches`)
    waited_s: float | None = None

    @property
    def items_per_s(self) -> float | None:
        """Images per second of the forward pass (None when nothing was extracted)."""
        return None if self.seconds is None else self.n_items / max(self.seconds, 1e-9)


def shard_indices(n: int, shard: Shard | None) -> range:
    """The contiguous share of ``range(n)`` that rank ``shard[0]`` of ``shard[1]`` reads."""
    if shard is None:
        return range(n)
    rank, world = shard
    if not 0 <= rank < world:
        raise ValueError(f"shard {shard}: rank must be in [0, world_size)")
    per_rank = math.ceil(n / world)
    return range(min(n, rank * per_rank), min(n, (rank + 1) * per_rank))


def rank_batches(n: int, batch_size: int, shard: Shard,
                 batch_sampler: BatchSampler | None = None) -> list[list[int]]:
    """Rank ``shard[0]``'s share of the batches ONE process reads over ``range(n)``: a contiguous
    block of them, rank 0 first.

    Each image stays in the batch it has in a one-process run, so its features are the same
    bits (a forward's output can depend on the batch it is computed in), and rows concatenated
    in rank order are in one-process order. Blocks are whole batches: with fewer batches than
    ranks, the last ranks read nothing.
    """
    rank, world = shard
    if batch_sampler is not None:
        batches = [list(b) for b in batch_sampler(range(n), batch_size)]
    else:
        batches = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    per_rank = math.ceil(len(batches) / world)
    return batches[rank * per_rank:(rank + 1) * per_rank]


def extract_features(backbone: nn.Module, dataset: Any, taps: Sequence[str],
                     pools: Mapping[str, Pool | None] | None = None, transform_id: str = "",
                     ckpt_sha: str = "", cache_dir: str | os.PathLike | None = None,
                     batch_size: int = 256, workers: int = 0, device: str | torch.device = "cpu",
                     progress: bool = False, mmap: bool = False, **options: Any) -> ExtractedFeatures:
    """Pooled features of ``taps`` for every readable image of ``dataset``, through the cache.

    Args:
        backbone: a :class:`dcbench.models.Backbone` (``backbone(x, taps=[...])``); it is put in
            eval mode for the pass and gets its previous mode back afterwards. It must already be
            on ``device``.
        dataset: an :class:`dcbench.data.ImageDataset` (items ``(image, target, index)`` or None)
            whose transform is described by ``transform_id``.
        taps: the taps to return.
        pools: tap -> pooling module/callable applied to the tap's output before flattening
            (missing or None: just flatten). Per-region pools need :func:`extract_rows`.
        transform_id: text identifying the dataset's transform (part of the cache key).
        ckpt_sha: sha256 of the backbone weights as used (part of the key and the folder name).
        cache_dir: the cache folder, or None to disable caching.
        batch_size, workers, device: the DataLoader and the forward pass.
        progress: show a tqdm bar (only when stderr is a terminal).
        mmap: return cached arrays memory-mapped (read-only) instead of loaded.
        options: keyword options of :func:`extract_rows` (``shard``, ``spill_dir``, ...).

    Returns:
        ``ExtractedFeatures(features, labels, indices)``: ``features[tap]`` is float32
        ``N_kept x D``; rows of unreadable images are dropped from features and labels alike, and
        ``indices`` names the dataset index of every row. A second call with the same keys
        reads the cache and does no forward pass.
    """
    check_per_image(taps, pools)
    out = extract_rows(backbone, dataset, taps, pools, transform_id, ckpt_sha, cache_dir, batch_size, workers,
                       device, progress, mmap, **options)
    return per_image_features(out, dataset)


def check_per_image(taps: Sequence[str], pools: Mapping[str, Pool | None] | None) -> None:
    """Raise ValueError when a pool of ``taps`` gives several rows per image (per-region pools:
    :func:`extract_rows`), before any image is read."""
    if any(is_per_region((pools or {}).get(t)) for t in taps):
        raise ValueError("extract_features returns one row per image; use extract_rows for per-region pools")


def per_image_features(out: "Extraction", dataset: Any) -> ExtractedFeatures:
    """:func:`extract_features`'s result from an :func:`extract_rows` extraction of per-image taps:
    every tap on the same readable images, with their labels and dataset indices."""
    return _align(out.taps, list(out.taps), dataset)


def extract_rows(backbone: nn.Module, dataset: Any, taps: Sequence[str],
                 pools: Mapping[str, Pool | None] | None = None, transform_id: str = "", ckpt_sha: str = "",
                 cache_dir: str | os.PathLike | None = None, batch_size: int = 256, workers: int = 0,
                 device: str | torch.device = "cpu", progress: bool = False, mmap: bool = False, *,
                 shard: Shard | None = None, gather: bool = False, batch_sampler: BatchSampler | None = None,
                 spill_dir: str | os.PathLike | None = None, spill_over_bytes: float = 0.0,
                 amp: bool = False, desc: str | None = None, channels_last: bool = False) -> Extraction:
    """Rows of ``taps`` (per image, or per region for ``per_region`` pools), through the cache.

    The arguments up to ``mmap`` are :func:`extract_features`'s. Further:

    Args:
        shard: ``(rank, world_size)``: read only that rank's contiguous share of the dataset
            (:func:`shard_indices`); an empty or wholly unreadable shard gives zero rows instead
            of an error. Sharded cache entries are keyed by their shard.
        gather: with ``shard`` of a joined process group (:mod:`dcbench.parallel`): data-parallel
            extraction (see :func:`rank_batches`): every rank gets every row, in one-process
            order; the cache is looked up and written (rank 0) under the whole-dataset keys, and a
            tap is read from it only when every rank finds it. ``spill_dir`` is not used.
        batch_sampler: ``(indices, batch_size) -> batches``; default consecutive batches.
        spill_dir, spill_over_bytes: a per-image tap whose rows would exceed
            ``spill_over_bytes`` is written to a disk memmap in ``spill_dir`` (unlinked at once:
            the space is freed with the array, even after ``kill -9``).
        amp: bfloat16 autocast on CUDA and the CPU (the trainer's ``amp``).
        desc: progress-bar text.
        channels_last: feed the batches in channels-last memory format (the trainer's setting; the
            convolutions then run channels-last kernels: last-bit differences, not in the cache key).

    Returns:
        :class:`Extraction`: per tap the rows and their dataset indices, in the order read.
    """
    taps = list(dict.fromkeys(taps))
    pools = dict(pools or {})
    cache = FeatureCache(cache_dir) if cache_dir is not None else None
    if cache is not None and not ckpt_sha:
        raise ValueError("extract_features: caching needs ckpt_sha (the sha256 of the weights)")
    if cache is not None and channels_last:
        raise ValueError("extract_rows: channels_last rows are not cached (their last bits differ); pass cache_dir=None")
    how = _Batching(shard, batch_sampler, amp, desc, channels_last)
    if gather and shard is not None and shard[1] > 1:
        keys = _keys(cache, dataset, ckpt_sha, transform_id, pools, taps, None, device, amp)  # whole-dataset entries
        return _extract_gathered(backbone, dataset, taps, pools, keys, cache, batch_size, workers, device, progress,
                                 mmap, how)
    keys = _keys(cache, dataset, ckpt_sha, transform_id, pools, taps, shard, device, amp)
    found = _cached(cache, keys, taps, mmap)
    missing = [t for t in taps if t not in found]
    indices = shard_indices(len(dataset), shard)
    if found:
        log.info("feature cache: %d of %d taps read from %s", len(found), len(taps), cache.root)
    seconds = waited = None
    if missing:
        started = time.perf_counter()
        spill = _Spill(spill_dir, spill_over_bytes, shard)
        fresh, waited = _forward_rows(backbone, dataset, missing, pools, indices, batch_size, workers, device,
                                      progress, how, spill)
        seconds = time.perf_counter() - started
        for tap in missing:
            found[tap] = fresh[tap]
            if cache is not None:
                cache.save(keys[tap], fresh[tap].rows, fresh[tap].owner)
    return Extraction({t: found[t] for t in taps}, len(indices), [t for t in taps if t not in missing], seconds,
                      waited)


def _keys(cache: FeatureCache | None, dataset: Any, ckpt_sha: str, transform_id: str,
          pools: Mapping[str, Pool | None], taps: list[str], shard: Shard | None, device: str | torch.device,
          amp: bool) -> dict[str, dict[str, Any]]:
    """The cache key of every tap ({} without a cache)."""
    if cache is None:
        return {}
    fingerprint = dataset.fingerprint()
    return {t: feature_key(ckpt_sha, t, transform_id, fingerprint, pool_id(pools.get(t)), shard, device, amp)
            for t in taps}


def _cached(cache: FeatureCache | None, keys: Mapping[str, Mapping[str, Any]], taps: list[str],
            mmap: bool) -> dict[str, TapRows]:
    """The taps the cache holds."""
    found = {}
    for tap in taps:
        hit = cache.load(keys[tap], mmap=mmap) if cache is not None else None
        if hit is not None:
            found[tap] = TapRows(*hit)
    return found


def _extract_gathered(backbone: nn.Module, dataset: Any, taps: list[str], pools: Mapping[str, Pool | None],
                      keys: Mapping[str, Mapping[str, Any]], cache: FeatureCache | None, batch_size: int,
                      workers: int, device: str | torch.device, progress: bool, mmap: bool,
                      how: "_Batching") -> Extraction:
    """Data-parallel :func:`extract_rows` (``gather=True``): see its docstring."""
    local = _cached(cache, keys, taps, mmap)
    everywhere = parallel.all_reduce_sum([int(t in local) for t in taps]) == how.shard[1]
    found = {t: local[t] for t, hit in zip(taps, everywhere) if hit}  # every rank takes the same path
    missing = [t for t in taps if t not in found]
    if found:
        log.info("feature cache: %d of %d taps read from %s", len(found), len(taps), cache.root)
    seconds = waited = None
    if missing:
        started = time.perf_counter()
        batches = rank_batches(len(dataset), batch_size, how.shard, how.batch_sampler)
        mine = [i for batch in batches for i in batch]
        part, waited = _forward_rows(backbone, dataset, missing, pools, mine, batch_size, workers, device, progress,
                                     how._replace(batch_sampler=lambda _indices, _size: batches),
                                     _Spill(None, 0.0, how.shard))
        for tap in missing:
            found[tap] = TapRows(*parallel.all_gather_rows(part[tap].rows, part[tap].owner))
            if cache is not None and how.shard[0] == 0:
                cache.save(keys[tap], found[tap].rows, found[tap].owner)
        if not len(found[missing[0]].owner):
            raise DataError(f"no readable image in {getattr(dataset, 'root', 'the dataset')}; "
                            f"check the files (every image failed to decode)")
        parallel.barrier()  # the entries exist before any rank reads them in a later extraction
        seconds = time.perf_counter() - started
    return Extraction({t: found[t] for t in taps}, len(dataset), [t for t in taps if t not in missing], seconds,
                      waited)


class _Batching(NamedTuple):
    """How :func:`_forward_rows` walks the data (options of :func:`extract_rows`)."""

    shard: Shard | None
    batch_sampler: BatchSampler | None
    amp: bool
    desc: str | None
    channels_last: bool = False


def _loader(dataset: Any, indices: Sequence[int], batch_size: int, workers: int, device: str | torch.device,
            how: _Batching) -> DataLoader:
    """The DataLoader of one extraction pass, in dataset order unless a batch sampler says otherwise."""
    if how.batch_sampler is not None:
        return MeteredLoader(dataset, batch_sampler=list(how.batch_sampler(indices, batch_size)),
                             num_workers=workers, collate_fn=skip_collate,
                             pin_memory=torch.device(device).type == "cuda")
    if how.shard is None:
        return make_loader(dataset, batch_size, workers, device)
    return MeteredLoader(dataset, batch_size=batch_size, sampler=list(indices), num_workers=workers,
                         collate_fn=skip_collate, pin_memory=torch.device(device).type == "cuda")


def _forward_rows(backbone: nn.Module, dataset: Any, taps: list[str], pools: Mapping[str, Pool | None],
                  indices: Sequence[int], batch_size: int, workers: int, device: str | torch.device, progress: bool,
                  how: _Batching, spill: "_Spill") -> tuple[dict[str, TapRows], float]:
    """One pass over ``indices`` of ``dataset``: one forward per batch for all ``taps``; the rows and
    the seconds spent waiting for images."""
    counter = SkipCounter(dataset)
    sinks = {t: _RowSink(len(indices), spill, t) for t in taps}
    # uint8 pixels through the loader, scaled on the device: the same inputs bit for bit
    loader = WaitedBatches(normalised_batches(
        dataset, lambda ds: _loader(ds, indices, batch_size, workers, device, how), device))
    bar = tqdm(loader, unit="batch", leave=False,
               desc=how.desc or f"features {','.join(taps)}", disable=not show_progress(progress))
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                              enabled=torch.device(device).type in AMP_DEVICES) if how.amp else contextlib.nullcontext()
    with frozen(backbone):
        for images, _targets, idx, n_skipped in bar:
            counter.update(idx, n_skipped)
            if len(idx) == 0:
                continue
            images = images.to(device, non_blocking=True)
            if how.channels_last and images.dim() == 4:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast:
                pooled = forward_pooled(backbone, images, taps, pools)
            for tap, value in pooled.items():
                sinks[tap].add(value, idx)
    counter.report(expected=None if how.shard is None and how.batch_sampler is None else indices)
    if not sinks[taps[0]].n_rows and (how.shard is None or how.shard[1] == 1):
        raise DataError(f"no readable image in {getattr(dataset, 'root', 'the dataset')}; "
                        f"check the files (every image failed to decode)")
    return {t: sink.result() for t, sink in sinks.items()}, loader.seconds


class _Spill(NamedTuple):
    """Where large per-image outputs go (see :func:`extract_rows`)."""

    folder: str | os.PathLike | None
    over_bytes: float
    shard: Shard | None

    def array(self, tap: str, rows: int, width: int) -> np.ndarray:
        """An empty float32 ``rows x width`` array: in RAM, or a self-deleting disk memmap."""
        if self.folder is None or rows * width * 4 <= self.over_bytes:
            return np.empty((rows, width), dtype=np.float32)
        rank = self.shard[0] if self.shard is not None else 0
        fd, path = tempfile.mkstemp(prefix=f"features.rank{rank}.", suffix=".tmp", dir=self.folder)
        os.close(fd)
        array = np.memmap(path, dtype=np.float32, mode="w+", shape=(rows, width))
        try:
            os.unlink(path)  # POSIX: the mapping lives on, the file is gone with the array
        except OSError:  # pragma: no cover - Windows cannot unlink a mapped file: delete after use
            weakref.finalize(array, _remove, path)
        log.info("features of %s: %.1f GB on disk in %s (freed after use)", tap, rows * width * 4 / 1e9, self.folder)
        return array


def _remove(path: str) -> None:  # pragma: no cover - Windows only
    with contextlib.suppress(OSError):
        os.unlink(path)


class _RowSink:
    """Collects one tap's rows: preallocated per image (RAM or spill memmap), appended per region."""

    def __init__(self, n_items: int, spill: _Spill, tap: str) -> None:
        self.n_items, self.spill, self.tap = n_items, spill, tap
        self.array: np.ndarray | None = None  # per image: rows preallocated once the width is known
        self.owner = np.empty(n_items, dtype=np.int64)
        self.parts: list[np.ndarray] = []  # per region
        self.owners: list[np.ndarray] = []
        self.n_rows = 0

    def add(self, value: torch.Tensor, idx: torch.Tensor) -> None:
        """One batch: ``B x D`` (a row per image) or ``B x R x D`` (a row per region)."""
        if value.dim() == 3:
            self.parts.append(value.reshape(-1, value.shape[-1]).cpu().numpy())
            self.owners.append(np.repeat(idx.numpy().astype(np.int64), value.shape[1]))
            self.n_rows += value.shape[0] * value.shape[1]
            return
        if self.array is None:  # no concat copy: written in place
            self.array = self.spill.array(self.tap, self.n_items, value.shape[1])
        b = len(idx)
        self.array[self.n_rows:self.n_rows + b] = value.cpu().numpy()
        self.owner[self.n_rows:self.n_rows + b] = idx.numpy()
        self.n_rows += b

    def result(self) -> TapRows:
        """The rows collected so far."""
        if self.parts:
            return TapRows(np.concatenate(self.parts).astype(np.float32), np.concatenate(self.owners))
        if self.array is None:  # nothing readable (an empty shard)
            return TapRows(np.zeros((0, 0), dtype=np.float32), np.zeros(0, dtype=np.int64))
        return TapRows(self.array[:self.n_rows], self.owner[:self.n_rows])


def _align(found: Mapping[str, TapRows], taps: list[str], dataset: Any) -> ExtractedFeatures:
    """Bring every tap to the same rows (cached taps may predate a newly unreadable file)."""
    index_sets = [found[t].owner for t in taps]
    common = index_sets[0]
    same = all(np.array_equal(common, other) for other in index_sets[1:])
    if not same:
        for other in index_sets[1:]:
            common = np.intersect1d(common, other)
        log.warning("feature cache: taps were extracted from different readable-image sets; "
                    "using the %d images common to all", len(common))
    features = {}
    for tap in taps:
        feats, idx = found[tap]
        features[tap] = feats if same else np.asarray(feats[np.searchsorted(idx, common)])
    targets = getattr(dataset, "targets", None)
    labels = (np.asarray(targets, dtype=np.int64)[common] if targets is not None
              else np.full(len(common), -1, dtype=np.int64))
    return ExtractedFeatures(features, labels, np.asarray(common, dtype=np.int64))


# ----------------------------------------------------------------------------- BatchNorm
def has_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` holds BatchNorm layers (whose running stats can be re-estimated)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def recalibrate_bn(backbone: nn.Module, dataset: Any, batch_size: int = 256, workers: int = 0,
                   device: str | torch.device = "cpu", seed: int = 0,
                   max_batches: int = BN_RECALIBRATE_MAX_BATCHES,
                   progress: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """A COPY of ``backbone`` (on ``device``) whose BatchNorm running stats are re-estimated.

    A random init's running stats (mean 0, var 1) do not describe its activations, so frozen
    eval-mode features would be badly scaled. The stats are reset and re-estimated as the
    cumulative average (``momentum=None``) over up to ``max_batches`` shuffled (seeded)
    batches of ``dataset``, forwarding through every conv tap with only the BN layers in train
    mode and no gradient. The original ``backbone`` is left untouched (protocols must not
    change the checkpoint they evaluate).

    Returns:
        ``(copy, info)`` with ``info = {"ran", "images", "batches", "max_batches"}`` (``ran``
        False, with a ``reason``, when the model has no BatchNorm).
    """
    clone = copy.deepcopy(backbone).to(device)
    bns = [m for m in clone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return clone.eval(), {"ran": False, "reason": "no BatchNorm layers"}
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the batches seen
    drop_last = len(dataset) > batch_size  # a 1-image batch cannot give batch statistics
    loader = make_loader(dataset, batch_size, workers, device, shuffle=True, seed=seed, drop_last=drop_last)
    taps = list(getattr(clone, "conv_tap_names", None) or [])
    images_seen = batches = 0
    clone.eval()
    for m in bns:
        m.train()
    bar = tqdm(loader, desc="BN re-estimation", unit="batch", disable=not show_progress(progress),
               total=min(len(loader), max_batches), leave=False)
    with torch.no_grad():
        for images, _t, idx, _n in bar:
            if batches >= max_batches:
                break
            if len(idx) < 2:
                continue
            images = images.to(device, non_blocking=True)
            if taps:  # stop after the last conv tap: the fc layers never feed a probe
                clone(images, taps=taps)
            else:
                clone(images)
            images_seen += len(idx)
            batches += 1
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    clone.eval()
    if batches == 0:  # batch statistics need 2+ images (or every image was unreadable)
        raise DataError(f"BatchNorm re-estimation needs a batch of 2 or more readable training images "
                        f"({len(dataset)} listed); add images or pass --set bn_recalibrate=off")
    return clone, {"ran": True, "images": images_seen, "batches": batches, "max_batches": max_batches}


def _recalibrated_on_rank0(backbone: nn.Module, dataset: Any, batch_size: int, workers: int,
                           device: str | torch.device, seed: int, progress: bool,
                           shard: Shard | None) -> tuple[nn.Module, dict[str, Any]]:
    """:func:`recalibrate_bn`, computed by rank 0 and broadcast when ``shard`` has several ranks."""
    if shard is None or shard[1] == 1:
        return recalibrate_bn(backbone, dataset, batch_size, workers, device, seed, progress=progress)
    if shard[0] == 0:
        clone, info = recalibrate_bn(backbone, dataset, batch_size, workers, device, seed, progress=progress)
    else:
        clone, info = copy.deepcopy(backbone).to(device).eval(), None
    parallel.broadcast_module_(clone)
    return clone, parallel.broadcast_object(info)


def assert_unchanged(module: nn.Module, before: Mapping[str, str], what: str = "backbone") -> None:
    """Raise RuntimeError naming the tensors of ``module`` that differ from ``before``.

    The MoCo-style sanity check of frozen-feature protocols: after training the heads, the
    backbone's weights and BN buffers must equal the snapshot taken before training.
    """
    after = tensor_digests(module)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    if changed:
        shown = ", ".join(changed[:5]) + (f", ... (+{len(changed) - 5})" if len(changed) > 5 else "")
        raise RuntimeError(f"the frozen {what} changed during the protocol ({len(changed)} tensors: "
                           f"{shown}); its features were not frozen, so the result is invalid")


# ----------------------------------------------------------------------------- preparing a checkpoint
def wants_bn_recalibration(setting: str, ckpt_format: str) -> bool:
    """``bn_recalibrate`` setting -> whether to re-estimate BN stats: 'auto' = random inits only."""
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"bn_recalibrate must be auto, on or off, got {setting!r}")
    return setting == "on" or (setting == "auto" and ckpt_format == "random")


@contextmanager
def prepared_backbone(ckpt: Any, bn_recalibrate: str, dataset: Any, batch_size: int = 256,
                      workers: int = 0, device: str | torch.device = "cpu", seed: int = 0,
                      progress: bool = False,
                      shard: Shard | None = None) -> Iterator[tuple[nn.Module, str, dict[str, Any]]]:
    """The backbone a frozen-feature protocol should use, on ``device``: ``(backbone, sha, info)``.

    With BN re-estimation (``bn_recalibrate`` 'on', or 'auto' for a random init, i.e.
    ``ckpt.format == 'random'``) it is a re-estimated COPY (see :func:`recalibrate_bn`) and
    ``sha`` the sha256 of the copy's weights, so cached features of the copy never mix with the
    original's. Otherwise it is ``ckpt.backbone`` itself, moved to ``device`` and moved back on
    exit, with ``ckpt.sha256``. ``info`` records what happened (``ran`` True/False).

    ``shard=(rank, world_size)`` of a joined process group: rank 0 alone re-estimates (the
    one-process computation, bit for bit) and every rank receives its copy, so all ranks hold
    the same weights and the same sha256.
    """
    setting = bn_recalibrate
    if wants_bn_recalibration(setting, ckpt.format) and has_batchnorm(ckpt.backbone):
        backbone, info = _recalibrated_on_rank0(ckpt.backbone, dataset, batch_size, workers, device, seed, progress,
                                                shard)
        info["setting"] = setting
        yield backbone, weights_sha256(backbone.backbone_state_dict()), info
        return
    if setting == "off":
        reason = "turned off"
    elif not has_batchnorm(ckpt.backbone):
        reason = "no BatchNorm layers"
    else:
        reason = "not a random init (auto)"
    with on_device(ckpt.backbone, device):
        yield ckpt.backbone, ckpt.sha256, {"ran": False, "setting": setting, "reason": reason}
