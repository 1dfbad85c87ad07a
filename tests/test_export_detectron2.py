"""The detectron2 weight export (dcbench/export_detectron2.py): key renaming as detectron2's
tools/convert-torchvision-to-d2.py does it, shapes and values, the pickle layout, refusals."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner

from dcbench.checkpoint import resolve_checkpoint
from dcbench.cli import main
from dcbench.errors import CheckpointError
from dcbench.export_detectron2 import detectron2_key, detectron2_state_dict, export_detectron2, resnet_depth


@pytest.fixture(scope="module")
def tv_resnet50_file(tmp_path_factory):
    """A torchvision ResNet-50 state dict saved as torchvision publishes it (a plain .pth)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    return path


@pytest.mark.parametrize("key, expected", [
    ("conv1.weight", "stem.conv1.weight"),
    ("bn1.running_var", "stem.conv1.norm.running_var"),
    ("layer1.0.conv1.weight", "res2.0.conv1.weight"),
    ("layer1.0.bn1.running_mean", "res2.0.conv1.norm.running_mean"),
    ("layer2.3.bn3.bias", "res3.3.conv3.norm.bias"),
    ("layer1.0.downsample.0.weight", "res2.0.shortcut.weight"),
    ("layer4.0.downsample.1.weight", "res5.0.shortcut.norm.weight"),
    ("layer4.2.conv3.weight", "res5.2.conv3.weight"),
    ("fc.weight", None),
    ("layer1.0.bn1.num_batches_tracked", None),
])
def test_key_renaming(key, expected):
    assert detectron2_key(key) == expected


def test_every_resnet50_weight_name_maps_back():
    """dcbench.detectron2_names holds one table for both ways: torchvision -> detectron2 -> torchvision
    is the identity on every weight of a ResNet-50; names outside the table map to None."""
    from dcbench.detectron2_names import to_detectron2, to_torchvision

    keys = [k for k in torchvision.models.resnet50(weights=None).state_dict()
            if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
    d2 = [to_detectron2(k) for k in keys]
    assert None not in d2 and len(set(d2)) == len(keys)
    assert [to_torchvision(k) for k in d2] == keys
    assert to_detectron2("layer5.0.conv1.weight") is None and to_torchvision("res1.0.conv1.weight") is None
    assert to_torchvision("roi_heads.box_predictor.cls_score.weight") is None


def test_unknown_layout_is_refused():
    with pytest.raises(CheckpointError, match="layer1.0.se.fc1.weight"):
        detectron2_key("layer1.0.se.fc1.weight")


def _check_resnet50_export(path, sd):
    with open(path, "rb") as f:
        obj = pickle.load(f)
    assert set(obj) == {"model", "__author__", "matching_heuristics"}
    assert obj["__author__"] == "dcbench" and obj["matching_heuristics"] is True
    model = obj["model"]
    shapes = {"stem.conv1.weight": (64, 3, 7, 7), "stem.conv1.norm.weight": (64,),
              "res2.0.conv1.norm.running_mean": (64,), "res2.0.shortcut.weight": (256, 64, 1, 1),
              "res2.0.shortcut.norm.running_var": (256,), "res4.5.conv2.weight": (256, 256, 3, 3),
              "res5.0.shortcut.weight": (2048, 1024, 1, 1), "res5.2.conv3.weight": (2048, 512, 1, 1)}
    for key, shape in shapes.items():
        assert isinstance(model[key], np.ndarray) and model[key].shape == shape, key
    # every weight and BN statistic made it, renamed; the classifier and counters did not
    kept = [k for k in sd if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
    assert len(model) == len(kept) == 265  # 320 tensors less fc.weight/bias and 53 BN counters
    assert not any(k.startswith("fc") or "num_batches_tracked" in k for k in model)
    for key in kept:
        np.testing.assert_array_equal(model[detectron2_key(key)], sd[key].numpy())
    assert resnet_depth(model) == 50


def test_torchvision_resnet50_file(tv_resnet50_file, tmp_path):
    loaded = resolve_checkpoint(str(tv_resnet50_file))
    out = export_detectron2(loaded, tmp_path / "sub" / "r50.pkl")
    assert out == tmp_path / "sub" / "r50.pkl"
    _check_resnet50_export(out, torch.load(tv_resnet50_file, weights_only=True))
    assert not list(out.parent.glob(".*.tmp"))  # atomic write left no temp file


def test_timm_resnet50(tmp_path):
    loaded = resolve_checkpoint("timm:resnet50")
    sd = {k[len("model."):]: v for k, v in loaded.backbone.backbone_state_dict().items()}
    _check_resnet50_export(export_detectron2(loaded, tmp_path / "timm.pkl"), sd)


def test_resnet18_basic_blocks():
    model = detectron2_state_dict(resolve_checkpoint("tv:resnet18"))
    assert model["res5.1.conv2.weight"].shape == (512, 512, 3, 3)
    assert "res2.0.conv3.weight" not in model and "res2.0.shortcut.weight" not in model
    assert resnet_depth(model) is None  # detectron2's C4 head needs bottleneck blocks


@pytest.mark.parametrize("spec, why", [("random:alexnet,size=64", "not a ResNet"),
                                       ("random:tv:resnet18,sobel=1", "Sobel")])
def test_refusals(spec, why, tmp_path):
    with pytest.raises(CheckpointError, match=why):
        export_detectron2(resolve_checkpoint(spec), tmp_path / "x.pkl")
    assert not (tmp_path / "x.pkl").exists()


def _cli_has_detectron2_target() -> bool:
    convert = main.commands["checkpoint"].commands["convert"]
    target = next(p for p in convert.params if p.name == "target")
    return "detectron2" in getattr(target.type, "choices", ())


@pytest.mark.skipif(not _cli_has_detectron2_target(), reason="`checkpoint convert --to detectron2` not wired yet")
def test_cli_convert(tv_resnet50_file, tmp_path):
    out = tmp_path / "r50.pkl"
    result = CliRunner().invoke(main, ["checkpoint", "convert", str(tv_resnet50_file), str(out), "--to", "detectron2"])
    assert result.exit_code == 0, result.output
    _check_resnet50_export(out, torch.load(tv_resnet50_file, weights_only=True))
    bad = CliRunner().invoke(main, ["checkpoint", "convert", "random:alexnet,size=64", str(tmp_path / "a.pkl"),
                                    "--to", "detectron2"])
    assert bad.exit_code == 1 and "not a ResNet" in bad.output


def test_loads_into_detectron2(tv_resnet50_file, tmp_path):
    """Where detectron2 is installed: its checkpointer fills an R50 backbone with every exported tensor."""
    pytest.importorskip("detectron2")
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone import build_resnet_backbone

    out = export_detectron2(resolve_checkpoint(str(tv_resnet50_file)), tmp_path / "r50.pkl")
    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH, cfg.MODEL.RESNETS.STRIDE_IN_1X1 = 50, False
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res5"]
    backbone = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    DetectionCheckpointer(backbone).load(str(out))
    sd = torch.load(tv_resnet50_file, weights_only=True)
    torch.testing.assert_close(backbone.state_dict()["res5.2.conv3.weight"], sd["layer4.2.conv3.weight"])
