"""Parity of dcbench's metric functions with the reference implementations behind published
numbers, each written out below from its source, on >= 1,000 random cases per metric.

- VOC AP: py-faster-rcnn ``lib/datasets/voc_eval.py`` ``voc_ap`` (= detectron2's
  ``evaluation/pascal_voc_evaluation.py`` ``voc_ap``), both rules; the 11-point rule on the
  ``np.arange(0.0, 1.1, 0.1)`` thresholds, with recalls of exactly 0.3, 0.6 and 0.7;
- detection AP: py-faster-rcnn ``voc_eval`` (matching, difficult objects, duplicates) with tied
  scores and classes whose objects are all difficult;
- retrieval: revisitop ``python/evaluate.py`` ``compute_map`` / ``compute_ap`` (queries without
  positives, junk), and Oxford's ``compute_ap.cpp`` for the original protocol;
- segmentation: mmsegmentation ``IoUMetric`` (``intersect_and_union`` summed over images,
  ``total_area_intersect / total_area_union``, ignore index 255, ``nanmean``).

The one deliberate difference, tie order of detections: the references sort with
``np.argsort(-confidence)`` (quicksort, not stable); dcbench sorts stably, so the references
here use ``kind="stable"`` too (stated on the voc-det card and in docs/protocols.md).
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from dcbench.data.voc import VOCAnnotation, VOCObject
from dcbench.detection.evaluation import COCO_THRESHOLDS, Detections, evaluate_detections
from dcbench.metrics import mean_iou, old_protocol_map, revisited_map, voc_ap
from dcbench.metrics.ap import precision_recall

CASES = 1000


def _same(a: float, b: float, tol: float = 1e-12) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol


# ============================================================================= VOC AP
def reference_voc_ap(rec: np.ndarray, prec: np.ndarray, use_07_metric: bool = False) -> float:
    """py-faster-rcnn lib/datasets/voc_eval.py voc_ap, as written there."""
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            if np.sum(rec >= t) == 0:
                p = 0
            else:
                p = np.max(prec[rec >= t])
            ap = ap + p / 11.0
    else:
        mrec = np.concatenate(([0.0], rec, [1.0]))
        mpre = np.concatenate(([0.0], prec, [0.0]))
        for i in range(mpre.size - 1, 0, -1):
            mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
        i = np.where(mrec[1:] != mrec[:-1])[0]
        ap = np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])
    return float(ap)


def _curve(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A precision/recall curve: mostly from a ranking with 10 or 20 positives (recalls k/10,
    so exactly 0.3, 0.6, 0.7), some with tied scores or a truncated ranking, some arbitrary."""
    if rng.random() < 0.15:
        n = int(rng.integers(1, 25))
        return np.sort(rng.random(n)), rng.random(n)
    n_pos = int(rng.choice([10, 20, 3, 7]))
    n = n_pos + int(rng.integers(0, 30))
    positives = np.zeros(n, dtype=bool)
    positives[rng.choice(n, n_pos, replace=False)] = True
    scores = np.round(rng.normal(size=n) + positives * rng.uniform(0, 3), 1)  # rounding: tied scores
    rec, prec = precision_recall(scores, positives)
    if rng.random() < 0.3:
        cut = int(rng.integers(1, n + 1))
        rec, prec = rec[:cut], prec[:cut]
    return rec, prec


def test_voc_ap_equals_py_faster_rcnn_on_random_curves():
    rng = np.random.default_rng(13)
    exact_hits = 0
    for _ in range(CASES * 2):
        rec, prec = _curve(rng)
        exact_hits += bool(np.isin(rec, [0.3, 0.6, 0.7]).any())
        for use_07 in (True, False):
            assert _same(voc_ap(rec, prec, use_07), reference_voc_ap(rec, prec, use_07)), (rec, prec, use_07)
    assert exact_hits >= 300  # the thresholds where the two 11-point spellings differ are exercised


def test_eleven_point_differs_from_exact_tenths_where_the_reference_does():
    """Recall reaching exactly 0.3 with precision 1: np.arange's 0.30000000000000004 is not reached."""
    rec, prec = np.array([0.1, 0.2, 0.3]), np.ones(3)
    assert voc_ap(rec, prec, True) == reference_voc_ap(rec, prec, True) == pytest.approx(3 / 11, abs=1e-12)


