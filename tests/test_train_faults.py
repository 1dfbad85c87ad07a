"""Training faults: a non-finite loss, a damaged checkpoint.pth, a full disk, a torn metrics.jsonl.

Each gives one line, exit 1 where the run cannot go on, and never loses the last good state.
"""
import errno
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from dcbench.checkpoint import load_checkpoint
from dcbench.cli import main
from dcbench.data.synthetic import make_image_folder
from test_train import SMALL_NET

SMALL = ["--image-size", "64", "--batch-size", "16", "--k", "4", "--workers", "0", "--set", "pca_dim=8"]
V2_SMALL = ["--method", "deepcluster-v2", "--arch", "alexnet", "--image-size", "64", "--batch-size", "16",
            "--workers", "0", "--set", "prototypes=[4,4]", "--set", "small_crops=0", "--set", "hidden_mlp=64",
            "--set", "feat_dim=16"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "shapes"
    return make_image_folder(root, n_classes=4, per_class=8, image_size=64, splits=None)


def _train(images: Path, run: Path, *extra: str, v2: bool = False):
    args = ["train", "--data", str(images), "--out", str(run), *(V2_SMALL if v2 else SMALL), *extra]
    return CliRunner().invoke(main, args)


def _errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _epochs(run: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- non-finite loss
def test_huge_learning_rate_stops_with_one_line_and_a_loadable_checkpoint(images, tmp_path):
    run = tmp_path / "run"
    result = _train(images, run, "--epochs", "3", "--set", "lr=1e6")
    assert result.exit_code == 1, result.output
    errors = _errors(result.output)
    assert len(errors) == 1 and "non-finite" in errors[0] and "--set lr=" in errors[0], result.output
    assert "Traceback" not in result.output and "internal error" not in result.output
    saved = json.loads((run / "checkpoint.json").read_text())
    assert f"checkpoint.pth (epoch {saved['epoch']}, iteration {saved['iteration']})" in errors[0]
    assert load_checkpoint(run / "checkpoint.pth").meta["epoch"] == saved["epoch"]
    assert len(_epochs(run)) == saved["epoch"] if (run / "metrics.jsonl").exists() else saved["epoch"] == 0


class _NaNLoss(torch.nn.Module):
    """A cross-entropy that turns non-finite: the fault, injected."""

    def forward(self, logits, targets):
        return torch.nn.functional.cross_entropy(logits, targets) * float("nan")


@pytest.mark.parametrize("v2", [False, True], ids=["deepcluster", "deepcluster-v2"])
def test_non_finite_loss_overwrites_nothing(images, tmp_path, monkeypatch, v2):
    run = tmp_path / "run"
    assert _train(images, run, "--epochs", "1", v2=v2).exit_code == 0
    before = {p.name: _digest(p) for p in (run / "checkpoint.pth", run / "metrics.jsonl")}
    if v2:
        real = torch.nn.functional.cross_entropy
        monkeypatch.setattr(torch.nn.functional, "cross_entropy", lambda *a, **k: real(*a, **k) * float("nan"))
    else:
        monkeypatch.setattr(torch.nn, "CrossEntropyLoss", _NaNLoss)
    result = _train(images, run, "--epochs", "2", "--resume", v2=v2)
    assert result.exit_code == 1, result.output
    errors = _errors(result.output)
    assert len(errors) == 1 and "epoch 1, iteration 0" in errors[0] and "(epoch 1, iteration 0)" in errors[0]
    assert {p.name: _digest(p) for p in (run / "checkpoint.pth", run / "metrics.jsonl")} == before


# ----------------------------------------------------------------------------- damaged checkpoint
def test_damaged_checkpoint_falls_back_to_the_newest_readable_snapshot(images, tmp_path):
    run, straight = tmp_path / "run", tmp_path / "straight"
    args = ["--set", "snapshot_every=1", *SMALL_NET]
    assert _train(images, straight, "--epochs", "3", *args).exit_code == 0
    assert _train(images, run, "--epochs", "2", *args).exit_code == 0
    (run / "checkpoint.pth").write_bytes((run / "checkpoint.pth").read_bytes()[:5000])  # truncated
    (run / "checkpoints" / "epoch_0002.pth").write_bytes(b"PK\x03\x04 not a zip")  # damaged too
    result = _train(images, run, "--epochs", "3", *args, "--resume")
    assert result.exit_code == 0, result.output
    assert "resuming from the newest readable snapshot" in result.output and "epoch_0001.pth" in result.output
    assert _epochs(run) == [0, 1, 2]
    # the snapshot carries the whole training state: the run ends where the uninterrupted one does
    a = load_checkpoint(run / "checkpoint.pth").backbone.backbone_state_dict()  # what checkpoints store
    b = load_checkpoint(straight / "checkpoint.pth").backbone.backbone_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_damaged_checkpoint_without_snapshots_is_one_line(images, tmp_path):
    run = tmp_path / "run"
    assert _train(images, run, "--epochs", "1", "--set", "snapshot_every=0").exit_code == 0
    (run / "checkpoint.pth").write_bytes(b"\x80garbage")
    result = _train(images, run, "--epochs", "2", "--resume")
    assert result.exit_code == 1, result.output
    errors = _errors(result.output)
    assert len(errors) == 1 and "no readable training snapshot" in errors[0] and "--out" in errors[0]


# ----------------------------------------------------------------------------- full disk
def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(images, tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert _train(images, run, "--epochs", "1").exit_code == 0
    before = _digest(run / "checkpoint.pth")

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    result = _train(images, run, "--epochs", "2", "--resume")
    assert result.exit_code == 1, result.output
    errors = _errors(result.output)
    assert len(errors) == 1 and "no space left" in errors[0] and "intact" in errors[0], result.output
    assert _digest(run / "checkpoint.pth") == before
    assert not [p for p in run.rglob("*.tmp")], "a temp file was left behind"
    monkeypatch.undo()
    assert load_checkpoint(run / "checkpoint.pth").meta["epoch"] == 1


def test_checkpoints_hold_cpu_tensors_only(images, tmp_path):
    run = tmp_path / "run"
    assert _train(images, run, "--epochs", "1").exit_code == 0
    record = torch.load(run / "checkpoint.pth", weights_only=True)  # no map_location

    def tensors(obj):
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, dict):
            for v in obj.values():
                yield from tensors(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                yield from tensors(v)

    found = list(tensors(record))
    assert found and all(t.device.type == "cpu" for t in found)


# ----------------------------------------------------------------------------- torn metrics.jsonl
def test_resume_after_a_torn_last_metrics_line_continues(images, tmp_path):
    run = tmp_path / "run"
    assert _train(images, run, "--epochs", "2").exit_code == 0
    text = (run / "metrics.jsonl").read_text()
    last = text.splitlines()[-1]
    (run / "metrics.jsonl").write_text(text[: len(text) - len(last) - 1] + last[: len(last) // 2])
    result = _train(images, run, "--epochs", "3", "--resume")
    assert result.exit_code == 0, result.output
    assert "dropped 1 unreadable line" in result.output
    assert _epochs(run) == [0, 2]  # the torn record of epoch 1 is gone; epoch 2 is logged after epoch 0


# ----------------------------------------------------------------------------- unreadable images
@pytest.mark.parametrize("workers", ["0", "2"])
def test_strict_stop_names_the_fix_that_works_for_a_run(images, tmp_path, workers):
    """`--strict` stops at a broken image; the run's settings are saved (strict included), so the
    hint cannot be "run without --strict": it names resuming with --set strict=false, which works
    (a worker's error arrives re-raised by the DataLoader: the same one line)."""
    data = tmp_path / "data"
    shutil.copytree(images, data)
    broken = data / "class_00" / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    run = tmp_path / "run"
    result = _train(data, run, "--epochs", "1", "--strict", "--workers", workers)
    assert result.exit_code == 1, result.output
    errors = _errors(result.output)
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert errors[0].startswith(f"error: cannot read image {broken} (UnidentifiedImageError"), errors[0]
    assert errors[0].endswith(f"continue with dcbench train --resume --out {run}, or skip unreadable images: "
                              "add --set strict=false"), errors[0]
    resumed = CliRunner().invoke(main, ["train", "--resume", "--out", str(run), "--set", "strict=false"])
    assert resumed.exit_code == 0, resumed.output
    assert _epochs(run) == [0]
