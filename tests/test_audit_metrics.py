"""Audit of the evaluation metrics and protocol wiring against independent implementations.

- kNN top-1/top-5 against facebookresearch/dino ``eval_knn.py`` ``knn_classifier`` (written out
  below), wherever DINO's answer does not depend on the order its sort leaves tied votes in;
  a class no neighbour voted for is never a hit (it was: top5_k1 = 100 on 4 classes).
- SVM protocols: a class without a training positive (or negative) is a one-line DataError,
  not liblinear's ValueError as an "internal error".
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch.nn import functional as F

from dcbench.cli import main
from dcbench.data.synthetic_voc import make_voc
from dcbench.data.voc import VOC_CLASSES
from dcbench.errors import DataError
from dcbench.knn import knn_correct, vote_correct
from dcbench.svm import check_trainable


# ============================================================================= kNN vs DINO
def dino_knn(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray, query_labels: np.ndarray,
             k: int, temperature: float, n_classes: int) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """facebookresearch/dino eval_knn.py knn_classifier for one block of queries: per query top-1
    and top-5 correct (top ``min(5, k)`` predictions; capped at the classes, where DINO's
    ``narrow`` would fail), and the summed votes."""
    train = F.normalize(torch.from_numpy(bank), dim=1).t()
    test = F.normalize(torch.from_numpy(queries), dim=1)
    targets = torch.from_numpy(query_labels)
    distances, indices = (test @ train).topk(k, largest=True, sorted=True)
    candidates = torch.from_numpy(bank_labels).view(1, -1).expand(len(test), -1)
    retrieved = torch.gather(candidates, 1, indices)
    one_hot = torch.zeros(len(test) * k, n_classes).scatter_(1, retrieved.view(-1, 1), 1)
    probs = (one_hot.view(len(test), -1, n_classes) * distances.div(temperature).exp().view(len(test), -1, 1)).sum(1)
    _, predictions = probs.sort(1, True)
    correct = predictions.eq(targets.view(-1, 1))
    top5 = correct.narrow(1, 0, min(5, k, n_classes)).any(1)
    return correct[:, 0].numpy(), top5.numpy(), probs


def test_knn_equals_dino_where_dino_is_defined():
    rng = np.random.default_rng(0)
    compared = 0
    for _ in range(150):
        n_classes, n_bank, n_queries = int(rng.integers(2, 12)), int(rng.integers(5, 50)), int(rng.integers(1, 20))
        bank = rng.normal(size=(n_bank, 6)).astype(np.float32)
        queries = rng.normal(size=(n_queries, 6)).astype(np.float32)
        bank_labels = rng.integers(0, n_classes, n_bank)
        query_labels = rng.integers(0, n_classes, n_queries)
        k = min(int(rng.choice([1, 2, 3, 5, 10, 20])), n_bank)
        ours = knn_correct(bank, bank_labels, queries, query_labels, [k], 0.07, n_classes)[k]
        top1, top5, probs = dino_knn(bank, bank_labels, queries, query_labels, k, 0.07, n_classes)
        np.testing.assert_array_equal(ours[:, 0], top1)
        # DINO's top-5 is arbitrary only where a zero-vote class is among its top min(5, k)
        # predictions and the label got no vote
        m = min(5, k, n_classes)
        label_voted = probs.gather(1, torch.from_numpy(query_labels)[:, None])[:, 0] > 0
        defined = ((probs.sort(1, True).values[:, m - 1] > 0) | label_voted).numpy()
        np.testing.assert_array_equal(ours[defined, 1], top5[defined])
        compared += int(defined.sum())
    assert compared > 1000


def test_knn_class_without_votes_is_never_a_hit():
    """1-NN on 4 classes: the top-5 is the top-1 (DINO: min(5, k) predictions), not 100 %."""
    bank = np.eye(4, dtype=np.float32)
    bank_labels = np.arange(4)
    queries = np.array([[1, 0.1, 0, 0], [0, 1, 0.2, 0], [0, 0, 1, 0.3]], dtype=np.float32)
    query_labels = np.array([0, 3, 1])  # right, wrong, wrong
    got = knn_correct(bank, bank_labels, queries, query_labels, [1, 2], 0.07, 4)
    np.testing.assert_array_equal(got[1], [[True, True], [False, False], [False, False]])
    # k = 2: the second neighbour votes too (query 1's second neighbour is class 2, query 2's is class 3)
    np.testing.assert_array_equal(got[2], [[True, True], [False, False], [False, False]])


def test_vote_ties_go_to_the_lower_class_index():
    votes = torch.tensor([[0.0, 2.0, 2.0, 0.0, 0.0, 0.0, 1.0],
                          [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]])
    got = vote_correct(votes, torch.tensor([2, 5]))
    # row 0: class 2 ties class 1 for the most votes and loses the tie; still in the top 5
    # row 1: six classes tie; class 5 comes sixth by index: not in the top 5
    np.testing.assert_array_equal(got, [[False, True], [False, False]])
    np.testing.assert_array_equal(vote_correct(votes, torch.tensor([1, 0])), [[True, True], [True, True]])
    np.testing.assert_array_equal(vote_correct(votes, torch.tensor([3, 6])), [[False, False], [False, False]])


# ============================================================================= SVM data errors
def test_check_trainable_names_the_class_and_the_fix():
    labels = np.array([[1, -1], [-1, 0], [-1, -1]])
    check_trainable(labels[:, :1], ["cat"], "trainval")
    with pytest.raises(DataError, match=r"class dog has no positive image in trainval.*dog_trainval.txt.*"
                                        r"--set classes=\[cat\]"):
        check_trainable(labels, ["cat", "dog"], "trainval")
    # difficult images are negatives for voc07-svm, never drawn by the low-shot sets
    difficult_only = np.array([[1], [0]])
    check_trainable(difficult_only, ["cat"], "train")
    with pytest.raises(DataError, match="class cat has no negative image in train"):
        check_trainable(difficult_only, ["cat"], "train", difficult_negative=False)


@pytest.mark.parametrize("protocol", ["voc07-svm", "voc07-lowshot"])
def test_svm_protocols_refuse_a_class_without_training_positives(tmp_path, protocol):
    root = make_voc(tmp_path / "voc", classes=VOC_CLASSES[:3])
    path = next(root.rglob("bird_trainval.txt"))
    path.write_text("".join(f"{line.split()[0]} -1\n" for line in path.read_text().splitlines() if line.strip()))
    result = CliRunner().invoke(main, ["eval", "--protocol", protocol, "--checkpoint", "random:alexnet,size=64",
                                       "--data", str(root), "--device", "cpu", "--store", str(tmp_path / "r.db"),
                                       "--set", "image_size=64", "--set", "workers=0"])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert lines == ["error: class bird has no positive image in trainval, so no SVM can be trained for it; check "
                     "ImageSets/Main/bird_trainval.txt or leave it out with --set classes=[aeroplane,bicycle]"]
    assert "Traceback" not in result.output


def test_knn_temperature_that_overflows_float32_is_refused(tmp_path):
    """T = 0.005 made near-duplicate neighbours weigh inf (exp(1/T) > float32 max): inf votes tie and
    top-1 fell from 98 % (T = 0.02) to 22 %; now a usage error naming the lowest T that works."""
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(60, 4)).astype(np.float32)
    labels = rng.integers(0, 6, 60)
    queries = bank[:20] + 0.01 * rng.normal(size=(20, 4)).astype(np.float32)
    assert knn_correct(bank, labels, queries, labels[:20], [10], 0.02, 6)[10][:, 0].mean() >= 0.9
    with pytest.raises(ValueError, match="temperature 0.005 overflows"):
        knn_correct(bank, labels, queries, labels[:20], [10], 0.005, 6)
    data = tmp_path / "data"
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (data / split / cls).mkdir(parents=True)
    result = CliRunner().invoke(main, ["eval", "--protocol", "knn", "--checkpoint", "random:alexnet,size=64",
                                       "--data", str(data), "--store", str(tmp_path / "r.db"),
                                       "--set", "temperature=0.005"])
    assert result.exit_code == 2, result.output
    assert "error: bad value 0.005 for temperature: give at least 0.0121 with ks up to 200" in result.output


# ============================================================================= voc-det splits
@pytest.mark.parametrize("sets,message", [
    (["--set", "test_set=2007:val"],
     "error: train_sets 2007:trainval and test_set 2007:val share 24 images (first: 000002), so the detector "
     "would be scored on images it trained on; use --set train_sets=[2007:train]"),
    (["--set", "train_sets=[2007:train,2007:test]"],
     "error: train_sets 2007:test and test_set 2007:test share 24 images (first: 000004), so the detector "
     "would be scored on images it trained on; use train_sets without 2007:test"),
])
def test_voc_det_refuses_training_on_the_evaluated_images(tmp_path, sets, message):
    """Evaluating on 2007:val with the preset's 2007:trainval (val is inside it) scored the detector on
    its own training images, silently; now a usage error (checked before any training)."""
    root = make_voc(tmp_path / "voc", classes=VOC_CLASSES[:2], images_per_split={"train": 24, "val": 24, "test": 24})
    result = CliRunner().invoke(main, ["eval", "--protocol", "voc-det", "--checkpoint", "random:alexnet,size=64",
                                       "--data", str(root), "--device", "cpu", "--store", str(tmp_path / "r.db"),
                                       *sets])
    assert result.exit_code == 2, result.output
    assert message in result.output.splitlines()


def test_voc_det_rows_carry_the_evaluated_split():
    from dcbench.detection.evaluation import COCO_THRESHOLDS, DetectionAP, ap_rows

    ap = DetectionAP(["cat"], {t: [0.5] for t in (*COCO_THRESHOLDS, 0.75)}, "VOC07 11-point")
    assert {r.split for r in ap_rows(ap, "all", 0)} == {"test"}
    assert {r.split for r in ap_rows(ap, "all", 0, "val")} == {"val"}


# ============================================================================= edge cases by hand
def test_detection_iou_of_exactly_half_is_a_miss_and_images_without_objects_are_false_positives():
    """VOC devkit: a match needs IoU > 0.5 (strict), with the devkit's +1 widths."""
    from dcbench.data.voc import VOCAnnotation, VOCObject
    from dcbench.detection.evaluation import Detections, evaluate_detections

    gt = VOCObject("cat", (1.0, 1.0, 10.0, 10.0), False, False)  # 10 x 10 devkit pixels
    hard = VOCObject("cat", (30.0, 30.0, 39.0, 39.0), True, False)
    anns = [VOCAnnotation("a", "a.jpg", 50, 50, 3, False, (gt, hard)),
            VOCAnnotation("b", "b.jpg", 50, 50, 3, False, ())]

    def ap50(boxes_a, scores_a, boxes_b=(), scores_b=()):
        dets = [Detections(np.array(boxes_a, float).reshape(-1, 4), np.array(scores_a, float),
                           np.zeros(len(scores_a), np.int64)),
                Detections(np.array(boxes_b, float).reshape(-1, 4), np.array(scores_b, float),
                           np.zeros(len(scores_b), np.int64))]
        return evaluate_detections(dets, anns, ["cat"]).class_ap("cat", 0.5)

    # detector boxes are 0-based continuous: devkit (1, 1, 10, 5) -> 50 of 100 pixels, IoU exactly 0.5
    assert ap50([[0, 0, 10, 5]], [0.9]) == 0.0
    assert ap50([[0, 0, 10, 6]], [0.9]) == pytest.approx(1.0)  # IoU 0.6 (11 x 1/11)
    # a detection on the difficult box is ignored; one on an image without objects is a false positive
    assert ap50([[0, 0, 10, 10], [29, 29, 39, 39]], [0.5, 0.9]) == pytest.approx(1.0)
    assert ap50([[0, 0, 10, 10]], [0.5], [[0, 0, 5, 5]], [0.9]) == pytest.approx(0.5)  # precision 1/2 at recall 1


