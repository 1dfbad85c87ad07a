"""Published weights by name (timm tags, hf-hub repos, torchvision enums) from temporary caches,
never the network; ViT taps; a CLI eval recording the weight tag and file sha256."""
import hashlib
import json

import pytest
import safetensors.torch
import timm
import torch
import torchvision
from click.testing import CliRunner

import dcbench
from dcbench.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint, weights_sha256
from dcbench.cli import main
from dcbench.data.synthetic import make_image_folder
from dcbench.errors import ArchError, CheckpointError
from dcbench.models import build_backbone
from dcbench.pooling import probe_pooling

REVISION = "0123456789abcdef0123456789abcdef01234567"
FAST_KNN = ["--set", "image_size=32", "--set", "workers=0", "--set", "ks=[5]", "--set", "batch_size=16"]


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty HF hub and torch hub caches, downloads forbidden (huggingface_hub's import-time flag too)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path


def put_hub_files(cache, repo: str, files: dict) -> None:
    """Lay ``files`` ({name: writer(path)}) out as huggingface_hub's cache holds a download of ``repo``:
    ``models--ORG--NAME/refs/main`` (the commit) and ``snapshots/COMMIT/NAME``."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "snapshots" / REVISION).mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(REVISION)
    for name, write in files.items():
        write(folder / "snapshots" / REVISION / name)


def random_state(build, seed: int) -> dict:
    torch.manual_seed(seed)  # not dcbench's seed 0: loaded weights must differ from any random init
    return {k: v.contiguous() for k, v in build().state_dict().items()}


@pytest.fixture
def resnet18_tag(caches):
    """timm resnet18 weights in the HF cache under the pretrained tag a1_in1k (timm's default)."""
    sd = random_state(lambda: timm.create_model("resnet18"), 123)
    put_hub_files(caches / "hf", "timm/resnet18.a1_in1k",
                  {"model.safetensors": lambda p: safetensors.torch.save_file(sd, str(p))})
    return sd


def file_sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def assert_same_weights(model: torch.nn.Module, sd: dict) -> None:
    loaded = model.state_dict()
    assert set(loaded) == set(sd)
    for key, value in sd.items():
        assert torch.equal(loaded[key], value), key


# ----------------------------------------------------------------------------- timm / hf-hub / torchvision
def test_timm_tag_loads_the_cached_file(resnet18_tag):
    assert_same_weights(dcbench.load_backbone("timm:resnet18.a1_in1k").model, resnet18_tag)
    ckpt = resolve_checkpoint("timm:resnet18.a1_in1k")
    path = ckpt.meta["file"]
    assert path.endswith(f"models--timm--resnet18.a1_in1k/snapshots/{REVISION}/model.safetensors")
    assert ckpt.name == "timm:resnet18.a1_in1k" and ckpt.format == "timm-pretrained"
    assert ckpt.meta["file_sha256"] == file_sha(path)
    assert ckpt.meta["weights_source"] == f"hf-hub:timm/resnet18.a1_in1k@{REVISION}"
    assert ckpt.backbone.arch == "timm:resnet18" and ckpt.backbone.family == "resnet"
    expected = {"input_size": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                "interpolation": "bicubic", "crop_pct": 0.95, "crop_mode": "center"}
    assert ckpt.backbone.input_config == ckpt.meta["input_config"]
    assert {k: ckpt.meta["input_config"][k] for k in ("interpolation", "crop_pct")} == \
        {k: expected[k] for k in ("interpolation", "crop_pct")}
    default = resolve_checkpoint("timm:resnet18,pretrained")  # timm's default tag is a1_in1k
    assert default.name == "timm:resnet18.a1_in1k" and default.sha256 == ckpt.sha256


def test_hf_hub_repo_with_timm_config(caches):
    sd = random_state(lambda: timm.create_model("resnet18"), 5)
    config = {"architecture": "resnet18", "num_classes": 1000,
              "pretrained_cfg": {"input_size": [3, 160, 160], "interpolation": "bilinear", "crop_pct": 1.0,
                                 "crop_mode": "center", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                                 "num_classes": 1000, "first_conv": "conv1", "classifier": "fc"}}
    put_hub_files(caches / "hf", "someone/my-resnet", {
        "config.json": lambda p: p.write_text(json.dumps(config)),
        "pytorch_model.bin": lambda p: torch.save(sd, p)})
    ckpt = resolve_checkpoint("hf-hub:someone/my-resnet")
    assert_same_weights(ckpt.backbone.model, sd)
    assert ckpt.name == "hf-hub:someone/my-resnet" and ckpt.meta["file"].endswith("pytorch_model.bin")
    assert ckpt.meta["file_sha256"] == file_sha(ckpt.meta["file"])
    assert ckpt.backbone.input_config["input_size"] == 160 and ckpt.backbone.input_config["mean"] == [0.5] * 3


def test_torchvision_weights_from_torch_home(caches):
    sd = random_state(torchvision.models.resnet18, 7)
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    path = caches / "torch" / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
    path.parent.mkdir(parents=True)
    torch.save(sd, path)
    ckpt = resolve_checkpoint("tv:resnet18:IMAGENET1K_V1")
    assert_same_weights(ckpt.backbone.model, sd)
    assert ckpt.name == "tv:resnet18:IMAGENET1K_V1" and ckpt.format == "torchvision-pretrained"
    assert ckpt.meta["file_sha256"] == file_sha(path) and ckpt.meta["weights_source"] == url
    assert ckpt.backbone.input_config["crop_pct"] == 0.875  # resize 256, crop 224
    assert resolve_checkpoint("tv:resnet18,pretrained").name == "tv:resnet18:IMAGENET1K_V1"  # DEFAULT


def test_dcbench_file_keeps_the_input_config(caches):
    config = {"architecture": "vit_tiny_patch16_224", "num_classes": 1000,
              "pretrained_cfg": {"input_size": [3, 224, 224], "interpolation": "bicubic", "crop_pct": 0.875,
                                 "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                 "num_classes": 1000, "first_conv": "patch_embed.proj", "classifier": "head"}}
    sd = random_state(lambda: timm.create_model("vit_tiny_patch16_224"), 9)
    put_hub_files(caches / "hf", "someone/dino-vit", {
        "config.json": lambda p: p.write_text(json.dumps(config)),
        "model.safetensors": lambda p: safetensors.torch.save_file(sd, str(p))})
    ckpt = resolve_checkpoint("hf-hub:someone/dino-vit")
    assert ckpt.backbone.family == "vit" and ckpt.backbone.input_config["mean"] == [0.485, 0.456, 0.406]
    save_checkpoint(caches / "vit.pth", ckpt.backbone)
    again = load_checkpoint(caches / "vit.pth")
    assert again.sha256 == ckpt.sha256 and again.backbone.input_config == ckpt.backbone.input_config
    assert again.backbone.input_config["source"] == "timm pretrained_cfg of hf-hub:someone/dino-vit"
    # a random init has no convention of its own (not timm's default tag's mean 0.5): the presets' apply
    assert build_backbone("timm:vit_tiny_patch16_224").input_config["source"] is None


def test_offline_without_weights_is_one_line(caches):
    data = make_image_folder(caches / "data", n_classes=2, per_class=3, image_size=32)
    result = CliRunner().invoke(main, ["eval", "--protocol", "knn", "--checkpoint", "timm:resnet18.a1_in1k",
                                       "--data", str(data), "--store", str(caches / "r.db"), *FAST_KNN])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output
    assert str(caches / "hf" / "models--timm--resnet18.a1_in1k") in errors[0]
    assert "hf download timm/resnet18.a1_in1k" in errors[0] and "HF_HUB_OFFLINE" in errors[0]
    with pytest.raises(CheckpointError, match=str(caches / "torch" / "hub" / "checkpoints")):
        resolve_checkpoint("tv:resnet18:IMAGENET1K_V1")


@pytest.mark.parametrize("spec,error,match", [
    ("timm:resnet18.nosuchtag", ArchError, "a1_in1k"),
    ("timm:resnet18.a1_in1k,random", CheckpointError, "pretrained and random"),
    ("timm:resnet18,pretrained,seed=1", CheckpointError, "no other options"),
    ("tv:resnet18:NOPE", ArchError, "IMAGENET1K_V1"),
])
def test_bad_pretrained_specs(caches, spec, error, match):
    with pytest.raises(error, match=match):
        resolve_checkpoint(spec)


def test_damaged_weight_file_is_a_checkpoint_error(caches):
    put_hub_files(caches / "hf", "timm/resnet18.a1_in1k", {"model.safetensors": lambda p: p.write_bytes(b"junk")})
    with pytest.raises(CheckpointError, match="does not load into timm model resnet18"):
        resolve_checkpoint("timm:resnet18.a1_in1k")


def test_random_option_is_the_bare_random_init():
    bare, explicit = resolve_checkpoint("timm:resnet18"), resolve_checkpoint("timm:resnet18,random")
    assert explicit.name == bare.name == "random:timm:resnet18" and explicit.format == "random"
    assert explicit.sha256 == bare.sha256
    assert resolve_checkpoint("timm:resnet18,random,seed=3").sha256 == resolve_checkpoint("timm:resnet18,seed=3").sha256


# ----------------------------------------------------------------------------- ViT
def test_vit_random_init_keeps_its_sha256():
    """dynamic_img_size changes no weight: bare timm:ViT keeps the sha256 of plain timm at seed 0."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        plain = timm.create_model("vit_tiny_patch16_224")
    weights = {f"model.{k}": v for k, v in plain.state_dict().items() if not k.startswith("head.")}
    assert resolve_checkpoint("timm:vit_tiny_patch16_224").sha256 == weights_sha256(weights)


def test_vit_taps_at_32px():
    bb = dcbench.load_backbone("timm:vit_tiny_patch16_224,random").eval()
    blocks = [f"block{i}" for i in range(1, 13)]
    assert bb.tap_names == blocks + ["cls", "avgpool", "cls4", "cls+avgpool"] and bb.conv_tap_names == blocks
    assert bb.family == "vit" and bb.feature_dim == 192 and bb.input_config["source"] is None
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = bb(x, taps=["block1", "block12", "cls", "avgpool", "cluster"])
        reference = bb.model.forward_features(x)
    assert out["block1"].shape == out["block12"].shape == (2, 192, 2, 2)
    assert out["cls"].shape == out["avgpool"].shape == (2, 192)
    torch.testing.assert_close(out["cls"], reference[:, 0])
    torch.testing.assert_close(out["avgpool"], reference[:, 1:].mean(dim=1))
    torch.testing.assert_close(out["cluster"], out["cls"])
    tokens = out["block12"].flatten(2).transpose(1, 2)  # the map is the patch tokens in raster order
    torch.testing.assert_close(bb.model.norm(tokens), reference[:, 1:])  # LayerNorm acts per token
    plans = probe_pooling(bb, ["block12", "cls"], 32)
    assert plans["block12"].kind == "adaptive" and plans["cls"].kind == "none" and plans["cls"].dim == 192


def test_vit_stops_after_the_deepest_block():
    bb = dcbench.load_backbone("timm:vit_tiny_patch16_224").eval()
    ran = []
    handles = [blk.register_forward_hook(lambda *_a, i=i: ran.append(i)) for i, blk in enumerate(bb.model.blocks)]
    with torch.no_grad():
        bb(torch.randn(1, 3, 48, 48), taps=["block3"])
    for h in handles:
        h.remove()
    assert ran == [0, 1, 2]


# ----------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("d") / "shapes", n_classes=3, per_class=6, image_size=32)


def test_cli_eval_records_tag_and_file_sha256(resnet18_tag, data, caches):
    result = CliRunner().invoke(main, ["eval", "--protocol", "knn", "--checkpoint", "timm:resnet18.a1_in1k",
                                       "--data", str(data), "--store", str(caches / "r.db"), "--json",
                                       "--set", "taps=[res5]", *FAST_KNN])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output.strip().splitlines()[-1])
    path = next((caches / "hf").rglob("model.safetensors"))
    assert record["checkpoint"]["name"] == "timm:resnet18.a1_in1k"
    assert record["extra"]["checkpoint_file_sha256"] == file_sha(path)
    assert record["extra"]["checkpoint_format"] == "timm-pretrained"


@pytest.mark.parametrize("protocol,settings", [
    ("knn", FAST_KNN),
    ("linear", ["--set", "image_size=32", "--set", "cached=true", "--set", "epochs=1", "--set", "batch_size=16",
                "--set", "crops=center", "--set", "workers=0"]),
])
def test_cli_eval_vit_on_cls(data, tmp_path, protocol, settings):
    result = CliRunner().invoke(main, ["eval", "--protocol", protocol, "--checkpoint",
                                       "timm:vit_tiny_patch16_224,random", "--data", str(data),
                                       "--store", str(tmp_path / "r.db"), "--json", "--set", "taps=[cls]",
                                       *settings])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output.strip().splitlines()[-1])
    assert {m["tap"] for m in record["metrics"]} == {"cls"}
    assert all(0 <= m["value"] <= 100 for m in record["metrics"])
