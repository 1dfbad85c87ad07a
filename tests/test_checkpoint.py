"""Checkpoints: dcbench format, foreign formats, the original DeepCluster file, safe loading, CLI."""
import json

import pytest
import torch
import torchvision
from click.testing import CliRunner
from torch import nn

import dcbench
from dcbench.checkpoint import (atomic_save, infer_arch, load_checkpoint, resolve_checkpoint,
                                save_checkpoint, weights_sha256)
from dcbench.cli import main
from dcbench.errors import CheckpointError
from dcbench.models import build_backbone


# -- an independent re-implementation of the original DeepCluster AlexNet (models/alexnet.py) --
class OriginalAlexNet(nn.Module):
    def __init__(self, k: int = 100):
        super().__init__()
        cfg = [(96, 11, 4, 2), "M", (256, 5, 1, 2), "M", (384, 3, 1, 1), (384, 3, 1, 1), (256, 3, 1, 1), "M"]
        layers, c = [], 2
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(3, 2))
            else:
                layers += [nn.Conv2d(c, v[0], v[1], v[2], v[3]), nn.BatchNorm2d(v[0]), nn.ReLU(inplace=True)]
                c = v[0]
        self.features = nn.DataParallel(nn.Sequential(*layers))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True),
                                        nn.Dropout(0.5), nn.Linear(4096, 4096), nn.ReLU(inplace=True))
        self.top_layer = nn.Linear(4096, k)
        grey = nn.Conv2d(3, 1, 1)
        grey.weight.data.fill_(1 / 3)
        grey.bias.data.zero_()
        sob = nn.Conv2d(1, 2, 3, padding=1)
        sob.weight.data[0, 0] = torch.tensor([[1.0, 0, -1], [2, 0, -2], [1, 0, -1]])
        sob.weight.data[1, 0] = torch.tensor([[1.0, 2, 1], [0, 0, 0], [-1, -2, -1]])
        sob.bias.data.zero_()
        self.sobel = nn.Sequential(grey, sob)
        for m in self.features.modules():  # non-trivial BN statistics so eval mode matters
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.1, 0.1)

    def reference_taps(self, x):
        """conv_i = ReLU output before pooling; fc7 after its ReLU, computed step by step."""
        feats = self.features.module
        out, x = {}, self.sobel(x)
        for i, layer in enumerate(feats):
            x = layer(x)
            if i in (2, 6, 10, 13, 16):
                out[f"conv{(2, 6, 10, 13, 16).index(i) + 1}"] = x.clone()
        x = x.view(x.size(0), 256 * 6 * 6)
        x = torch.relu(self.classifier[1](x))
        out["fc7"] = torch.relu(self.classifier[4](x))
        return out


@pytest.fixture
def original_ckpt(tmp_path):
    torch.manual_seed(0)
    model = OriginalAlexNet().eval()
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 500, "arch": "alexnet", "state_dict": model.state_dict(),
                "optimizer": torch.optim.SGD(model.parameters(), lr=0.05).state_dict()}, path)
    return model, path


def test_original_deepcluster_checkpoint_matches_independent_model(original_ckpt):
    model, path = original_ckpt
    loaded = load_checkpoint(path)
    assert loaded.format == "deepcluster" and loaded.meta["epoch"] == 500
    assert loaded.backbone.arch == "alexnet" and loaded.backbone.has_sobel and loaded.backbone.input_size == 224
    assert loaded.report.ignored_heads == ["top_layer.bias", "top_layer.weight"]
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours = dcbench.load_backbone(str(path)).eval()(x, taps=["conv1", "conv2", "conv3", "conv4", "conv5", "fc7"])
        ref = model.reference_taps(x)
    for tap in ref:
        assert (ours[tap] - ref[tap]).abs().max().item() < 1e-4, tap


