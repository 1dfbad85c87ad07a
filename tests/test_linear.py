"""Tests for the linear-probe protocols (protocols/linear.py, heads and training in dcbench/probe.py)
on small synthetic ImageFolders, run through the runner (dcbench.evaluate.run) as the CLI does."""
from __future__ import annotations

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch
from torch import nn

import dcbench.pooling as pooling
import dcbench.probe as probe
import dcbench.protocols.linear as linear
from dcbench import evaluate
from dcbench.checkpoint import resolve_checkpoint
from dcbench.data import DataError
from dcbench.data.synthetic import make_image_folder
from dcbench.errors import UsageError
from dcbench.features import tensor_digests
from dcbench.models import build_backbone
from dcbench.settings import apply_settings
from dcbench.protocol import EvalContext, ProtocolError, get_protocol
from dcbench.results import outcome_key

FAST = {"image_size": 64, "batch_size": 16, "workers": 0}
N_CLASSES = 4




@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("lin") / "data", n_classes=N_CLASSES, per_class=12,
                             image_size=32, corrupt=1)


def settings(name: str = "linear", **overrides):
    proto = get_protocol(name)
    return proto, apply_settings(proto.default_settings(), {**FAST, **overrides})


def run(root, tmp_path, name: str = "linear", ckpt=None, **overrides):
    proto, s = settings(name, **overrides)
    proto.check_data(root, s)
    ckpt = ckpt or resolve_checkpoint("random:alexnet,size=64")
    return evaluate.run(evaluate.Plan(proto, s, root), ckpt, EvalContext(cache_dir=tmp_path / "cache"))


def by_key(out):
    return {(r.metric, r.tap, r.selection): r for r in out.metrics}


def check_outcomes(out, scored: int) -> None:
    """One 0/1 array per metric row (final and best epoch), over the scored val images, whose mean is the row."""
    assert set(out.outcomes) == {outcome_key(r.metric, r.tap, r.selection) for r in out.metrics}
    for row in out.metrics:
        outcome = out.outcomes[outcome_key(row.metric, row.tap, row.selection)]
        assert outcome.shape == (scored,) and set(np.unique(outcome)) <= {0, 1}
        assert 100.0 * outcome.mean() == pytest.approx(row.value, abs=1e-9)


# ----------------------------------------------------------------------------- learning, both modes
def test_cached_deepcluster_learns(root, tmp_path):
    out = run(root, tmp_path, cached=True, epochs=6)
    rows = by_key(out)
    taps = ["conv1", "conv2", "conv3", "conv4", "conv5"]
    assert len(out.metrics) == len(taps) * 2 * 2
    assert set(rows) == {(m, t, s) for m in ("top1", "top5") for t in taps for s in ("final", "best")}
    assert all(r.split == "val" and r.seed == 0 for r in out.metrics)
    chance = 100 / N_CLASSES
    assert max(rows[("top1", t, "final")].value for t in taps) >= chance + 20
    for t in taps:
        assert rows[("top1", t, "best")].value >= rows[("top1", t, "final")].value
        assert rows[("top5", t, "final")].value == 100.0  # 4 classes: top-5 always hits
    extra = out.extra
    assert extra["mode"] == "cached" and extra["crops"] == "center" and extra["crops_note"]
    assert extra["epochs"] == 6 and extra["weight_decay"] == 1e-7 and len(extra["history_top1"]) == 6
    assert extra["pooling"]["conv1"] == {"kind": "adaptive", "map": [15, 15], "grid": [10, 10], "dim": 9600}
    assert extra["pooling"]["conv5"]["grid"] == [3, 3]  # 6x6 capped at the 3x3 map
    assert extra["bn_recalibrate"]["ran"] is True
    assert extra["skipped_images"] == {"train": 1, "val": 1}
    assert "best" in extra["selection"] and len(out.data["fingerprint"]) == 16
    check_outcomes(out, scored=4 * 12)  # the corrupt val image (a 49th file) is not scored
    for row in out.metrics:
        row.validate()  # what the runner stores
    json.dumps(extra)  # the result record is JSON


