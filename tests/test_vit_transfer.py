"""Issue 19, ViTs in the transfer protocols: retrieval (DINO eval_image_retrieval.py's CLS descriptor;
R-MAC on patch-token maps), VOC07 classification, VOC segmentation and VOC detection fine-tunes
(the last block's patch tokens as one stride-p feature map, ViTDet's simple-pyramid input); and
the stage taps of timm Swin Transformers (channels-last stage outputs read as maps).

All on ``timm:vit_tiny_patch16_224,random`` (or a random Swin-T) at small image sizes, a few
iterations; no network."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dcbench.checkpoint import resolve_checkpoint
from dcbench.data.synthetic_retrieval import make_retrieval_root
from dcbench.errors import UsageError
from dcbench.protocol import EvalContext, get_protocol
from dcbench.protocols.retrieval import retrieval_taps
from dcbench.retrieval import GlobalPool, RMACPool, region_pool
from dcbench.settings import apply_settings

VIT = "timm:vit_tiny_patch16_224,random"


@pytest.fixture(scope="module")
def vit_ckpt():
    return resolve_checkpoint(VIT)


# ----------------------------------------------------------------------------- retrieval
@pytest.fixture(scope="module")
def retrieval_root(tmp_path_factory):
    return make_retrieval_root(tmp_path_factory.mktemp("vit-retrieval") / "data",
                               names=("roxford5k", "rparis6k"), image_size=72, n_landmarks=2, distractors=3)


def test_vit_retrieval_taps_and_pools(vit_ckpt):
    bb = vit_ckpt.backbone
    assert retrieval_taps(bb, None) == ["cls"]  # DINO eval_image_retrieval.py's descriptor
    assert retrieval_taps(bb, ["block12", "cls"]) == ["block12", "cls"]
    with pytest.raises(UsageError, match="choose from block1, .*block12 \\(or a global ViT tap: cls, avgpool\\)"):
        retrieval_taps(bb, ["logits"])
    assert isinstance(region_pool(bb, "block12", 3), RMACPool) and isinstance(region_pool(bb, "cls", 3), GlobalPool)
    feature = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    torch.testing.assert_close(GlobalPool()(feature), torch.tensor([[[0.6, 0.8]], [[0.0, 1.0]]]))


def test_vit_input_sides_are_cut_to_whole_patches(vit_ckpt):
    """DINO's strided patch convolution drops the remainder: a 50 x 70 image reads as its 48 x 64 part."""
    bb = vit_ckpt.backbone.eval()
    x = torch.randn(1, 3, 50, 70)
    with torch.no_grad():
        out, cut = bb(x, taps=["cls", "block12"]), bb(x[..., :48, :64], taps=["cls"])
    assert out["block12"].shape == (1, 192, 3, 4)
    torch.testing.assert_close(out["cls"], cut["cls"])


@pytest.mark.parametrize("name", ["roxford5k"])
def test_retrieval_runs_on_a_vit(retrieval_root, tmp_path, vit_ckpt, name):
    proto = get_protocol(name)
    settings = apply_settings(proto.default_settings(), {"image_size": 72, "workers": 0, "whitening_dim": 16,
                                                         "taps": ["cls", "block12"]})
    proto.check_data(retrieval_root, settings)
    out = proto.run(vit_ckpt, settings, retrieval_root, EvalContext(cache_dir=tmp_path / "c", settings=settings))
    assert {r.tap for r in out.metrics} == {"cls", "block12"}
    assert all(0.0 <= r.value <= 100.0 for r in out.metrics)
    assert out.extra["global_taps"] == ["cls"]
    # one global vector per image for cls, several R-MAC regions on the block12 maps
    assert out.extra["taps"]["cls"]["regions_per_image"] == 1.0 < out.extra["taps"]["block12"]["regions_per_image"]
    maps = {r.metric: r.value for r in out.metrics if r.tap == "cls"}
    assert set(maps) >= {"mAP_easy", "mAP_medium", "mAP_hard"} and not any(np.isnan(v) for v in maps.values())


