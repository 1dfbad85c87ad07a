"""Pascal VOC detection AP, as the VOC devkit (and detectron2's PascalVOCDetectionEvaluator) computes it.

Coordinates: ground truth stays in the devkit's 1-based inclusive pixel coordinates (as
written in ``Annotations/*.xml``); predictions in continuous 0-based coordinates (what the
detector outputs: pixel ``i`` of the devkit covers ``[i - 1, i]``) are mapped back with
``xmin + 1, ymin + 1`` (detectron2's inverse of its loader). Overlaps use the devkit's ``+1``
widths. Per class and IoU threshold ``t``:

- detections of the class over the whole test set are ranked by decreasing score (stable
  sort: ties keep the input order, so the result is deterministic; the references'
  ``np.argsort(-confidence)`` is not stable, the one known difference);
- a detection whose best-overlapping ground-truth box of the same image has IoU ``> t``
  (strictly, as the devkit) is a true positive if that box is not difficult and not yet
  matched, a false positive if it was already matched, and ignored (neither) if the box is
  difficult; any other detection is a false positive;
- recall = TP / number of non-difficult boxes, precision = TP / (TP + FP), AP by
  :func:`dcbench.metrics.ap.voc_ap` (VOC07 11-point on ``np.arange(0.0, 1.1, 0.1)`` by default,
  as py-faster-rcnn and detectron2 do for the VOC2007 test set, for every threshold).

AP50 / AP75 are the means over classes at t = 0.5 / 0.75; AP is the mean over classes of the
mean over t in {0.50, 0.55, ..., 0.95}. A class without non-difficult ground truth has an
undefined (NaN) AP and is left out of the means.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from dcbench.data.voc import VOCAnnotation
from dcbench.metrics.ap import mean_ap, voc_ap
from dcbench.results import MetricRow

#: IoU thresholds of the AP over 0.50:0.95 (detectron2: range(50, 100, 5) / 100)
COCO_THRESHOLDS: tuple[float, ...] = tuple(t / 100.0 for t in range(50, 100, 5))


@dataclass
class Detections:
    """The detections of one image: ``boxes`` N x 4 (x0, y0, x1, y1; 0-based continuous
    pixel coordinates of the original image), ``scores`` N, ``labels`` N (0-based index into
    the evaluated classes)."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    @staticmethod
    def empty() -> "Detections":
        """No detection."""
        return Detections(np.zeros((0, 4), np.float64), np.zeros(0, np.float64), np.zeros(0, np.int64))


@dataclass
class DetectionAP:
    """AP of a detection run (fractions in [0, 1]; NaN where undefined)."""

    classes: list[str]
    per_threshold: dict[float, list[float]]  # IoU threshold -> AP per class
    rule: str
    n_ground_truth: dict[str, int] = field(default_factory=dict)  # non-difficult boxes per class

    def class_ap(self, cls: str, threshold: float | None = None) -> float:
        """AP of ``cls`` at ``threshold`` (None: the mean over 0.50:0.95)."""
        col = self.classes.index(cls)
        if threshold is not None:
            return self.per_threshold[threshold][col]
        values = [self.per_threshold[t][col] for t in COCO_THRESHOLDS]
        return float("nan") if any(math.isnan(v) for v in values) else float(np.mean(values))

    @property
    def ap50(self) -> float:
        """Mean over classes of AP at IoU 0.5."""
        return mean_ap(self.per_threshold[0.5])

    @property
    def ap75(self) -> float:
        """Mean over classes of AP at IoU 0.75."""
        return mean_ap(self.per_threshold[0.75])

    @property
    def ap(self) -> float:
        """Mean over classes of AP averaged over IoU 0.50:0.95."""
        return mean_ap([self.class_ap(c) for c in self.classes])

    def per_class(self) -> dict[str, dict[str, float | None]]:
        """``{cls: {"AP50", "AP75", "AP"}}`` x100 (None where undefined), for the result record."""
        def pct(v: float) -> float | None:
            return None if math.isnan(v) else round(100.0 * v, 4)
        return {c: {"AP50": pct(self.class_ap(c, 0.5)), "AP75": pct(self.class_ap(c, 0.75)),
                    "AP": pct(self.class_ap(c))} for c in self.classes}


def box_iou_devkit(box: np.ndarray, gts: np.ndarray) -> np.ndarray:
    """IoU of one box against M boxes, all in 1-based inclusive coordinates (``+1`` widths)."""
    ix0 = np.maximum(gts[:, 0], box[0])
    iy0 = np.maximum(gts[:, 1], box[1])
    ix1 = np.minimum(gts[:, 2], box[2])
    iy1 = np.minimum(gts[:, 3], box[3])
    inter = np.maximum(ix1 - ix0 + 1.0, 0.0) * np.maximum(iy1 - iy0 + 1.0, 0.0)
    area = (box[2] - box[0] + 1.0) * (box[3] - box[1] + 1.0)
    gt_area = (gts[:, 2] - gts[:, 0] + 1.0) * (gts[:, 3] - gts[:, 1] + 1.0)
    return inter / (area + gt_area - inter)