def test_augmented_deepcluster_learns(root, tmp_path):
    out = run(root, tmp_path, epochs=6, crops="center", taps=["conv2", "conv3"])
    rows = by_key(out)
    assert max(rows[("top1", t, "best")].value for t in ("conv2", "conv3")) >= 100 / N_CLASSES + 20
    assert out.extra["mode"] == "augmented" and out.extra["crops"] == "center"
    assert set(out.extra["pooling"]) == {"conv2", "conv3"}


def test_augmented_vissl_tencrop(root, tmp_path):
    out = run(root, tmp_path, preset="vissl", epochs=1, taps=["conv1", "conv4"], crops="tencrop")
    extra = out.extra
    assert extra["crops"] == "tencrop" and extra["mode"] == "augmented"
    assert extra["train_crops"] == "Resize, RandomCrop, flip" and extra["head_init"] == "torch default"
    assert extra["head"] == "AvgPool -> BatchNorm2d -> Linear"
    assert extra["weight_decay"] == 5e-4 and extra["lr_steps"] == []  # no step before the only epoch ends
    assert {r.tap for r in out.metrics} == {"conv1", "conv4"}
    for r in out.metrics:
        assert 0 <= r.value <= 100
    check_outcomes(out, scored=4 * 12)  # ten crops, one outcome per image


def test_cached_vissl_learns_and_reuses_cache(root, tmp_path):
    ckpt = resolve_checkpoint("random:alexnet,size=64")
    first = run(root, tmp_path, ckpt=ckpt, preset="vissl", cached=True, epochs=5, bn_recalibrate="off")
    assert max(r.value for r in first.metrics if r.metric == "top1") >= 100 / N_CLASSES + 20
    calls = []
    original = ckpt.backbone.forward
    ckpt.backbone.forward = lambda x, taps=None: calls.append(taps) or original(x, taps=taps)
    second = run(root, tmp_path, ckpt=ckpt, preset="vissl", cached=True, epochs=5, bn_recalibrate="off")
    assert len(calls) == 1  # only the 1-image dry run that sizes the pooling: features come from the cache
    assert [r.value for r in first.metrics] == [r.value for r in second.metrics]


# ----------------------------------------------------------------------------- frozen backbone
def test_frozen_check_fires_when_backbone_changes(root, tmp_path, monkeypatch):
    """The protocol no longer checks itself: the run context / runner catch a probe that lets
    BatchNorm buffers move, name the protocol, and store nothing."""
    assert not hasattr(linear, "assert_unchanged") and not hasattr(linear, "tensor_digests")
    original = probe.forward_pooled

    def leaky(backbone, images, taps, pools):
        backbone.train()  # a bug that lets BN update its running stats during probing
        try:
            return original(backbone, images, taps, pools)
        finally:
            backbone.eval()

    monkeypatch.setattr(probe, "forward_pooled", leaky)
    with pytest.raises(ProtocolError, match="protocol linear: .*frozen backbone.*changed.*running_mean"):
        run(root, tmp_path, epochs=1, crops="center", taps=["conv1"], bn_recalibrate="off")


def test_checkpoint_untouched_and_bn_recalibrated_copy(root, tmp_path, monkeypatch):
    import dcbench.features as features
    copies = []
    original_recal = features.recalibrate_bn

    def spy(*args, **kwargs):
        clone, info = original_recal(*args, **kwargs)
        copies.append(clone)
        return clone, info

    monkeypatch.setattr(features, "recalibrate_bn", spy)
    ckpt = resolve_checkpoint("random:alexnet,size=64")
    before = tensor_digests(ckpt.backbone)
    out = run(root, tmp_path, ckpt=ckpt, cached=True, epochs=1, taps=["conv2"])
    assert out.extra["bn_recalibrate"]["ran"] and len(copies) == 1
    bn_orig = ckpt.backbone.features[5]
    bn_copy = copies[0].features[5]
    assert isinstance(bn_orig, nn.BatchNorm2d)
    assert not torch.equal(bn_orig.running_mean, bn_copy.running_mean)  # the copy was re-estimated
    assert tensor_digests(ckpt.backbone) == before  # the checkpoint object never changes

    off = run(root, tmp_path, ckpt=ckpt, cached=True, epochs=1, taps=["conv2"], bn_recalibrate="off")
    assert off.extra["bn_recalibrate"] == {"ran": False, "setting": "off", "reason": "turned off"}
    trained = dataclasses.replace(ckpt, format="dcbench")
    auto = run(root, tmp_path, ckpt=trained, cached=True, epochs=1, taps=["conv2"])
    assert auto.extra["bn_recalibrate"]["ran"] is False and len(copies) == 1


