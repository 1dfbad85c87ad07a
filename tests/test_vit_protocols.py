"""Issue 19, ViTs in the probes: DINO eval_linear.py's concatenated CLS taps (cls4, cls+avgpool),
the linear ``dino`` preset, ViT default taps of linear / knn (cls), and the input convention of
published weights (timm pretrained_cfg / torchvision transforms) against the presets' own.

No network: ViTs are random timm inits or weights laid out in a temporary Hugging Face cache."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from PIL import Image

import dcbench.protocols.linear as linear
from dcbench import evaluate
from dcbench.checkpoint import resolve_checkpoint
from dcbench.data.synthetic import make_image_folder
from dcbench.data.transforms import (InputConvention, center_transform_id, convention_center_id,
                                     convention_center_transform, resolve_convention)
from dcbench.errors import UsageError
from dcbench.models import build_backbone
from dcbench.models.external import wrap_timm
from dcbench.pooling import default_taps, probe_pooling, resolve_taps
from dcbench.protocol import EvalContext, get_protocol
from dcbench.settings import apply_settings

VIT = "timm:vit_tiny_patch16_224"  # 12 blocks, embed dim 192 (the ViT-S side of DINO's rule)
REVISION = "0123456789abcdef0123456789abcdef01234567"
FAST = {"image_size": 32, "batch_size": 16, "workers": 0}


@pytest.fixture(scope="module")
def vit():
    return build_backbone(VIT, seed=0).eval()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("vit") / "data", n_classes=3, per_class=6, image_size=32)


def dino_intermediate(model: torch.nn.Module, x: torch.Tensor, n: int) -> list[torch.Tensor]:
    """facebookresearch/dino vision_transformer.py get_intermediate_layers: norm of the last n blocks' tokens."""
    tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    out = []
    for i, block in enumerate(model.blocks):
        tokens = block(tokens)
        if len(model.blocks) - i <= n:
            out.append(model.norm(tokens))
    return out


def run(root, tmp_path, ckpt, name: str = "linear", **overrides):
    proto = get_protocol(name)
    settings = apply_settings(proto.default_settings(), {**FAST, **overrides})
    return evaluate.run(evaluate.Plan(proto, settings, root), ckpt, EvalContext(cache_dir=tmp_path / "cache"))


# ----------------------------------------------------------------------------- DINO's taps
def test_concatenated_cls_taps_equal_dino_eval_linear(vit):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = vit(x, taps=["cls4", "cls+avgpool", "cls3+avgpool", "cls"])
        four = dino_intermediate(vit.model, x, 4)
    # eval_linear.py: torch.cat([x[:, 0] for x in intermediate_output], dim=-1) (n_last_blocks 4, ViT-S)
    torch.testing.assert_close(out["cls4"], torch.cat([t[:, 0] for t in four], dim=-1))
    # n_last_blocks 1 + avgpool_patchtokens (ViT-B): CLS and the mean of the last block's normed patch tokens
    last = four[-1]
    torch.testing.assert_close(out["cls+avgpool"], torch.cat([last[:, 0], last[:, 1:].mean(dim=1)], dim=-1))
    torch.testing.assert_close(out["cls3+avgpool"][:, :3 * 192], torch.cat([t[:, 0] for t in four[1:]], dim=-1))
    torch.testing.assert_close(out["cls4"][:, -192:], out["cls"])
    assert out["cls4"].shape == (2, 768) and out["cls+avgpool"].shape == (2, 384)


def test_concatenated_taps_of_a_rope_vit_read_forward_intermediates():
    """Eva (vit_*_rope_*) blocks take rotary embeddings: the taps go through timm's forward_intermediates."""
    model = timm.create_model("vit_base_patch16_rope_224", depth=4, embed_dim=64, num_heads=2, dynamic_img_size=True)
    bb = wrap_timm("vit_base_patch16_rope_224", model, input_size=32).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = bb(x, taps=["cls4", "cls", "block2"])
        ref = model.forward_intermediates(x, indices=[0, 1, 2, 3], norm=True, output_fmt="NLC",
                                          return_prefix_tokens=True, intermediates_only=True)
    torch.testing.assert_close(out["cls4"], torch.cat([prefix[:, 0] for _tokens, prefix in ref], dim=-1))
    torch.testing.assert_close(out["cls4"][:, -64:], out["cls"])
    assert out["block2"].shape == (1, 64, 2, 2)


