"""The VOC image sets of a detection run: training splits (e.g. VOC2007 + VOC2012 trainval),
the test split, the classes, and their parsed annotations.

Image sets are named ``YEAR:SPLIT`` (``2007:trainval``); classes default to those whose
``ImageSets/Main/<cls>_<split>.txt`` files exist for the test set.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcbench.data import DataError
from dcbench.data.voc import VOC_CLASSES, VOCAnnotation, VOCSplit, available_classes, load_voc_split
from dcbench.detection.data import DetectionRecord, annotations_digest, records_from_annotations
from dcbench.errors import UsageError

log = logging.getLogger("dcbench")


def parse_set(text: str) -> tuple[str, str]:
    """``"2007:trainval"`` -> ``("2007", "trainval")``."""
    year, split = text.split(":")
    return year, split


@dataclass
class DetData:
    """The image sets of a run: training splits, the test split, classes, parsed annotations."""

    train: list[VOCSplit]
    test: VOCSplit
    classes: list[str]
    train_annotations: list[list[VOCAnnotation]] = field(default_factory=list)
    test_annotations: list[VOCAnnotation] = field(default_factory=list)

    def read_annotations(self) -> None:
        """Parse every XML once."""
        self.train_annotations = [s.annotations() for s in self.train]
        self.test_annotations = self.test.annotations()

    def fingerprint(self) -> str:
        """16 hex chars over every split's images, image sets and annotation files."""
        parts = [f"{s.year}:{s.split}:{s.fingerprint()}:{annotations_digest(s)}" for s in [*self.train, self.test]]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        """JSON-safe facts for the result record."""
        return {"voc_dirs": sorted({str(s.voc_dir) for s in [*self.train, self.test]}), "classes": self.classes,
                "all_voc_classes": self.classes == list(VOC_CLASSES),
                "train_sets": [f"{s.year}:{s.split}" for s in self.train],
                "test_set": f"{self.test.year}:{self.test.split}",
                "images": {f"{s.year}:{s.split}": len(s) for s in [*self.train, self.test]}}

    def training_records(self, keep_difficult: bool) -> list[DetectionRecord]:
        """The records of every training split (after :meth:`read_annotations`) that hold a
        training box: detectron2 and py-faster-rcnn both drop images without one."""
        records = []
        for split, anns in zip(self.train, self.train_annotations):
            records += records_from_annotations(split, anns, self.classes, keep_difficult)
        return [r for r in records if len(r.boxes)]


def load_det_data(root: Path, train_sets: list[str], test_set: str, classes: list[str] | None,
                  warn: bool = True) -> DetData:
    """Read the image sets (cheap: text files, folder listings; annotations are not parsed)."""
    test_year, test_split = parse_set(test_set)
    if test_year == "2012" and test_split == "test":
        raise DataError("VOC2012 publishes no test annotations; evaluate on 2007:test (or a val split)")
    found = classes or available_classes(root, [test_split], test_year)
    if warn and classes is None and len(found) < len(VOC_CLASSES):
        log.warning("VOCdevkit has the class files of %d of the 20 VOC classes; detecting %s "
                    "(AP is comparable to published numbers only with all 20)", len(found), ", ".join(found))
    unknown = [c for c in found if c not in VOC_CLASSES]
    if unknown:
        raise UsageError(f"unknown class {unknown[0]!r} in classes; VOC classes: {', '.join(VOC_CLASSES)}")
    splits = []
    for text in [*train_sets, test_set]:
        year, split = parse_set(text)
        s = load_voc_split(root, split, year, classes=None)
        s.check_annotations()
        splits.append(s)
    check_disjoint(splits[:-1], splits[-1])
    return DetData(splits[:-1], splits[-1], list(found))


def check_disjoint(train: list[VOCSplit], test: VOCSplit) -> None:
    """UsageError when a training split holds test images (``2007:trainval`` with ``test_set=2007:val``):
    the detector would be scored on images it was trained on."""
    test_ids = set(test.image_ids)
    for split in train:
        if split.year != test.year:
            continue  # VOC2012 trainval holds no VOC2007 image (other ids, other folders)
        shared = [i for i in split.image_ids if i in test_ids]
        if shared:
            other = {"val": "train", "train": "val"}.get(test.split)
            kept = [f"{s.year}:{other}" if s is split else f"{s.year}:{s.split}" for s in train]
            fix = (f"--set train_sets=[{','.join(dict.fromkeys(kept))}]" if other and split.split == "trainval"
                   else f"train_sets without {split.year}:{split.split}")
            raise UsageError(f"train_sets {split.year}:{split.split} and test_set {test.year}:{test.split} share "
                             f"{len(shared)} images (first: {shared[0]}), so the detector would be scored on "
                             f"images it trained on; use {fix}")