# ============================================================================= detection AP
def reference_voc_eval(dets: list[tuple[int, float, np.ndarray]], gts: dict[int, list[tuple[np.ndarray, bool]]],
                       ovthresh: float, use_07_metric: bool) -> float:
    """py-faster-rcnn voc_eval for one class: ``dets`` = (image, score, devkit box) in file
    order, ``gts`` = image -> [(devkit box, difficult)]. NaN without non-difficult objects
    (the reference divides by npos = 0 there)."""
    class_recs, npos = {}, 0
    for img, objs in gts.items():
        bbox = np.array([b for b, _ in objs], dtype=float).reshape(-1, 4)
        difficult = np.array([d for _, d in objs], dtype=bool)
        npos += int((~difficult).sum())
        class_recs[img] = {"bbox": bbox, "difficult": difficult, "det": [False] * len(objs)}
    if npos == 0:
        return float("nan")
    image_ids = [d[0] for d in dets]
    confidence = np.array([d[1] for d in dets], dtype=float)
    BB = np.array([d[2] for d in dets], dtype=float).reshape(-1, 4)
    sorted_ind = np.argsort(-confidence, kind="stable")  # the reference: default (unstable) quicksort
    BB = BB[sorted_ind, :]
    image_ids = [image_ids[x] for x in sorted_ind]
    nd = len(image_ids)
    tp, fp = np.zeros(nd), np.zeros(nd)
    for d in range(nd):
        R = class_recs[image_ids[d]]
        bb = BB[d, :].astype(float)
        ovmax = -np.inf
        BBGT = R["bbox"].astype(float)
        if BBGT.size > 0:
            ixmin = np.maximum(BBGT[:, 0], bb[0])
            iymin = np.maximum(BBGT[:, 1], bb[1])
            ixmax = np.minimum(BBGT[:, 2], bb[2])
            iymax = np.minimum(BBGT[:, 3], bb[3])
            iw = np.maximum(ixmax - ixmin + 1.0, 0.0)
            ih = np.maximum(iymax - iymin + 1.0, 0.0)
            inters = iw * ih
            uni = ((bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0)
                   + (BBGT[:, 2] - BBGT[:, 0] + 1.0) * (BBGT[:, 3] - BBGT[:, 1] + 1.0) - inters)
            overlaps = inters / uni
            ovmax = np.max(overlaps)
            jmax = np.argmax(overlaps)
        if ovmax > ovthresh:
            if not R["difficult"][jmax]:
                if not R["det"][jmax]:
                    tp[d] = 1.0
                    R["det"][jmax] = 1
                else:
                    fp[d] = 1.0
        else:
            fp[d] = 1.0
    fp, tp = np.cumsum(fp), np.cumsum(tp)
    rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return reference_voc_ap(rec, prec, use_07_metric)


def _box(rng: np.random.Generator, near: np.ndarray | None = None) -> np.ndarray:
    """A devkit box on a half-pixel grid (exact arithmetic both ways; exact-threshold IoUs)."""
    if near is not None and rng.random() < 0.7:
        return near + np.round(rng.normal(0, 3, 4) * 2) / 2
    x0, y0 = rng.integers(1, 60, 2)
    w, h = rng.integers(4, 40, 2)
    return np.array([x0, y0, x0 + w, y0 + h], dtype=float)


def _detection_case(rng: np.random.Generator) -> tuple[list[VOCAnnotation], list[Detections], list[str]]:
    classes = ["a", "b", "c"]
    n_images = int(rng.integers(1, 5))
    anns, dets = [], []
    only_difficult = rng.random() < 0.3  # class c: every object difficult (AP undefined)
    for i in range(n_images):
        objects = []
        for c in classes:
            for _ in range(int(rng.integers(0, 4))):
                difficult = only_difficult if c == "c" else bool(rng.random() < 0.2)
                objects.append(VOCObject(c, tuple(_box(rng)), difficult, False))
        anns.append(VOCAnnotation(f"{i}", f"{i}.jpg", 100, 100, 3, False, tuple(objects)))
        boxes, scores, labels = [], [], []
        for _ in range(int(rng.integers(0, 8))):
            label = int(rng.integers(0, len(classes)))
            same = [np.array(o.bbox) for o in objects if o.name == classes[label]]
            devkit = _box(rng, same[int(rng.integers(0, len(same)))] if same else None)
            boxes.append([devkit[0] - 1, devkit[1] - 1, devkit[2], devkit[3]])  # the detector's 0-based box
            scores.append(round(float(rng.random()), 1))  # one decimal: many tied scores
            labels.append(label)
        dets.append(Detections(np.array(boxes, dtype=float).reshape(-1, 4), np.array(scores),
                               np.array(labels, dtype=np.int64)))
    return anns, dets, classes


