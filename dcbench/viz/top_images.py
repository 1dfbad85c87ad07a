"""The images of a dataset that excite a filter most (the paper's Fig. 4 right and Fig. 5).

One pass over any image folder or file list: each image is scored, for each chosen filter,
by the filter's mean activation over positions (the unit's value for an fc tap). Only the
k best (score, image) pairs per filter are kept, in a fixed-size buffer per filter that is
merged with every batch, so memory is k per filter whatever the number of images. Ties
keep the image that comes first in the dataset order, so the result is deterministic.

Output: ``LAYER-filterNNNN.png`` (the k images as the network saw them, best first, in a
near-square grid), ``index.html`` (every grid with file names and scores) and
``top_images.json`` (the same, for scripts).
"""
from __future__ import annotations

import html
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from dcbench.fileio import atomic_write_text
from dcbench.data import ImageDataset, SkipCounter, eval_transform, skip_collate, unlabelled_images
from dcbench.errors import UsageError
from dcbench.models import Backbone
from dcbench.progress import track
from dcbench.viz import denormalize, image_grid, save_png

log = logging.getLogger("dcbench")

__all__ = ["TopImages", "TopK", "find_top_images", "save_top_images"]


class TopK:
    """The k highest scores per filter and the image indices they came from.

    Holds two ``n_filters x k`` tensors and nothing else: each batch is merged in with one
    stable sort of ``k + batch`` candidates per filter (the vectorised form of one bounded
    min-heap per filter).
    """

    def __init__(self, n_filters: int, k: int) -> None:
        if k < 1:
            raise UsageError(f"--k must be at least 1, got {k}")
        self.k = k
        self.scores = torch.full((n_filters, k), float("-inf"))
        self.indices = torch.full((n_filters, k), -1, dtype=torch.long)

    def update(self, scores: torch.Tensor, indices: torch.Tensor) -> None:
        """Merge a batch: ``scores`` is batch x n_filters, ``indices`` the batch's image indices."""
        scores = scores.detach().float().cpu().t()
        indices = indices.detach().long().cpu().view(1, -1).expand_as(scores)
        all_scores = torch.cat([self.scores, scores], dim=1)
        all_indices = torch.cat([self.indices, indices], dim=1)
        # stable: on equal scores the earlier candidate (kept before, or earlier in the batch) wins
        order = torch.sort(all_scores, dim=1, descending=True, stable=True).indices[:, :self.k]
        self.scores = torch.gather(all_scores, 1, order)
        self.indices = torch.gather(all_indices, 1, order)

    def best(self, row: int) -> list[tuple[int, float]]:
        """(image index, score) pairs of filter row ``row``, best first (fewer when few images)."""
        return [(int(i), float(s)) for i, s in zip(self.indices[row], self.scores[row]) if i >= 0]


@dataclass
class TopImages:
    """Per filter, the best images as (dataset index, path, score), best first."""

    layer: str
    filters: list[int]
    k: int
    dataset: ImageDataset
    best: dict[int, list[tuple[int, str, float]]] = field(default_factory=dict)
    n_images: int = 0
    n_skipped: int = 0


def _filter_scores(out: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """batch x n_filters mean activations of the chosen channels."""
    chosen = out.index_select(1, filters)
    return chosen.flatten(2).mean(dim=2) if chosen.dim() > 2 else chosen


def _progress(loader: DataLoader, desc: str):
    # a bar on a terminal, a log line every 30 s or 5% otherwise (dcbench.progress)
    return track(loader, desc, "batch")


def find_top_images(backbone: Backbone, data: str | os.PathLike | ImageDataset, layer: str, filters: list[int],
                    k: int = 9, image_size: int | None = None, batch_size: int = 64, workers: int = 0,
                    device: str | torch.device = "cpu", strict: bool = False) -> TopImages:
    """Score every readable image of ``data`` (a folder, a file list, or the dataset already
    opened from one, as the CLI does before loading the checkpoint) and keep the ``k`` best per
    filter (one pass). ``strict``: stop at the first unreadable image.

    The backbone must already be on ``device``; it runs in eval mode.
    """
    dataset = data if isinstance(data, ImageDataset) else unlabelled_images(data)
    dataset.transform = eval_transform(image_size or backbone.input_size)
    dataset.strict = strict
    tracker = TopK(len(filters), k)
    counter = SkipCounter(dataset)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=skip_collate)
    chosen = torch.as_tensor(filters, device=device)
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.inference_mode():
            for images, _, indices, n_skipped in _progress(loader, f"top images {layer}"):
                counter.update(indices, n_skipped)
                if len(indices):
                    out = backbone(images.to(device), taps=[layer])[layer]
                    tracker.update(_filter_scores(out, chosen), indices)
    finally:
        backbone.train(was_training)
    n_skipped = counter.count
    counter.report()
    best = {f: [(i, dataset.paths[i], s) for i, s in tracker.best(row)] for row, f in enumerate(filters)}
    return TopImages(layer, list(filters), k, dataset, best, len(dataset) - n_skipped, n_skipped)


def _grid_for(result: TopImages, f: int) -> np.ndarray:
    tiles = [denormalize(result.dataset[i][0]) for i, _, _ in result.best[f]]
    return image_grid(tiles, pad=2)


def save_top_images(result: TopImages, out_dir: str | os.PathLike) -> list[Path]:
    """Write one grid per filter, ``index.html`` and ``top_images.json``; returns the paths."""
    out_dir = Path(out_dir)
    if result.n_images == 0:
        raise UsageError(f"no readable image under {result.dataset.root}; nothing to show")
    paths = [save_png(_grid_for(result, f), out_dir / _grid_name(result.layer, f)) for f in result.filters]
    record = {"layer": result.layer, "k": result.k, "images": result.n_images, "skipped": result.n_skipped,
              "data": result.dataset.root,
              "filters": {str(f): [{"path": p, "score": s} for _, p, s in result.best[f]] for f in result.filters}}
    atomic_write_text(out_dir / "top_images.json", json.dumps(record, indent=1) + "\n")
    atomic_write_text(out_dir / "index.html", _index_page(result))
    return paths + [out_dir / "index.html", out_dir / "top_images.json"]


def _grid_name(layer: str, f: int) -> str:
    return f"{layer}-filter{f:04d}.png"


def _index_page(result: TopImages) -> str:
    esc = html.escape
    sections = []
    for f in result.filters:
        rows = "".join(f"<li>{esc(os.path.relpath(p, result.dataset.root))} <span>{s:.4g}</span></li>"
                       for _, p, s in result.best[f])
        sections.append(f'<section><h2>{esc(result.layer)} filter {f}</h2>'
                        f'<img src="{esc(_grid_name(result.layer, f))}" alt="top images of filter {f}">'
                        f"<ol>{rows}</ol></section>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>top images: {esc(result.layer)}</title><style>{_STYLE}</style></head><body>"
            f"<h1>Top {result.k} images per filter of {esc(result.layer)}</h1>"
            f"<p>{result.n_images} images from {esc(result.dataset.root)}"
            f"{f', {result.n_skipped} unreadable skipped' if result.n_skipped else ''}; "
            "score = the filter's mean activation; best first (left to right, top to bottom).</p>"
            + "\n".join(sections) + "</body></html>\n")


_STYLE = ("body{font-family:system-ui,sans-serif;margin:2em}section{display:inline-block;"
          "vertical-align:top;margin:0 2em 2em 0}img{image-rendering:pixelated;width:240px}"
          "ol{font-size:0.8em;padding-left:1.5em}span{color:#666}")
