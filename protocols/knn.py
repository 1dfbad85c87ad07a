"""Weighted k-nearest-neighbour classification on frozen features (PROTOCOLS.md "kNN").

Memory bank: the pooled, L2-normalised features of ROOT/train; queries: those of ROOT/val.
Similarity is the cosine (dot product of unit vectors); each of the k nearest training images
votes for its class with weight ``exp(sim / T)`` (T = 0.07), the votes are summed per class and
the classes ranked by their sums (top-1 and top-5), for k in {10, 20, 100, 200}. Features go
through the feature cache, so re-running with other ``ks``/``temperature`` costs no forward
pass, and kNN shares extractions with the other frozen-feature protocols.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from dcbench.errors import UsageError
from dcbench.data import image_folder
from dcbench.features import extract_features, prepared_backbone
from dcbench.results import MetricRow
from dcbench.protocol import EvalContext, Protocol, ProtocolOutput, register_protocol
from dcbench.data.layouts import check_train_val, train_val_fingerprint
from dcbench.data.transforms import center_transform, center_transform_id
from dcbench.pooling import probe_pooling, resolve_taps

#: bound on query x bank similarities held at once (float32: 64 MiB)
SIM_BLOCK_ELEMENTS = 1 << 24


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class KnnSettings:
    """Settings of the ``knn`` protocol (defaults = PROTOCOLS.md)."""

    taps: list[str] | None = field(default=None, metadata=_help(
        "taps to evaluate, all from one forward pass (default: every conv tap)"))
    pool: Literal["global", "preset"] = field(default="global", metadata=_help(
        "global: global average pooling (C dims); preset: the deepcluster linear-probe pooling (~9k dims)"))
    ks: list[int] = field(default_factory=lambda: [10, 20, 100, 200], metadata=_help(
        "numbers of neighbours (each capped at the number of training images)"))
    temperature: float = field(default=0.07, metadata=_help("T in the vote weight exp(cosine / T)"))
    image_size: int = field(default=224, metadata=_help(
        "centre-crop side in px; images are resized to round(s*256/224) first"))
    batch_size: int = field(default=256, metadata=_help("extraction batch size"))
    cache: bool = field(default=True, metadata=_help("read/write the extracted features in the feature cache"))
    workers: int = field(default=4, metadata=_help("DataLoader worker processes"))
    seed: int = field(default=0, metadata=_help("seed of BN re-estimation (kNN itself is deterministic)"))
    bn_recalibrate: Literal["auto", "on", "off"] = field(default="auto", metadata=_help(
        "re-estimate BatchNorm running stats on train images on a copy before extracting; "
        "auto = on for random inits"))

    def validate(self) -> None:
        """Raise UsageError for impossible values."""
        if not self.ks or any(k < 1 for k in self.ks):
            raise UsageError(f"bad value {self.ks} for ks: give positive integers, e.g. [10,20,100,200]")
        if self.temperature <= 0:
            raise UsageError(f"bad value {self.temperature} for temperature: must be positive")
        for name in ("image_size", "batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"bad value {getattr(self, name)} for {name}: must be at least 1")
        if self.workers < 0:
            raise UsageError(f"bad value {self.workers} for workers: must be >= 0")
        if self.taps is not None and not self.taps:
            raise UsageError("taps is empty: name at least one tap, or leave it unset for every conv tap")


class GlobalAvgPool(nn.Module):
    """Mean over the spatial dims (N x C x H x W -> N x C x 1 x 1); 2-D taps pass through."""

    pool_id = "global-avg"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1), keepdim=True) if x.dim() == 4 else x


def knn_scores(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, ks: Sequence[int],
               temperature: float, n_classes: int,
               block_elements: int = SIM_BLOCK_ELEMENTS) -> dict[int, torch.Tensor]:
    """Weighted kNN vote: ``{k: n_queries x n_classes}`` summed ``exp(sim / T)`` per class.

    ``bank`` and ``queries`` must be L2-normalised rows (cosine = dot product). Similarities
    are computed for blocks of queries holding at most ``block_elements`` entries, never the
    whole ``n_queries x n_bank`` matrix. ``k`` larger than the bank is capped at its size.
    """
    ks = sorted({min(k, len(bank)) for k in ks})
    kmax = max(ks)
    rows = max(1, block_elements // max(len(bank), 1))
    out = {k: [] for k in ks}
    for start in range(0, len(queries), rows):
        sims = queries[start:start + rows] @ bank.T
        top_sims, top_idx = sims.topk(kmax, dim=1)  # sorted, most similar first
        weights = (top_sims / temperature).exp()
        labels = bank_labels[top_idx]
        for k in ks:
            votes = torch.zeros(len(sims), n_classes, dtype=weights.dtype, device=weights.device)
            out[k].append(votes.scatter_add_(1, labels[:, :k], weights[:, :k]))
    return {k: torch.cat(v) for k, v in out.items()}


def topk_hits(scores: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """[top-1 hits, top-5 hits] of ``scores`` (n x classes) against ``labels``."""
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices
    correct = top == labels[:, None]
    return np.array([int(correct[:, 0].sum()), int(correct.any(1).sum())])


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(top-1, top-5) in percent of ``scores`` (n x classes) against ``labels``."""
    top1, top5 = 100.0 * topk_hits(scores, labels) / max(len(labels), 1)
    return float(top1), float(top5)