def _reference_inputs(anns: list[VOCAnnotation], dets: list[Detections], c: int, cls: str):
    gts = {i: [(np.array(o.bbox, dtype=float), o.difficult) for o in a.objects if o.name == cls]
           for i, a in enumerate(anns)}
    found = [(i, float(s), np.array([b[0] + 1, b[1] + 1, b[2], b[3]]))
             for i, d in enumerate(dets) for b, s, lab in zip(d.boxes, d.scores, d.labels) if lab == c]
    return found, gts


def test_detection_ap_equals_py_faster_rcnn_voc_eval():
    rng = np.random.default_rng(7)
    thresholds = [0.5, 0.7, 0.75, 0.9]  # the rule is the same at every threshold: a few keep this fast
    assert set(thresholds) <= set(COCO_THRESHOLDS)
    seen_nan = seen_ties = 0
    for _ in range(CASES):
        anns, dets, classes = _detection_case(rng)
        use_07 = bool(rng.random() < 0.5)
        ap = evaluate_detections(dets, anns, classes, use_07_metric=use_07, thresholds=thresholds)
        for c, cls in enumerate(classes):
            found, gts = _reference_inputs(anns, dets, c, cls)
            seen_ties += len({s for _, s, _ in found}) < len(found)
            for t in thresholds:
                want = reference_voc_eval(found, gts, t, use_07)
                seen_nan += math.isnan(want)
                assert _same(ap.class_ap(cls, t), want), (cls, t, use_07)
    assert seen_nan > 0 and seen_ties > 0


# ============================================================================= retrieval
def reference_compute_ap(ranks: np.ndarray, nres: int) -> float:
    """revisitop python/evaluate.py compute_ap."""
    nimgranks = len(ranks)
    ap = 0.0
    recall_step = 1.0 / nres
    for j in np.arange(nimgranks):
        rank = ranks[j]
        precision_0 = 1.0 if rank == 0 else float(j) / rank
        precision_1 = float(j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) * recall_step / 2.0
    return ap


def reference_compute_map(ranks: np.ndarray, gnd: list[dict], kappas: list[int]):
    """revisitop python/evaluate.py compute_map."""
    mAP = 0.0
    nq = len(gnd)
    aps = np.zeros(nq)
    pr = np.zeros(len(kappas))
    prs = np.zeros((nq, len(kappas)))
    nempty = 0
    for i in np.arange(nq):
        qgnd = np.array(gnd[i]["ok"])
        if qgnd.shape[0] == 0:
            aps[i] = float("nan")
            prs[i, :] = float("nan")
            nempty += 1
            continue
        try:
            qgndj = np.array(gnd[i]["junk"])
        except KeyError:
            qgndj = np.empty(0)
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgnd)]
        junk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgndj)]
        k, ij = 0, 0
        if len(junk):
            ip = 0
            while ip < len(pos):
                while ij < len(junk) and pos[ip] > junk[ij]:
                    k += 1
                    ij += 1
                pos[ip] = pos[ip] - k
                ip += 1
        ap = reference_compute_ap(pos, len(qgnd))
        mAP = mAP + ap
        aps[i] = ap
        pos += 1
        for j in np.arange(len(kappas)):
            kq = min(max(pos), kappas[j])
            prs[i, j] = (pos <= kq).sum() / kq
        pr = pr + prs[i, :]
    mAP = mAP / (nq - nempty)
    pr = pr / (nq - nempty)
    return mAP, aps, pr, prs


def reference_oxford_compute_ap(good_ok: set[int], junk: set[int], ranked: np.ndarray) -> float:
    """Oxford's compute_ap.cpp (in float64): positives good + ok, junk skipped."""
    old_recall, old_precision, ap = 0.0, 1.0, 0.0
    intersect, j = 0, 0
    for item in ranked:
        if int(item) in junk:
            continue
        if int(item) in good_ok:
            intersect += 1
        recall = intersect / float(len(good_ok))
        precision = intersect / (j + 1.0)
        ap += (recall - old_recall) * ((old_precision + precision) / 2.0)
        old_recall, old_precision = recall, precision
        j += 1
    return ap


