"""The VOC detection protocol (protocols/voc_det.py) and its engine (dcbench/detection/, dcbench/finetune.py): a short
fine-tune through the CLI that learns, the fc6-8 self-check, the C4 design on a ResNet, the VOC
AP against hand-computed detections, records and flips, presets, and the user errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dcbench.checkpoint import resolve_checkpoint
from dcbench.cli import main
from dcbench.data import DataError
from dcbench.data.synthetic_voc import make_voc
from dcbench.data.voc import VOC_CLASSES, VOCAnnotation, VOCObject, load_voc_split
from dcbench.detection import (DetectionDataset, Detections, DetectorSpec, SolverSpec, build_detector,
                               evaluate_detections, lr_factor, records_from_annotations)
from dcbench.detection.detectron2_backend import detectron2_available
from dcbench.errors import UsageError
from dcbench.features import tensor_digests
from dcbench.settings import apply_settings
from dcbench.protocol import EvalContext, get_protocol
from dcbench.detection import finetune as det_finetune
from dcbench.protocols.voc_det import VocDetSettings, resolve

CLASSES = VOC_CLASSES[:4]
ALEXNET = "random:alexnet,size=96"  # pool5 grid 2: RoI 2x2, fc6 of 256*2*2 inputs
#: a small learnable setup: 192 px short side (stride-16 conv5 maps of 12 x 14), few RoIs and proposals
FAST = {"iterations": 60, "batch_size": 4, "lr": 0.05, "lr_steps": [48], "min_size": [192], "test_size": 192,
        "max_size": 320, "anchor_sizes": [64, 128], "rois_per_image": 16, "proposals_train": 100,
        "proposals_test": 50, "mode": "all", "workers": 0}
#: a ResNet-18 C4 smoke setup (the moco preset would read VOC2012, absent from the fixture)
RESNET = {"iterations": 2, "batch_size": 2, "min_size": [96], "test_size": 96, "max_size": 160,
          "anchor_sizes": [32, 64], "rois_per_image": 8, "proposals_train": 20, "proposals_test": 10,
          "train_sets": ["2007:trainval"], "precise_bn": 2, "workers": 0}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_voc(tmp_path_factory.mktemp("voc") / "data", classes=CLASSES)


def run(root, ckpt_spec=ALEXNET, **overrides):
    proto = get_protocol("voc-det")
    settings = apply_settings(proto.default_settings(), {**FAST, **overrides})
    proto.check_data(root, settings)
    return proto.run(resolve_checkpoint(ckpt_spec), settings, root, EvalContext())


def values(output):
    return {r.metric: r.value for r in output.metrics}


def _sets(settings):
    out = []
    for key, value in settings.items():
        text = "[" + ",".join(map(str, value)) + "]" if isinstance(value, list) else str(value)
        out += ["--set", f"{key}={text}"]
    return out


# ----------------------------------------------------------------------------- end to end
def test_cli_short_run_learns(root, tmp_path):
    """``dcbench eval --protocol voc-det ... --set iterations=N --json``: AP50/AP75/AP and
    per-class AP, far above the untrained head of the same checkpoint."""
    args = ["eval", "--protocol", "voc-det", "--checkpoint", ALEXNET, "--data", str(root), "--json",
            "--store", str(tmp_path / "results.db"), *_sets(FAST)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    record = json.loads(result.output.strip().splitlines()[-1])
    metrics = {m["metric"]: m for m in record["metrics"]}
    assert {"AP50", "AP75", "AP"} | {f"AP50_{c}" for c in CLASSES} <= set(metrics)
    assert all(m["tap"] == "all" and m["split"] == "test" and m["seed"] == 0 for m in metrics.values())
    assert metrics["AP50"]["value"] >= metrics["AP"]["value"] >= 0
    extra = record["extra"]
    assert extra["preset"] == "deepcluster" and extra["backend"] == "torchvision" and extra["mode"] == "all"
    assert extra["recipe"]["iterations"] == 60 and extra["recipe"]["min_size"] == [192]
    assert extra["recipe"]["train_sets"] == ["2007:trainval"] and extra["test_set"] == "2007:test"
    assert extra["trunk_check"]["passed"] and extra["trunk_check"]["changed"].get("conv", 0) > 0
    assert extra["detector"]["roi_size"] == 2 and extra["detector"]["feature_stride"] == 16
    assert set(extra["ap_per_class"]) == set(CLASSES)
    assert record["settings"]["iterations"] == 60 and record["settings"]["backend"] == "torchvision"
    assert "torchvision" in record["versions"]

    untrained = values(run(root, iterations=0))["AP50"]
    trained = metrics["AP50"]["value"]
    assert trained > max(10.0, 4 * untrained), (trained, untrained)


def test_fc68_keeps_the_convs(root):
    ckpt = resolve_checkpoint("random:alexnet,size=96,seed=3")
    before = tensor_digests(ckpt.backbone)
    proto = get_protocol("voc-det")
    settings = apply_settings(proto.default_settings(), {**FAST, "iterations": 3, "mode": "fc6-8"})
    out = proto.run(ckpt, settings, root, EvalContext())
    check = out.extra["trunk_check"]
    assert check["passed"] and check["changed"] == {} and check["rule"].startswith("fc6-8")
    assert out.extra["recipe"]["bn"] == "frozen"
    assert tensor_digests(ckpt.backbone) == before  # the checkpoint itself is never touched
    assert {r.tap for r in out.metrics} == {"fc6-8"}


def test_fc68_self_check_catches_a_trained_conv(root, monkeypatch):
    """If the freezing failed, the protocol refuses its own result."""
    original = det_finetune.set_trainable

    def leaky(det, mode, bn):
        allowed = original(det, mode, bn)
        det.trunk.body[0].weight.requires_grad_(True)  # conv1 trains although fc6-8 froze it
        return allowed

    monkeypatch.setattr(det_finetune, "set_trainable", leaky)
    with pytest.raises(RuntimeError, match="fc6-8 fine-tuning changed"):
        run(root, iterations=2, mode="fc6-8")


def test_resnet_c4(root):
    out = run(root, "tv:resnet18", **RESNET, mode="fc6-8")
    extra = out.extra
    assert extra["preset"] == "moco" and "C4" in extra["detector"]["design"]
    assert extra["detector"]["roi_size"] == 14 and extra["detector"]["box_head_features"] == 512
    assert extra["detector_spec"]["extra_norm"] and extra["detector_spec"]["roi_pool"] == "align"
    assert extra["trunk_check"]["changed"] == {}  # stem..res4 frozen; res5 (the RoI head) trains
    assert extra["precise_bn"]["ran"] and extra["precise_bn"]["iterations"] == 2
    assert {"AP50", "AP75", "AP"} <= set(values(out))


# ----------------------------------------------------------------------------- model
def test_alexnet_head_is_the_checkpoints_fc6_fc7():
    for size, grid in ((96, 2), (224, 6)):
        backbone = resolve_checkpoint(f"random:alexnet,size={size}").backbone
        det = build_detector(backbone, 3, DetectorSpec(min_size=(96,), test_size=96))
        assert det.design["roi_size"] == grid == backbone.grid
        fc6 = det.box_head.classifier[1]
        assert fc6.in_features == 256 * grid * grid
        torch.testing.assert_close(fc6.weight, backbone.classifier[1].weight)
        assert fc6.weight.data_ptr() != backbone.classifier[1].weight.data_ptr()  # a copy
        assert det.model.roi_heads.box_predictor.cls_score.out_features == 4


def test_unsupported_backbone(root):
    with pytest.raises(UsageError, match="no detector design"):
        run(root, "tv:mobilenet_v3_small", iterations=1)


def test_lr_schedule():
    solver = SolverSpec(lr=0.02, steps=(18000, 22000), warmup_iters=100, warmup_factor=0.001)
    assert lr_factor(0, solver) == pytest.approx(0.001)
    assert lr_factor(50, solver) == pytest.approx(0.001 * 0.5 + 0.5)
    assert lr_factor(100, solver) == 1.0
    assert lr_factor(18000, solver) == pytest.approx(0.1)
    assert lr_factor(23999, solver) == pytest.approx(0.01)


# ----------------------------------------------------------------------------- data
def test_records_and_flip(root):
    split = load_voc_split(root, "trainval", classes=None)
    anns = split.annotations()
    with_difficult = records_from_annotations(split, anns, CLASSES, keep_difficult=True)
    without = records_from_annotations(split, anns, CLASSES, keep_difficult=False)
    i = next(k for k, a in enumerate(anns) if any(o.difficult for o in a.objects))
    assert len(with_difficult[i].boxes) == len(anns[i].objects) > len(without[i].boxes)
    obj = anns[i].objects[0]
    np.testing.assert_allclose(with_difficult[i].boxes[0], [obj.bbox[0] - 1, obj.bbox[1] - 1, obj.bbox[2], obj.bbox[3]])
    assert with_difficult[i].labels[0] == CLASSES.index(obj.name) + 1
    ds = DetectionDataset([with_difficult[i]], flip=True)
    seen = set()
    for seed in range(8):
        torch.manual_seed(seed)
        image, target, _ = ds[0]
        box = target["boxes"][0].numpy()
        flipped = not np.allclose(box, with_difficult[i].boxes[0])
        if flipped:
            w = image.shape[-1]
            np.testing.assert_allclose(box, [w - obj.bbox[2], obj.bbox[1] - 1, w - obj.bbox[0] + 1, obj.bbox[3]])
        seen.add(flipped)
    assert seen == {True, False}


# ----------------------------------------------------------------------------- evaluation
def _ann(image_id, objects):
    return VOCAnnotation(image_id, f"{image_id}.jpg", 100, 100, 3, False,
                         tuple(VOCObject(n, b, d, False) for n, b, d in objects))


def _pred(devkit_box):
    x0, y0, x1, y1 = devkit_box
    return [x0 - 1, y0 - 1, x1, y1]  # the detector's 0-based coordinates


def test_ap_against_hand_computed_detections():
    anns = [_ann("a", [("cat", (11, 11, 50, 50), False), ("cat", (61, 61, 90, 90), True),
                       ("dog", (6, 6, 30, 30), False)]),
            _ann("b", [("cat", (21, 21, 60, 60), False)])]
    classes = ["cat", "dog", "bird"]
    dets = [Detections(np.array([_pred((11, 11, 50, 50)), _pred((11, 11, 50, 50)), _pred((61, 61, 90, 90)),
                                 _pred((6, 6, 30, 30))], dtype=float),
                       np.array([0.9, 0.8, 0.7, 0.3]), np.array([0, 0, 0, 1])),
            Detections(np.array([_pred((29, 21, 68, 60)), _pred((70, 70, 99, 99))], dtype=float),  # IoU 2/3; a miss
                       np.array([0.6, 0.5]), np.array([0, 0]))]
    ap = evaluate_detections(dets, anns, classes, use_07_metric=True)
    # cat, ranked: TP (0.9), FP duplicate (0.8), [difficult match ignored (0.7)], TP at IoU<2/3 (0.6), FP (0.5)
    # recall .5 .5 1 1, precision 1 .5 2/3 .5 -> 11-point: 6 x 1 + 5 x 2/3
    cat50 = (6 + 5 * 2 / 3) / 11
    cat75 = 6 / 11  # the 0.6 detection is a FP: recall stops at .5
    assert ap.class_ap("cat", 0.5) == pytest.approx(cat50)
    assert ap.class_ap("cat", 0.75) == pytest.approx(cat75)
    # 1.0000000000000002: the reference's sum of 11 times 1/11 (py-faster-rcnn's voc_ap)
    assert ap.class_ap("dog", 0.5) == pytest.approx(1.0, abs=1e-12) and np.isnan(ap.class_ap("bird", 0.5))
    assert ap.ap50 == pytest.approx((cat50 + 1) / 2)
    assert ap.ap75 == pytest.approx((cat75 + 1) / 2)
    # thresholds 0.50..0.65 see the IoU-2/3 match, 0.70..0.95 do not
    assert ap.class_ap("cat") == pytest.approx((4 * cat50 + 6 * cat75) / 10)
    assert ap.ap == pytest.approx(((4 * cat50 + 6 * cat75) / 10 + 1) / 2)
    assert ap.n_ground_truth == {"cat": 2, "dog": 1, "bird": 0}
    # all-points: area under the envelope, .5 x 1 + .5 x 2/3
    assert evaluate_detections(dets, anns, classes, use_07_metric=False).class_ap("cat", 0.5) == pytest.approx(5 / 6)
    # an unreadable test image (None) keeps its objects: recall of dog drops to 0
    assert evaluate_detections([None, dets[1]], anns, classes).class_ap("dog", 0.5) == 0.0


# ----------------------------------------------------------------------------- settings and errors
def test_presets_equal_protocols_md():
    alexnet = resolve_checkpoint("random:alexnet,size=96").backbone
    paper = resolve(VocDetSettings(), alexnet)
    assert paper.preset == "deepcluster" and paper.mode == "fc6-8" and paper.train_sets == ["2007:trainval"]
    assert paper.test_set == "2007:test" and paper.roi_pool == "pool"
    moco = resolve(VocDetSettings(preset="moco"), None)
    assert (moco.iterations, moco.batch_size, moco.lr, moco.lr_steps, moco.warmup_iters) == \
        (24000, 16, 0.02, [18000, 22000], 100)
    assert moco.min_size == list(range(480, 801, 32)) and moco.test_size == 800 and moco.mode == "all"
    assert moco.train_sets == ["2007:trainval", "2012:trainval"] and moco.test_set == "2007:test"
    assert moco.bn == "train" and moco.ap_rule == "11-point" and moco.backend == "torchvision"
    assert resolve(VocDetSettings(iterations=7, bn="frozen"), alexnet).values["precise_bn"] == 0
    assert resolve(VocDetSettings(iterations=7), alexnet).iterations == 7
    # box losses: detectron2's L1 for moco; py-faster-rcnn's RPN (sigma 3) and Fast R-CNN's head (sigma 1)
    assert (moco.rpn_loss_beta, moco.box_loss_beta) == (0.0, 0.0)
    assert (paper.rpn_loss_beta, paper.box_loss_beta) == (pytest.approx(1 / 9), 1.0)
    assert (moco.detector_spec().nms_thresh, paper.detector_spec().nms_thresh) == (0.5, 0.3)


def test_box_losses_take_the_recipe_beta():
    """With beta 1/9 the losses are torchvision's own, bit for bit; beta 0 is L1; the detector
    gets the loss modules only where the recipe's beta is not torchvision's."""
    from torch.nn import functional as F
    from torchvision.models.detection.roi_heads import fastrcnn_loss
    from torchvision.models.detection.rpn import RegionProposalNetwork

    from dcbench.detection.losses import SmoothL1RoIHeads, SmoothL1RPN, box_head_loss

    g = torch.Generator().manual_seed(0)
    logits, deltas = torch.randn(12, 4, generator=g), torch.randn(12, 16, generator=g)
    labels, targets = [torch.tensor([0, 1, 2, 3, 0, 1]), torch.tensor([3, 0, 0, 2, 1, 0])], \
        [torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)]
    for got, want in zip(box_head_loss(logits, deltas, labels, targets, 1 / 9),
                         fastrcnn_loss(logits, deltas, labels, targets)):
        assert torch.equal(got, want)
    _, l1 = box_head_loss(logits, deltas, labels, targets, 0.0)
    all_labels, all_targets = torch.cat(labels), torch.cat(targets)
    pos = all_labels > 0
    picked = deltas.view(12, 4, 4)[pos.nonzero().squeeze(1), all_labels[pos]]
    assert torch.allclose(l1, F.l1_loss(picked, all_targets[pos], reduction="sum") / 12)

    backbone = resolve_checkpoint("random:alexnet,size=96").backbone
    plain = build_detector(backbone, 3, DetectorSpec(min_size=(96,), test_size=96))
    assert type(plain.model.rpn) is RegionProposalNetwork and not isinstance(plain.model.roi_heads, SmoothL1RoIHeads)
    l1_spec = DetectorSpec(min_size=(96,), test_size=96, rpn_loss_beta=0.0, box_loss_beta=0.0)
    l1_det = build_detector(backbone, 3, l1_spec)
    assert isinstance(l1_det.model.rpn, SmoothL1RPN) and isinstance(l1_det.model.roi_heads, SmoothL1RoIHeads)
    assert l1_det.model.roi_heads.box_head is l1_det.box_head and l1_det.design["box_loss"]["rpn_smooth_l1_beta"] == 0
    objectness = torch.randn(40, generator=g)
    rpn_deltas, rpn_labels = torch.randn(40, 4, generator=g), [torch.randint(-1, 2, (40,), generator=g).float()]
    rpn_targets = [torch.randn(40, 4, generator=g)]
    same_beta = SmoothL1RPN(plain.model.rpn, 1 / 9)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        want = plain.model.rpn.compute_loss(objectness, rpn_deltas, rpn_labels, rpn_targets)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        got = same_beta.compute_loss(objectness, rpn_deltas, rpn_labels, rpn_targets)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("overrides, message", [
    ({"train_sets": ["2007-trainval"]}, "bad image set"),
    ({"mode": "fc7"}, "choose one of"),
    ({"min_size": [0]}, "min_size"),
    ({"anchors": [32]}, "unknown setting 'anchors'"),
])
def test_bad_settings(overrides, message):
    with pytest.raises(UsageError, match=message):
        apply_settings(VocDetSettings(), overrides)


def test_moco_preset_needs_voc2012(root):
    result = CliRunner().invoke(main, ["eval", "--protocol", "voc-det", "--checkpoint", "tv:resnet18",
                                       "--data", str(root), "--set", "preset=moco"])
    assert result.exit_code == 1
    assert "VOC2012" in result.output and len(result.output.strip().splitlines()) == 1


def test_missing_annotations(root, tmp_path):
    import shutil
    copy = tmp_path / "voc"
    shutil.copytree(root, copy)
    victim = sorted((copy / "VOCdevkit" / "VOC2007" / "Annotations").iterdir())[0]
    victim.unlink()
    with pytest.raises(DataError, match=victim.name):
        get_protocol("voc-det").check_data(copy, VocDetSettings())


@pytest.mark.skipif(detectron2_available(), reason="detectron2 is installed")
def test_detectron2_backend_missing(root):
    result = CliRunner().invoke(main, ["eval", "--protocol", "voc-det", "--checkpoint", "tv:resnet50",
                                       "--data", str(root), "--set", "backend=detectron2"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "pip install" in lines[0] and "detectron2" in lines[0]


@pytest.mark.skipif(not detectron2_available(), reason="detectron2 is not installed")
def test_detectron2_backend_runs(root):
    out = run(root, "tv:resnet50", **{**RESNET, "backend": "detectron2", "iterations": 2})
    assert {"AP50", "AP75", "AP"} <= set(values(out))
    assert out.extra["detectron2"]["resnet_depth"] == 50
