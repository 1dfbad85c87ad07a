"""``example-centroid``: nearest-class-centroid top-1 per tap on frozen features.

Each class is the mean of its L2-normalised train features; a val image takes the class of
the most cosine-similar centroid. The runner checks the data once, seeds, times, and asserts
the backbone stayed frozen; the context gives the (cached) features.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from dcbench.data import image_folder
from dcbench.data.layouts import check_train_val, train_val_fingerprint
from dcbench.data.transforms import center_transform, center_transform_id
from dcbench.pooling import resolve_taps
from dcbench.protocol import FrozenFeatureSettings, Protocol, ProtocolOutput, RunContext, register_protocol
from dcbench.results import MetricRow


class GlobalMean(nn.Module):
    """Spatial mean of a conv map; 2-D taps pass through. ``pool_id`` keys the feature cache."""

    pool_id = "example-global-mean"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1)) if x.dim() == 4 else x


def unit_rows(rows: np.ndarray) -> torch.Tensor:
    return F.normalize(torch.from_numpy(np.asarray(rows, dtype=np.float32)), dim=1)


@dataclass
class CentroidSettings(FrozenFeatureSettings):
    """The common frozen-feature settings (taps, image_size, cache, ...) are all it needs."""


@register_protocol
class ExampleCentroid(Protocol):
    name: ClassVar[str] = "example-centroid"
    description: ClassVar[str] = "nearest-class-centroid top-1 per tap (example plugin)"
    version: ClassVar[str] = "1"
    Settings: ClassVar[type] = CentroidSettings
    data_layout: ClassVar[str] = "ROOT/train/CLASS/*.jpg and ROOT/val/CLASS/*.jpg, same class folders\n"

    def check_data(self, root: Path, settings: Any) -> None:
        check_train_val(root, self.name, self.data_layout.splitlines()[0])

    def run(self, ckpt: Any, settings: CentroidSettings, root: Path, ctx: RunContext) -> ProtocolOutput:
        view = center_transform(settings.image_size)
        train, val = image_folder(root / "train", transform=view), image_folder(root / "val", transform=view)
        taps = resolve_taps(ckpt.backbone, settings.taps)
        pools = {tap: GlobalMean() for tap in taps}
        with ctx.frozen_backbone(ckpt, train) as (backbone, sha):
            feats = [ctx.extract(backbone, sha, ds, taps, pools, center_transform_id(settings.image_size))
                     for ds in (train, val)]
        labels = [torch.from_numpy(f.labels) for f in feats]
        rows = []
        for tap in taps:
            bank, queries = unit_rows(feats[0].features[tap]), unit_rows(feats[1].features[tap])
            sums = torch.zeros(len(train.classes), bank.shape[1]).index_add_(0, labels[0], bank)
            predicted = (queries @ F.normalize(sums, dim=1).T).argmax(dim=1)
            top1 = 100.0 * float((predicted == labels[1]).float().mean())
            rows.append(MetricRow("top1", top1, tap, "val", None, settings.seed))
        return ProtocolOutput(rows, train_val_fingerprint(train.fingerprint(), val.fingerprint()),
                              {"classes": len(train.classes), "pooling": "global mean, L2-normalised"})
