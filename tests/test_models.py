"""Backbones: taps of every built-in arch at 64 and 224 px, init, Sobel, registry, one forward."""
import math

import pytest
import torch
from torch import nn

import dcbench
from dcbench.errors import ArchError
from dcbench.models import CLUSTER_TAP, LOGITS_TAP, build_backbone, list_archs

ALEXNET_SHAPES = {
    64: {"conv1": (96, 15, 15), "conv2": (256, 7, 7), "conv3": (384, 3, 3), "conv4": (384, 3, 3),
         "conv5": (256, 3, 3), "fc6": (4096,), "fc7": (4096,)},
    224: {"conv1": (96, 55, 55), "conv2": (256, 27, 27), "conv3": (384, 13, 13), "conv4": (384, 13, 13),
          "conv5": (256, 13, 13), "fc6": (4096,), "fc7": (4096,)},
}


def _vgg_shapes(size: int) -> dict[str, tuple]:
    widths = {1: 64, 2: 128, 3: 256, 4: 512, 5: 512}
    shapes = {}
    for block, n in zip(range(1, 6), (2, 2, 3, 3, 3)):
        for i in range(1, n + 1):
            side = size // 2 ** (block - 1)
            shapes[f"conv{block}_{i}"] = (widths[block], side, side)
    shapes["fc6"] = shapes["fc7"] = (4096,)
    return shapes


@pytest.mark.parametrize("size", [64, 224])
@pytest.mark.parametrize("sobel", [True, False])
def test_alexnet_every_tap(size, sobel):
    bb = build_backbone("alexnet", sobel=sobel, input_size=size, seed=0).eval()
    out = bb(torch.randn(2, 3, size, size))
    assert list(out) == bb.tap_names == list(ALEXNET_SHAPES[size])
    for tap, shape in ALEXNET_SHAPES[size].items():
        assert tuple(out[tap].shape) == (2, *shape), tap
        assert (out[tap] >= 0).all(), f"{tap} is a ReLU output"
    assert bb.classifier[1].in_features == 256 * (6 if size == 224 else 1) ** 2


