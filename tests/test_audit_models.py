"""Audit of the model zoo: every registered arch (and an example of every prefix) builds and
computes every tap it lists with the documented shape; torchvision models whose ``features`` are
not a plain conv stack (DenseNet, SqueezeNet) get real stage taps and the right width; the
original DeepCluster VGG16 file layout maps exactly; fc taps at the wrong size are one user error.

Models are small or built at 64 px; no weights are downloaded."""
from __future__ import annotations

import torch
from click.testing import CliRunner
from torch import nn

import pytest

from dcbench.checkpoint import load_checkpoint, save_checkpoint
from dcbench.cli import main
from dcbench.errors import ArchError, DcbenchError
from dcbench.models import CLUSTER_TAP, LOGITS_TAP, build_backbone, list_archs
from dcbench.pretrained.registry import load_manifest

#: one cheap example per registered prefix (README "Architectures": ResNets, ViTs, Swins, and the
#: torchvision layouts: plain conv stacks, ResNets, and ``features`` stages)
PREFIX_EXAMPLES = {
    "timm": ["timm:resnet18", "timm:vit_tiny_patch16_224", "timm:swin_tiny_patch4_window7_224",
             "timm:efficientnet_b0"],
    "tv": ["tv:resnet18", "tv:alexnet", "tv:mobilenet_v3_small", "tv:densenet121", "tv:squeezenet1_1"],
}
PLAIN_ARCHS = [a for a in list_archs() if ":" not in a]
ALL_EXAMPLES = PLAIN_ARCHS + [name for names in PREFIX_EXAMPLES.values() for name in names]
#: 2-D taps (one vector per image), by name; every other listed tap is a map N x C x H x W
VECTOR_TAPS = {"fc6", "fc7", "cls", "avgpool", "cls4", "cls+avgpool"}


def test_every_registered_prefix_has_an_example():
    """A newly registered prefix must be added to PREFIX_EXAMPLES so the sweep below covers it."""
    prefixes = {a.split(":")[0] for a in list_archs() if a.endswith(":NAME")}
    assert prefixes == set(PREFIX_EXAMPLES)


@pytest.mark.parametrize("arch", ALL_EXAMPLES)
def test_every_registered_arch_computes_every_listed_tap(arch):
    bb = build_backbone(arch, input_size=64, seed=0).eval()
    taps = [*bb.tap_names, CLUSTER_TAP]
    with torch.no_grad():
        out = bb(torch.randn(2, 3, 64, 64), taps=taps)
    assert set(out) == set(taps)
    assert set(bb.conv_tap_names) <= set(bb.tap_names) and len(bb.conv_tap_names) >= 2, bb.conv_tap_names
    for tap in bb.tap_names:
        expected_dims = 2 if tap in VECTOR_TAPS else 4
        assert out[tap].dim() == expected_dims and out[tap].shape[0] == 2, (tap, tuple(out[tap].shape))
        assert torch.isfinite(out[tap]).all(), tap
    assert tuple(out[CLUSTER_TAP].shape) == (2, bb.feature_dim)
    if bb.family != "vit" and not bb.is_deepcluster:  # the cluster feature pools the last stage
        last = out[bb.conv_tap_names[-1]]
        assert last.shape[1] == bb.feature_dim
        assert torch.allclose(out[CLUSTER_TAP], last.mean(dim=(-2, -1)), atol=1e-5)
    bb.set_top_layer(7)
    with torch.no_grad():
        assert tuple(bb(torch.randn(1, 3, 64, 64), taps=[LOGITS_TAP])[LOGITS_TAP].shape) == (1, 7)
    assert bb.describe()["taps"] == bb.tap_names


@pytest.mark.parametrize("arch", sorted({e.arch for e in load_manifest().values()}))
def test_every_published_checkpoint_arch_builds_at_its_size(arch):
    """The archs the pretrained manifest names build at its input size with the taps README lists."""
    entries = [e for e in load_manifest().values() if e.arch == arch]
    for entry in entries:
        bb = build_backbone(entry.arch, sobel=entry.input.get("sobel"), input_size=entry.input_size, seed=0)
        assert bb.arch == entry.arch and bb.input_size == entry.input_size
        assert bb.has_sobel == bool(entry.input.get("sobel"))
        if arch == "alexnet":
            assert bb.tap_names == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7"]
        elif arch == "tv:resnet50":
            assert bb.tap_names == ["conv1", "res2", "res3", "res4", "res5", "avgpool"] and bb.feature_dim == 2048