# ----------------------------------------------------------------------------- settings
def test_defaults_follow_protocols_md():
    s = get_protocol("linear").default_settings()
    assert (s.preset, s.image_size, s.batch_size, s.lr, s.momentum, s.crops, s.cached, s.seed, s.head_init) == \
        ("deepcluster", 224, 256, None, 0.9, None, False, 0, None)
    f = get_protocol("linear").filled(s)  # None: the preset's value
    assert (f.lr, f.head_init, f.interpolation) == (0.01, "torch", "bilinear")
    for preset, crops, center_crop in (("deepcluster", "tencrop", True), ("vissl", "center", False)):
        proto, s = settings("linear", preset=preset)
        filled = proto.filled(s)
        assert (filled.crops, filled.train_center_crop) == (crops, center_crop), preset
    bb = build_backbone("alexnet", input_size=64)
    cases = [("linear", "deepcluster", 90, 1e-7, []), ("linear", "vissl", 28, 5e-4, [8, 16, 24]),
             ("imagenet-linear", "vissl", 28, 5e-4, [8, 16, 24]), ("places-linear", "vissl", 14, 5e-4, [4, 8, 12]),
             ("places-linear", "deepcluster", 90, 1e-7, [])]
    for name, preset, epochs, wd, steps in cases:
        proto, s = settings(name, preset=preset)
        r = proto.resolve(s, bb)
        assert (r.epochs, r.weight_decay, r.steps) == (epochs, wd, steps), name


def test_unknown_tap_names_available_taps(root, tmp_path):
    with pytest.raises(UsageError, match=r"unknown tap 'conv9' for alexnet; available: conv1, conv2, conv3, "
                                         r"conv4, conv5, fc6, fc7"):
        run(root, tmp_path, taps=["conv9"])


@pytest.mark.parametrize("overrides, message", [
    ({"preset": "simclr"}, "choose one of deepcluster, vissl"),
    ({"epochs": 0}, "epochs"),
    ({"lr": -1}, "lr"),
    ({"momentum": 1.5}, "momentum"),
    ({"crops": "fivecrop"}, "tencrop, center"),
    ({"bn_recalibrate": "maybe"}, "auto, on, off"),
    ({"taps": []}, "taps is empty"),
    ({"learning_rate": 0.1}, "unknown setting 'learning_rate'"),
])
def test_settings_validation(overrides, message):
    proto = get_protocol("linear")
    with pytest.raises(UsageError, match=message):
        apply_settings(proto.default_settings(), overrides)


def test_fc_tap_at_wrong_size_is_a_usage_error(root, tmp_path):
    ckpt = resolve_checkpoint("random:alexnet,size=224")
    with pytest.raises(UsageError, match="image_size=64"):
        run(root, tmp_path, ckpt=ckpt, taps=["fc6"])


# ----------------------------------------------------------------------------- pooling tables
def test_alexnet_tables_at_224():
    bb = build_backbone("alexnet", input_size=224)
    for preset, kernels in (("deepcluster", [6, 4, 3, 3, 2]), ("vissl", [19, 12, 9, 9, 8])):
        plans = pooling.probe_pooling(bb, bb.conv_tap_names, 224, preset)
        assert [p.dim for p in plans.values()] == [9600, 9216, 9600, 9600, 9216]
        assert [p.kernel for p in plans.values()] == kernels
        assert all(p.kind == "table" for p in plans.values())
        x = torch.zeros(1, 96, 55, 55)
        assert plans["conv1"].module()(x).flatten(1).shape[1] == 9600