def test_concat_tap_names(vit):
    assert vit.tap_names[-4:] == ["cls", "avgpool", "cls4", "cls+avgpool"]
    assert resolve_taps(vit, ["cls12+avgpool", "cls2"]) == ["cls12+avgpool", "cls2"]  # any N up to the depth
    for bad in ("cls13", "cls1", "cls0", "cls04", "avgpool+cls"):
        with pytest.raises(UsageError, match=f"unknown tap '{bad.replace('+', '.')}'"):
            resolve_taps(vit, [bad])
    plans = probe_pooling(vit, ["cls4", "cls+avgpool"], 32)
    assert (plans["cls4"].kind, plans["cls4"].dim, plans["cls+avgpool"].dim) == ("none", 768, 384)


# ----------------------------------------------------------------------------- default taps
def test_vit_default_taps_are_cls_and_other_archs_keep_theirs(vit):
    proto = get_protocol("linear")
    resolve = lambda bb, **o: proto.resolve(apply_settings(proto.default_settings(), {**FAST, **o}), bb, 3).taps
    assert resolve(vit) == resolve(vit, preset="vissl") == ["cls"]
    assert resolve(vit, preset="dino") == ["cls4"]  # embed dim 192 < 768: DINO's ViT-S rule
    base = wrap_timm("vit_base_patch16_224", timm.create_model("vit_base_patch16_224", depth=2, dynamic_img_size=True))
    assert resolve(base, preset="dino") == ["cls+avgpool"]  # 768: DINO's ViT-B rule
    resnet, alexnet = build_backbone("tv:resnet18", input_size=64), build_backbone("alexnet", input_size=64)
    assert resolve(resnet) == ["conv1", "res2", "res3", "res4", "res5"]
    assert resolve(resnet, preset="vissl")[-1] == "avgpool" and resolve(resnet, preset="dino") == ["avgpool"]
    assert resolve(alexnet) == resolve(alexnet, preset="dino") == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    plans = proto.resolve(apply_settings(proto.default_settings(), {"preset": "dino"}),
                          build_backbone("alexnet"), 3).plans
    assert plans["conv1"].table == "deepcluster-alexnet"  # dino has no table of its own
    assert default_taps(vit, image_feature=True) == ["cls"] and default_taps(vit) == vit.conv_tap_names


def test_knn_on_a_vit_defaults_to_cls(vit, root, tmp_path):
    ckpt = resolve_checkpoint(f"{VIT},random")
    out = run(root, tmp_path, ckpt, name="knn", ks=[3])
    assert {r.tap for r in out.metrics} == {"cls"} and out.extra["taps"] == ["cls"]
    assert out.extra["input_convention"]["source"] == "protocol preset"
    assert out.extra["interpolation"] == "bicubic"


# ----------------------------------------------------------------------------- the dino preset
def test_dino_preset_settings_and_schedule():
    proto = get_protocol("linear")
    s = proto.filled(apply_settings(proto.default_settings(), {"preset": "dino"}))
    assert (s.epochs, s.lr, s.weight_decay, s.momentum, s.crops, s.head_init, s.interpolation, s.batch_size) == \
        (100, 0.001, 0.0, 0.9, "center", "normal", "bicubic", 256)
    # CosineAnnealingLR(optimizer, 100, eta_min=0), stepped per epoch
    assert [linear.dino_lr(0.001, e, 100) for e in (0, 50, 100)] == pytest.approx([0.001, 0.0005, 0.0])
    optim = linear.probe_optim("dino", 0.001, 0.0, 0.9, [], "normal", epochs=4)
    assert optim.schedule(2, 999, 0.0) == pytest.approx(0.0005) and not optim.batchnorm and optim.init_std == 0.01
    with pytest.raises(UsageError, match="train_center_crop"):
        apply_settings(proto.default_settings(), {"preset": "dino", "train_center_crop": True})
    card = get_protocol("imagenet-linear").card(apply_settings(proto.default_settings(), {"preset": "dino"}))
    assert "n_last_blocks" in card.sources["taps"] and "0.001" in card.sources["lr"]
    assert any("batch 256" in d.what for d in card.deviations)