def test_vit_cls_retrieval_is_dinos_ranking(retrieval_root, tmp_path, vit_ckpt):
    """whitening=none, query_crop=none: the ranking of facebookresearch/dino eval_image_retrieval.py,
    L2-normalised CLS tokens of the whole images compared by inner product, scored by revisitop's rules."""
    from dcbench.data.retrieval import read_retrieval_dataset
    from dcbench.protocols.retrieval import KAPPAS
    from dcbench.retrieval import image_sets, retrieval_scores

    proto = get_protocol("roxford5k")
    settings = apply_settings(proto.default_settings(), {"image_size": 72, "workers": 0, "whitening": "none",
                                                         "query_crop": "none"})
    out = proto.run(vit_ckpt, settings, retrieval_root, EvalContext(cache_dir=None, settings=settings))
    ds = read_retrieval_dataset(retrieval_root, "roxford5k")
    sets = image_sets(ds, [1.0], 72, "none", None)
    model = vit_ckpt.backbone.eval()

    def features(images):
        with torch.no_grad():
            rows = [model(images[i][0][None], taps=["cls"])["cls"][0] for i in range(len(images))]
        return torch.nn.functional.normalize(torch.stack(rows), dim=1)

    db, queries = features(sets[("database", 1.0)]), features(sets[("queries", 1.0)])
    ranks = torch.argsort(-(db @ queries.T), dim=0).numpy()
    expected, _ = retrieval_scores(ranks, ds.gnd, True, KAPPAS)
    got = {r.metric: r.value for r in out.metrics}
    for metric in ("mAP_easy", "mAP_medium", "mAP_hard", "mP@5_medium"):
        assert got[metric] == pytest.approx(100 * expected[metric], abs=1e-6), metric


# ----------------------------------------------------------------------------- voc07-cls
@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    from dcbench.data.synthetic_voc import make_voc
    from dcbench.data.voc import VOC_CLASSES

    return make_voc(tmp_path_factory.mktemp("vit-voc") / "data", classes=VOC_CLASSES[:3])


def test_voc07_cls_finetunes_a_vit_on_its_cls_token(vit_ckpt):
    from dcbench.voc_finetune import build_finetune_net, set_trainable

    net = build_finetune_net(vit_ckpt.backbone, 3, 32, head_dim=16)
    assert net.kind == "ViT cls (final norm) + new fc6/fc7 MLP" and net.head[1].in_features == 192
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feature = net.eval().trunk(x)
        torch.testing.assert_close(feature, vit_ckpt.backbone.eval()(x, taps=["cls"])["cls"])
    assert set_trainable(net, "fc6-8", True) == set()  # LayerNorm only: no BatchNorm affine to train
    trained = set_trainable(net, "all", False)
    assert "backbone.model.blocks.11.mlp.fc2.weight" in trained and not any(".head." in n for n in trained)


@pytest.mark.parametrize("mode", ["fc6-8", "all"])
def test_voc07_cls_runs_on_a_vit(voc_root, tmp_path, vit_ckpt, mode):
    proto = get_protocol("voc07-cls")
    settings = apply_settings(proto.default_settings(), {"image_size": 32, "iterations": 2, "batch_size": 4,
                                                         "workers": 0, "head_dim": 16, "mode": mode})
    proto.check_data(voc_root, settings)
    out = proto.run(vit_ckpt, settings, voc_root, EvalContext(cache_dir=tmp_path, workers=0, settings=settings))
    assert out.extra["head"].startswith("ViT cls") and out.extra["trunk_check"]["passed"]
    assert {r.metric for r in out.metrics} >= {"mAP"} and all(0 <= r.value <= 100 for r in out.metrics)
    if mode == "fc6-8":
        assert out.extra["trunk_check"]["changed"] == {}


# ----------------------------------------------------------------------------- voc-seg
@pytest.mark.parametrize("preset, mode", [("mmselfsup", "all"), ("deepcluster", "fc6-8")])
def test_voc_seg_runs_on_a_vit(tmp_path_factory, vit_ckpt, preset, mode):
    pytest.importorskip("mmseg")
    from dcbench import segmentation as seg
    from dcbench.data.synthetic_voc import make_voc
    from dcbench.data.voc import VOC_CLASSES

    seg.prepare_mmseg()
    classes = list(VOC_CLASSES[:2])
    root = make_voc(tmp_path_factory.mktemp("vit-seg") / "data", classes=classes, year="2012",
                    images_per_split={"train": 4, "val": 3})
    proto = get_protocol("voc-seg")
    settings = apply_settings(proto.default_settings(), {"preset": preset, "iterations": 2, "crop_size": 48,
                                                         "batch_size": 2, "workers": 0, "classes": classes})
    out = proto.run(vit_ckpt, settings, root, EvalContext())
    recipe = out.extra["recipe"]
    assert recipe["family"] == "vit" and recipe["taps"] == ["block12"] and out.extra["mode"] == mode
    assert out.extra["trunk_check"]["passed"]
    assert (out.extra["trunk_check"]["changed"] == 0) == (mode == "fc6-8")
    if preset == "mmselfsup":
        assert "last block's patch tokens" in recipe["head"]
    assert {r.metric for r in out.metrics} >= {"mIoU"} and all(0 <= r.value <= 100 for r in out.metrics)