def _retrieval_case(rng: np.random.Generator, allow_empty: bool = True) -> tuple[np.ndarray, list[dict]]:
    n_db, n_q = int(rng.integers(3, 40)), int(rng.integers(1, 6))
    ranks = np.stack([rng.permutation(n_db) for _ in range(n_q)], axis=1)
    gnd = []
    for _ in range(n_q):
        ids = rng.permutation(n_db)
        n_ok = int(rng.integers(0 if allow_empty else 1, max(2, n_db // 2)))
        n_junk = int(rng.integers(0, max(1, (n_db - n_ok) // 3)))
        entry = {"ok": ids[:n_ok].tolist()}
        if rng.random() < 0.8:
            entry["junk"] = ids[n_ok:n_ok + n_junk].tolist()
        gnd.append(entry)
    return ranks, gnd


def test_revisited_map_equals_revisitop_compute_map():
    rng = np.random.default_rng(5)
    kappas = [1, 5, 10]
    seen_empty = 0
    for _ in range(CASES):
        ranks, gnd = _retrieval_case(rng)
        if all(len(g["ok"]) == 0 for g in gnd):
            gnd[0]["ok"] = [int(ranks[-1, 0])]
        seen_empty += any(len(g["ok"]) == 0 for g in gnd)
        got = revisited_map(ranks, gnd, kappas)
        want_map, want_aps, want_pr, want_prs = reference_compute_map(ranks.copy(), gnd, kappas)
        assert _same(got.map, want_map)
        np.testing.assert_allclose(got.aps, want_aps, rtol=0, atol=1e-12)
        np.testing.assert_allclose(got.mpr, want_pr, rtol=0, atol=1e-12)
        np.testing.assert_allclose(got.prs, want_prs, rtol=0, atol=1e-12)
    assert seen_empty > 0


def test_old_protocol_map_equals_oxford_compute_ap():
    rng = np.random.default_rng(11)
    for _ in range(CASES):
        ranks, gnd = _retrieval_case(rng, allow_empty=False)
        # the original layout: good and ok both positive, junk ignored
        split = [int(rng.integers(0, len(g["ok"]) + 1)) for g in gnd]
        old = [{"good": g["ok"][:s], "ok": g["ok"][s:], "junk": g.get("junk", [])} for g, s in zip(gnd, split)]
        want = np.mean([reference_oxford_compute_ap(set(g["ok"]), set(g.get("junk", [])), ranks[:, q])
                        for q, g in enumerate(gnd)])
        assert _same(old_protocol_map(ranks, old).map, float(want))


# ============================================================================= segmentation
def reference_mmseg_iou(preds: list[np.ndarray], labels: list[np.ndarray], num_classes: int,
                        ignore_index: int = 255) -> tuple[float, np.ndarray]:
    """mmsegmentation IoUMetric: intersect_and_union per image (histograms over the kept
    pixels), summed, IoU = total intersect / total union, mIoU = nanmean."""
    total_i = np.zeros(num_classes)
    total_u = np.zeros(num_classes)
    for pred, label in zip(preds, labels):
        mask = label != ignore_index
        pred, label = pred[mask], label[mask]
        intersect = pred[pred == label]
        area_i = np.histogram(intersect, bins=num_classes, range=(0, num_classes - 1))[0]
        area_p = np.histogram(pred, bins=num_classes, range=(0, num_classes - 1))[0]
        area_l = np.histogram(label, bins=num_classes, range=(0, num_classes - 1))[0]
        total_i += area_i
        total_u += area_p + area_l - area_i
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = total_i / total_u
    with np.errstate(all="ignore"):
        miou = float(np.nanmean(iou)) if not np.isnan(iou).all() else float("nan")
    return miou, iou


def test_mean_iou_equals_mmseg():
    rng = np.random.default_rng(3)
    seen_absent = 0
    for _ in range(CASES):
        k = int(rng.integers(2, 7))
        used = int(rng.integers(1, k + 1))  # classes beyond `used` appear nowhere (IoU NaN)
        preds, labels = [], []
        for _ in range(int(rng.integers(1, 4))):
            shape = tuple(rng.integers(1, 12, 2))
            label = rng.integers(0, used, shape)
            label[rng.random(shape) < 0.15] = 255
            pred = np.where(rng.random(shape) < 0.6, np.where(label == 255, 0, label), rng.integers(0, used, shape))
            preds.append(pred)
            labels.append(label)
        got_miou, got_iou = mean_iou(preds, labels, k)
        want_miou, want_iou = reference_mmseg_iou(preds, labels, k)
        seen_absent += bool(np.isnan(want_iou).any())
        assert _same(got_miou, want_miou)
        np.testing.assert_allclose(got_iou, want_iou, rtol=0, atol=1e-12)
    assert seen_absent > 0