@pytest.mark.parametrize("size", [64, 224])
def test_vgg16_every_tap(size):
    bb = build_backbone("vgg16", input_size=size, seed=0).eval()
    with torch.no_grad():
        out = bb(torch.randn(1, 3, size, size))
    expected = _vgg_shapes(size)
    assert list(out) == bb.tap_names == list(expected)
    for tap, shape in expected.items():
        assert tuple(out[tap].shape) == (1, *shape), tap
    assert bb.classifier[0].in_features == 512 * (size // 32) ** 2
    assert sum(isinstance(m, nn.Dropout) for m in bb.classifier) == 1


@pytest.mark.parametrize("arch", ["timm:resnet18", "tv:resnet18"])
@pytest.mark.parametrize("size", [64, 224])
def test_resnet_stage_taps(arch, size):
    bb = build_backbone(arch, input_size=size, seed=0).eval()
    assert bb.tap_names == ["conv1", "res2", "res3", "res4", "res5", "avgpool"]
    assert bb.conv_tap_names == ["conv1", "res2", "res3", "res4", "res5"]
    with torch.no_grad():
        out = bb(torch.randn(1, 3, size, size), taps=bb.tap_names + [CLUSTER_TAP])
    assert out["res5"].shape[-1] == size // 32
    assert tuple(out[CLUSTER_TAP].shape) == (1, 512)
    assert torch.allclose(out[CLUSTER_TAP], out["res5"].mean(dim=(2, 3)))
    assert torch.equal(out["avgpool"], out[CLUSTER_TAP])


@pytest.mark.parametrize("arch", ["timm:resnet50", "tv:resnet50"])
def test_resnet50_avgpool_tap_is_the_2048d_global_average(arch):
    """VISSL's res5avg: the global average of res5, what the classifier of the model reads."""
    bb = build_backbone(arch, input_size=64, seed=0).eval()
    assert "avgpool" in bb.tap_names and "avgpool" not in bb.conv_tap_names
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = bb(x, taps=["avgpool", "res5"])
        alone = bb(x, taps=["avgpool"])["avgpool"]
        reference = bb.model.forward_head(bb.model.forward_features(x), pre_logits=True) if arch.startswith("timm") \
            else torch.flatten(bb.model.avgpool(out["res5"]), 1)
    assert tuple(out["avgpool"].shape) == (2, 2048)
    torch.testing.assert_close(out["avgpool"], out["res5"].mean(dim=(2, 3)))
    torch.testing.assert_close(alone, out["avgpool"])
    torch.testing.assert_close(out["avgpool"], reference)


def test_timm_and_tv_resnet_agree_with_same_weights():
    a = build_backbone("timm:resnet18", seed=0).eval()
    b = build_backbone("tv:resnet18", seed=1).eval()
    b.model.load_state_dict(a.model.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        oa, ob = a(x), b(x)
    for tap in a.tap_names:
        assert torch.allclose(oa[tap], ob[tap], atol=1e-5), tap


def test_early_taps_stop_the_forward_pass():
    bb = build_backbone("tv:vgg11", seed=0).eval()
    calls = []
    bb.model.classifier.register_forward_hook(lambda *a: calls.append(1))
    bb(torch.randn(1, 3, 64, 64), taps=["conv1"])
    assert calls == []


def test_cluster_feature_is_fc7_before_relu():
    bb = build_backbone("alexnet", input_size=64, seed=0).eval()
    out = bb(torch.randn(4, 3, 64, 64), taps=["fc7", CLUSTER_TAP])
    assert (out[CLUSTER_TAP] < 0).any()
    assert torch.equal(out["fc7"], out[CLUSTER_TAP].clamp(min=0))


def test_top_layer_logits_and_init():
    bb = build_backbone("alexnet", input_size=64, seed=0).eval()
    with pytest.raises(KeyError, match="top layer"):
        bb(torch.randn(1, 3, 64, 64), taps=[LOGITS_TAP])
    layer = bb.set_top_layer(50)
    assert layer.weight.shape == (50, 4096) and torch.all(layer.bias == 0)
    assert abs(layer.weight.std().item() - 0.01) < 0.001
    assert bb(torch.randn(3, 3, 64, 64), taps=[LOGITS_TAP])[LOGITS_TAP].shape == (3, 50)


def test_deepcluster_init_matches_paper():
    bb = build_backbone("alexnet", seed=0)
    conv2 = bb.features[4]
    expected = math.sqrt(2.0 / (5 * 5 * 256))
    assert abs(conv2.weight.std().item() - expected) / expected < 0.02
    assert torch.all(conv2.bias == 0)
    assert torch.all(bb.features[1].weight == 1) and torch.all(bb.features[1].bias == 0)
    assert abs(bb.classifier[1].weight.std().item() - 0.01) < 0.0005


def test_sobel_front_end_is_fixed_and_exact():
    bb = build_backbone("alexnet", seed=0)
    grey, edges = bb.sobel[0], bb.sobel[1]
    assert torch.allclose(grey.weight, torch.full((1, 3, 1, 1), 1 / 3)) and torch.all(grey.bias == 0)
    assert edges.weight[0, 0].tolist() == [[1, 0, -1], [2, 0, -2], [1, 0, -1]]
    assert edges.weight[1, 0].tolist() == [[1, 2, 1], [0, 0, 0], [-1, -2, -1]]
    assert not any(p.requires_grad for p in bb.sobel.parameters())
    assert bb.features[0].in_channels == 2
    assert build_backbone("alexnet", sobel=False).features[0].in_channels == 3


def test_random_spec_is_seeded():
    a = dcbench.load_backbone("random:alexnet,seed=3,size=64")
    b = dcbench.load_backbone("random:alexnet,seed=3,size=64")
    c = dcbench.load_backbone("random:alexnet,seed=4,size=64")
    assert torch.equal(a.features[0].weight, b.features[0].weight)
    assert not torch.equal(a.features[0].weight, c.features[0].weight)
    assert not dcbench.load_backbone("random:alexnet,sobel=0").has_sobel


def test_unknown_arch_and_tap_errors():
    with pytest.raises(ArchError, match="unknown arch 'resnet9000'"):
        build_backbone("resnet9000")
    with pytest.raises(ArchError, match="unknown timm model"):
        build_backbone("timm:not_a_model")
    with pytest.raises(KeyError, match="unknown tap"):
        build_backbone("alexnet", input_size=64)(torch.randn(1, 3, 64, 64), taps=["conv9"])
    assert "alexnet" in list_archs() and "timm:NAME" in list_archs()


def test_fc_taps_need_the_built_input_size():
    bb = build_backbone("alexnet", input_size=64).eval()
    with pytest.raises(ValueError, match="built for 64px"):
        bb(torch.randn(1, 3, 224, 224), taps=["fc7"])
    assert bb(torch.randn(1, 3, 224, 224), taps=["conv5"])["conv5"].shape[-1] == 13


def test_input_config_per_backbone():
    """Random inits (DeepCluster, torchvision, timm) have no input convention of their own: the
    protocols' presets apply to them, as before issue 19 (published weights: test_pretrained_models)."""
    default = build_backbone("alexnet", input_size=64).input_config
    assert default == {"input_size": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                       "interpolation": "bilinear", "crop_pct": 0.875, "crop_mode": "center", "source": None}
    assert build_backbone("tv:resnet18").input_config == default
    assert build_backbone("timm:resnet18").input_config == default  # not timm's config of weights it does not have
    default["mean"][0] = 0.0  # every backbone owns its copy
    assert build_backbone("vgg16", input_size=64).input_config["mean"][0] == 0.485


def test_vit_family_and_cls_cluster_feature():
    bb = build_backbone("timm:deit_tiny_distilled_patch16_224", seed=0).eval()  # two prefix tokens
    assert bb.family == "vit" and bb.conv_tap_names[-1] == "block12" and "cls" in bb.tap_names
    with torch.no_grad():
        out = bb(torch.randn(1, 3, 64, 64), taps=["block12", "cls", CLUSTER_TAP])
    assert out["block12"].shape == (1, 192, 4, 4)
    assert torch.equal(out[CLUSTER_TAP], out["cls"]) and out["cls"].shape == (1, 192)
