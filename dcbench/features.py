"""Frozen feature extraction with an on-disk feature cache, shared by every protocol.

One extraction serves SVMs, kNN, retrieval and cached-feature probes: features are keyed by
``(checkpoint sha256, tap, transform id, dataset fingerprint, pooling id)`` and stored as

    <cache_dir>/<sha256[:16]>/<key-hash>.npy        float32, N_kept x D (pooled, flattened)
    <cache_dir>/<sha256[:16]>/<key-hash>.idx.npy    int64, the dataset indices of the rows
    <cache_dir>/<sha256[:16]>/<key-hash>.json       the key, shape and dtype (written last)

Each file is written to a temp file and renamed into place, and the JSON sidecar is written
last, so a reader never sees a half-written entry: no sidecar, no entry.

:func:`extract_features` runs ONE frozen forward per batch for all the taps that are not
cached yet (eval mode, ``torch.inference_mode``). Unreadable images are skipped (their rows
and labels are dropped; the kept dataset indices are returned).

This module is protocol-agnostic: the pooling modules, the transform and its id come from
the caller (e.g. the linear-probe tables live in :mod:`dcbench.pooling`).
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from dcbench.data import DataError, SkipCounter, skip_collate
from dcbench.fileio import atomic_write

log = logging.getLogger("dcbench")

#: bump when extraction changes in a way that changes the stored numbers
CACHE_VERSION = 1
#: BatchNorm re-estimation stops after this many batches ("a few hundred")
BN_RECALIBRATE_MAX_BATCHES = 200

Pool = Callable[[torch.Tensor], torch.Tensor]


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


def feature_key(ckpt_sha: str, tap: str, transform_id: str, dataset_fingerprint: str,
                pooling: str) -> dict[str, Any]:
    """The cache key of one tap's features, as a JSON-safe dict."""
    return {"cache_version": CACHE_VERSION, "checkpoint_sha256": ckpt_sha, "tap": tap,
            "transform": transform_id, "dataset_fingerprint": dataset_fingerprint,
            "pooling": pooling, "dtype": "float32"}


def key_hash(key: Mapping[str, Any]) -> str:
    """32 hex characters identifying ``key`` (the cache file name)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


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
        """``(features, indices)`` of ``key``, or None when absent or unreadable."""
        feats_path, idx_path, meta_path = self.paths(key)
        if not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("key") != dict(key):
                return None  # a hash collision or a hand-edited file: treat as absent
            feats = np.load(feats_path, mmap_mode="r" if mmap else None)
            indices = np.load(idx_path)
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable feature cache entry %s: %s", meta_path, exc)
            return None
        if feats.shape[0] != indices.shape[0] or list(feats.shape) != meta.get("shape"):
            log.warning("ignoring inconsistent feature cache entry %s", meta_path)
            return None
        return feats, indices

    def save(self, key: Mapping[str, Any], feats: np.ndarray, indices: np.ndarray) -> None:
        """Store one entry atomically (features, indices, then the sidecar)."""
        feats_path, idx_path, meta_path = self.paths(key)
        feats_path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(feats_path, lambda f: np.save(f, feats, allow_pickle=False))
        _atomic_write(idx_path, lambda f: np.save(f, indices.astype(np.int64), allow_pickle=False))
        meta = {"key": dict(key), "shape": list(feats.shape), "rows": int(feats.shape[0])}
        _atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=1, sort_keys=True).encode()))


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
    """ONE frozen forward pass of ``images`` for all ``taps``; each tap pooled and flattened.

    Runs under ``torch.inference_mode``: the results cannot enter autograd (``clone()`` them
    outside inference mode to train on them). The caller sets eval mode (see :func:`frozen`).
    """
    with torch.inference_mode():
        out = backbone(images, taps=list(taps))
        pooled = {}
        for tap in taps:
            pool = pools.get(tap)
            pooled[tap] = (pool(out[tap]) if pool is not None else out[tap]).flatten(1).float()
        return pooled


def show_progress(progress: bool) -> bool:
    """Progress bars only when asked for and stderr is a terminal (quiet in logs and CI)."""
    return bool(progress) and sys.stderr.isatty()


def make_loader(dataset: Any, batch_size: int, workers: int, device: str | torch.device = "cpu",
                shuffle: bool = False, seed: int = 0, drop_last: bool = False,
                persistent: bool = False) -> DataLoader:
    """A DataLoader with :func:`skip_collate` (unreadable images dropped) and seeded shuffling."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      num_workers=workers, collate_fn=skip_collate, drop_last=drop_last,
                      pin_memory=torch.device(device).type == "cuda",
                      persistent_workers=persistent and workers > 0)