def test_resnet_and_other_taps():
    bb = build_backbone("tv:resnet18", input_size=224)
    plans = pooling.probe_pooling(bb, bb.conv_tap_names, 224, "vissl")
    assert [p.grid[0] for p in plans.values()] == [12, 6, 4, 3, 2]
    assert {p.table for p in plans.values()} == {"resnet50"}
    small = pooling.probe_pooling(bb, ["res4", "res5"], 64)
    assert [(p.kind, p.grid) for p in small.values()] == [("adaptive", (3, 3)), ("adaptive", (2, 2))]
    vgg = pooling.plan_pool(None, "deepcluster", "conv5_3", (512, 14, 14))
    assert vgg.grid == (4, 4) and vgg.dim == 8192  # ~9k dims
    assert pooling.plan_pool(None, "deepcluster", "conv1_1", (64, 224, 224)).dim == 9216
    assert pooling.plan_pool(None, "deepcluster", "fc6", (4096,)).kind == "none"


# ----------------------------------------------------------------------------- lr schedules
def test_deepcluster_lr_schedule_values():
    assert linear.deepcluster_lr(0.01, 1e-7, 0) == 0.01
    assert linear.deepcluster_lr(0.1, 0.1, 100) == pytest.approx(0.1 / math.sqrt(2))  # 1 + 0.1*0.1*100 = 2
    assert linear.deepcluster_lr(0.01, 1e-7, 450_450) == pytest.approx(0.01 / math.sqrt(1.00045045))
    bb = build_backbone("alexnet", input_size=64)
    plans = pooling.probe_pooling(bb, ["conv5"], 64)
    probes = probe.ProbeSet(plans, 4, linear.probe_optim("deepcluster", 0.1, 0.1, 0.9, []), "cpu")
    probes.set_lr(epoch=3, iteration=300)
    assert probes.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)  # 0.1 / sqrt(1 + 3)


def test_vissl_lr_schedule_values():
    assert linear.vissl_steps(28) == [8, 16, 24]
    assert linear.vissl_steps(14) == [4, 8, 12]
    assert linear.vissl_steps(90) == [26, 51, 77]
    assert [linear.vissl_lr(0.01, e, [8, 16, 24]) for e in (0, 7, 8, 16, 27)] == \
        pytest.approx([0.01, 0.01, 0.001, 0.0001, 0.00001])
    bb = build_backbone("alexnet", input_size=64)
    probes = probe.ProbeSet(pooling.probe_pooling(bb, ["conv1"], 64, "vissl"), 4,
                            linear.probe_optim("vissl", 0.01, 5e-4, 0.9, [8, 16, 24]), "cpu")
    assert [g["weight_decay"] for g in probes.optimizer.param_groups] == [5e-4, 0.0]  # no wd on BN
    probes.set_lr(epoch=9, iteration=0)
    assert all(g["lr"] == pytest.approx(0.001) for g in probes.optimizer.param_groups)


def test_vissl_steps_never_repeat_at_small_epoch_counts():
    """Issue 12 item 9: 2 epochs gave [1, 1, 2] (lr x0.01 after epoch 1, and a step that never
    applies). Steps are now distinct and within [1, epochs - 1]; the standard schedules stay."""
    assert [linear.vissl_steps(e) for e in (1, 2, 3, 4)] == [[], [1], [1, 2], [1, 2, 3]]
    for epochs in range(1, 200):
        steps = linear.vissl_steps(epochs)
        assert steps == sorted(set(steps)) and all(1 <= s < epochs for s in steps), epochs
    assert [linear.vissl_lr(0.01, e, linear.vissl_steps(2)) for e in (0, 1)] == pytest.approx([0.01, 0.001])