@pytest.mark.parametrize("arch", ["alexnet", "vgg16"])
@pytest.mark.parametrize("size", [65, 100, 150])
def test_deepcluster_nets_at_sizes_between_64_and_224(arch, size):
    """README: alexnet and vgg16 work from 64 px to 224 px, fc layers sized for the built size."""
    bb = build_backbone(arch, sobel=True, input_size=size, seed=0).eval()
    with torch.no_grad():
        out = bb(torch.randn(1, 3, size, size), taps=[bb.conv_tap_names[-1], "fc6", "fc7", CLUSTER_TAP])
    assert tuple(out["fc7"].shape) == (1, 4096) and tuple(out[CLUSTER_TAP].shape) == (1, 4096)
    assert out[bb.conv_tap_names[-1]].shape[1] == bb.channels


# ----------------------------------------------------------------------------- torchvision layouts
def test_torchvision_densenet_has_stage_taps_and_its_real_width():
    """Was an internal ValueError (the width read off a BN's name); the stem tap was the only one."""
    bb = build_backbone("tv:densenet121", input_size=64, seed=0)
    assert len(bb.conv_tap_names) == 9 and bb.feature_dim == 1024
    assert bb.family == "other"
    # the width is measured in eval mode: BatchNorm statistics of the random init stay untouched
    assert all(float(m.running_mean.abs().max()) == 0.0 for m in bb.modules() if isinstance(m, nn.BatchNorm2d))
    assert bb.training


def test_torchvision_squeezenet_taps_every_fire_module():
    """Was one tap (the stem's ReLU), so the cluster feature was the 96-d stem average."""
    bb = build_backbone("tv:squeezenet1_1", input_size=64, seed=0).eval()
    assert len(bb.conv_tap_names) == 9 and bb.feature_dim == 512
    with torch.no_grad():
        out = bb(torch.randn(1, 3, 64, 64), taps=[CLUSTER_TAP, "conv1"])
    assert tuple(out[CLUSTER_TAP].shape) == (1, 512) and (out["conv1"] >= 0).all()


def test_torchvision_seeded_builds_are_identical():
    a = build_backbone("tv:densenet121", input_size=64, seed=3).backbone_state_dict()
    b = build_backbone("tv:densenet121", input_size=64, seed=3).backbone_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_torchvision_swin_is_one_line_pointing_at_timm():
    """Was an IndexError: its stages are channels-last, which the torchvision wrapper cannot read."""
    with pytest.raises(ArchError, match="timm:swin_tiny_patch4_window7_224"):
        build_backbone("tv:swin_t", input_size=64)
    result = CliRunner().invoke(main, ["checkpoint", "inspect", "tv:swin_t"])
    assert result.exit_code == 1
    assert [line for line in result.output.splitlines() if line.startswith("error:")] == [
        line for line in result.output.splitlines() if "swin" in line and line.startswith("error:")]
    assert "internal error" not in result.output and "Traceback" not in result.output


# ----------------------------------------------------------------------------- fc taps at another size
def test_fc_taps_at_another_size_are_one_user_error():
    """Was a bare ValueError (`error: internal error ...` on the CLI); names the setting to fix it."""
    bb = build_backbone("alexnet", input_size=64, seed=0).eval()
    with pytest.raises(DcbenchError, match=r"--set image_size=64") as info:
        bb(torch.randn(1, 3, 224, 224), taps=["fc7"])
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