# ----------------------------------------------------------------------------- extraction
def extract_features(backbone: nn.Module, dataset: Any, taps: Sequence[str],
                     pools: Mapping[str, Pool | None] | None = None, transform_id: str = "",
                     ckpt_sha: str = "", cache_dir: str | os.PathLike | None = None,
                     batch_size: int = 256, workers: int = 0, device: str | torch.device = "cpu",
                     progress: bool = False, mmap: bool = False) -> ExtractedFeatures:
    """Pooled features of ``taps`` for every readable image of ``dataset``, through the cache.

    Args:
        backbone: a :class:`dcbench.models.Backbone` (``backbone(x, taps=[...])``); it is put in
            eval mode for the pass and gets its previous mode back afterwards. It must already be
            on ``device``.
        dataset: an :class:`dcbench.data.ImageDataset` (items ``(image, target, index)`` or None)
            whose transform is described by ``transform_id``.
        taps: the taps to return.
        pools: tap -> pooling module/callable applied to the tap's output before flattening
            (missing or None: just flatten).
        transform_id: text identifying the dataset's transform (part of the cache key).
        ckpt_sha: sha256 of the backbone weights as used (part of the key and the folder name).
        cache_dir: the cache folder, or None to disable caching.
        batch_size, workers, device: the DataLoader and the forward pass.
        progress: show a tqdm bar (only when stderr is a terminal).
        mmap: return cached arrays memory-mapped (read-only) instead of loaded.

    Returns:
        ``ExtractedFeatures(features, labels, indices)``: ``features[tap]`` is float32
        ``N_kept x D``; rows of unreadable images are dropped from features and labels alike, and
        ``indices`` names the dataset index of every row. A second call with the same keys
        reads the cache and does no forward pass.
    """
    taps = list(dict.fromkeys(taps))
    pools = dict(pools or {})
    cache = FeatureCache(cache_dir) if cache_dir is not None else None
    if cache is not None and not ckpt_sha:
        raise ValueError("extract_features: caching needs ckpt_sha (the sha256 of the weights)")
    keys = {}
    if cache is not None:
        fingerprint = dataset.fingerprint()
        keys = {t: feature_key(ckpt_sha, t, transform_id, fingerprint, pool_id(pools.get(t))) for t in taps}

    found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for tap in taps:
        hit = cache.load(keys[tap], mmap=mmap) if cache is not None else None
        if hit is not None:
            found[tap] = hit
    missing = [t for t in taps if t not in found]
    if found:
        log.info("feature cache: %d of %d taps read from %s", len(found), len(taps), cache.root)
    if missing:
        feats, indices = _extract(backbone, dataset, missing, pools, batch_size, workers, device, progress)
        for tap in missing:
            found[tap] = (feats[tap], indices)
            if cache is not None:
                cache.save(keys[tap], feats[tap], indices)
    return _align(found, taps, dataset)


def _extract(backbone: nn.Module, dataset: Any, taps: list[str], pools: Mapping[str, Pool | None],
             batch_size: int, workers: int, device: str | torch.device,
             progress: bool) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One pass over ``dataset`` in order: one forward per batch for all ``taps``."""
    loader = make_loader(dataset, batch_size, workers, device)
    counter = SkipCounter(dataset)
    n_total = len(dataset)
    arrays: dict[str, np.ndarray] = {}
    kept = np.empty(n_total, dtype=np.int64)
    n = 0
    bar = tqdm(loader, desc=f"features {','.join(taps)}", unit="batch", disable=not show_progress(progress),
               leave=False)
    with frozen(backbone):
        for images, _targets, idx, n_skipped in bar:
            counter.update(idx, n_skipped)
            if len(idx) == 0:
                continue
            pooled = forward_pooled(backbone, images.to(device, non_blocking=True), taps, pools)
            b = len(idx)
            for tap, value in pooled.items():
                if tap not in arrays:  # rows preallocated once the width is known; no concat copy
                    arrays[tap] = np.empty((n_total, value.shape[1]), dtype=np.float32)
                arrays[tap][n:n + b] = value.cpu().numpy()
            kept[n:n + b] = idx.numpy()
            n += b
    counter.report()
    if n == 0:
        raise DataError(f"no readable image in {getattr(dataset, 'root', 'the dataset')}; "
                        f"check the files (every image failed to decode)")
    return {t: arrays[t][:n] for t in taps}, kept[:n]


def _align(found: Mapping[str, tuple[np.ndarray, np.ndarray]], taps: list[str],
           dataset: Any) -> ExtractedFeatures:
    """Bring every tap to the same rows (cached taps may predate a newly unreadable file)."""
    index_sets = [found[t][1] for t in taps]
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
    if batches == 0:
        raise RuntimeError("BatchNorm re-estimation saw no batch of 2+ readable images")
    return clone, {"ran": True, "images": images_seen, "batches": batches, "max_batches": max_batches}


def tensor_digests(module: nn.Module) -> dict[str, str]:
    """A digest of every parameter and buffer (weights AND BN running stats) of ``module``.

    Small to keep (a few bytes per tensor, unlike a copy of the weights), and it can name
    the tensors that changed; see :func:`assert_unchanged`.
    """
    out = {}
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h = hashlib.blake2b(f"{t.dtype}|{tuple(t.shape)}|".encode(), digest_size=16)
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # buffer protocol: no copy
        out[name] = h.hexdigest()
    return out


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
                      progress: bool = False) -> Iterator[tuple[nn.Module, str, dict[str, Any]]]:
    """The backbone a frozen-feature protocol should use, on ``device``: ``(backbone, sha, info)``.

    With BN re-estimation (``bn_recalibrate`` 'on', or 'auto' for a random init, i.e.
    ``ckpt.format == 'random'``) it is a re-estimated COPY (see :func:`recalibrate_bn`) and
    ``sha`` the sha256 of the copy's weights, so cached features of the copy never mix with the
    original's. Otherwise it is ``ckpt.backbone`` itself, moved to ``device`` and moved back on
    exit, with ``ckpt.sha256``. ``info`` records what happened (``ran`` True/False).
    """
    from dcbench.checkpoint import weights_sha256  # local: keeps this module importable alone

    setting = bn_recalibrate
    if wants_bn_recalibration(setting, ckpt.format) and has_batchnorm(ckpt.backbone):
        backbone, info = recalibrate_bn(ckpt.backbone, dataset, batch_size, workers, device, seed,
                                        progress=progress)
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
