"""The VOC07 classification protocols (protocols/voc07_cls.py, protocols/voc07_svm.py) and their engine
(dcbench/voc_finetune.py, dcbench/finetune.py, dcbench/svm.py, dcbench/lowshot.py): fine-tuning end to end
through the CLI and its self-checks, the SVM core on constructed features, per-tap SVMs where a trained
checkpoint beats a random one, resuming after an interruption, low-shot, and data errors."""
from __future__ import annotations

import json
import shutil
import sqlite3

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.nn import functional as F

from dcbench.checkpoint import resolve_checkpoint, save_checkpoint
from dcbench.cli import main
from dcbench.data.synthetic_voc import make_voc
from dcbench.data.voc import VOC_CLASSES, load_voc_split
from dcbench.features import tensor_digests
from dcbench.models import build_backbone
from dcbench.settings import apply_settings
from dcbench.protocol import EvalContext, get_protocol
from dcbench import svm
from dcbench.data.transforms import center_transform
from dcbench.finetune import check_trunk
from dcbench.lowshot import lowshot_sample, lowshot_stats
from dcbench.protocols.voc07_svm import COSTS
from dcbench.svm import FALLBACK_COST, FitStore, SvmParams, choose_cost, svm_tap, svm_targets
from dcbench.voc_finetune import build_finetune_net, lr_at, masked_bce, set_trainable