# ----------------------------------------------------------------------------- original DeepCluster VGG16
class OriginalVGG16(nn.Module):
    """facebookresearch/deepcluster models/vgg16.py as the paper's code describes it: VGG16 with
    BatchNorm (conv, BN, ReLU per layer, 2x2 max-pools), classifier Linear-ReLU-Dropout-Linear-ReLU,
    a top layer and the fixed Sobel front end; main.py wraps ``features`` in DataParallel. Built
    here at 64 px (a 2x2 last map) instead of 224 to keep the test small."""

    def __init__(self, grid: int = 2, k: int = 20) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 2
        for width in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]:
            if width == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            channels = width
        self.features = nn.DataParallel(nn.Sequential(*layers))
        self.classifier = nn.Sequential(nn.Linear(512 * grid * grid, 4096), nn.ReLU(True), nn.Dropout(0.5),
                                        nn.Linear(4096, 4096), nn.ReLU(True))
        self.top_layer = nn.Linear(4096, k)
        grey, edges = nn.Conv2d(3, 1, 1), nn.Conv2d(1, 2, 3, padding=1)
        grey.weight.data.fill_(1 / 3)
        grey.bias.data.zero_()
        edges.weight.data[0, 0] = torch.tensor([[1.0, 0, -1], [2, 0, -2], [1, 0, -1]])
        edges.weight.data[1, 0] = torch.tensor([[1.0, 2, 1], [0, 0, 0], [-1, -2, -1]])
        edges.bias.data.zero_()
        self.sobel = nn.Sequential(grey, edges)
        for m in self.modules():  # non-trivial BN statistics so eval mode matters
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.1, 0.1)

    def reference(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """conv5_3 (ReLU output before the last pool), fc7 before and after its ReLU, logits."""
        x = self.features.module[:-1](self.sobel(x))
        out = {"conv5_3": x.clone()}
        x = self.features.module[-1](x).flatten(1)
        pre = self.classifier[3](torch.relu(self.classifier[0](x)))
        out.update(cluster=pre, fc7=torch.relu(pre))
        return out


@pytest.fixture(scope="module")
def original_vgg(tmp_path_factory):
    torch.manual_seed(5)
    model = OriginalVGG16().eval()
    path = tmp_path_factory.mktemp("orig") / "checkpoint.pth.tar"
    torch.save({"epoch": 3, "arch": "vgg16", "state_dict": model.state_dict(),
                "optimizer": torch.optim.SGD(model.parameters(), lr=0.05).state_dict()}, path)
    return model, path


def test_original_deepcluster_vgg16_file_maps_exactly(original_vgg):
    model, path = original_vgg
    assert any(k.startswith("features.module.") for k in torch.load(path, weights_only=True)["state_dict"])
    loaded = load_checkpoint(path)
    bb = loaded.backbone.eval()
    assert (loaded.format, bb.arch, bb.has_sobel, bb.input_size) == ("deepcluster", "vgg16", True, 64)
    assert loaded.report.ignored_heads == ["top_layer.bias", "top_layer.weight"]
    assert loaded.report.unexpected == [] and loaded.meta["epoch"] == 3
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours, ref = bb(x, taps=["conv5_3", "fc7", CLUSTER_TAP]), model.reference(x)
    for tap in ref:
        assert (ours[tap] - ref[tap]).abs().max().item() < 1e-4, tap


def test_original_vgg16_converts_to_dcbench_with_the_same_weights(original_vgg, tmp_path):
    _, path = original_vgg
    result = CliRunner().invoke(main, ["checkpoint", "convert", str(path), str(tmp_path / "dc.pth")])
    assert result.exit_code == 0, result.output
    assert load_checkpoint(tmp_path / "dc.pth").sha256 == load_checkpoint(path).sha256


def _export_to_torchvision(backbone, saved, exported) -> None:
    """Save ``backbone`` as a dcbench checkpoint at ``saved``, convert it with the CLI to ``exported``."""
    save_checkpoint(saved, backbone)
    result = CliRunner().invoke(main, ["checkpoint", "convert", str(saved), str(exported), "--to", "torchvision"])
    assert result.exit_code == 0, result.output


def test_torchvision_round_trip_keeps_outputs(tmp_path):
    """dcbench -> torchvision -> loaded again (recognised as the same arch): same weights, same taps."""
    bb = build_backbone("tv:resnet18", input_size=64, seed=1)
    _export_to_torchvision(bb, tmp_path / "a.pth", tmp_path / "tv.pth")
    back = load_checkpoint(tmp_path / "tv.pth")
    assert back.backbone.arch == "tv:resnet18" and back.sha256 == load_checkpoint(tmp_path / "a.pth").sha256
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(back.backbone.eval()(x, taps=["res5"])["res5"], bb.eval()(x, taps=["res5"])["res5"])


@pytest.mark.parametrize("arch, size, good", [("timm:vit_tiny_patch16_224", 70, 64),
                                              ("timm:vit_relpos_small_patch16_224", 64, 224)])
def test_vit_size_errors_name_options_that_exist(arch, size, good):
    """The hint named only --image-size, which `eval` and `compare` lack (they take --set image_size=N)."""
    with pytest.raises(ArchError) as info:
        build_backbone(arch, input_size=size)
    message = str(info.value)
    assert f"--set image_size={good}" in message and f"--image-size {good}" in message
    runner = CliRunner()
    for command in (["eval", "--help"], ["train", "--help"]):
        assert ("--image-size" in runner.invoke(main, command).output) == (command[0] == "train")


def test_images_too_small_for_the_network_are_one_user_error():
    """Was `error: internal error RuntimeError: Calculated padded input size ...` on the CLI."""
    bb = build_backbone("alexnet", input_size=224, seed=0).eval()
    with pytest.raises(DcbenchError, match=r"alexnet cannot take 16x16 px images .*--set image_size=N") as info:
        bb(torch.randn(1, 3, 16, 16), taps=["conv5"])
    assert isinstance(info.value, RuntimeError) and "\n" not in str(info.value)
    tv = build_backbone("tv:squeezenet1_1", input_size=64, seed=0).eval()
    with pytest.raises(DcbenchError, match="tv:squeezenet1_1 cannot take 8x8 px images"):
        tv(torch.randn(1, 3, 8, 8))
    with pytest.raises(RuntimeError, match="expected input") as other:  # any other failure stays what it is
        bb(torch.randn(1, 5, 64, 64), taps=["conv1"])
    assert not isinstance(other.value, DcbenchError)


# ----------------------------------------------------------------------------- checkpoint round trips
def test_torchvision_export_of_tv_vgg16_bn_loads_back(tmp_path):
    """The export has no classifier (heads are not exported); it was read as DeepCluster's VGG16,
    which then lacked fc6/fc7: `does not match arch vgg16: 4 of 95 weights missing`."""
    from dcbench.checkpoint import infer_arch

    bb = build_backbone("tv:vgg16_bn", input_size=64, seed=0)
    sd = {k[len("model."):]: v for k, v in bb.backbone_state_dict().items()}
    assert not any(k.startswith("classifier.") for k in sd)
    assert infer_arch(sd).arch == "tv:vgg16_bn"
    torch.save(sd, tmp_path / "tv.pth")
    back = load_checkpoint(tmp_path / "tv.pth")
    assert back.backbone.arch == "tv:vgg16_bn" and back.report.missing == []
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(back.backbone.eval()(x, taps=["conv13"])["conv13"], bb.eval()(x, taps=["conv13"])["conv13"])


def test_original_vgg16_below_64px_is_recognised_at_its_size(tmp_path):
    """A 1x1 last map (a VGG16 trained at 32-63 px) was outside the candidate sizes: loading fell
    back to 224 and failed on the fc6 shape."""
    from dcbench.checkpoint import infer_arch

    bb = build_backbone("vgg16", sobel=False, input_size=32, seed=0)
    guess = infer_arch(bb.backbone_state_dict())
    assert (guess.arch, guess.input_size) == ("vgg16", 32)
    sd = {k.replace("features.", "features.module.", 1): v for k, v in bb.state_dict().items()}
    torch.save({"arch": "vgg16", "epoch": 1, "state_dict": sd}, tmp_path / "c.pth.tar")
    loaded = load_checkpoint(tmp_path / "c.pth.tar")
    assert loaded.backbone.input_size == 32
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.backbone.eval()(x, taps=["fc7"])["fc7"], bb.eval()(x, taps=["fc7"])["fc7"])