# ----------------------------------------------------------------------------- check_data
def _copy(root, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(root, target)
    return target


def test_check_data_accepts_the_fixture(root):
    proto, s = settings()
    proto.check_data(root, s)


@pytest.mark.parametrize("damage, message", [
    (lambda r: shutil.rmtree(r / "train"), r"train is missing \(found: val/\)"),
    (lambda r: shutil.rmtree(r / "val"), r"val is missing \(found: train/\)"),
    (lambda r: [shutil.rmtree(d) for d in (r / "train").iterdir()], "has no class folders"),
    (lambda r: shutil.rmtree(r / "val" / "class_03"), r"1 only in train/ \(class_03\)"),
    (lambda r: (r / "val" / "class_03").rename(r / "val" / "dog"), "only in val/ \\(dog\\)"),
])
def test_check_data_errors(root, tmp_path, damage, message):
    copy = _copy(root, tmp_path)
    damage(copy)
    proto, s = settings()
    with pytest.raises(DataError, match=message) as excinfo:
        proto.check_data(copy, s)
    assert "\n" not in str(excinfo.value)


def test_check_data_flat_val_and_class_counts(root, tmp_path):
    copy = _copy(root, tmp_path)
    flat = copy / "val"
    for image in list(flat.rglob("*.jpg")):
        image.rename(flat / f"{image.parent.name}_{image.name}")
    for d in [d for d in flat.iterdir() if d.is_dir()]:
        shutil.rmtree(d)
    proto, s = settings()
    with pytest.raises(DataError, match="holds images but no class folders.*valprep"):
        proto.check_data(copy, s)
    proto, s = settings("imagenet-linear")
    with pytest.raises(DataError, match="expects the 1000 ImageNet classes.*has 4 class folders.*--protocol linear"):
        proto.check_data(root, s)
    proto, s = settings("places-linear")
    with pytest.raises(DataError, match="205 Places205 classes"):
        proto.check_data(root, s)
    with pytest.raises(DataError, match="not a folder"):
        proto.check_data(tmp_path / "nowhere", s)


def test_check_data_original_places_layout(tmp_path):
    (tmp_path / "images" / "a" / "abbey").mkdir(parents=True)
    (tmp_path / "trainvalsplit_places205").mkdir()
    proto, s = settings("places-linear")
    with pytest.raises(DataError, match="original Places205 layout"):
        proto.check_data(tmp_path, s)


def test_joint_run_equals_separate_runs(root, tmp_path):
    """Sharing the forward pass changes nothing: each head has its own seed and its own update."""
    joint = by_key(run(root, tmp_path, cached=True, epochs=2, taps=["conv2", "conv4"], bn_recalibrate="off"))
    alone = by_key(run(root, tmp_path, cached=True, epochs=2, taps=["conv4"], bn_recalibrate="off"))
    for key, row in alone.items():
        assert joint[key].value == pytest.approx(row.value)


@pytest.mark.parametrize("shape, grid", [((3, 96, 15, 15), (10, 10)), ((2, 256, 7, 7), (6, 6)),
                                         ((2, 8, 3, 3), (3, 3)), ((1, 4, 40, 40), (5, 5)), ((2, 3, 9, 7), (4, 3))])
def test_adaptive_grid_pool_equals_torch(shape, grid):
    x = torch.randn(*shape)
    torch.testing.assert_close(pooling.AdaptiveGridPool(grid)(x), nn.AdaptiveAvgPool2d(grid)(x))


def test_tencrop_averages_softmax_not_logits():
    """Crops (10,0,0), (0,2,0), (0,2,0): mean logits pick class 0, mean softmax picks class 1
    (softmax rows ~(1,0,0), (0.107,0.787,0.107) twice -> means 0.405 vs 0.525)."""
    plan = pooling.plan_pool(None, "deepcluster", "fc", (3,))
    probes = probe.ProbeSet({"fc": plan}, 3, linear.probe_optim("deepcluster", 0.01, 0.0, 0.9, []), "cpu")
    with torch.no_grad():
        probes.heads[0].linear.weight.copy_(torch.eye(3))
        probes.heads[0].linear.bias.zero_()
    crops = torch.tensor([[10.0, 0, 0], [0, 2, 0], [0, 2, 0]])
    hits = probes.hits({"fc": crops}, torch.tensor([1]), n_crops=3)
    assert hits["fc"].tolist() == [1, 1]
    assert probes.hits({"fc": crops.mean(0, keepdim=True)}, torch.tensor([1]))["fc"].tolist() == [0, 1]


# ----------------------------------------------------------------------------- issue 13: presets = sources
def test_vissl_preset_follows_vissl_and_deepcluster_its_code(root, tmp_path):
    """vissl: one centre crop at test, no CenterCrop(256) in training, torch's default head init;
    deepcluster: TenCrop test, Resize + CenterCrop + RandomCrop training."""
    vissl = run(root, tmp_path, preset="vissl", epochs=1, taps=["conv3"]).extra
    assert (vissl["crops"], vissl["train_crops"], vissl["head_init"]) == \
        ("center", "Resize, RandomCrop, flip", "torch default")
    dc = run(root, tmp_path, epochs=1, taps=["conv3"]).extra
    assert (dc["crops"], dc["train_crops"]) == ("tencrop", "Resize, CenterCrop, RandomCrop, flip")


def test_head_init_default_is_torch_and_normal_is_a_choice():
    from dcbench.pooling import PoolPlan
    plan = PoolPlan("t", "none", None, None, None, None, 512, (1, 1), (1, 1))
    torch_default = probe.seeded_head(plan, 10, linear.probe_optim("vissl", 0.01, 5e-4, 0.9, [8]), 0)
    normal = probe.seeded_head(plan, 10, linear.probe_optim("vissl", 0.01, 5e-4, 0.9, [8], "normal"), 0)
    # torch's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) weights and bias; normal: N(0, 0.01), bias 0
    assert torch_default.linear.weight.abs().max() <= 1 / math.sqrt(512) and torch_default.linear.bias.abs().sum() > 0
    assert normal.linear.bias.abs().sum() == 0 and normal.linear.weight.std().item() == pytest.approx(0.01, rel=0.1)


def test_vissl_default_taps_add_the_resnet_avgpool():
    bb = build_backbone("tv:resnet18", input_size=64)
    proto, s = settings("linear", preset="vissl", image_size=64)
    r = proto.resolve(s, bb, 3)
    assert r.taps == ["conv1", "res2", "res3", "res4", "res5", "avgpool"]
    assert r.plans["avgpool"].kind == "none" and r.plans["avgpool"].dim == 512
    assert proto.resolve(settings("linear", image_size=64)[1], bb, 3).taps[-1] == "res5"  # deepcluster: stages only
    assert proto.resolve(settings("linear", preset="vissl", image_size=64)[1],
                         build_backbone("alexnet", input_size=64), 3).taps[-1] == "conv5"


def test_card_and_user_deviations_follow_the_preset():
    proto = get_protocol("linear")
    vissl = proto.card(apply_settings(proto.default_settings(), {"preset": "vissl"})).to_dict()
    assert vissl["settings"]["crops"] == "center" and vissl["settings"]["epochs"] == 28
    assert any("CenterCrop 224" in s["source"] for s in vissl["sources"] if s["setting"] == "crops")
    same = apply_settings(proto.default_settings(), {"preset": "vissl", "crops": "center"})
    assert [d for d in proto.deviations(same) if d.source == "user"] == []
    moved = apply_settings(proto.default_settings(), {"crops": "center"})
    assert [d.what for d in proto.deviations(moved) if d.source == "user"] == ["crops=center"]


def test_augmented_probe_decodes_each_image_once_with_the_same_numbers(root, tmp_path):
    """decode_cache_gb: the decoded train and val images stay in shared memory across epochs, filled
    by the loader workers; the numbers equal those of a run that decodes every epoch."""
    common = dict(epochs=2, crops="center", taps=["conv2"], workers=2)
    kept = run(root, tmp_path / "kept", **common)
    decoded = run(root, tmp_path / "decoded", decode_cache_gb=0, **common)
    # 4 classes x 12 (+ 1 corrupt) files per split: the corrupt ones are never stored
    assert kept.extra["decoded_in_memory"] == {"train": 4 * 12, "val": 4 * 12}
    assert decoded.extra["decoded_in_memory"] == {"train": None, "val": None}
    assert [(r.metric, r.tap, r.selection, r.value) for r in kept.metrics] == \
        [(r.metric, r.tap, r.selection, r.value) for r in decoded.metrics]
    with pytest.raises(UsageError, match="decode_cache_gb"):
        settings(decode_cache_gb=-1)