CLASSES = VOC_CLASSES[:4]
FAST = {
    "voc07-cls": {"image_size": 64, "iterations": 3, "batch_size": 8, "workers": 0},
    "voc07-svm": {"image_size": 64, "workers": 0, "jobs": 2},
    "voc07-lowshot": {"image_size": 64, "workers": 0, "jobs": 2, "ks": [1, 2], "samples": 2,
                      "costs": [0.1, 1.0, 10.0], "taps": ["conv3"]},
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_voc(tmp_path_factory.mktemp("voc") / "data", classes=CLASSES)


@pytest.fixture(scope="module")
def trained(root, tmp_path_factory):
    """An AlexNet whose conv1 was briefly trained on the fixture's trainval labels (the rest
    random): a checkpoint that carries information, made in a few seconds."""
    torch.manual_seed(0)
    split = load_voc_split(root, "trainval", classes=CLASSES)
    ds = split.dataset(center_transform(64))
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.from_numpy(split.labels)
    bb = build_backbone("alexnet", input_size=64, seed=0)
    head = nn.Linear(96 * 16, len(CLASSES))
    opt = torch.optim.Adam(list(bb.features[:2].parameters()) + list(head.parameters()), lr=3e-3)
    for _ in range(25):
        logits = head(F.adaptive_avg_pool2d(bb(x, taps=["conv1"])["conv1"], 4).flatten(1))
        loss = F.binary_cross_entropy_with_logits(logits, (y == 1).float(), reduction="none")
        opt.zero_grad()
        loss.masked_fill(y == 0, 0).mean().backward()
        opt.step()
    path = tmp_path_factory.mktemp("ckpt") / "trained.pth"
    save_checkpoint(path, bb)
    return path


def run(name, root, cache, ckpt=None, **overrides):
    proto = get_protocol(name)
    settings = apply_settings(proto.default_settings(), {**FAST[name], **overrides})
    proto.check_data(root, settings)
    ckpt = ckpt or resolve_checkpoint("random:alexnet,size=64")
    return proto.run(ckpt, settings, root, EvalContext(cache_dir=cache, workers=settings.workers, settings=settings))


def _invoke(*args):
    return CliRunner().invoke(main, list(map(str, args)))


def values(output, tap=None):
    return {r.metric: r.value for r in output.metrics if tap is None or r.tap == tap}


# ----------------------------------------------------------------------------- fine-tuning
def test_cli_finetune_prints_map_and_per_class_ap(root, tmp_path):
    store = tmp_path / "r.db"
    result = _invoke("eval", "--protocol", "voc07-cls", "--checkpoint", "random:alexnet", "--data", root,
                     "--store", store, "--set", "iterations=3", "--set", "image_size=64", "--set", "batch_size=8",
                     "--set", "workers=0", "--json")
    assert result.exit_code == 0, result.output
    assert "mAP" in result.output and "AP_aeroplane" in result.output
    record = json.loads(result.output.strip().splitlines()[-1])
    rows = {m["metric"]: m for m in record["metrics"]}
    assert set(rows) == {"mAP"} | {f"AP_{c}" for c in CLASSES}
    assert all(m["tap"] == "fc6-8" and m["split"] == "test" and 0 <= m["value"] <= 100 for m in rows.values())
    assert rows["mAP"]["value"] == pytest.approx(np.mean([rows[f"AP_{c}"]["value"] for c in CLASSES]))
    check = record["extra"]["trunk_check"]
    assert check["passed"] and check["changed"] == {"bn_affine": 10}  # only the trained BN scale/shift moved
    assert record["settings"]["lr"] == 0.003 and record["settings"]["crop_scale"] == [0.1, 0.5]
    with sqlite3.connect(store) as db:
        assert db.execute("select count(*) from results").fetchone()[0] == 1
    # the per-image scores stored for the bootstrap give back the mAP of the record
    from dcbench.results import ResultStore
    with ResultStore(store, readonly=True) as db:
        (stored,) = db.results()
        outcome = db.outcomes(stored.id)["mAP/fc6-8"]
    assert outcome.statistic == "map-finetune" and len(outcome) == record["extra"]["images"]["test"]
    assert 100 * outcome.value(np.ones((1, len(outcome))))[0] == pytest.approx(rows["mAP"]["value"], abs=1e-9)


@pytest.mark.parametrize("mode,bn_affine,expect", [("fc6-8", False, {}), ("all", True, {"conv", "bn_affine"})])
def test_finetune_modes_leave_or_change_the_convs(root, mode, bn_affine, expect):
    ckpt = resolve_checkpoint("random:alexnet,size=64")
    before = tensor_digests(ckpt.backbone)
    out = run("voc07-cls", root, None, ckpt, mode=mode, train_bn_affine=bn_affine, iterations=2,
              bn_recalibrate="off", test_crops="tencrop")
    changed = out.extra["trunk_check"]["changed"]
    assert set(changed) == set(expect)
    if mode == "all":
        assert changed["conv"] == 10  # the 5 convs' weights and biases
    assert tensor_digests(ckpt.backbone) == before  # the caller's backbone is untouched
    assert {r.tap for r in out.metrics} == {mode} and "mAP" in values(out)


def test_trunk_check_refuses_a_moved_frozen_layer():
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    before = tensor_digests(trunk)
    with torch.no_grad():
        trunk[1].weight.add_(1.0)
    allowed = {"1.weight", "1.bias"}
    assert check_trunk(trunk, before, allowed, "fc6-8", 5)["changed"] == {"bn_affine": 1}
    with torch.no_grad():
        trunk[0].weight.add_(1.0)
    with pytest.raises(RuntimeError, match="fc6-8 fine-tuning changed 1 frozen trunk tensors"):
        check_trunk(trunk, before, allowed, "fc6-8", 5)
    with pytest.raises(RuntimeError, match="left every trunk weight unchanged"):
        check_trunk(trunk, tensor_digests(trunk), {"0.weight"}, "all", 5)


def test_generic_backbone_gets_a_pooled_mlp_head():
    backbone = build_backbone("tv:resnet18", input_size=64, seed=0)
    net = build_finetune_net(backbone, 4, 64, head_dim=32)
    assert "global average pool of res5" in net.kind and net.trunk.backbone is not backbone
    assert [type(m) for m in net.head] == [nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU]
    assert net.head[1].in_features == 512 and torch.all(net.head[1].bias == 0.1)
    assert net.eval()(torch.zeros(2, 3, 64, 64)).shape == (2, 4)
    assert set_trainable(net, "fc6-8", False) == set()
    allowed = set_trainable(net, "fc6-8", True)
    assert allowed and all(name.endswith(("bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias", ".1.weight",
                                          ".1.bias")) for name in allowed)
    everything = set_trainable(net, "all", True)
    assert len(everything) == len(list(net.trunk.parameters())) - 2  # not the tv model's own (unused) fc
    assert not any(".fc." in name for name in everything)
    sobel_net = build_finetune_net(build_backbone("alexnet", input_size=64, seed=0), 4, 64)
    assert not any("sobel" in name for name in set_trainable(sobel_net, "all", True))  # fixed filters stay fixed


def test_deepcluster_head_is_reinitialised_for_the_input_size():
    backbone = build_backbone("alexnet", input_size=224, seed=0)  # fc6 built for a 6x6 map
    net = build_finetune_net(backbone, 20, 64)  # 64 px: a 1x1 map, fc6 rebuilt
    fc6, fc7 = net.head[1], net.head[4]
    assert fc6.in_features == 256 and fc7.weight.shape == (4096, 4096) and net.top.out_features == 20
    assert float(fc7.weight.detach().std()) == pytest.approx(0.01, rel=0.05) and torch.all(fc7.bias == 0.1)
    assert torch.all(net.top.bias == 0.1) and backbone.classifier[1].in_features == 256 * 36


def test_loss_and_schedule_by_hand():
    logits = torch.zeros(1, 3)
    labels = torch.tensor([[1, -1, 0]])  # difficult (0) is masked out
    assert masked_bce(logits, labels).item() == pytest.approx(2 * np.log(2))
    assert masked_bce(torch.zeros(2, 3), torch.tensor([[1, -1, 0], [1, 1, 1]])).item() == pytest.approx(
        5 * np.log(2) / 2)
    assert [lr_at(0.003, 5000, t) for t in (0, 4999, 5000, 10000)] == [0.003, 0.003, 0.0015, 0.00075]


# ----------------------------------------------------------------------------- SVM core
def _labels(rng, n, classes=4):
    labels = np.where(rng.random((n, classes)) < 0.35, 1, -1)
    labels[np.arange(n), rng.integers(0, classes, n)] = 1
    labels[rng.random((n, classes)) < 0.05] = 0
    return labels.astype(np.int8)


def test_svm_core_informative_features_beat_noise():
    rng = np.random.default_rng(0)
    train, test = _labels(rng, 60), _labels(rng, 40)
    informative = [(lab == 1) * 2.0 + rng.normal(0, 0.5, lab.shape) for lab in (train, test)]
    informative = [np.hstack([x, rng.normal(0, 0.5, (len(x), 50))]) for x in informative]
    noise = [rng.normal(size=(len(lab), 54)) for lab in (train, test)]
    classes = ["a", "b", "c", "d"]
    good, results = svm_tap(informative[0], train, informative[1], test, classes, COSTS, SvmParams(),
                            FitStore(None), jobs=2)
    bad, _ = svm_tap(noise[0], train, noise[1], test, classes, COSTS, SvmParams(), FitStore(None), jobs=2)
    assert np.mean(good) > 0.95 and np.mean(bad) < 0.75
    assert all(r.cost in COSTS and len(r.cv_aps) == len(COSTS) for r in results)


def test_svm_core_conventions():
    assert svm_targets(np.array([1, -1, 0])).tolist() == [1, -1, -1]  # difficult trains as negative
    assert choose_cost([0.5, 0.9, 0.9, 0.1], [1, 2, 3, 4]) == 2.0  # first of equals
    assert choose_cost([float("nan")] * 2, [5.0, 50.0]) == FALLBACK_COST
    # difficult test images, however high they score, do not move the test AP
    rng = np.random.default_rng(1)
    train, test = _labels(rng, 40), _labels(rng, 30)
    x_train, x_test = rng.normal(size=(40, 8)) + train[:, :1], rng.normal(size=(30, 8)) + test[:, :1]
    aps, _ = svm_tap(x_train, train[:, :1], x_test, test[:, :1], ["a"], [1.0], SvmParams(), FitStore(None), 1)
    hard = test[:, :1].copy()
    extra = np.vstack([x_test, np.full((3, 8), 50.0)])
    aps_hard, _ = svm_tap(x_train, train[:, :1], extra, np.vstack([hard, [[0], [0], [0]]]), ["a"], [1.0],
                          SvmParams(), FitStore(None), 1)
    assert aps_hard == pytest.approx(aps)


def test_lowshot_sampling_and_stats_by_hand():
    labels = np.array([[1, -1], [1, -1], [1, 0], [-1, 1], [-1, 1], [0, -1], [-1, -1]])
    sets = lowshot_sample(labels, 1, np.random.default_rng(0))
    for c, rows in enumerate(sets):
        assert (labels[rows, c] == 1).sum() == 1 and (labels[rows, c] == -1).sum() == 1  # (2 - 1) * k negatives
        assert (labels[rows, c] != 0).all()  # difficult never drawn
    capped = lowshot_sample(labels, 10, np.random.default_rng(0))
    assert (labels[capped[1], 1] == 1).sum() == 2 and (labels[capped[1], 1] == -1).sum() == 4  # all there is
    ap = np.array([[0.5, 0.7], [0.7, 0.6], [0.6, 0.8]])  # samples x costs
    cost, stats = lowshot_stats(ap, [1.0, 10.0], None)  # mean 0.6 vs 0.7: C = 10
    assert cost == 10.0 and stats == pytest.approx({"mean": 70.0, "min": 60.0, "max": 80.0,
                                                    "std": float(np.std([60, 70, 80]))})
    assert lowshot_stats(ap, [1.0, 10.0], 1.0)[1]["mean"] == pytest.approx(60.0)


# ----------------------------------------------------------------------------- SVM protocols
def test_svm_per_tap_map_and_trained_beats_random(root, trained, tmp_path):
    taps = ["conv2", "conv3", "conv4"]
    ckpt = resolve_checkpoint(str(trained))
    grid = [0.1, 1.0, 10.0, 100.0]  # a shorter grid keeps the test fast
    mine = run("voc07-svm", root, tmp_path / "cache", ckpt, taps=taps, costs=grid)
    rand = run("voc07-svm", root, tmp_path / "cache", taps=taps, costs=grid)
    for out in (mine, rand):
        assert {(r.metric, r.tap) for r in out.metrics} == {(m, t) for t in taps
                                                            for m in ["mAP"] + [f"AP_{c}" for c in CLASSES]}
        assert all(r.split == "test" and 0 <= r.value <= 100 for r in out.metrics)
    gains = [values(mine, t)["mAP"] - values(rand, t)["mAP"] for t in taps]
    assert np.mean(gains) > 5 and min(gains) > 0, gains
    for t in taps:  # per-image SVM scores for the bootstrap give back each tap's mAP
        outcome = mine.outcomes[f"mAP/{t}"]
        assert outcome.statistic == "map-all-points"
        assert 100 * outcome.value(np.ones((1, len(outcome))))[0] == pytest.approx(values(mine, t)["mAP"], abs=1e-9)
    assert mine.extra["pooling"]["conv3"]["kind"] == "adaptive" and mine.extra["svm"]["cv_folds"] == 3
    # SVMs do not depend on the seed; the seeded BatchNorm re-estimation of the random init does
    assert get_protocol("voc07-svm").seed_dependent is False
    assert (mine.extra["seed_dependent"], rand.extra["seed_dependent"]) == (False, True)
    assert rand.extra["bn_recalibrate"]["ran"] is True

    # the features come from the cache: another C grid needs no extraction pass (only the
    # one-blank-image dry run that sizes the pooling)
    calls = []
    original = ckpt.backbone.forward
    ckpt.backbone.forward = lambda x, taps=None: calls.append(len(x)) or original(x, taps=taps)
    again = run("voc07-svm", root, tmp_path / "cache", ckpt, taps=["conv3"], costs=[1.0, 10.0])
    assert calls == [1] and "mAP" in values(again, "conv3")


def test_svm_resumes_after_an_interruption(root, tmp_path, monkeypatch):
    settings = {"taps": ["conv3"], "costs": [0.1, 1.0, 10.0], "jobs": 1}
    ckpt = resolve_checkpoint("random:alexnet,size=64")
    reference = run("voc07-svm", root, tmp_path / "fresh", ckpt, **settings)
    real, calls = svm.fit_svm, []

    def interrupted(*args, **kwargs):
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(svm, "fit_svm", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run("voc07-svm", root, tmp_path / "cache", ckpt, **settings)
    stored = list((tmp_path / "cache").rglob("svm/*/*.npz"))
    assert len(stored) == 5

    monkeypatch.setattr(svm, "fit_svm", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    calls.clear()
    resumed = run("voc07-svm", root, tmp_path / "cache", ckpt, **settings)
    assert len(calls) == 4 * 3 - 5  # only the fits the interruption lost
    assert resumed.extra["per_tap"]["conv3"]["fits_reused"] == 5
    assert values(resumed) == pytest.approx(values(reference))


def test_lowshot_rows_and_reuse(root, tmp_path):
    ckpt = resolve_checkpoint("random:alexnet,size=64")
    first = run("voc07-lowshot", root, tmp_path / "cache", ckpt)
    rows = values(first, "conv3")
    assert set(rows) == {f"mAP_k{k}_{s}" for k in (1, 2) for s in ("mean", "min", "max", "std")}
    for k in (1, 2):
        assert rows[f"mAP_k{k}_min"] <= rows[f"mAP_k{k}_mean"] <= rows[f"mAP_k{k}_max"]
        assert rows[f"mAP_k{k}_std"] >= 0
    assert first.extra["per_tap"]["conv3"]["fits_computed"] == 2 * 2 * 4 * 3  # k x samples x classes x C
    assert first.extra["min_positives_drawn"] == {"1": 1, "2": 2}
    # the low-shot training sets are drawn from the seed: the protocol's own True holds for every run
    assert get_protocol("voc07-lowshot").seed_dependent is True and "seed_dependent" not in first.extra
    again = run("voc07-lowshot", root, tmp_path / "cache", ckpt)
    assert again.extra["per_tap"]["conv3"]["fits_computed"] == 0 and values(again) == values(first)


# ----------------------------------------------------------------------------- errors and docs
@pytest.mark.parametrize("protocol", ["voc07-cls", "voc07-svm"])
@pytest.mark.parametrize("breakage,text", [
    ("ImageSets/Main/test.txt", "test.txt is missing"),
    ("ImageSets/Main/bird_test.txt", "bird_test.txt is missing"),
    ("JPEGImages", "JPEGImages is missing"),
    ("VOCdevkit", "no VOC2007 folder"),
])
def test_missing_devkit_pieces_are_one_line_exit_1(root, tmp_path, protocol, breakage, text):
    data = tmp_path / "data"
    shutil.copytree(root, data)
    victim = data / breakage if breakage == "VOCdevkit" else data / "VOCdevkit" / "VOC2007" / breakage
    shutil.rmtree(victim) if victim.is_dir() else victim.unlink()
    store = tmp_path / "r.db"
    result = _invoke("eval", "--protocol", protocol, "--checkpoint", "random:alexnet", "--data", data,
                     "--store", store, "--set", "image_size=64")
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and text in lines[0], lines[0]
    assert not store.exists() or sqlite3.connect(store).execute("select count(*) from results").fetchone()[0] == 0


def test_protocols_describe_settings_and_layout():
    for name, setting in (("voc07-cls", "train_bn_affine"), ("voc07-svm", "cv_folds"), ("voc07-lowshot", "samples")):
        described = _invoke("protocols", name)
        assert described.exit_code == 0 and setting in described.output and "VOCdevkit" in described.output


def test_defaults_equal_protocols_md():
    ft = get_protocol("voc07-cls").default_settings()
    assert (ft.mode, ft.lr, ft.momentum, ft.weight_decay, ft.batch_size, ft.iterations, ft.lr_step, ft.clip_norm,
            ft.crop_scale, ft.test_crops, ft.image_size, ft.train_split) == \
        ("fc6-8", 0.003, 0.9, 1e-6, 16, 80000, 5000, 10.0, [0.1, 0.5], "random10", 224, "trainval")
    svm = get_protocol("voc07-svm").default_settings()
    assert (svm.costs, svm.positive_weight, svm.max_iter, svm.tol, svm.cv_folds) == \
        ([0.01, 0.1, 1, 2, 5, 10, 15, 20, 50, 100, 1000], 2.0, 2000, 1e-4, 3)
    low = get_protocol("voc07-lowshot").default_settings()
    assert (low.ks, low.samples, low.cost) == ([1, 2, 4, 8, 16, 32, 64, 96], 5, None)


def test_svm_images_are_squashed_whole_as_vissl():
    """VISSL's VOC07 SVM configs: Resize 256 then Resize [224, 224] (no crop); low-shot: Resize [224, 224]."""
    from PIL import Image

    from dcbench.protocols.voc07_svm import voc_view

    img = Image.new("RGB", (300, 100), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 20, 100))  # a red stripe at the left edge: a centre crop drops it
    squash, squash_id = voc_view(64, "squash", True)
    crop, crop_id = voc_view(64, "crop", True)
    lowshot, lowshot_id = voc_view(64, "squash", False)
    assert squash(img).shape == crop(img).shape == lowshot(img).shape == (3, 64, 64)
    assert squash(img)[0, 32, 0] > 2 and crop(img)[0, 32, 0] < 0  # normalised red channel
    assert len({squash_id, crop_id, lowshot_id}) == 3
    for name in ("voc07-svm", "voc07-lowshot"):
        assert get_protocol(name).default_settings().resize == "squash"
    assert get_protocol("voc07-svm").squash_pre_resize and not get_protocol("voc07-lowshot").squash_pre_resize