def test_timm_resnet_exports_to_torchvision(tmp_path):
    """timm's ResNet-18 has torchvision's names and shapes; the export was refused with a reason
    about AlexNet."""
    import torchvision

    bb = build_backbone("timm:resnet18", input_size=64, seed=2)
    _export_to_torchvision(bb, tmp_path / "timm.pth", tmp_path / "tv.pth")
    model = torchvision.models.resnet18(weights=None)
    missing, unexpected = model.load_state_dict(torch.load(tmp_path / "tv.pth", weights_only=True), strict=False)
    assert unexpected == [] and sorted(missing) == ["fc.bias", "fc.weight"]
    x = torch.randn(1, 3, 64, 64)
    model.fc = nn.Identity()
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), bb.eval()(x, taps=["avgpool"])["avgpool"], atol=1e-5)


@pytest.mark.parametrize("spec, reason", [("random:alexnet,size=64", "Sobel front end"),
                                          ("random:vgg16,size=64,sobel=0", "this one for 64 px"),
                                          ("random:timm:resnet50d,size=64", "layout and names")])
def test_torchvision_export_refusals_say_why(spec, reason, tmp_path):
    result = CliRunner().invoke(main, ["checkpoint", "convert", spec, str(tmp_path / "x.pth"), "--to", "torchvision"])
    assert result.exit_code == 1 and reason in result.output, result.output
    assert "alexnet has no BatchNorm" not in result.output and not (tmp_path / "x.pth").exists()