@pytest.mark.parametrize("cached", [True, False])
def test_dino_preset_runs_on_a_vit(root, tmp_path, cached):
    out = run(root, tmp_path, resolve_checkpoint(f"{VIT},random"), preset="dino", epochs=2, cached=cached)
    assert {r.tap for r in out.metrics} == {"cls4"}
    extra = out.extra
    assert (extra["lr"], extra["weight_decay"], extra["head_init"], extra["crops"]) == \
        (0.001, 0.0, "N(0, 0.01), bias 0", "center")
    assert extra["train_crops"] == (None if cached else "RandomResizedCrop, flip")
    assert extra["lr_schedule"].startswith("lr_e = lr0 * (1 + cos(pi * e / 2)) / 2")
    assert extra["input_convention"]["interpolation"] == "bicubic"
    assert extra["pooling"]["cls4"]["dim"] == 768
    assert all(0 <= r.value <= 100 for r in out.metrics)


# ----------------------------------------------------------------------------- input conventions
def _put_vit_weights(cache, repo: str, pretrained_cfg: dict) -> dict:
    sd = {k: v.contiguous() for k, v in timm.create_model("vit_tiny_patch16_224").state_dict().items()}
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(REVISION)
    config = {"architecture": "vit_tiny_patch16_224", "num_classes": 1000,
              "pretrained_cfg": {"input_size": [3, 224, 224], "num_classes": 1000, "first_conv": "patch_embed.proj",
                                 "classifier": "head", **pretrained_cfg}}
    (snapshot / "config.json").write_text(json.dumps(config))
    safetensors.torch.save_file(sd, str(snapshot / "model.safetensors"))
    return sd