def _unit_rows(array: np.ndarray, device: str | torch.device) -> torch.Tensor:
    return F.normalize(torch.from_numpy(np.array(array, dtype=np.float32)).to(device), dim=1)


@register_protocol
class Knn(Protocol):
    """Weighted kNN (cosine, T = 0.07, k in 10/20/100/200) per tap."""

    name: ClassVar[str] = "knn"
    description: ClassVar[str] = "weighted kNN (cosine, exp(sim/0.07) votes) per layer on frozen features"
    version: ClassVar[str] = "1"
    Settings: ClassVar[type] = KnnSettings
    data_layout: ClassVar[str] = """\
ROOT/train/CLASS/*.jpg (memory bank) and ROOT/val/CLASS/*.jpg (queries), same class folders
Class indices follow the sorted class folder names. Unreadable images are skipped (counted).
"""

    def check_data(self, root: Path, settings: Any) -> None:
        """Fast layout check (folder listings): DataError naming the problem and the layout."""
        check_train_val(Path(root), self.name, self.data_layout.strip().splitlines()[0])

    def run(self, ckpt: Any, settings: KnnSettings, root: Path, ctx: EvalContext) -> ProtocolOutput:
        """Extract (or read) the features of both splits, then vote per tap and k."""
        root = Path(root)
        started = time.perf_counter()
        self.check_data(root, settings)
        transform = center_transform(settings.image_size)
        train_ds = image_folder(root / "train", transform=transform)
        val_ds = image_folder(root / "val", transform=transform)
        taps = resolve_taps(ckpt.backbone, settings.taps)  # settings errors before expensive work
        pools, pooling = self._pools(ckpt.backbone, taps, settings)
        with torch.random.fork_rng(devices=[]), prepared_backbone(
                ckpt, settings.bn_recalibrate, train_ds, settings.batch_size, settings.workers, ctx.device,
                settings.seed, ctx.progress) as (backbone, sha, bn_info):
            cache_dir = ctx.cache_dir if settings.cache else None
            feats = {split: extract_features(backbone, ds, taps, pools, center_transform_id(settings.image_size),
                                             sha, cache_dir, settings.batch_size, settings.workers, ctx.device,
                                             ctx.progress, mmap=True)
                     for split, ds in (("train", train_ds), ("val", val_ds))}
        rows = self._vote(feats["train"], feats["val"], taps, settings, len(train_ds.classes), ctx.device)
        extra = {"pooling": pooling, "ks": [min(k, len(feats["train"].labels)) for k in settings.ks],
                 "temperature": settings.temperature, "similarity": "cosine on L2-normalised features",
                 "vote": "sum of exp(sim / T) per class over the k nearest", "crops": "center",
                 "bn_recalibrate": bn_info, "bank_size": len(feats["train"].labels),
                 "queries": len(feats["val"].labels), "classes": len(train_ds.classes),
                 "skipped_images": {"train": len(train_ds) - len(feats["train"].labels),
                                    "val": len(val_ds) - len(feats["val"].labels)},
                 "knn_wall_s": round(time.perf_counter() - started, 3)}
        return ProtocolOutput(rows, train_val_fingerprint(train_ds.fingerprint(), val_ds.fingerprint()), extra)

    @staticmethod
    def _pools(backbone: nn.Module, taps: list[str],
               settings: KnnSettings) -> tuple[dict[str, nn.Module], dict[str, Any]]:
        if settings.pool == "global":
            return {t: GlobalAvgPool() for t in taps}, {t: {"kind": "global-avg"} for t in taps}
        plans = probe_pooling(backbone, taps, settings.image_size, "deepcluster")
        return {t: p.module() for t, p in plans.items()}, {t: p.describe() for t, p in plans.items()}

    @staticmethod
    def _vote(train: Any, val: Any, taps: list[str], settings: KnnSettings, n_classes: int,
              device: str) -> list[MetricRow]:
        """Metric rows per tap and k; queries go in blocks so memory stays bounded on large sets."""
        rows = []
        bank_labels = torch.from_numpy(train.labels).to(device)
        query_labels = torch.from_numpy(val.labels).to(device)
        n_queries = len(val.labels)
        for tap in taps:
            bank = _unit_rows(train.features[tap], device)
            block = max(1, SIM_BLOCK_ELEMENTS // len(bank))  # queries per block: bounded memory
            hits = {k: np.zeros(2, dtype=np.int64) for k in settings.ks}
            for start in range(0, n_queries, block):
                queries = _unit_rows(val.features[tap][start:start + block], device)
                labels = query_labels[start:start + block]
                scores = knn_scores(bank, bank_labels, queries, settings.ks, settings.temperature, n_classes)
                for k in hits:
                    hits[k] += topk_hits(scores[min(k, len(bank))], labels)
            for k in dict.fromkeys(settings.ks):
                top1, top5 = 100.0 * hits[k] / max(n_queries, 1)
                rows.append(MetricRow(f"top1_k{k}", float(top1), tap, "val", None, settings.seed))
                rows.append(MetricRow(f"top5_k{k}", float(top5), tap, "val", None, settings.seed))
        return rows
