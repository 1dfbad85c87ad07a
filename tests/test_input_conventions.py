"""Issue 19 item 3 beyond linear / knn: the VOC07 SVM protocols (voc07-svm, voc07-lowshot) and
R-MAC retrieval read published weights with their own input convention
(:func:`dcbench.data.transforms.resolve_convention`), record it in ``extra.input_convention``,
and ``input_convention=preset`` (or a backbone without a convention) gives exactly the preset's
transform, feature-cache id and numbers. voc07-svm defaults to the ``cls`` tap on a ViT.

No network: "published" weights are a seeded random timm ResNet-18 whose timm pretrained_cfg
says mean = std = 0.5, bicubic, crop_pct 0.8 (what ``timm:NAME.TAG`` loading records)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dcbench.checkpoint import resolve_checkpoint
from dcbench.data.synthetic_retrieval import make_retrieval_root
from dcbench.data.synthetic_voc import make_voc
from dcbench.data.transforms import (InputConvention, center_transform_id, convention_squash_id,
                                     resolve_uncropped_convention, squash_transform_id)
from dcbench.data.voc import VOC_CLASSES
from dcbench.errors import UsageError
from dcbench.models.external import timm_input_config
from dcbench.protocol import EvalContext, get_protocol
from dcbench.protocols.voc07_svm import voc_convention, voc_view
from dcbench.retrieval import image_sets
from dcbench.settings import apply_settings

SOURCE = "timm pretrained_cfg of resnet18.test_in1k"
HALF = {"source": SOURCE, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "crop_pct": 0.8,
        "crop_mode": "center"}
FAST = {
    "voc07-svm": {"image_size": 64, "workers": 0, "jobs": 1, "taps": ["res4"], "costs": [1.0], "cv_folds": 2},
    "voc07-lowshot": {"image_size": 64, "workers": 0, "jobs": 1, "taps": ["res4"], "costs": [1.0], "ks": [2],
                      "samples": 1},
    "roxford5k": {"image_size": 96, "workers": 0, "taps": ["res4"], "whitening_dim": 8},
    "voc07-cls": {"image_size": 64, "workers": 0, "iterations": 2, "batch_size": 4, "head_dim": 16},
}
GREY = Image.fromarray(np.full((48, 64, 3), 128, dtype=np.uint8))  # 0.502 after ToTensor


def published(name: str = "timm:resnet18,random", **cfg) -> object:
    """A seeded random timm model carrying a pretrained-style input convention."""
    ckpt = resolve_checkpoint(name)
    model = ckpt.backbone.model
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": (0.5,) * 3, "std": (0.5,) * 3,
                            "interpolation": "bicubic", "crop_pct": 0.8, "crop_mode": "center", **cfg}
    ckpt.backbone.input_config = timm_input_config(model, SOURCE)
    return ckpt


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return make_voc(tmp_path_factory.mktemp("voc") / "data", classes=VOC_CLASSES[:3])


@pytest.fixture(scope="module")
def oxford(tmp_path_factory):
    return make_retrieval_root(tmp_path_factory.mktemp("retrieval") / "data", names=("roxford5k", "rparis6k"),
                               image_size=96, n_landmarks=2, distractors=2)


def run(name: str, root, cache, ckpt, **overrides):
    proto = get_protocol(name)
    settings = apply_settings(proto.default_settings(), {**FAST[name], **overrides})
    proto.check_data(root, settings)
    return proto.run(ckpt, settings, root, EvalContext(cache_dir=cache, workers=0, settings=settings))


def values(out) -> dict:
    return {(r.metric, r.tap): r.value for r in out.metrics}


# ----------------------------------------------------------------------------- the VOC view
def test_published_config_reaches_the_backbone():
    assert published().backbone.input_config == {**HALF, "input_size": 224}
    assert resolve_checkpoint("timm:resnet18,random").backbone.input_config["source"] is None


def test_voc_view_takes_the_weights_mean_std_and_filter():
    ckpt = published()
    svm = get_protocol("voc07-svm")
    squash = apply_settings(svm.default_settings(), {"image_size": 32})
    own = voc_convention(ckpt.backbone, squash)
    assert (own.mean, own.std, own.interpolation, own.source) == ((0.5,) * 3, (0.5,) * 3, "bicubic", SOURCE)
    transform, tid = voc_view(32, "squash", True, own)
    assert transform(GREY).abs().max() < 0.01  # mean 0.5 / std 0.5: grey is ~0
    assert tid == convention_squash_id(32, True, own) == "resize37-squash32x32-bicubic-norm[0.5,0.5,0.5,0.5,0.5,0.5]"
    # the preset's view: the transform and cache id of before issue 19
    preset = voc_convention(ckpt.backbone, apply_settings(squash, {"input_convention": "preset"}))
    assert preset == InputConvention()
    transform, tid = voc_view(32, "squash", True, preset)
    assert transform(GREY).abs().max() > 0.05 and tid == squash_transform_id(32, True)
    assert voc_view(32, "crop", False, preset)[1] == center_transform_id(32)
    # resize=crop takes the crop ratio too: Resize(floor(32 / 0.8)) = 40
    assert voc_view(32, "crop", False, own)[1].startswith("resize40-bicubic-center32-center-pct0.8-norm")


def test_border_crop_mode_refused_only_where_the_view_crops():
    ckpt = published(crop_mode="border")
    svm = get_protocol("voc07-svm")
    assert voc_convention(ckpt.backbone, svm.default_settings()).crop_mode == "border"  # squash: no crop
    with pytest.raises(UsageError, match="input_convention=preset"):
        voc_convention(ckpt.backbone, apply_settings(svm.default_settings(), {"resize": "crop"}))
    assert resolve_uncropped_convention(ckpt.backbone, "preset") == InputConvention()


# ----------------------------------------------------------------------------- the SVM protocols
@pytest.mark.parametrize("name", ["voc07-svm", "voc07-lowshot"])
def test_svm_protocols_record_the_convention_and_preset_keeps_todays_numbers(name, voc, tmp_path):
    ckpt = published()
    own = run(name, voc, tmp_path / "a", ckpt)
    conv = own.extra["input_convention"]
    assert {k: conv[k] for k in HALF} == HALF and "no crop ratio" in conv["applied"]
    forced = run(name, voc, tmp_path / "b", ckpt, input_convention="preset")
    assert forced.extra["input_convention"]["source"] == "protocol preset"
    # a backbone without a convention (random init, DeepCluster file): the same numbers as the preset
    plain = run(name, voc, tmp_path / "c", resolve_checkpoint("timm:resnet18,random"))
    assert plain.extra["input_convention"] == forced.extra["input_convention"]
    assert values(plain) == values(forced)
    assert values(own) != values(forced)  # other normalisation and filter: other features


def test_voc07_svm_defaults_to_the_cls_tap_on_a_vit(voc, tmp_path):
    ckpt = resolve_checkpoint("timm:vit_tiny_patch16_224,random")
    out = run("voc07-svm", voc, tmp_path, ckpt, taps=None, image_size=32)
    assert {r.tap for r in out.metrics} == {"cls"} and out.extra["taps"] == ["cls"]
    assert out.extra["pooling"]["cls"]["kind"] == "none"


# ----------------------------------------------------------------------------- retrieval
def test_retrieval_images_take_the_weights_mean_and_std_only(oxford, tmp_path):
    from dcbench.data.retrieval import read_retrieval_dataset

    ds = read_retrieval_dataset(oxford, "roxford5k")
    own = resolve_uncropped_convention(published().backbone)
    mine = image_sets(ds, [1.0], 64, "after_resize", None, own)[("database", 1.0)]
    before = image_sets(ds, [1.0], 64, "after_resize", None)[("database", 1.0)]
    assert before.transform_id == "retrieval:max-side=64:bilinear:box-crop=no:min-side=32"  # ids of earlier caches
    assert mine.transform_id == before.transform_id + ":norm[0.5,0.5,0.5,0.5,0.5,0.5]"
    x, y = mine[0][0], before[0][0]
    assert x.shape == y.shape  # same geometry (bilinear resize to the largest side): only the normalisation moves
    std = np.array([0.229, 0.224, 0.225])[:, None, None]
    mean = np.array([0.485, 0.456, 0.406])[:, None, None]
    np.testing.assert_allclose((x.numpy() * 0.5 + 0.5), y.numpy() * std + mean, atol=1e-5)


def test_retrieval_records_the_convention_and_preset_keeps_todays_numbers(oxford, tmp_path):
    ckpt = published()
    own = run("roxford5k", oxford, tmp_path / "a", ckpt)
    conv = own.extra["input_convention"]
    assert {k: conv[k] for k in HALF} == HALF and conv["applied"].startswith("mean, std")
    forced = run("roxford5k", oxford, tmp_path / "b", ckpt, input_convention="preset")
    plain = run("roxford5k", oxford, tmp_path / "c", resolve_checkpoint("timm:resnet18,random"))
    assert forced.extra["input_convention"]["source"] == plain.extra["input_convention"]["source"] == "protocol preset"
    assert values(plain) == values(forced)
    assert values(own) != values(forced)


# ----------------------------------------------------------------------------- voc-seg (normalisation only)
def test_seg_config_takes_the_weights_mean_and_std_in_mmseg_scale():
    from dcbench.protocols.voc_seg import with_normalization

    config = {"data_preprocessor": {"type": "SegDataPreProcessor", "mean": [123.675, 116.28, 103.53],
                                    "std": [58.395, 57.12, 57.375], "bgr_to_rgb": True}, "backbone": {}}
    assert with_normalization(config, InputConvention()) is config  # the preset's: untouched
    own = with_normalization(config, resolve_uncropped_convention(published().backbone))
    assert own["data_preprocessor"] == {**config["data_preprocessor"], "mean": [127.5] * 3, "std": [127.5] * 3}
    assert config["data_preprocessor"]["mean"][0] == 123.675  # not modified in place


def test_voc_seg_records_the_convention_and_preset_keeps_todays_numbers(tmp_path):
    pytest.importorskip("mmseg")
    from dcbench import segmentation as seg

    seg.prepare_mmseg()
    classes = list(VOC_CLASSES[:2])
    root = make_voc(tmp_path / "data", classes=classes, year="2012", images_per_split={"train": 4, "val": 3})
    proto = get_protocol("voc-seg")
    fast = {"preset": "deepcluster", "iterations": 2, "crop_size": 64, "batch_size": 2, "workers": 0,
            "classes": classes}

    def seg_run(ckpt, **o):
        return proto.run(ckpt, apply_settings(proto.default_settings(), {**fast, **o}), root, EvalContext())

    own = seg_run(published())
    assert own.extra["mmseg_config"]["data_preprocessor"]["mean"] == [127.5] * 3
    assert {k: own.extra["input_convention"][k] for k in HALF} == HALF
    forced = seg_run(published(), input_convention="preset")
    plain = seg_run(resolve_checkpoint("timm:resnet18,random"))
    assert forced.extra["mmseg_config"] == plain.extra["mmseg_config"]
    assert forced.extra["mmseg_config"]["data_preprocessor"]["mean"] == [123.675, 116.28, 103.53]
    assert forced.extra["input_convention"]["source"] == "protocol preset"
    assert values(plain) == values(forced)


# ----------------------------------------------------------------------------- the VOC07 fine-tune
@pytest.mark.parametrize("test_crops", ["random10", "tencrop"])
def test_voc07_cls_finetunes_with_the_convention_and_preset_keeps_todays_numbers(test_crops, voc, tmp_path):
    from dcbench.voc_finetune import finetune_transform

    torch_grey = finetune_transform(32, [0.9, 1.0], resolve_uncropped_convention(published().backbone))(GREY)
    assert torch_grey.abs().max() < 0.01 and finetune_transform(32, [0.9, 1.0])(GREY).abs().max() > 0.05
    ckpt = published()
    own = run("voc07-cls", voc, tmp_path / "a", ckpt, test_crops=test_crops)
    conv = own.extra["input_convention"]
    assert {k: conv[k] for k in HALF} == HALF
    assert ("crop ratio (TenCrop)" in conv["applied"]) == (test_crops == "tencrop")
    forced = run("voc07-cls", voc, tmp_path / "b", ckpt, test_crops=test_crops, input_convention="preset")
    plain = run("voc07-cls", voc, tmp_path / "c", resolve_checkpoint("timm:resnet18,random"), test_crops=test_crops)
    assert forced.extra["input_convention"]["source"] == plain.extra["input_convention"]["source"] == "protocol preset"
    assert values(plain) == values(forced)
    assert values(own) != values(forced)


# ----------------------------------------------------------------------------- voc-det (normalisation only)
DET = {"iterations": 2, "batch_size": 2, "min_size": [96], "test_size": 96, "max_size": 160, "anchor_sizes": [32, 64],
       "rois_per_image": 8, "proposals_train": 20, "proposals_test": 10, "train_sets": ["2007:trainval"],
       "precise_bn": 2, "workers": 0, "mode": "fc6-8"}


def test_voc_det_normalises_with_the_weights_and_preset_keeps_todays_numbers(voc):
    from dcbench.detection import DetectorSpec, build_detector

    def tv_published():
        ckpt = resolve_checkpoint("tv:resnet18")
        ckpt.backbone.input_config = {**HALF, "input_size": 224}
        return ckpt

    det = build_detector(tv_published().backbone, 3, DetectorSpec(image_mean=(0.5,) * 3, image_std=(0.5,) * 3))
    assert det.model.transform.image_mean == [0.5] * 3 and det.model.transform.image_std == [0.5] * 3
    proto = get_protocol("voc-det")

    def det_run(ckpt, **o):
        settings = apply_settings(proto.default_settings(), {**DET, **o})
        return proto.run(ckpt, settings, voc, EvalContext())

    own = det_run(tv_published())
    assert {k: own.extra["input_convention"][k] for k in HALF} == HALF
    assert own.extra["detector_spec"]["image_mean"] == [0.5] * 3
    forced = det_run(tv_published(), input_convention="preset")
    plain = det_run(resolve_checkpoint("tv:resnet18"))
    assert forced.extra["detector_spec"] == plain.extra["detector_spec"]
    assert plain.extra["detector_spec"]["image_mean"] == [0.485, 0.456, 0.406]
    assert values(plain) == values(forced)
    from types import SimpleNamespace

    from dcbench.protocols.voc_det import detection_convention

    with pytest.raises(UsageError, match="input_convention=preset"):  # detectron2 keeps its own PIXEL_MEAN
        detection_convention(tv_published().backbone, SimpleNamespace(input_convention="weights", backend="detectron2"))
    preset = SimpleNamespace(input_convention="preset", backend="detectron2")
    assert detection_convention(tv_published().backbone, preset) == InputConvention()