@pytest.fixture
def half_mean_vit(tmp_path, monkeypatch):
    """Published ViT weights whose config says mean = std = 0.5, bilinear, crop_pct 0.8."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    _put_vit_weights(tmp_path / "hf", "someone/half-vit", {"mean": [0.5] * 3, "std": [0.5] * 3,
                                                            "interpolation": "bilinear", "crop_pct": 0.8})
    return resolve_checkpoint("hf-hub:someone/half-vit")


def test_the_rule_weights_convention_or_the_presets(half_mean_vit, vit):
    own = resolve_convention(half_mean_vit.backbone, "weights", "bicubic")
    assert (own.mean, own.std, own.interpolation, own.crop_pct) == ((0.5,) * 3, (0.5,) * 3, "bilinear", 0.8)
    assert own.source == "timm pretrained_cfg of hf-hub:someone/half-vit" and own.resize(32) == 40  # floor(32 / 0.8)
    assert resolve_convention(half_mean_vit.backbone, "preset", "bicubic") == InputConvention(interpolation="bicubic")
    assert resolve_convention(vit, "weights", "bicubic") == InputConvention(interpolation="bicubic")  # random init
    # the presets' transforms and feature-cache ids are those of before issue 19
    preset = InputConvention(interpolation="bicubic")
    assert convention_center_id(32, preset) == center_transform_id(32, "bicubic") == \
        "resize37-bicubic-center32-imagenet-norm"
    assert convention_center_id(32, own) != convention_center_id(32, InputConvention(source="other", crop_pct=0.8))
    # the weights' normalisation is applied: a mid-grey image becomes ~0 under mean 0.5 / std 0.5
    grey = Image.fromarray(np.full((48, 48, 3), 128, dtype=np.uint8))
    assert convention_center_transform(32, own)(grey).abs().max() < 0.01
    assert convention_center_transform(32, preset)(grey).abs().max() > 0.05


def test_border_crop_mode_names_the_fix(vit):
    vit_copy = build_backbone(VIT)
    vit_copy.input_config = {**vit_copy.input_config, "crop_mode": "border", "source": "timm pretrained_cfg of x"}
    with pytest.raises(UsageError, match="input_convention=preset"):
        resolve_convention(vit_copy)


def test_knn_and_linear_record_the_weights_convention(half_mean_vit, root, tmp_path):
    knn = run(root, tmp_path, half_mean_vit, name="knn", ks=[3])
    assert knn.extra["input_convention"] == {"source": "timm pretrained_cfg of hf-hub:someone/half-vit",
                                             "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear",
                                             "crop_pct": 0.8, "crop_mode": "center"}
    assert knn.extra["interpolation"] == "bilinear"
    forced = run(root, tmp_path, half_mean_vit, name="knn", ks=[3], input_convention="preset")
    assert forced.extra["input_convention"]["source"] == "protocol preset"
    assert forced.extra["interpolation"] == "bicubic"
    lin = run(root, tmp_path, half_mean_vit, cached=True, epochs=1, crops="center")
    assert lin.extra["input_convention"]["mean"] == [0.5] * 3 and {r.tap for r in lin.metrics} == {"cls"}


def test_torchvision_weights_convention_resize():
    """ResNet50_Weights.IMAGENET1K_V2: resize 232, crop 224, bilinear (its transforms())."""
    import torchvision

    from dcbench.models.hub import torchvision_input_config

    config = torchvision_input_config(torchvision.models.ResNet50_Weights.IMAGENET1K_V2)
    assert config["source"] == "torchvision ResNet50_Weights.IMAGENET1K_V2.transforms()"

    class _Holder:
        input_config = config

    convention = resolve_convention(_Holder())
    assert (convention.resize(224), convention.interpolation) == (232, "bilinear")
    assert math.isclose(convention.crop_pct, 224 / 232, abs_tol=1e-4)


# ----------------------------------------------------------------------------- the mocov3 preset (last-block CLS)
def test_mocov3_preset_is_the_simple_last_block_cls_probe(vit):
    proto = get_protocol("linear")
    s = proto.filled(apply_settings(proto.default_settings(), {"preset": "mocov3"}))
    # moco-v3 main_lincls.py defaults + CONFIG.md's ViT command (--lr=3, a base lr for batch 256)
    assert (s.epochs, s.lr, s.weight_decay, s.momentum, s.crops, s.head_init, s.interpolation, s.batch_size) == \
        (90, 3.0, 0.0, 0.9, "center", "normal", "bilinear", 256)
    assert proto.resolve(s, vit, 3).taps == ["cls"]
    assert proto.resolve(s, build_backbone("tv:resnet18", input_size=64), 3).taps == ["avgpool"]
    optim = linear.probe_optim("mocov3", 3.0, 0.0, 0.9, [], "normal", epochs=4)
    assert optim.schedule(2, 999, 0.0) == pytest.approx(1.5) and optim.init_std == 0.01 and not optim.batchnorm
    with pytest.raises(UsageError, match="preset mocov3"):
        apply_settings(proto.default_settings(), {"preset": "mocov3", "train_center_crop": True})
    card = get_protocol("imagenet-linear").card(apply_settings(proto.default_settings(), {"preset": "mocov3"}))
    assert "moco-v3 main_lincls.py" in card.sources["taps"] and "--lr=3" in card.sources["lr"]
    assert [d.what for d in card.deviations][0].startswith("batch 256 with lr 3")
    places = get_protocol("places-linear")
    assert places.filled(apply_settings(places.default_settings(), {"preset": "mocov3"})).epochs == 90


def test_mocov3_preset_runs_on_a_vit(root, tmp_path):
    out = run(root, tmp_path, resolve_checkpoint(f"{VIT},random"), preset="mocov3", epochs=2)
    assert {r.tap for r in out.metrics} == {"cls"}
    extra = out.extra
    assert (extra["lr"], extra["weight_decay"], extra["head_init"], extra["preset"]) == \
        (3.0, 0.0, "N(0, 0.01), bias 0", "mocov3")
    assert extra["train_crops"] == "RandomResizedCrop, flip" and extra["crops"] == "center"
    assert extra["lr_schedule"].startswith("lr_e = lr0 * (1 + cos(pi * e / 2)) / 2")
    assert extra["input_convention"]["interpolation"] == "bilinear" and extra["pooling"]["cls"]["dim"] == 192
