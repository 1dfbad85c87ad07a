"""voc-seg (protocols/voc_seg.py, dcbench/segmentation, dcbench/compat): a short run through the
CLI reaches an mIoU far above chance on the fixture; fc6-8 leaves the convs unchanged while
fc6/fc7 train; palette/greyscale label PNGs are read as class indices; the SBD aug layout;
the fc6/fc7-as-convolution and ResNet-dilation geometry; the mmcv.ops stand-in is used only
when the real mmcv.ops is absent."""
from __future__ import annotations

import importlib
import json
import shutil
import sys
import types

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch.nn import functional as F

pytest.importorskip("mmseg")

from dcbench import compat  # noqa: E402
from dcbench import segmentation as seg  # noqa: E402
from dcbench.checkpoint import resolve_checkpoint  # noqa: E402
from dcbench.cli import main  # noqa: E402
from dcbench.data import DataError  # noqa: E402
from dcbench.data.synthetic_voc import make_voc  # noqa: E402
from dcbench.data.voc import VOC_CLASSES, voc_palette  # noqa: E402
from dcbench.errors import UsageError  # noqa: E402
from dcbench.features import tensor_digests  # noqa: E402
from dcbench.models import build_backbone  # noqa: E402
from dcbench.settings import apply_settings  # noqa: E402
from dcbench.protocol import EvalContext, get_protocol  # noqa: E402
from dcbench.finetune import check_trunk, trainable_names  # noqa: E402

CLASSES = list(VOC_CLASSES[:4])  # four classes with four different shapes and colours
CLASS_SET = "classes=[" + ",".join(CLASSES) + "]"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_voc(tmp_path_factory.mktemp("voc") / "data", classes=CLASSES, year="2012",
                    images_per_split={"train": 32, "val": 12})


@pytest.fixture(scope="module", autouse=True)
def mmseg_ready():
    seg.prepare_mmseg()


def _invoke(*args):
    return CliRunner().invoke(main, list(map(str, args)))


def _chance_miou(root) -> float:
    """mIoU of predicting the majority class (background) everywhere on val."""
    data = seg.load_seg_data(root, "off", CLASSES)
    preds, targets = [], []
    for item in data.val:
        t = np.array(Image.open(item.mask))
        preds.append(np.zeros_like(t))
        targets.append(t)
    from dcbench.metrics.segmentation import mean_iou
    return mean_iou(preds, targets, len(CLASSES) + 1)[0]