def test_retrieval_junk_ahead_of_positives_and_queries_without_positives():
    from dcbench.metrics import old_protocol_map, revisited_map

    ranks = np.array([[3, 0], [4, 1], [0, 2], [1, 3], [2, 4]])  # db indices, most similar first, per query
    # query 0: junk 3, 4 ranked first, then its positives 0, 1: AP 1 once junk is removed
    # query 1: only junk listed (no positive): left out of the mean
    result = revisited_map(ranks, [{"ok": [0, 1], "junk": [3, 4]}, {"ok": [], "junk": [0, 1, 2]}])
    assert result.map == 1.0 and np.isnan(result.aps[1])
    np.testing.assert_array_equal(result.mpr, [1.0, 1.0, 1.0])
    assert np.isnan(old_protocol_map(ranks[:, 1:], [{"good": [], "ok": [], "junk": [0]}]).map)
    # Oxford compute_ap by hand: positives at ranks 1 and 3 of [p, n, p] -> (1 + 1)/2 * 1/2 + (1/2 + 2/3)/2 * 1/2
    assert old_protocol_map(np.array([[0], [5], [1]]), [{"good": [0], "ok": [1], "junk": []}]).map == \
        pytest.approx(0.5 + (0.5 + 2 / 3) / 4)


def test_miou_class_never_predicted_counts_zero_and_absent_class_is_left_out():
    from dcbench.metrics import mean_iou

    target = np.array([[0, 0, 1, 1], [0, 0, 1, 255]])
    pred = np.array([[0, 0, 0, 0], [0, 0, 0, 2]])  # class 1 never predicted; 255 pixel not evaluated
    miou, iou = mean_iou(pred, target, num_classes=4)
    np.testing.assert_allclose(iou[:2], [4 / 7, 0.0])
    assert np.isnan(iou[2]) and np.isnan(iou[3])  # class 2 predicted only on the void pixel; class 3 nowhere
    assert miou == pytest.approx((4 / 7 + 0.0) / 2)