@pytest.mark.parametrize("name", ["resnext50_32x4d", "resnext101_64x4d", "wide_resnet50_2", "resnet50"])
def test_infer_arch_tells_resnext_from_wide_resnet(name):
    """ResNeXt-50's first conv is 128 wide like wide_resnet50_2's: it was guessed as the wide ResNet
    and then failed on its grouped conv2 shape."""
    import torchvision

    from dcbench.checkpoint import infer_arch

    with torch.device("meta"):  # shapes only
        sd = torchvision.models.get_model(name, weights=None).state_dict()
    assert infer_arch(sd).arch == f"tv:{name}"


@pytest.mark.parametrize("arch", ["tv:resnet18", "timm:resnet50"])
def test_detectron2_export_reads_back_without_unpickling_code(arch, tmp_path):
    """dcbench -> detectron2 -> dcbench: the exported .pkl (numpy arrays in dicts) was refused
    without --trust-checkpoint and, with it, not recognised; it now reads with the safe unpickler
    and maps back to the same weights."""
    spec = f"random:{arch},size=64,seed=4"
    runner = CliRunner()
    result = runner.invoke(main, ["checkpoint", "convert", spec, str(tmp_path / "d2.pkl"), "--to", "detectron2"])
    assert result.exit_code == 0, result.output
    from dcbench.checkpoint import resolve_checkpoint

    original = resolve_checkpoint(spec)
    back = load_checkpoint(tmp_path / "d2.pkl")
    assert back.format == "detectron2" and back.meta == {"author": "dcbench"}
    assert back.report.missing == [] and back.report.unexpected == []
    assert back.backbone.arch == ("tv:resnet18" if arch == "tv:resnet18" else "tv:resnet50")
    assert back.sha256 == original.sha256 or arch.startswith("timm:")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = back.backbone.eval()(x, taps=["res5"])["res5"]
        theirs = original.backbone.eval()(x, taps=["res5"])["res5"]
    assert torch.allclose(ours, theirs, atol=1e-5)
    again = runner.invoke(main, ["checkpoint", "convert", str(tmp_path / "d2.pkl"), str(tmp_path / "dc.pth")])
    assert again.exit_code == 0, again.output
    assert load_checkpoint(tmp_path / "dc.pth").sha256 == back.sha256


def test_a_plain_pickle_with_code_is_still_refused(tmp_path):
    """The safe read of plain pickles builds containers and numpy arrays only."""
    import pickle

    class Boom:
        def __reduce__(self):
            return (print, ("ran code",))

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": {"stem.conv1.weight": Boom()}}))
    with pytest.raises(DcbenchError, match="--trust-checkpoint"):
        load_checkpoint(path)


def test_swin_takes_any_input_size_as_readme_says():
    """README: timm Swins take any input size; 70 px was timm's AssertionError (not divisible by the
    4 px patch), an internal error on the CLI. The remainder is dropped as a strided patch conv does."""
    bb = build_backbone("timm:swin_tiny_patch4_window7_224", input_size=64, seed=0).eval()
    x = torch.randn(1, 3, 70, 70)
    with torch.no_grad():
        out = bb(x, taps=["stage1", "stage4", CLUSTER_TAP])
        cropped = bb(x[..., :68, :68], taps=["stage4"])["stage4"]
    assert tuple(out["stage1"].shape) == (1, 96, 17, 17) and tuple(out[CLUSTER_TAP].shape) == (1, 768)
    assert torch.equal(out["stage4"], cropped)