# ----------------------------------------------------------------------------- end to end
def test_cli_run_prints_miou_far_above_chance(root):
    result = _invoke("eval", "--protocol", "voc-seg", "--checkpoint", "random:alexnet,size=64,sobel=0",
                     "--data", root, "--set", "iterations=80", "--set", "crop_size=96", "--set", "batch_size=4",
                     "--set", "lr=0.05", "--set", "workers=0", "--set", CLASS_SET, "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.output.strip().splitlines()[-1])
    rows = {r["metric"]: r for r in record["metrics"]}
    assert {"mIoU", "aAcc", "IoU_background", *(f"IoU_{c}" for c in CLASSES)} <= set(rows)
    assert "mIoU" in result.output and "IoU_aeroplane" in result.output  # the printed table
    chance = 100 * _chance_miou(root)
    assert chance < 20
    assert rows["mIoU"]["value"] > max(40.0, 2.5 * chance), (rows["mIoU"], chance)
    assert rows["mIoU"]["tap"] == "all" and rows["mIoU"]["split"] == "val"
    extra = record["extra"]
    assert extra["trunk_check"]["passed"] and extra["trunk_check"]["rule"].startswith("all")
    assert set(extra["iou"]) == {"background", *CLASSES}
    assert extra["images"] == {"train": 32, "aug": 0, "val": 12} and extra["sbd_aug"] == "absent"
    assert extra["mmcv_ops"] in ("mmcv", "dcbench")
    assert extra["segmentation_versions"]["mmsegmentation"] == "1.2.2"
    assert extra["mmseg_config"]["decode_head"]["type"] == "FCNHead"
    settings = record["settings"]
    assert settings["iterations"] == 80 and settings["crop_size"] == 96 and settings["preset"] == "mmselfsup"
    assert settings["backend"] == "mmseg" and extra["recipe"]["mode"] == "all"


def test_fine_tune_gives_the_same_numbers_with_any_workers(root):
    """mmseg's transforms draw from numpy and random: seeded per (seed, pass, image) in the main
    process, 0 and 2 loader workers crop, flip and distort alike (version 4)."""
    proto = get_protocol("voc-seg")
    results = []
    for workers in (0, 2):
        settings = apply_settings(proto.default_settings(), {
            "iterations": 4, "crop_size": 64, "batch_size": 2, "workers": workers, "classes": CLASSES})
        out = proto.run(resolve_checkpoint("random:alexnet,size=64,sobel=0"), settings, root, EvalContext())
        results.append(({r.metric: r.value for r in out.metrics}, out.extra["train"]["loss"]))
    assert results[0] == results[1] and "mIoU" in results[0][0] and results[0][1]


def test_fc68_trains_fc6_fc7_and_leaves_the_convs_unchanged(root):
    proto = get_protocol("voc-seg")
    settings = apply_settings(proto.default_settings(), {
        "preset": "deepcluster", "iterations": 3, "crop_size": 64, "batch_size": 2, "workers": 1,  # worker path
        "classes": CLASSES})
    ckpt = resolve_checkpoint("random:alexnet,size=64")
    before = tensor_digests(ckpt.backbone)
    out = proto.run(ckpt, settings, root, EvalContext())
    assert out.extra["trunk_check"] == {"passed": True, "rule": "fc6-8: every trunk tensor unchanged", "changed": 0}
    assert out.extra["recipe"]["taps"] == ["fc7"] and out.extra["mode"] == "fc6-8"
    assert {r.metric for r in out.metrics} >= {"mIoU", "IoU_background"}
    assert tensor_digests(ckpt.backbone) == before  # the checkpoint itself is never touched
    # per-image confusion matrices for the bootstrap: their summed mIoU is the row's value
    miou = next(r.value for r in out.metrics if r.metric == "mIoU")
    outcome = out.outcomes["mIoU/fc6-8/final"]
    assert outcome.statistic == "miou" and len(outcome) == out.extra["evaluated_images"]
    assert 100 * outcome.value(np.ones((1, len(outcome))))[0] == pytest.approx(miou, abs=1e-9)


def _segmentor(arch_spec: str, preset: str, mode: str | None, crop: int = 64):
    net = resolve_checkpoint(arch_spec).backbone
    recipe = seg.resolve_recipe(net, preset, len(CLASSES) + 1, mode)
    return net, seg.build_segmentor(net, seg.model_config(recipe, crop))


def _few_steps(model, root, steps: int = 2) -> None:
    data = seg.load_seg_data(root, "off", CLASSES)
    ds = seg.SegDataset(data.train, seg.build_pipeline(seg.train_pipeline(64, (0.5, 2.0))), 5, data.label_map)
    loader = seg.train_loader(ds, 2, 0, 0)
    schedule = seg.schedule_config(steps, 0.05, 0.9, 5e-4, 0.9, 1e-4)
    with seg.seeded(0):
        seg.train(model, loader, schedule)


def test_fc68_component_level_and_the_self_check(root):
    net, model = _segmentor("random:alexnet,size=64", "deepcluster", "fc6-8")
    assert model.backbone.net is net  # the segmentor trains this very module (no copy in the config)
    trunk, fc = tensor_digests(net), tensor_digests(model.backbone.fc)
    assert not any(p.requires_grad for p in net.parameters())
    _few_steps(model, root)
    assert tensor_digests(net) == trunk  # conv weights and BN running statistics
    changed = [k for k, v in tensor_digests(model.backbone.fc).items() if fc[k] != v]
    assert any(k.endswith("weight") for k in changed)  # fc6/fc7 (as convolutions) trained
    assert check_trunk(net, trunk, trainable_names(net), "fc6-8", 2, detail="count")["passed"]
    with torch.no_grad():
        net.features[0].weight.add_(1.0)
    with pytest.raises(RuntimeError, match="fc6-8 fine-tuning changed 1 frozen trunk tensors"):
        check_trunk(net, trunk, trainable_names(net), "fc6-8", 2, detail="count")
    with pytest.raises(RuntimeError, match="left every trunk weight unchanged"):
        net.features[0].weight.requires_grad_(True)
        check_trunk(net, tensor_digests(net), trainable_names(net), "all", 2, detail="count")


def test_resnet_gets_dilation_and_an_auxiliary_head(root):
    net, model = _segmentor("tv:resnet18", "mmselfsup", None)
    assert model.with_auxiliary_head and model.backbone.dilations == {"res4": 2, "res5": 4}
    model.eval()
    with torch.no_grad():
        res4, res5 = model.backbone(torch.zeros(1, 3, 64, 64))
    assert res4.shape[-2:] == (8, 8) and res5.shape[-2:] == (8, 8) and res5.shape[1] == 512
    before = tensor_digests(net)
    _few_steps(model, root, steps=1)
    assert tensor_digests(net) != before  # mode all: the trunk trains


# ----------------------------------------------------------------------------- geometry
def test_fc6_fc7_as_convolutions_equal_the_linear_layers():
    from dcbench.segmentation.backbone import FcAsConv

    net = build_backbone("alexnet", input_size=96, seed=0).eval()  # pool5 2x2: an even fc6 kernel
    x = torch.randn(2, 3, 96, 96)
    fc = FcAsConv(net.classifier, net.channels, net.grid).eval()
    with torch.no_grad():
        expected = net(x, taps=["fc7"])["fc7"]
        pool5 = net.features(net.sobel(x))
        maps = fc(pool5)
    assert maps.shape[-2:] == pool5.shape[-2:]  # "same" padding keeps pool5's size
    torch.testing.assert_close(maps[:, :, 0, 0], expected, rtol=1e-4, atol=1e-5)  # the window that sees all of pool5


def test_dilation_keeps_the_weights_and_reaches_the_stride():
    from dcbench.segmentation.backbone import dilate_resnet

    net = build_backbone("tv:resnet18").eval()
    before = tensor_digests(net)
    assert dilate_resnet(net, 16) == {"res5": 2}
    with torch.no_grad():
        out = net(torch.zeros(1, 3, 64, 64), taps=["res4", "res5"])
    assert out["res4"].shape[-1] == 4 and out["res5"].shape[-1] == 4
    assert tensor_digests(net) == before
    first = net.model.layer4[0]
    assert first.conv1.stride == (1, 1) and first.conv1.dilation == (1, 1)  # contract_dilation: first block d/2
    second = net.model.layer4[1]  # mmseg's BasicBlock dilates conv1 only
    assert second.conv1.dilation == (2, 2) and second.conv1.padding == (2, 2) and second.conv2.dilation == (1, 1)
    bottleneck = build_backbone("tv:resnet50")
    dilate_resnet(bottleneck, 8)
    block = bottleneck.model.layer3[1]  # Bottleneck: the 3x3 conv2, res4 dilation 2
    assert block.conv2.dilation == (2, 2) and block.conv1.dilation == (1, 1)
    assert bottleneck.model.layer4[0].conv2.dilation == (2, 2) and bottleneck.model.layer4[0].conv2.stride == (1, 1)
    assert bottleneck.model.layer4[0].downsample[0].stride == (1, 1)


def test_preset_resolution_and_bad_combinations():
    alex = build_backbone("alexnet", input_size=64)
    recipe = seg.resolve_recipe(alex, "deepcluster", 21)
    assert (recipe.mode, recipe.norm_eval, recipe.taps) == ("fc6-8", True, ["fc7"])
    assert recipe.decode_head["in_channels"] == 4096 and recipe.decode_head["num_convs"] == 0
    recipe = seg.resolve_recipe(alex, "mmselfsup", 21)
    assert (recipe.mode, recipe.norm_eval, recipe.taps, recipe.auxiliary_head) == ("all", False, ["conv5"], None)
    with pytest.raises(UsageError, match="output_stride=8 needs a ResNet"):
        seg.resolve_recipe(alex, "mmselfsup", 21, output_stride=8)
    proto = get_protocol("voc-seg")
    for bad in ({"classes": ["cat", "unicorn"]}, {"min_lr": 1.0}, {"scale_range": [2.0, 1.0]}, {"crop_size": 8}):
        with pytest.raises(UsageError):
            apply_settings(proto.default_settings(), bad)


def test_defaults_equal_protocols_md():
    s = get_protocol("voc-seg").default_settings()
    assert (s.iterations, s.batch_size, s.crop_size, s.scale_range) == (20000, 16, 512, [0.5, 2.0])
    assert (s.lr, s.momentum, s.weight_decay, s.poly_power, s.min_lr) == (0.01, 0.9, 5e-4, 0.9, 1e-4)
    assert s.preset == "mmselfsup" and s.sbd_aug == "auto" and s.classes is None
    pipeline = seg.train_pipeline(s.crop_size, tuple(s.scale_range))
    assert pipeline[2]["scale"] == (2048, 512) and pipeline[3]["cat_max_ratio"] == 0.75


# ----------------------------------------------------------------------------- labels and data
def test_palette_and_greyscale_pngs_are_read_as_class_indices(tmp_path):
    labels = np.array([[0, 1, 1, 255], [3, 3, 20, 255], [0, 0, 15, 15]], dtype=np.uint8)
    Image.fromarray(np.zeros((3, 4, 3), np.uint8)).save(tmp_path / "img.jpg")
    palette = Image.fromarray(labels, mode="P")
    palette.putpalette(voc_palette())
    palette.save(tmp_path / "pal.png")
    Image.fromarray(labels, mode="L").save(tmp_path / "grey.png")  # SBD aug (mmseg's conversion)
    rgb = np.array(Image.open(tmp_path / "pal.png").convert("RGB"))
    assert tuple(rgb[0, 1]) == (128, 0, 0) and tuple(rgb[0, 3]) == (224, 224, 192)  # VOC's colours
    pipeline = seg.build_pipeline(seg.eval_pipeline(64))
    for name in ("pal.png", "grey.png"):
        item = seg.data.SegItem("x", tmp_path / "img.jpg", tmp_path / name)
        seg.data.check_mask_format(item.mask)
        _, out, err = seg.SegDataset([item], pipeline, 21)[0]
        assert err == ""
        np.testing.assert_array_equal(out["data_samples"].gt_sem_seg.data[0].numpy(), labels)
    # a class subset: other classes become void, chosen ones renumbered in the given order
    lmap = seg.label_map_for(["cat", "aeroplane"])
    assert lmap[0] == 0 and lmap[8] == 1 and lmap[1] == 2 and lmap[3] == 255 and lmap[20] == 255
    _, out, _ = seg.SegDataset([item], pipeline, 3, lmap)[0]
    np.testing.assert_array_equal(out["data_samples"].gt_sem_seg.data[0].numpy(),
                                  [[0, 2, 2, 255], [255, 255, 255, 255], [0, 0, 255, 255]])
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    with pytest.raises(DataError, match="RGB image; segmentation labels must be palette"):
        seg.data.check_mask_format(tmp_path / "rgb.png")


def test_fixture_masks_match_the_objects(root):
    data = seg.load_seg_data(root, "off")
    pipeline = seg.build_pipeline(seg.eval_pipeline(64))
    ds = seg.SegDataset(data.train, pipeline, 21)
    for i in range(4):
        _, out, _ = ds[i]
        gt = out["data_samples"].gt_sem_seg.data[0].numpy()
        assert set(np.unique(gt)) <= {0, 1, 2, 3, 4, 255} and (gt == 255).any() and (gt == 0).any()
        np.testing.assert_array_equal(gt, np.array(Image.open(data.train[i].mask)))


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    Image.fromarray(np.zeros((4, 4), np.uint8), mode="L").save(tmp_path / "m.png")
    Image.fromarray(np.full((4, 4), 99, np.uint8), mode="L").save(tmp_path / "wrong.png")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "ok.jpg")
    items = [seg.data.SegItem("a", tmp_path / "bad.jpg", tmp_path / "m.png"),
             seg.data.SegItem("b", tmp_path / "ok.jpg", tmp_path / "wrong.png"),
             seg.data.SegItem("c", tmp_path / "ok.jpg", tmp_path / "m.png")]
    ds = seg.SegDataset(items, seg.build_pipeline(seg.eval_pipeline(32)), 21)
    batch = seg.data.collate([ds[i] for i in range(3)])
    assert batch["indices"] == [2] and len(batch["inputs"]) == 1 and len(batch["failed"]) == 2
    assert "bad.jpg" in batch["failed"][0] and "label value 99" in batch["failed"][1]


