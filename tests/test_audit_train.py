"""Trainer audit (stop 27): resuming from another folder, --epochs below the trained epochs,
the small-data preset with the user's own batch, v1's k limit, DeepCluster-v2's unreadable images."""
import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from dcbench.cli import main
from dcbench.data.synthetic import make_image_folder
from dcbench.errors import DcbenchError, UsageError
from dcbench.train.config import TrainConfig, resume_conflicts
from dcbench.train.loop import check_sizes
from dcbench.train.presets import resolve_config, small_data_settings
from dcbench.train.rundir import RunDir

TINY = ["--image-size", "64", "--batch-size", "8", "--k", "2", "--workers", "0", "--set", "pca_dim=4",
        "--set", "snapshot_every=0", "--set", "decode_cache_gb=0"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "shapes"
    return make_image_folder(root, n_classes=2, per_class=8, image_size=64, splits=None, corrupt=1)


def test_a_run_started_with_a_relative_data_path_resumes_from_another_folder(images, tmp_path, monkeypatch):
    monkeypatch.chdir(images.parent)
    run = tmp_path / "run"
    first = CliRunner().invoke(main, ["train", "--data", images.name, "--epochs", "1", "--out", str(run), *TINY])
    assert first.exit_code == 0, first.output
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"] == str(images.resolve())  # not "shapes": that names nothing from elsewhere
    monkeypatch.chdir(tmp_path)
    again = CliRunner().invoke(main, ["train", "--out", "run", "--resume", "--epochs", "2"])
    assert again.exit_code == 0, again.output
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1]


def test_data_given_relative_or_absolute_is_the_same_data_on_resume(tmp_path, monkeypatch):
    (tmp_path / "imgs").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resume_conflicts({"data": "imgs", "k": 4}, {"data": str(tmp_path / "imgs"), "k": 4}) == []
    assert resume_conflicts({"data": str(tmp_path / "imgs")}, {"data": "./imgs/"}) == []
    assert resume_conflicts({"data": "imgs"}, {"data": str(tmp_path)}) == ["data"]


def test_resume_with_fewer_epochs_than_trained_is_refused_before_touching_config(tmp_path):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.checkpoint.write_bytes(b"x")
    run.config.write_text(yaml.safe_dump({"epochs": 3}))
    run.write_progress(epoch=2, iteration=0)
    with pytest.raises(UsageError, match=r"--epochs 1: it has trained 2 epochs already; pass --epochs 2 or more"):
        run.prepare({"epochs": 1}, resume=True)
    assert yaml.safe_load(run.config.read_text()) == {"epochs": 3}
    run.check({"epochs": 2}, resume=True)  # stopping where it stands, or extending, is fine


def test_k_equal_to_the_number_of_images_is_allowed_and_the_hint_says_so(tmp_path):
    cfg = TrainConfig(data=str(tmp_path), k=7, pca_dim=4)
    with pytest.raises(DcbenchError, match=r"needs more images than the 6 in .*; pass --k 6 or less"):
        check_sizes(cfg, 6, 4096)
    check_sizes(TrainConfig(data=str(tmp_path), k=6, pca_dim=4), 6, 4096)


@pytest.mark.parametrize("method", ["deepcluster", "deepcluster-v2"])
def test_small_data_learning_rate_follows_the_users_batch(method):
    computed = resolve_config({"method": method, "preset": "small-data", "arch": "alexnet"}, n_images=6000)
    assert computed.batch_size == 32 and computed.lr == pytest.approx(0.05 * 32 / 256)
    own = resolve_config({"method": method, "preset": "small-data", "arch": "alexnet", "batch_size": "8"},
                         n_images=6000)
    assert own.batch_size == 8 and own.lr == pytest.approx(0.05 * 8 / 256)  # linear in the total batch
    if method == "deepcluster":
        assert own.top_lr == own.lr and own.reassign == 1.0
        big = resolve_config({"preset": "small-data", "batch_size": 256}, n_images=6000)
        assert big.reassign == 5.0 and big.epochs == 4  # ceil(100 x 256 / 6000) passes per clustering
    chosen = resolve_config({"method": method, "preset": "small-data", "arch": "alexnet", "batch_size": 8,
                             "lr": 0.5}, n_images=6000)
    assert chosen.lr == 0.5  # an explicit lr still wins


def test_small_data_never_whitens_more_dimensions_than_images():
    assert small_data_settings("deepcluster", 6)["pca_dim"] == 6
    assert small_data_settings("deepcluster", 100)["pca_dim"] == 8
    assert small_data_settings("deepcluster", 6000)["pca_dim"] == 64