@dataclass
class _ClassTruth:
    boxes: np.ndarray  # M x 4, devkit coordinates
    difficult: np.ndarray  # M bool


def _truth_of(annotations: Sequence[VOCAnnotation], cls: str) -> tuple[dict[int, _ClassTruth], int]:
    truth, npos = {}, 0
    for i, ann in enumerate(annotations):
        objs = [o for o in ann.objects if o.name == cls]
        boxes = np.array([o.bbox for o in objs], dtype=np.float64).reshape(-1, 4)
        difficult = np.array([o.difficult for o in objs], dtype=bool)
        truth[i] = _ClassTruth(boxes, difficult)
        npos += int((~difficult).sum())
    return truth, npos


def class_ap(image_index: np.ndarray, scores: np.ndarray, boxes: np.ndarray, truth: Mapping[int, _ClassTruth],
             npos: int, threshold: float, use_07_metric: bool) -> float:
    """VOC AP of one class at one IoU ``threshold`` (see the module docstring).

    ``image_index``, ``scores``, ``boxes`` (devkit coordinates) describe the class's
    detections over the test set; ``truth`` maps image index to that class's boxes.
    """
    if npos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    matched = {i: np.zeros(len(t.boxes), dtype=bool) for i, t in truth.items()}
    tp = np.zeros(len(order))
    fp = np.zeros(len(order))
    for rank, d in enumerate(order):
        gt = truth.get(int(image_index[d]))
        if gt is None or len(gt.boxes) == 0:
            fp[rank] = 1.0
            continue
        overlaps = box_iou_devkit(boxes[d], gt.boxes)
        j = int(np.argmax(overlaps))
        if overlaps[j] > threshold:
            if gt.difficult[j]:
                continue  # matching a difficult box is neither right nor wrong
            seen = matched[int(image_index[d])]
            if seen[j]:
                fp[rank] = 1.0
            else:
                tp[rank], seen[j] = 1.0, True
        else:
            fp[rank] = 1.0
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    recall = tp / float(npos)
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return voc_ap(recall, precision, use_07_metric)


def to_devkit_boxes(boxes: np.ndarray) -> np.ndarray:
    """0-based continuous boxes -> the devkit's 1-based coordinates (``xmin + 1, ymin + 1``)."""
    out = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    out[:, :2] += 1.0
    return out


def evaluate_detections(detections: Sequence[Detections | None], annotations: Sequence[VOCAnnotation],
                        classes: Sequence[str], use_07_metric: bool = True,
                        thresholds: Sequence[float] = COCO_THRESHOLDS) -> DetectionAP:
    """VOC AP per class and IoU threshold.

    Args:
        detections: one entry per test image, aligned with ``annotations`` (None: the image
            could not be read, so it has no detection but its objects still count).
        annotations: the parsed XML of every test image.
        classes: the evaluated class names; ``Detections.labels`` index into them.
        use_07_metric: VOC07 11-point rule (True) or all-points.
        thresholds: IoU thresholds (0.5 and 0.75 are always evaluated).
    """
    if len(detections) != len(annotations):
        raise ValueError(f"{len(detections)} detection entries for {len(annotations)} images")
    thresholds = sorted(set(thresholds) | {0.5, 0.75})
    per_threshold: dict[float, list[float]] = {t: [] for t in thresholds}
    counts = {}
    for c, cls in enumerate(classes):
        truth, npos = _truth_of(annotations, cls)
        counts[cls] = npos
        index, scores, boxes = _class_detections(detections, c)
        for t in thresholds:
            per_threshold[t].append(class_ap(index, scores, boxes, truth, npos, t, use_07_metric))
    rule = "VOC07 11-point" if use_07_metric else "all-points"
    return DetectionAP(list(classes), per_threshold, rule, counts)


def _class_detections(detections: Sequence[Detections | None], c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    index, scores, boxes = [], [], []
    for i, det in enumerate(detections):
        if det is None:
            continue
        keep = np.asarray(det.labels) == c
        n = int(keep.sum())
        if n:
            index.append(np.full(n, i, dtype=np.int64))
            scores.append(np.asarray(det.scores, dtype=np.float64)[keep])
            boxes.append(to_devkit_boxes(np.asarray(det.boxes)[keep]))
    if not index:
        return np.zeros(0, np.int64), np.zeros(0), np.zeros((0, 4))
    return np.concatenate(index), np.concatenate(scores), np.concatenate(boxes)


def ap_rows(ap: DetectionAP, tap: str, seed: int, split: str = "test") -> list[MetricRow]:
    """``AP50``, ``AP75``, ``AP`` (x100) and one ``AP50_<cls>`` row per class with test objects,
    labelled with the evaluated ``split`` (``test``; ``val`` for a tuning run on 2007:val)."""
    rows = [MetricRow(name, 100.0 * value, tap, split, None, seed)
            for name, value in (("AP50", ap.ap50), ("AP75", ap.ap75), ("AP", ap.ap)) if not math.isnan(value)]
    rows += [MetricRow(f"AP50_{cls}", 100.0 * ap.class_ap(cls, 0.5), tap, split, None, seed)
             for cls in ap.classes if not math.isnan(ap.class_ap(cls, 0.5))]
    return rows