def test_sbd_aug_layout(root, tmp_path):
    work = tmp_path / "voc"
    shutil.copytree(root, work)
    voc = work / "VOCdevkit" / "VOC2012"
    val_id = (voc / "ImageSets/Segmentation/val.txt").read_text().split()[0]
    train_id = (voc / "ImageSets/Segmentation/train.txt").read_text().split()[0]
    (voc / "SegmentationClassAug").mkdir()
    extra = ["2011_000001", "2011_000002"]
    for new in extra:
        shutil.copy(voc / "JPEGImages" / f"{train_id}.jpg", voc / "JPEGImages" / f"{new}.jpg")
        mask = np.array(Image.open(voc / "SegmentationClass" / f"{train_id}.png"))
        Image.fromarray(mask, mode="L").save(voc / "SegmentationClassAug" / f"{new}.png")
    # val and train ids in aug.txt are dropped: val never leaks into training
    (voc / "ImageSets/Segmentation/aug.txt").write_text("\n".join([*extra, val_id, train_id]) + "\n")
    data = seg.load_seg_data(work, "auto")
    assert (data.aug, data.n_aug, data.n_train, len(data.train)) == ("used", 2, 32, 34)
    assert data.train[-1].mask.parent.name == "SegmentationClassAug"
    assert val_id not in {it.image_id for it in data.train}
    assert seg.load_seg_data(work, "off").n_aug == 0
    assert seg.load_seg_data(work, "on").fingerprint() != seg.load_seg_data(work, "off").fingerprint()
    with pytest.raises(DataError, match="aug.txt is missing"):
        seg.load_seg_data(root, "on")
    (voc / "SegmentationClassAug" / "2011_000002.png").unlink()
    with pytest.raises(DataError, match="2011_000002.png is missing"):
        seg.load_seg_data(work, "auto")