# ============================================================================= R-MAC grid
def deepcluster_rmac_regions(H: int, W: int, L: int) -> list[tuple[int, int, int]]:
    """facebookresearch/deepcluster eval_retrieval.py get_rmac_region_coordinates (Tolias et al.'s
    Matlab code), written out; returns (x, y, side) per region."""
    ovr = 0.4
    steps = np.array((2, 3, 4, 5, 6, 7), dtype=np.float32)
    w = np.minimum(H, W)
    b = (np.maximum(H, W) - w) / (steps - 1)
    idx = np.argmin(np.abs(((w ** 2 - w * b) / w ** 2) - ovr)) + 1
    Wd, Hd = (idx, 0) if H < W else ((0, idx) if H > W else (0, 0))
    regions = []
    for l in range(1, L + 1):
        wl = np.floor(2 * w / (l + 1))
        wl2 = np.floor(wl / 2 - 1)
        b = (W - wl) / (l + Wd - 1) if l + Wd - 1 > 0 else 0
        cen_w = np.floor(wl2 + b * np.arange(l - 1 + Wd + 1)) - wl2
        b = (H - wl) / (l + Hd - 1) if l + Hd - 1 > 0 else 0
        cen_h = np.floor(wl2 + b * np.arange(l - 1 + Hd + 1)) - wl2
        regions += [[j, i, wl, wl] for i in cen_h for j in cen_w]
    out = []
    for r in regions:
        x, y, side, _ = (int(round(v)) for v in r)
        x -= max(0, x + side - W)
        y -= max(0, y + side - H)
        out.append((x, y, side))
    return out


def test_rmac_regions_equal_deepclusters_on_every_map_shape():
    """Every conv5 map of a 1024-px image (AlexNet ~31 x 23 .. 64 x 48 for VGG16) and below."""
    from dcbench.retrieval import rmac_regions

    for h in range(2, 70):
        for w in range(2, 70, 3):
            assert rmac_regions(h, w, 3) == deepcluster_rmac_regions(h, w, 3), (h, w)
