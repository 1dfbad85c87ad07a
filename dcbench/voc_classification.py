"""Pascal VOC2007 classification data and result rows, shared by ``voc07-cls`` (fine-tuning)
and the SVM protocols (``voc07-svm``, ``voc07-lowshot``).

Labels come from ``ImageSets/Main/<cls>_<split>.txt``: 1 positive, -1 negative, 0 difficult.
Runs train on trainval and test on test (``train_split=train``: train -> val, for tuning).
"""
from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dcbench.data.voc import VOC_CLASSES, VOCSplit, available_classes, layout, load_voc_split
from dcbench.errors import UsageError
from dcbench.metrics.ap import mean_ap
from dcbench.results import MetricRow

log = logging.getLogger("dcbench")

#: the evaluated split for each training split
TEST_SPLIT = {"trainval": "test", "train": "val"}

#: the data layout of the VOC07 classification protocols (``dcbench protocols NAME``)
VOC07_LAYOUT = f"""\
{layout("2007")}
ROOT may also be ROOT/VOCdevkit or the VOC2007 folder itself. Labels: <cls>_<split>.txt lines
"<id> <label>" with 1 positive, -1 negative, 0 difficult. Default: train on trainval, test on
test (the VOC2007 test set is a separate download extracted into the same VOCdevkit).
A devkit holding the class files of only some VOC classes is evaluated on those (recorded).
"""


def check_classes(classes: list[str] | None) -> None:
    """UsageError unless ``classes`` is None or a non-empty list of distinct names."""
    if classes is not None and (not classes or len(set(classes)) != len(classes)):
        raise UsageError(f"bad value {classes} for classes: give distinct class names, e.g. [cat,dog]")


@dataclass
class VocData:
    """The two splits of a run, with their labels read."""

    train: VOCSplit
    test: VOCSplit

    @property
    def classes(self) -> list[str]:
        """The evaluated classes, in label-column order."""
        return list(self.train.classes)

    def fingerprint(self) -> str:
        """16 hex chars over both splits (images and image-set files)."""
        text = f"{self.train.split}:{self.train.fingerprint()}\n{self.test.split}:{self.test.fingerprint()}\n"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        """JSON-safe facts recorded in the result."""
        return {"voc_dir": str(self.train.voc_dir), "classes": self.classes,
                "all_voc_classes": self.classes == list(VOC_CLASSES),
                "images": {self.train.split: len(self.train), self.test.split: len(self.test)}}


def load_voc_data(root: Path, train_split: str, classes: list[str] | None, warn: bool = True) -> VocData:
    """Both splits (``train_split`` and its test split) with labels (DataError naming a
    missing piece); ``warn``: log when the devkit holds only some of the VOC classes."""
    test_split = TEST_SPLIT[train_split]
    found = classes or available_classes(root, [train_split, test_split], "2007")
    if warn and classes is None and len(found) < len(VOC_CLASSES):
        log.warning("VOCdevkit has the class files of %d of the 20 VOC classes; evaluating on %s "
                    "(mAP is comparable to published numbers only with all 20)", len(found), ", ".join(found))
    train = load_voc_split(root, train_split, "2007", found)
    test = load_voc_split(root, test_split, "2007", found)
    return VocData(train, test)


def labels_of(split: VOCSplit, indices: np.ndarray) -> np.ndarray:
    """The label rows (1 / -1 / 0) of the images ``indices`` of ``split``."""
    return np.asarray(split.labels)[indices]


def ap_rows(aps: Sequence[float], classes: Sequence[str], tap: str, split: str,
            seed: int) -> tuple[list[MetricRow], dict[str, float | None]]:
    """``mAP`` (mean over the classes) and ``AP_<cls>`` rows, x100, plus the per-class dict
    recorded in the result; a class without test positives (AP undefined) gets no row."""
    rows = [MetricRow("mAP", 100.0 * mean_ap(aps), tap, split, None, seed)] if not all(map(math.isnan, aps)) else []
    rows += [MetricRow(f"AP_{cls}", 100.0 * ap, tap, split, None, seed)
             for cls, ap in zip(classes, aps) if not math.isnan(ap)]
    return rows, {cls: None if math.isnan(ap) else round(100.0 * ap, 4) for cls, ap in zip(classes, aps)}