# ----------------------------------------------------------------------------- voc-det
DET = {"iterations": 2, "batch_size": 2, "min_size": [96], "test_size": 96, "max_size": 160,
       "anchor_sizes": [32, 64], "rois_per_image": 8, "proposals_train": 20, "proposals_test": 10,
       "train_sets": ["2007:trainval"], "precise_bn": 2, "workers": 0}


def test_voc_det_builds_vitdet_single_scale(vit_ckpt):
    from dcbench.detection.model import DetectorSpec, build_detector, set_trainable

    det = build_detector(vit_ckpt.backbone, 3, DetectorSpec(min_size=(96,), test_size=96, max_size=160))
    assert det.design["feature_stride"] == 16 and det.design["feature_channels"] == 256
    assert det.design["roi_size"] == 7 and det.design["box_head_features"] == 1024
    assert "ViTDet single-scale" in det.design["design"]
    # the trunk's map is the last block's patch tokens (no final norm), as the dcbench tap block12
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(det.eval().trunk(x)["0"], vit_ckpt.backbone.eval()(x, taps=["block12"])["block12"])
    assert set_trainable(det, "fc6-8", "train") == set()  # the whole ViT frozen; the neck is not trunk
    neck = det.model.backbone.neck
    assert all(p.requires_grad for p in neck.parameters())
    fresh = build_detector(vit_ckpt.backbone, 3, DetectorSpec(min_size=(96,), test_size=96, max_size=160))
    allowed = set_trainable(fresh, "all", "train")  # once per detector: frozen flags count as fixed after it
    assert "body.net.model.blocks.0.attn.qkv.weight" in allowed and not any(".head." in n for n in allowed)


@pytest.mark.parametrize("mode", ["fc6-8", "all"])
def test_voc_det_runs_on_a_vit(voc_root, vit_ckpt, mode):
    proto = get_protocol("voc-det")
    settings = apply_settings(proto.default_settings(), {**DET, "mode": mode})
    proto.check_data(voc_root, settings)
    out = proto.run(vit_ckpt, settings, voc_root, EvalContext())
    assert out.extra["trunk_check"]["passed"] and out.extra["recipe"]["preset"] == "moco"
    assert out.extra["precise_bn"]["ran"] is False  # a ViT and its LayerNorm neck hold no BatchNorm
    assert {r.metric for r in out.metrics} >= {"AP50"} and all(0 <= r.value <= 100 for r in out.metrics)


# ----------------------------------------------------------------------------- Swin stage taps
def test_swin_stage_taps_are_timms_maps_at_any_size(tmp_path):
    import timm

    from dcbench.data.synthetic import make_image_folder
    from dcbench.models import build_backbone

    swin = build_backbone("timm:swin_tiny_patch4_window7_224", seed=0, input_size=64).eval()
    assert swin.conv_tap_names == ["stage1", "stage2", "stage3", "stage4"] and swin.channels_last
    x = torch.randn(2, 3, 64, 96)  # not the 224 px it was built for: dynamic_img_size
    with torch.no_grad():
        out = swin(x, taps=["stage2", "stage4", "cluster"])
        ref = swin.model.forward_intermediates(x, output_fmt="NCHW", intermediates_only=True)
    torch.testing.assert_close(out["stage2"], ref[1])
    torch.testing.assert_close(out["stage4"], ref[3])
    assert out["stage4"].shape == (2, 768, 2, 3)
    torch.testing.assert_close(out["cluster"], ref[3].mean(dim=(2, 3)))
    # dynamic_img_size changes no parameter: the seeded random init is timm's plain one
    torch.manual_seed(0)
    plain = timm.create_model("swin_tiny_patch4_window7_224").state_dict()
    assert all(torch.equal(v, plain[k[len("model."):]]) for k, v in swin.state_dict().items() if k.startswith("model."))
    # a frozen-feature protocol on the stage maps
    root = make_image_folder(tmp_path / "data", n_classes=2, per_class=3, image_size=64)
    proto = get_protocol("linear")
    settings = apply_settings(proto.default_settings(), {"image_size": 64, "batch_size": 6, "workers": 0,
                                                         "epochs": 1, "cached": True, "crops": "center"})
    from dcbench import evaluate

    res = evaluate.run(evaluate.Plan(proto, settings, root), resolve_checkpoint("timm:swin_tiny_patch4_window7_224"),
                       EvalContext(cache_dir=tmp_path / "cache"))
    assert {r.tap for r in res.metrics} == {"stage1", "stage2", "stage3", "stage4"}
    assert res.extra["pooling"]["stage4"]["kind"] != "none"