def test_cli_inspect_original_checkpoint(original_ckpt):
    _, path = original_ckpt
    result = CliRunner().invoke(main, ["checkpoint", "inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output.strip().splitlines()[-1])
    assert info["format"] == "deepcluster" and info["arch"] == "alexnet" and info["sobel"] is True
    assert info["taps"] == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7"]
    assert len(info["sha256"]) == 64 and info["parameters"] > 50_000_000


def test_dcbench_round_trip_keeps_weights_and_metadata(tmp_path):
    bb = build_backbone("vgg16", sobel=False, input_size=64, seed=0)
    path = save_checkpoint(tmp_path / "run" / "c.pth", bb, epoch=7, config={"k": 10})
    loaded = load_checkpoint(path)
    assert loaded.meta["epoch"] == 7 and loaded.meta["config"] == {"k": 10}
    assert loaded.meta["versions"]["torch"] == torch.__version__.split("+")[0] and loaded.meta["git"] != ""
    assert loaded.sha256 == weights_sha256(bb.backbone_state_dict())
    for k, v in bb.backbone_state_dict().items():
        assert torch.equal(v, loaded.backbone.state_dict()[k])


def test_same_weights_same_sha_across_formats(tmp_path):
    bb = build_backbone("tv:resnet18", seed=0)
    torch.save(bb.model.state_dict(), tmp_path / "tv.pth")
    save_checkpoint(tmp_path / "dc.pth", bb)
    assert load_checkpoint(tmp_path / "tv.pth").sha256 == load_checkpoint(tmp_path / "dc.pth").sha256


def _resnet50_sd():
    torch.manual_seed(0)
    return torchvision.models.resnet50().state_dict()


@pytest.mark.parametrize("fmt", ["torchvision", "moco", "lightning", "vissl", "timm"])
def test_foreign_resnet_formats(tmp_path, fmt):
    sd = _resnet50_sd()
    wrapped = {
        "torchvision": sd,
        "timm": {"model": sd},  # timm training scripts save {'state_dict'|'model': ...}
        "moco": {"epoch": 200, "arch": "resnet50",
                 "state_dict": {**{f"module.encoder_q.{k}": v for k, v in sd.items()},
                                **{f"module.encoder_k.{k}": v for k, v in sd.items()},
                                "module.queue": torch.zeros(128, 4)}},
        "lightning": {"pytorch-lightning_version": "2.0", "epoch": 9,
                      "state_dict": {**{f"backbone.{k}": v for k, v in sd.items() if not k.startswith("fc.")},
                                     "projector.0.weight": torch.zeros(2, 2)}},
        "vissl": {"phase_idx": 3, "classy_state_dict": {"base_model": {"model": {
            "trunk": {f"_feature_blocks.{k}": v for k, v in sd.items() if not k.startswith("fc.")},
            "heads": {"0.clf.0.weight": torch.zeros(2, 2)}}}}},
    }[fmt]
    path = tmp_path / f"{fmt}.pth"
    torch.save(wrapped, path)
    loaded = load_checkpoint(path)
    assert loaded.backbone.arch == "tv:resnet50"
    assert loaded.format == ("torchvision" if fmt == "timm" else fmt)
    assert loaded.report.missing == [] and loaded.report.unexpected == []
    assert torch.equal(loaded.backbone.model.layer3[2].conv2.weight, sd["layer3.2.conv2.weight"])


def test_infer_arch_variants():
    assert infer_arch(torchvision.models.resnet18().state_dict()).arch == "tv:resnet18"
    assert infer_arch(build_backbone("vgg16", input_size=64).state_dict()).input_size in (64, 96)
    assert infer_arch({"x": torch.zeros(1)}).arch is None


def test_wrong_architecture_is_one_clear_error(tmp_path):
    save_checkpoint(tmp_path / "vgg.pth", build_backbone("vgg16", input_size=64))
    torch.save(build_backbone("vgg16", input_size=64).state_dict(), tmp_path / "plain_vgg.pth")
    with pytest.raises(CheckpointError, match="holds a vgg16 but --arch alexnet"):
        load_checkpoint(tmp_path / "vgg.pth", arch="alexnet")
    with pytest.raises(CheckpointError, match="does not fit arch alexnet"):
        load_checkpoint(tmp_path / "plain_vgg.pth", arch="alexnet")
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(CheckpointError, match="does not (fit|match) arch"):
        load_checkpoint(tmp_path / "r18.pth", arch="tv:resnet50")


@pytest.mark.parametrize("content,match", [
    (b"hello, I am not a checkpoint\n", "not a PyTorch checkpoint"),
    (b"PK\x03\x04garbage", "not a PyTorch checkpoint or is truncated"),
])
def test_cli_non_checkpoint_file_one_line_exit_1(tmp_path, content, match):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    result = CliRunner().invoke(main, ["checkpoint", "inspect", str(path)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0]
    assert "Traceback" not in result.output


def test_cli_wrong_arch_exit_1_and_debug_shows_traceback(tmp_path):
    torch.save(build_backbone("vgg16", input_size=64).state_dict(), tmp_path / "v.pth")
    result = CliRunner().invoke(main, ["checkpoint", "inspect", str(tmp_path / "v.pth"), "--arch", "alexnet"])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "does not fit arch alexnet" in result.output
    debug = CliRunner().invoke(main, ["--debug", "checkpoint", "inspect", str(tmp_path / "v.pth"), "--arch", "alexnet"])
    assert isinstance(debug.exception, CheckpointError)


@pytest.mark.parametrize("spec, built", [("random:alexnet,size=64", "alexnet"),
                                          ("timm:resnet18", "timm:resnet18")])
def test_arch_that_a_named_spec_overrides_is_said(spec, built):
    """--arch is for files; a spec that names its model builds it (and one --arch may serve the
    files of a compare), so a conflicting --arch is a warning naming what was built, not ignored silently."""
    result = CliRunner().invoke(main, ["checkpoint", "inspect", spec, "--arch", "vgg16", "--json"])
    assert result.exit_code == 0, result.output
    assert f"--arch vgg16 does not apply to {spec}, which builds {built}" in result.output
    agreeing = CliRunner().invoke(main, ["checkpoint", "inspect", spec, "--arch", built, "--json"])
    assert agreeing.exit_code == 0 and "does not apply" not in agreeing.output


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_untrusted_pickle_refused_unless_trusted(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": build_backbone("tv:resnet18").model.state_dict(), "obj": _Evil()}, path)
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        load_checkpoint(path)
    assert load_checkpoint(path, trust=True).backbone.arch == "tv:resnet18"


def test_atomic_save_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "c.pth"
    atomic_save({"a": torch.ones(1)}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_save({"a": Boom()}, path)
    assert torch.equal(torch.load(path)["a"], torch.ones(1))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pth"]


def test_convert_to_dcbench_and_torchvision(tmp_path, original_ckpt):
    _, orig = original_ckpt
    runner = CliRunner()
    result = runner.invoke(main, ["checkpoint", "convert", str(orig), str(tmp_path / "dc.pth")])
    assert result.exit_code == 0, result.output
    assert load_checkpoint(tmp_path / "dc.pth").sha256 == load_checkpoint(orig).sha256
    bad = runner.invoke(main, ["checkpoint", "convert", str(orig), str(tmp_path / "tv.pth"), "--to", "torchvision"])
    assert bad.exit_code == 1 and "no torchvision equivalent" in bad.output
    assert not (tmp_path / "tv.pth").exists()
    save_checkpoint(tmp_path / "vgg.pth", build_backbone("vgg16", sobel=False, seed=0))
    ok = runner.invoke(main, ["checkpoint", "convert", str(tmp_path / "vgg.pth"), str(tmp_path / "tv.pth"),
                              "--to", "torchvision"])
    assert ok.exit_code == 0, ok.output
    tv = torchvision.models.vgg16_bn()
    missing, unexpected = tv.load_state_dict(torch.load(tmp_path / "tv.pth"), strict=False)
    assert unexpected == [] and set(missing) == {"classifier.6.weight", "classifier.6.bias"}


def test_random_spec_identity():
    a = resolve_checkpoint("random:alexnet,size=64")
    assert a.format == "random" and a.identity()["arch"] == "alexnet"
    assert a.sha256 == resolve_checkpoint("random:alexnet,size=64").sha256
    with pytest.raises(CheckpointError, match="bad option"):
        resolve_checkpoint("random:alexnet,depth=3")


def test_foreign_checkpoint_loads_at_its_own_fc_size(original_ckpt):
    """A protocol's image size must not rebuild fc layers a foreign checkpoint cannot fill."""
    _, path = original_ckpt
    loaded = resolve_checkpoint(str(path), input_size=64)
    assert loaded.backbone.input_size == 224
    assert loaded.backbone(torch.randn(1, 3, 64, 64), taps=["conv5"])["conv5"].shape[-1] == 3
