"""DeepCluster training: a real run, exact resume after kill -9, torchrun with 2 processes, errors."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import dcbench
from dcbench.checkpoint import load_checkpoint
from dcbench.cli import main
from dcbench.data.synthetic import make_image_folder

SMALL = ["--image-size", "64", "--batch-size", "16", "--k", "4", "--workers", "0",
         "--set", "pca_dim=8", "--set", "snapshot_every=2"]
#: a tiny random ResNet (timm's own test model) for tests where the arch is beside the point
#: (torchrun, snapshots, the decode cache): ~10x faster than AlexNet, whose 4096-wide fc layers
#: make every checkpoint ~180 MB. AlexNet's own path (dropout, Sobel) keeps its tests.
SMALL_NET = ["--arch", "timm:test_resnet"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "shapes"
    return make_image_folder(root, n_classes=4, per_class=12, image_size=64, splits=None, corrupt=1)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "dcbench", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_writes_run_folder_and_logs_every_epoch(images, tmp_path):
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--data", str(images), "--epochs", "2", "--out", str(run), *SMALL])
    assert result.exit_code == 0, result.output
    records = _metrics(run)
    assert [r["epoch"] for r in records] == [0, 1]
    for key in ("nmi_prev", "nmi_labels", "kmeans_objective", "empty_clusters", "cluster_size_min",
                "cluster_size_max", "loss", "time_extract_s", "time_cluster_s", "time_train_s"):
        assert key in records[1], key
    for r in records:  # workers=0: the passes wait for every image they decode
        assert 0 < r["time_extract_wait_s"] < r["time_extract_s"] and 0 < r["time_train_wait_s"] < r["time_train_s"]
    assert records[0]["nmi_prev"] is None and 0 <= records[1]["nmi_prev"] <= 1
    assert records[1]["nmi_labels"] is not None and records[1]["n_skipped"] == 1
    assert records[1]["n_images"] == 48 and records[1]["iterations"] == 3
    saved = np.load(run / "assignments" / "epoch_0001.npz")["assignments"]
    assert saved.shape == (49,) and (saved == -1).sum() == 1 and saved.max() < 4
    config = (run / "config.yaml").read_text()
    assert "k: 4" in config and "lr: 0.05" in config and "seed: 31" in config
    assert (run / "checkpoints" / "epoch_0002.pth").exists()
    loaded = load_checkpoint(run / "checkpoint.pth")
    assert loaded.backbone.arch == "alexnet" and loaded.meta["epoch"] == 2
    bb = dcbench.load_backbone(str(run / "checkpoint.pth"))
    assert bb(torch.randn(1, 3, 64, 64), taps=["conv3"])["conv3"].shape[1] == 384


def test_defaults_are_the_papers():
    from dcbench.train import TrainConfig

    c = TrainConfig()
    assert (c.arch, c.sobel, c.k, c.pca_dim, c.kmeans_iters, c.lr, c.momentum, c.weight_decay, c.batch_size,
            c.epochs, c.seed, c.reassign, c.crop_scale, c.top_lr) == \
        ("alexnet", True, 10000, 256, 20, 0.05, 0.9, 1e-5, 256, 500, 31, 1.0, (0.08, 1.0), 0.05)


def _final_weights(run: Path) -> dict:
    return torch.load(run / "checkpoint.pth", weights_only=True)["state_dict"]


def kill_in_epoch_1(args: list[str], out: Path, after_iteration: int, attempts: int = 3) -> Path:
    """Run ``dcbench ARGS --out OUT`` and SIGKILL it once epoch 1 has checkpointed
    ``after_iteration``; return the run folder, whose checkpoint holds epoch 1 mid-way. A loaded
    machine may deliver the kill after epoch 1 ended: then it tries afresh in another folder."""
    for attempt in range(attempts):
        run = out.with_name(f"{out.name}{attempt}")
        proc = subprocess.Popen([sys.executable, "-m", "dcbench", *args, "--out", str(run)],
                                env={**os.environ, "OMP_NUM_THREADS": "1"},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            try:
                p = json.loads((run / "checkpoint.json").read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                p = {"epoch": 0, "iteration": 0}
            if p["epoch"] == 1 and p["iteration"] >= after_iteration:
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = torch.load(run / "checkpoint.pth", weights_only=True)["train_state"]
        if state["epoch"] == 1 and state["iteration"] > 0:
            return run
    raise AssertionError(f"the kill never landed mid-epoch 1 in {attempts} attempts")


def test_kill_9_mid_epoch_then_resume_gives_identical_weights(images, tmp_path):
    args = ["train", "--data", str(images), "--epochs", "3", "--checkpoint-every", "1", *SMALL]
    straight = tmp_path / "straight"
    assert _cli(*args, "--out", str(straight)).returncode == 0

    killed = kill_in_epoch_1(args, tmp_path / "killed", after_iteration=1)
    resumed = _cli(*args, "--out", str(killed), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert [r["epoch"] for r in _metrics(killed)] == [0, 1, 2]
    a, b = _final_weights(straight), _final_weights(killed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert _metrics(straight)[-1]["loss"] == pytest.approx(_metrics(killed)[-1]["loss"], rel=1e-6)


def test_torchrun_two_processes(images, tmp_path):
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "dcbench", "train", "--data", str(images), "--epochs", "2", "--out", str(run), "--device", "cpu",
           *SMALL, *SMALL_NET]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = _metrics(run)
    assert [r["epoch"] for r in records] == [0, 1]
    assert records[1]["n_images"] == 48
    # each process trains on half of the pseudo-labelled sample: 48 images, batch 16 -> 2 steps per rank
    assert records[1]["iterations"] == 2
    assert load_checkpoint(run / "checkpoint.pth").meta["epoch"] == 2


def test_resume_refuses_changed_settings_and_accepts_the_allowed_ones(images, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--data", str(images), "--out", str(run), *SMALL, "--set", "feature_memmap_gb=0"]
    first = CliRunner().invoke(main, [*args, "--epochs", "1"])
    assert first.exit_code == 0, first.output
    assert not list(run.glob("*.tmp"))  # the features memmap (feature_memmap_gb=0) is deleted after use
    refused = CliRunner().invoke(main, [*args, "--epochs", "2", "--resume", "--k", "5", "--set", "lr=0.1"])
    lines = refused.output.strip().splitlines()
    assert refused.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), refused.output
    assert "k (4 -> 5)" in lines[0] and "lr (0.05 -> 0.1)" in lines[0] and "--out" in lines[0]
    assert "k: 4" in (run / "config.yaml").read_text()  # the saved settings are left alone
    assert [r["epoch"] for r in _metrics(run)] == [0]
    # epochs (extend the run), workers and device may change: documented in TrainConfig
    extended = CliRunner().invoke(main, [*args, "--epochs", "2", "--resume", "--device", "cpu"])
    assert extended.exit_code == 0, extended.output
    assert [r["epoch"] for r in _metrics(run)] == [0, 1]
    assert "epochs: 2" in (run / "config.yaml").read_text()


@pytest.mark.parametrize("case", ["empty", "k_too_large", "unwritable", "non_image_list", "resume_nothing"])
def test_bad_input_one_line_exit_1(images, tmp_path, case):
    out = tmp_path / "run"
    data = str(images)
    extra: list[str] = []
    if case == "empty":
        (tmp_path / "empty").mkdir()
        data = str(tmp_path / "empty")
    elif case == "k_too_large":
        extra = ["--k", "500"]
    elif case == "unwritable":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "run"
    elif case == "non_image_list":
        (tmp_path / "list.txt").write_text("notes.txt\n")
        (tmp_path / "notes.txt").write_text("hello")
        data = str(tmp_path / "list.txt")
    elif case == "resume_nothing":
        extra = ["--resume"]
    result = CliRunner().invoke(main, ["train", "--data", data, "--epochs", "1", "--out", str(out), *SMALL, *extra])
    lines = result.output.strip().splitlines()
    assert result.exit_code in (1, 2), result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert not (out / "checkpoint.pth").exists()


def test_unknown_setting_is_usage_error(images, tmp_path):
    result = CliRunner().invoke(main, ["train", "--data", str(images), "--set", "learning_rate=1"])
    assert result.exit_code == 2 and "unknown setting 'learning_rate'" in result.output


def test_small_data_preset_v1_follows_the_stated_rules():
    from dcbench.train.presets import small_data_settings

    s = small_data_settings("deepcluster", 6000)
    assert (s["batch_size"], s["reassign"], s["pca_dim"], s["k"], s["epochs"], s["image_size"]) == \
        (32, 1.0, 64, 47, 20, 64)
    assert s["lr"] == s["top_lr"] == pytest.approx(0.05 * 32 / 256)
    tiny = small_data_settings("deepcluster", 1350)  # batch 16: 84 steps per pass, so 2 passes per clustering
    assert (tiny["batch_size"], tiny["reassign"], tiny["pca_dim"], tiny["k"]) == (16, 2.0, 32, 11)
    paper_size = small_data_settings("deepcluster", 1_281_167)
    assert (paper_size["batch_size"], paper_size["pca_dim"], paper_size["k"]) == (256, 256, 10000)


def test_paper_settings_on_small_data_warn_naming_the_preset(images, tmp_path):
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--data", str(images), "--epochs", "1", "--out", str(run), *SMALL,
                                       "--set", "pca_dim=16"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and all("--preset small-data" in w for w in warnings), result.output
    assert "3 SGD steps per clustering" in warnings[0] and "pca_dim=16" in warnings[1]


def test_preset_small_data_resolves_from_the_data_and_flags_win(images):
    result = CliRunner().invoke(main, ["train", "--data", str(images), "--preset", "small-data", "--k", "4",
                                       "--list-settings"])
    assert result.exit_code == 0, result.output
    values = {line.split()[0]: line.split()[1] for line in result.output.splitlines() if line.strip()}
    # 49 images: batch 16 (the floor), ceil(100 * 16 / 49) = 33 passes per clustering, PCA to 4 (sqrt) -> 8 (floor)
    assert (values["preset"], values["k"], values["image_size"], values["batch_size"], values["pca_dim"],
            values["reassign"]) == ("small-data", "4", "64", "16", "8", "33.0")


def test_a_gpu_pass_that_waits_for_images_gets_one_warning_naming_the_fix():
    """finish_epoch's warning: on a GPU, a pass that waited for images >= 25% of its time and
    >= 10 s; the fix it names is a setting both trainers have."""
    from dcbench.train.common import waiting_warning
    from dcbench.train.config import DCv2Config, TrainConfig

    record = {"time_extract_s": 100.0, "time_extract_wait_s": 5.0, "time_train_s": 400.0, "time_train_wait_s": 160.0}
    cuda = torch.device("cuda")
    line = waiting_warning(3, record, workers=4, device=cuda, cores=16)
    assert line == ("epoch 3: the training pass waited for images 40% of its 400 s with 4 loader workers (16 usable "
                    "cores) while the cuda device idled; more loader workers would use the idle cores: --workers 16")
    busy = waiting_warning(3, record, workers=16, device=cuda, cores=16)
    assert "--set decode_cache_gb=N" in busy and "--workers" not in busy
    assert all("decode_cache_gb" in {f.name for f in dataclasses.fields(c)} for c in (TrainConfig, DCv2Config))
    exact = {**record, "time_train_s": 40.0, "time_train_wait_s": 10.0}  # 25% and 10 s: both thresholds met
    assert waiting_warning(3, exact, 4, cuda, 16).startswith("epoch 3: the training pass waited for images 25%")
    assert waiting_warning(3, record, 4, torch.device("cpu"), 16) is None  # loading and computing share the cores
    assert waiting_warning(3, {**record, "time_train_wait_s": 99.0}, 4, cuda, 16) is None  # under 25%
    short = {"time_extract_s": 8.0, "time_extract_wait_s": 6.0, "time_train_s": 9.9, "time_train_wait_s": 9.9}
    assert waiting_warning(0, short, 4, cuda, 16) is None  # under 10 s of waiting: not worth tuning
