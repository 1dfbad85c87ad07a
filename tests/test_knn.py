"""Tests for the kNN protocol (protocols/knn.py, the vote in dcbench/knn.py): the weighted vote
by hand, chunking, the protocol on a synthetic ImageFolder through the runner, feature-cache
reuse, settings and data errors."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import dcbench.knn as knn
from dcbench import evaluate
from dcbench.checkpoint import resolve_checkpoint
from dcbench.data import DataError
from dcbench.data.synthetic import make_image_folder
from dcbench.errors import UsageError
from dcbench.settings import apply_settings
from dcbench.protocol import EvalContext, get_protocol
from dcbench.knn import knn_scores
from dcbench.results import outcome_key
from dcbench.metrics import topk_accuracy

FAST = {"image_size": 64, "batch_size": 32, "workers": 0}




@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("knn") / "data", n_classes=4, per_class=12, image_size=32)


def run(root, cache, ckpt=None, **overrides):
    proto = get_protocol("knn")
    settings = apply_settings(proto.default_settings(), {**FAST, **overrides})
    proto.check_data(root, settings)
    ckpt = ckpt or resolve_checkpoint("random:alexnet,size=64")
    return evaluate.run(evaluate.Plan(proto, settings, root), ckpt, EvalContext(cache_dir=cache))


# ----------------------------------------------------------------------------- the vote by hand
# Bank (unit vectors): b0 = (1, 0) class 0, b1 = (0, 1) class 1, b2 = (0.6, 0.8) class 1,
# b3 = (0.8, 0.6) class 0. Query q0 = (1, 0): cosines 1, 0, 0.6, 0.8. Query q1 = (0, 1):
# cosines 0, 1, 0.8, 0.6. With T = 0.5 the weights are exp(2) = 7.389056, exp(1.6) = 4.953032,
# exp(1.2) = 3.320117, exp(0) = 1.
BANK = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6]])
BANK_LABELS = torch.tensor([0, 1, 1, 0])
QUERIES = torch.tensor([[1.0, 0.0], [0.0, 1.0]])


def test_vote_hand_example():
    scores = knn_scores(BANK, BANK_LABELS, QUERIES, ks=[1, 2, 3, 4], temperature=0.5, n_classes=2)
    expected = {
        # q0 neighbours by similarity: b0 (1.0, c0), b3 (0.8, c0), b2 (0.6, c1), b1 (0.0, c1)
        # q1 neighbours by similarity: b1 (1.0, c1), b2 (0.8, c1), b3 (0.6, c0), b0 (0.0, c0)
        1: [[7.389056, 0.0], [0.0, 7.389056]],
        2: [[12.342088, 0.0], [0.0, 12.342088]],
        3: [[12.342088, 3.320117], [3.320117, 12.342088]],
        4: [[12.342088, 4.320117], [4.320117, 12.342088]],
    }
    for k, values in expected.items():
        torch.testing.assert_close(scores[k], torch.tensor(values), rtol=0, atol=1e-5)


def test_vote_weights_decide_against_majority():
    # 1 very close neighbour of class 0 outweighs 2 far ones of class 1 at T = 0.07:
    # exp(0.99/0.07) = 1.37e6 > 2 * exp(0.5/0.07) = 2 * 1.26e3
    bank = F.normalize(torch.tensor([[1.0, 0.02], [1.0, 1.7], [1.0, -1.7]]), dim=1)
    query = torch.tensor([[1.0, 0.0]])
    scores = knn_scores(bank, torch.tensor([0, 1, 1]), query, ks=[3], temperature=0.07, n_classes=2)[3]
    sims = (bank @ query.T).squeeze(1)
    assert scores[0, 0].item() == pytest.approx(math.exp(sims[0].item() / 0.07), rel=1e-5)
    assert scores[0, 1].item() == pytest.approx(sum(math.exp(s / 0.07) for s in sims[1:].tolist()), rel=1e-5)
    assert scores.argmax().item() == 0


def test_topk_accuracy():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    top1, top5 = topk_accuracy(scores, torch.tensor([1, 1, 0]))
    assert top1 == pytest.approx(100 / 3) and top5 == 100.0  # 3 classes: top-5 covers all


def test_chunked_equals_unchunked():
    gen = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(50, 8, generator=gen), dim=1)
    queries = F.normalize(torch.randn(23, 8, generator=gen), dim=1)
    labels = torch.randint(0, 5, (50,), generator=gen)
    whole = knn_scores(bank, labels, queries, [1, 10, 200], 0.07, 5)
    chunked = knn_scores(bank, labels, queries, [1, 10, 200], 0.07, 5, block_elements=120)  # 2 queries a block
    assert set(whole) == {1, 10, 50}  # k = 200 is capped at the bank size
    for k in whole:
        torch.testing.assert_close(whole[k], chunked[k], rtol=1e-5, atol=0)  # exp(1/0.07) ~ 1.6e6: float32 rounding


# ----------------------------------------------------------------------------- the protocol
def test_knn_rows_and_cache_reuse(root, tmp_path):
    ckpt = resolve_checkpoint("random:alexnet,size=64")
    first = run(root, tmp_path / "cache", ckpt, bn_recalibrate="off")
    taps = ["conv1", "conv2", "conv3", "conv4", "conv5"]
    names = [f"top{n}_k{k}" for k in (10, 20, 100, 200) for n in (1, 5)]
    assert sorted((r.metric, r.tap) for r in first.metrics) == sorted((m, t) for m in names for t in taps)
    assert all(r.split == "val" and r.selection is None and r.seed == 0 for r in first.metrics)
    assert max(r.value for r in first.metrics if r.metric == "top1_k10") >= 45  # chance is 25
    assert first.extra["ks"] == [10, 20, 48, 48] and first.extra["bank_size"] == 48
    assert first.extra["pooling"]["conv1"] == {"kind": "global-avg"}
    for row in first.metrics:
        row.validate()
        outcome = first.outcomes[outcome_key(row.metric, row.tap)]  # per val image, dataset order
        assert outcome.shape == (48,) and 100.0 * outcome.mean() == pytest.approx(row.value, abs=1e-9)
    assert len(first.outcomes) == len(first.metrics)
    json.dumps(first.extra)
    assert first.extra["seed_dependent"] is False  # no BatchNorm re-estimation: the seed plays no part

    calls = []
    original = ckpt.backbone.forward
    ckpt.backbone.forward = lambda x, taps=None: calls.append(taps) or original(x, taps=taps)
    second = run(root, tmp_path / "cache", ckpt, bn_recalibrate="off", ks=[10, 1])
    assert calls == []  # every feature came from the cache
    values = {(r.metric, r.tap): r.value for r in first.metrics}
    again = {(r.metric, r.tap): r.value for r in second.metrics}
    assert all(again[key] == values[key] for key in again if key[0].endswith("_k10"))
    assert {m for m, _ in again} == {"top1_k10", "top5_k10", "top1_k1", "top5_k1"}


def test_knn_preset_pool_and_bn_recalibration(root, tmp_path):
    out = run(root, None, taps=["conv2"], pool="preset", ks=[5])
    assert out.extra["pooling"]["conv2"]["dim"] == 9216
    assert out.extra["bn_recalibrate"]["ran"] is True  # random init, auto
    assert [r.metric for r in out.metrics] == ["top1_k5", "top5_k5"]
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("overrides, message", [
    ({"ks": []}, "ks"),
    ({"ks": [0, 10]}, "ks"),
    ({"temperature": 0}, "temperature"),
    ({"pool": "max"}, "global, preset"),
    ({"k": 10}, "unknown setting 'k'"),
])
def test_settings_validation(overrides, message):
    proto = get_protocol("knn")
    with pytest.raises(UsageError, match=message):
        apply_settings(proto.default_settings(), overrides)


def test_unknown_tap(root, tmp_path):
    with pytest.raises(UsageError, match="unknown tap 'res5' for alexnet; available: conv1"):
        run(root, tmp_path, taps=["res5"])


def test_check_data_errors(root, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    shutil.rmtree(copy / "val" / "class_01")
    proto = get_protocol("knn")
    with pytest.raises(DataError, match=r"class folders differ.*1 only in train/ \(class_01\)"):
        proto.check_data(copy, proto.default_settings())
    shutil.rmtree(copy / "val")
    with pytest.raises(DataError, match="val is missing.*ROOT/train/CLASS"):
        proto.check_data(copy, proto.default_settings())


def test_blockwise_queries_give_the_same_rows(root, tmp_path, monkeypatch):
    whole = run(root, tmp_path / "cache", taps=["conv3"], bn_recalibrate="off")
    monkeypatch.setattr(knn, "SIM_BLOCK_ELEMENTS", 100)  # 48-image bank: 2 queries per block
    blocks = run(root, tmp_path / "cache", taps=["conv3"], bn_recalibrate="off")
    assert [(r.metric, r.value) for r in whole.metrics] == [(r.metric, r.value) for r in blocks.metrics]


def test_images_are_resized_bicubically_as_dino():
    """DINO eval_knn.py: Resize(256, interpolation=3); the bilinear cache id keeps its v1 form."""
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    from dcbench.data.transforms import center_transform, center_transform_id

    assert get_protocol("knn").default_settings().interpolation == "bicubic"
    assert center_transform_id(224) == "resize256-center224-imagenet-norm"
    assert center_transform_id(224, "bicubic") == "resize256-bicubic-center224-imagenet-norm"
    img = Image.effect_noise((300, 200), 64).convert("RGB")
    got = center_transform(64, "bicubic")(img)
    want = TF.normalize(TF.to_tensor(TF.center_crop(TF.resize(img, 73, InterpolationMode.BICUBIC), 64)),
                        [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert torch.equal(got, want) and not torch.equal(got, center_transform(64)(img))


def test_seed_dependent_only_with_bn_reestimation(root, tmp_path):
    """kNN is deterministic; the seeded BatchNorm re-estimation of a random init is not."""
    assert get_protocol("knn").seed_dependent is False
    out = run(root, tmp_path / "cache", ks=[10], taps=["conv2"])  # random init, bn_recalibrate auto: on
    assert out.extra["bn_recalibrate"]["ran"] is True and out.extra["seed_dependent"] is True


# ----------------------------------------------------------------------------- the bank in chunks
def _features_with_ties(seed=0, n_bank=60, n_queries=17, dim=6):
    """Random rows plus exact duplicates and all-zero rows: many equal similarities, some at the k-th place."""
    gen = torch.Generator().manual_seed(seed)
    bank = torch.randn(n_bank, dim, generator=gen)
    bank[10:20] = bank[3]  # ten copies of row 3
    bank[40:45] = 0.0  # zero rows: similarity 0 with every query
    bank[50:55] = bank[30]
    queries = torch.randn(n_queries, dim, generator=gen)
    queries[0] = bank[3]  # its 11 nearest are tied at similarity 1
    queries[1] = 0.0  # every similarity 0: the k nearest are the k first rows
    labels = torch.randint(0, 5, (n_bank,), generator=gen)
    return bank.numpy(), labels.numpy(), queries.numpy(), torch.randint(0, 5, (n_queries,), generator=gen).numpy()


def _reference(bank, queries, k):
    """The documented rule, by brute force: similarity desc, then bank row asc."""
    sims = knn.unit_rows(queries, "cpu") @ knn.unit_rows(bank, "cpu").T
    order = torch.sort(sims, dim=1, descending=True, stable=True)
    return order.values[:, :k], order.indices[:, :k]


@pytest.fixture()
def small_tiles(monkeypatch):
    """Tiles of 4 bank rows and 5 queries, so 60-row banks span many tiles and chunks."""
    monkeypatch.setattr(knn, "BANK_TILE", 4)
    monkeypatch.setattr(knn, "QUERY_TILE", 5)


@pytest.mark.parametrize("k", [1, 5, 11, 12, 60, 200])
def test_bank_chunks_give_identical_neighbours_including_ties(k, small_tiles):
    bank, _labels, queries, _ = _features_with_ties()
    whole = knn.nearest(bank, queries, k)  # one chunk: the unchunked computation
    want = _reference(bank, queries, k)
    assert torch.equal(whole[1], want[1])  # the documented order, ties included
    for chunk_rows in (4, 8, 12, 28, 56, 60, 64):
        got = knn.nearest(bank, queries, k, bank_chunk_bytes=chunk_rows * bank.shape[1] * 4)
        assert torch.equal(got[1], whole[1]), f"neighbours differ with {chunk_rows}-row chunks"
        assert torch.equal(got[0], whole[0]), f"similarities differ with {chunk_rows}-row chunks"
    assert want[1][0, :min(k, 11)].tolist() == sorted([3, *range(10, 20)])[:min(k, 11)]  # ties: lower row first
    assert want[1][1].tolist() == list(range(min(k, 60)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunked_knn_correct_equals_unchunked_bit_for_bit(seed, monkeypatch, small_tiles):
    bank, labels, queries, query_labels = _features_with_ties(seed)
    ks = [1, 5, 11, 20, 200]
    whole = knn.knn_correct(bank, labels, queries, query_labels, ks, 0.07, 5)
    votes_whole = knn.vote(knn.nearest(bank, queries, 60), torch.from_numpy(labels), [1, 5, 11, 20, 60], 0.07, 5)
    moved = []
    real = knn.unit_rows
    monkeypatch.setattr(knn, "unit_rows", lambda a, d: moved.append(len(a)) or real(a, d))
    bound = 9 * bank.shape[1] * 4  # 9 rows: 2 tiles of 4 at a time
    chunked = knn.knn_correct(bank, labels, queries, query_labels, ks, 0.07, 5, bank_chunk_bytes=bound)
    assert max(moved) <= 9, "more bank rows on the device than the bound allows"
    for k in ks:
        np.testing.assert_array_equal(whole[k], chunked[k])
    votes = knn.vote(knn.nearest(bank, queries, 60, bank_chunk_bytes=bound), torch.from_numpy(labels),
                     [1, 5, 11, 20, 60], 0.07, 5)
    for k in votes:
        assert torch.equal(votes[k], votes_whole[k]), f"summed votes of k={k} differ in the last bits"


def test_knn_correct_reads_a_memmapped_bank_in_chunks(tmp_path, monkeypatch, small_tiles):
    bank, labels, queries, query_labels = _features_with_ties(3, n_bank=40)
    np.save(tmp_path / "bank.npy", bank)
    mapped = np.load(tmp_path / "bank.npy", mmap_mode="r")
    materialised = []
    real = knn.unit_rows
    monkeypatch.setattr(knn, "unit_rows", lambda a, d: materialised.append(a.shape[0]) or real(a, d))
    got = knn.knn_correct(mapped, labels, queries, query_labels, [3], 0.1, 5, bank_chunk_bytes=12 * 6 * 4)
    assert materialised.count(12) == 3 and materialised.count(4) == 1  # bank: 3 chunks of 3 tiles, 1 of 1 tile
    assert materialised.count(5) == 4 * 3  # 17 queries (over the bound): 3 tiles of 5 re-read per chunk, then 2
    np.testing.assert_array_equal(got[3], knn.knn_correct(bank, labels, queries, query_labels, [3], 0.1, 5)[3])