def test_cli_data_errors_are_one_line(root, tmp_path):
    work = tmp_path / "voc"
    shutil.copytree(root, work)
    (work / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt").unlink()
    result = _invoke("eval", "--protocol", "voc-seg", "--checkpoint", "random:alexnet,size=64", "--data", work)
    assert result.exit_code == 1 and "val.txt is missing" in result.output
    result = _invoke("eval", "--protocol", "voc-seg", "--checkpoint", "random:alexnet,size=64", "--data", root,
                     "--set", "output_stride=7")
    assert result.exit_code != 0 and "output_stride" in result.output


def test_missing_seg_extra_is_a_usage_error_before_any_work(root, monkeypatch):
    monkeypatch.setattr(seg, "missing_packages", lambda: ["mmseg"])
    proto = get_protocol("voc-seg")
    with pytest.raises(UsageError, match=r"pip install -e '\.\[seg\]'"):
        proto.check_data(root, proto.default_settings())


# ----------------------------------------------------------------------------- mmcv.ops
@pytest.fixture
def no_mmcv_ops(monkeypatch):
    """A session in which ``import mmcv.ops`` has not happened yet (restored afterwards)."""
    monkeypatch.delitem(sys.modules, "mmcv.ops", raising=False)
    import mmcv
    monkeypatch.delattr(mmcv, "ops", raising=False)
    return monkeypatch


def test_standin_is_installed_when_mmcv_ops_cannot_be_imported(no_mmcv_ops):
    real = importlib.import_module

    def failing(name, *args, **kwargs):
        if name == "mmcv.ops":
            raise ModuleNotFoundError("No module named 'mmcv._ext'")
        return real(name, *args, **kwargs)

    no_mmcv_ops.setattr(compat.importlib, "import_module", failing)
    assert compat.ensure_mmcv_ops() == "dcbench"
    import mmcv
    from dcbench.compat import mmcv_ops
    assert sys.modules["mmcv.ops"] is mmcv_ops and mmcv.ops is mmcv_ops
    assert compat.mmcv_ops_source() == "dcbench" and compat.ensure_mmcv_ops() == "dcbench"
    from mmcv.ops import point_sample, sigmoid_focal_loss  # what mmseg imports unconditionally
    assert point_sample is mmcv_ops.point_sample and sigmoid_focal_loss is mmcv_ops.sigmoid_focal_loss
    with pytest.raises(ModuleNotFoundError, match="CrissCrossAttention"):  # what mmseg's try/except expects
        from mmcv.ops import CrissCrossAttention  # noqa: F401


def test_real_mmcv_ops_is_used_when_it_imports(no_mmcv_ops):
    real_ops = types.ModuleType("mmcv.ops")
    real = importlib.import_module

    def succeeding(name, *args, **kwargs):
        if name == "mmcv.ops":
            sys.modules["mmcv.ops"] = real_ops  # what a successful import does
            return real_ops
        return real(name, *args, **kwargs)

    no_mmcv_ops.setattr(compat.importlib, "import_module", succeeding)
    assert compat.ensure_mmcv_ops() == "mmcv"
    assert sys.modules["mmcv.ops"] is real_ops and compat.mmcv_ops_source() == "mmcv"
    assert compat.ensure_mmcv_ops() == "mmcv"  # already imported: left alone


def test_mmcv_missing_is_a_clear_import_error(no_mmcv_ops):
    no_mmcv_ops.setitem(sys.modules, "mmcv", None)  # "import mmcv" raises ImportError
    with pytest.raises(ImportError, match=r"pip install -e '\.\[seg\]'"):
        compat.ensure_mmcv_ops()


def test_standin_functions_match_references():
    from torchvision.ops import sigmoid_focal_loss as tv_focal

    from dcbench.compat.mmcv_ops import point_sample, sigmoid_focal_loss

    x = torch.arange(12.0).view(1, 1, 3, 4)
    centres = torch.tensor([[[0.5 / 4, 0.5 / 3], [3.5 / 4, 2.5 / 3]]])  # pixel centres (x, y) in [0, 1]
    torch.testing.assert_close(point_sample(x, centres), torch.tensor([[[0.0, 11.0]]]))
    grid = torch.rand(2, 5, 6, 2)
    feats = torch.randn(2, 3, 7, 9)
    torch.testing.assert_close(point_sample(feats, grid), F.grid_sample(feats, 2 * grid - 1, align_corners=False))

    torch.manual_seed(0)
    logits = torch.randn(6, 4, requires_grad=True)
    target = torch.tensor([0, 3, 1, 4, 2, 3])  # 4 = no class positive
    onehot = F.one_hot(target, 5)[:, :4].float()
    ours = sigmoid_focal_loss(logits, target, 2.0, 0.25, None, "none")
    torch.testing.assert_close(ours, tv_focal(logits, onehot, alpha=0.25, gamma=2.0, reduction="none"))
    mean = sigmoid_focal_loss(logits, target)
    torch.testing.assert_close(mean, ours.sum() / 6)
    mean.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    weight = torch.tensor([1.0, 2.0, 3.0, 4.0])
    weighted = sigmoid_focal_loss(logits, target, weight=weight, reduction="none")
    torch.testing.assert_close(weighted[1], 4.0 * ours[1])  # row weight = weight[target]
    torch.testing.assert_close(weighted[3], ours[3])  # a "no class" row keeps weight 1


def test_mmseg_optional_ops_fall_back_to_none():
    from mmseg.models.decode_heads import cc_head, psa_head

    if compat.mmcv_ops_source() == "dcbench":
        assert cc_head.CrissCrossAttention is None and psa_head.PSAMask is None


@pytest.mark.parametrize("depth", [18, 50])
def test_dilated_resnet_equals_mmseg_resnet_d8(depth):
    """The same torchvision weights in mmseg's own ``ResNet`` (MMSelfSup's fcn_r50-d8 backbone:
    dilations (1, 1, 2, 4), strides (1, 2, 1, 1), contract_dilation) give the same res4/res5."""
    from mmseg.models.backbones import ResNet

    from dcbench.segmentation.backbone import dilate_resnet

    torch.manual_seed(0)
    ours = build_backbone(f"tv:resnet{depth}").eval()
    dilate_resnet(ours, 8)
    theirs = ResNet(depth=depth, dilations=(1, 1, 2, 4), strides=(1, 2, 1, 1), contract_dilation=True,
                    out_indices=(2, 3), style="pytorch")
    theirs.eval()  # (mmseg's ResNet.train returns None: no chaining)
    weights = {k: v for k, v in ours.model.state_dict().items() if not k.startswith("fc.")}
    theirs.load_state_dict(weights, strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        mine = ours(x, taps=["res4", "res5"])
        res4, res5 = theirs(x)
    torch.testing.assert_close(mine["res4"], res4)
    torch.testing.assert_close(mine["res5"], res5)