def test_v2_names_the_unreadable_images_it_skipped(images, tmp_path):
    run = tmp_path / "v2"
    result = CliRunner().invoke(main, [
        "train", "--method", "deepcluster-v2", "--arch", "alexnet", "--data", str(images), "--out", str(run),
        "--epochs", "1", "--image-size", "64", "--batch-size", "17", "--workers", "0", "--set",
        "prototypes=[2]", "--set", "small_crops=0", "--set", "snapshot_every=0", "--set", "decode_cache_gb=0"])
    assert result.exit_code == 0, result.output
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert record["n_skipped"] == 1
    corrupt = sorted(Path(images).rglob("corrupt_*"))
    assert f"skipped 1 unreadable image(s) in epoch 0 (first: {corrupt[0]})" in result.output


def test_v1_k_above_the_readable_images_is_one_error_line(images, tmp_path):
    args = [a if a != "2" else "17" for a in TINY]  # --k 17: 17 files, 16 of them readable
    result = CliRunner().invoke(main, ["train", "--data", str(images), "--out", str(tmp_path / "r"), "--epochs", "1",
                                       *args])
    assert result.exit_code == 1, result.output
    assert ("error: k=17 exceeds the 16 readable images (1 of the 17 in" in result.output
            and "with --k 16 or less" in result.output and "internal error" not in result.output)


def test_v2_prototypes_above_the_filled_bank_rows_is_one_error_line(images, tmp_path):
    result = CliRunner().invoke(main, [
        "train", "--method", "deepcluster-v2", "--arch", "alexnet", "--data", str(images), "--out", str(tmp_path / "r"),
        "--epochs", "1", "--image-size", "64", "--batch-size", "17", "--workers", "0", "--set", "prototypes=[17]",
        "--set", "small_crops=0", "--set", "decode_cache_gb=0"])
    assert result.exit_code == 1, result.output
    assert ("error: 17 prototypes exceed the 16 memory-bank rows filled from readable images" in result.output
            and "K at most 16" in result.output and "internal error" not in result.output)


@pytest.mark.parametrize("method", ["deepcluster", "deepcluster-v2"])
@pytest.mark.parametrize("setting", ["workers=-1", "checkpoint_every=-1", "snapshot_every=-2"])
def test_negative_counts_are_usage_errors(images, tmp_path, method, setting):
    result = CliRunner().invoke(main, ["train", "--method", method, "--data", str(images), "--out",
                                       str(tmp_path / "r"), "--set", setting])
    name, value = setting.split("=")
    assert result.exit_code == 2, result.output
    assert f"error: {name} must be >= 0" in result.output and f"got {value}" in result.output
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("method,setting,message", [
    ("deepcluster", "momentum=-1", "momentum must be >= 0, got -1.0"),
    ("deepcluster", "top_weight_decay=-1", "top_weight_decay must be >= 0, got -1.0"),
    ("deepcluster", "pic_sigma=0", "PIC needs pic_sigma > 0"),
    ("deepcluster-v2", "weight_decay=-1e-6", "weight_decay must be >= 0, got -1e-06"),
    ("deepcluster-v2", "larc_trust=-1", "larc_trust must be >= 0, got -1.0"),
    ("deepcluster-v2", "final_lr=-1", "final_lr must be >= 0, got -1.0"),
    ("deepcluster-v2", "color_jitter=3", "color_jitter must be within [0, 2.5]"),
    ("deepcluster-v2", "blur_p=1.5", "color_jitter must be within [0, 2.5] and blur_p within [0, 1], got 1.0 and 1.5"),
])
def test_settings_torch_would_reject_mid_setup_are_usage_errors(method, setting, message, tmp_path):
    result = CliRunner().invoke(main, ["train", "--method", method, "--data", str(tmp_path), "--out",
                                       str(tmp_path / "r"), "--set", setting])
    assert result.exit_code == 2, result.output
    assert f"error: {message}" in result.output


def test_pic_neighbours_above_the_images_is_one_error_line(images, tmp_path):
    result = CliRunner().invoke(main, ["train", "--data", str(images), "--out", str(tmp_path / "r"), "--epochs", "1",
                                       "--clustering", "pic", "--set", "pic_neighbors=17", *TINY])
    assert result.exit_code == 1, result.output
    assert "error: pic_neighbors=17 needs more images than the 17 in" in result.output
    assert "--set pic_neighbors=16 or less" in result.output
    assert "internal error" not in result.output
