"""VOC detection data: image records with boxes, a Dataset with horizontal flips, batching.

Boxes are converted from the devkit's 1-based inclusive pixels to continuous 0-based
coordinates as detectron2 does (``xmin - 1, ymin - 1, xmax, ymax``: pixel ``i`` covers
``[i - 1, i]``), so a flip is ``x -> width - x`` exactly.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import functional as TF

from dcbench import parallel
from dcbench.data.datasets import DataError, MeteredLoader, load_rgb, readable_items
from dcbench.data.seeded import SeededOrder, seeded_loader
from dcbench.data.voc import VOCAnnotation, VOCSplit

log = logging.getLogger("dcbench")


@dataclass(frozen=True)
class DetectionRecord:
    """One image: path, size, and its training boxes (0-based continuous) with 1-based labels
    (0 is the background class of the detector)."""

    image_id: str
    path: str
    width: int
    height: int
    boxes: np.ndarray  # N x 4 float32
    labels: np.ndarray  # N int64, 1..n_classes


def records_from_annotations(split: VOCSplit, annotations: Sequence[VOCAnnotation], classes: Sequence[str],
                             keep_difficult: bool) -> list[DetectionRecord]:
    """One record per image of ``split``; objects of other classes are dropped, difficult
    ones unless ``keep_difficult`` (detectron2 keeps them, py-faster-rcnn drops them)."""
    index = {c: i + 1 for i, c in enumerate(classes)}
    out = []
    for image_id, ann in zip(split.image_ids, annotations):
        objs = [o for o in ann.objects if o.name in index and (keep_difficult or not o.difficult)]
        boxes = np.array([[o.bbox[0] - 1.0, o.bbox[1] - 1.0, o.bbox[2], o.bbox[3]] for o in objs],
                         dtype=np.float32).reshape(-1, 4)
        labels = np.array([index[o.name] for o in objs], dtype=np.int64)
        out.append(DetectionRecord(image_id, str(split.image_path(image_id)), ann.width, ann.height, boxes, labels))
    return out


def annotations_digest(split: VOCSplit) -> str:
    """sha256 (16 hex) over the split's annotation files, so relabelled boxes change the fingerprint."""
    h = hashlib.sha256()
    for image_id in split.image_ids:
        h.update(split.annotation_path(image_id).read_bytes())
    return h.hexdigest()[:16]


class DetectionDataset(Dataset):
    """``dataset[i] = (image, target, i)``: ``image`` a float tensor 3 x H x W in [0, 1] (the
    detector normalises and resizes), ``target`` ``{"boxes", "labels"}``; with ``flip`` the
    pair is mirrored with probability 0.5. An unreadable image gives None (counted by
    :func:`collate_detection`), or a DataError naming it when ``strict`` (``--strict``)."""

    def __init__(self, records: Sequence[DetectionRecord], flip: bool = False, strict: bool = False) -> None:
        self.records = list(records)
        self.flip = flip
        self.strict = strict

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], int] | None:
        rec = self.records[int(index)]
        try:
            img = load_rgb(rec.path)
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
            if self.strict:
                reason = " ".join(str(exc).split()) or type(exc).__name__
                raise DataError(f"cannot read image {rec.path} ({reason}); replace or delete the file, or run "
                                f"without --strict to skip unreadable images") from exc
            log.debug("unreadable image %s: %s", rec.path, exc)
            return None
        image = TF.to_tensor(img)
        boxes = torch.from_numpy(rec.boxes.copy())
        if self.flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
            width = image.shape[-1]
            boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
        return image, {"boxes": boxes, "labels": torch.from_numpy(rec.labels.copy())}, int(index)


def collate_detection(batch: list) -> tuple[list[torch.Tensor], list[dict], list[int], int]:
    """Lists of images, targets and indices of the readable items, and the count of unreadable ones
    (the pads of a seeded order, :class:`~dcbench.data.datasets.Padding`, are dropped uncounted)."""
    kept, n_unreadable = readable_items(batch)
    return [k[0] for k in kept], [k[1] for k in kept], [k[2] for k in kept], n_unreadable


def detection_loader(dataset: DetectionDataset, batch_size: int, workers: int, shuffle: bool,
                     seed: int = 0) -> DataLoader:
    """A DataLoader of :func:`collate_detection` batches (seeded shuffling)."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return MeteredLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=workers,
                         collate_fn=collate_detection, drop_last=False)


def endless_batches(dataset: DetectionDataset, batch_size: int, workers: int, seed: int,
                    shard: tuple[int, int] = (0, 1)) -> Iterator[tuple[list[torch.Tensor], list[dict], list[int], int]]:
    """Batches forever: one seeded shuffle per epoch (epoch ``e`` uses seed ``seed + e``), each
    image's flip a function of (seed, epoch, image) (:mod:`dcbench.data.seeded`: the same with any
    ``workers``); the last, smaller batch of an epoch is dropped when the epoch has more than one
    batch. ``shard = (rank, world)``: this rank's ``batch_size / world`` share of every one of
    those global batches (every world-th image of the same order, the same flips)."""
    rank, world = shard
    order = SeededOrder(dataset, seed, world, rank)
    loader = seeded_loader(dataset, order, parallel.per_rank_batch(batch_size, world), workers,
                           collate_fn=collate_detection)
    full = len(dataset) // batch_size
    epoch = 0
    while True:
        order.set_epoch(epoch)
        for b, batch in enumerate(loader):
            if full and b >= full:
                break  # a ragged last batch would change the effective batch size
            yield batch
        epoch += 1
