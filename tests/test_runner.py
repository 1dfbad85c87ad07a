"""The runner (dcbench/evaluate.py) does every shared step once, for every protocol."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from dcbench import evaluate, progress, protocol
from dcbench.data import image_folder
from dcbench.data.fingerprint import tree_signature
from dcbench.data.synthetic import make_image_folder
from dcbench.data.transforms import center_transform
from dcbench.errors import UsageError
from dcbench.protocol import (CommonSettings, FrozenFeatureSettings, Protocol, ProtocolError, ProtocolOutput,
                              register_protocol, setting)
from dcbench.results import MetricRow, ResultStore
from dcbench.settings import apply_settings


@dataclass
class ToySettings(FrozenFeatureSettings):
    mutate: bool = setting(False, "change a BatchNorm buffer of the backbone it was handed")
    image_size: int = setting(64, "input side")
    workers: int = setting(0, "DataLoader workers")


class Toy(Protocol):
    """Records what it saw; optionally breaks the frozen-backbone rule."""

    name: ClassVar[str] = "toy-runner"
    description: ClassVar[str] = "runner test protocol"
    data_layout: ClassVar[str] = "ROOT/train/CLASS/*.jpg\n"
    Settings: ClassVar[type] = ToySettings
    calls: ClassVar[dict[str, int]] = {"check_data": 0, "run": 0}
    draws: ClassVar[list[float]] = []

    def check_data(self, root: Path, settings: Any) -> None:
        Toy.calls["check_data"] += 1
        super().check_data(root, settings)

    def run(self, ckpt: Any, settings: ToySettings, root: Path, ctx: Any) -> ProtocolOutput:
        Toy.calls["run"] += 1
        Toy.draws.append(float(torch.rand(1)) + float(np.random.rand()))
        data = image_folder(root / "train", transform=center_transform(settings.image_size))
        with ctx.frozen_backbone(ckpt, data) as (backbone, _sha):
            if settings.mutate:
                bn = next(m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
                bn.running_mean.add_(1.0)
        return ProtocolOutput([MetricRow("score", 1.0, None, "val", None, settings.seed)], "fp")


@pytest.fixture()
def toy(tmp_path):
    register_protocol(Toy)
    Toy.calls.update(check_data=0, run=0)
    Toy.draws.clear()
    yield make_image_folder(tmp_path / "data", n_classes=2, per_class=3, image_size=40, splits=("train",))
    protocol._REGISTRY.pop(Toy.name, None)


def test_check_data_once_and_seeded_run(toy):
    p = evaluate.plan("toy-runner", {"seed": 3}, toy)
    ckpt = evaluate.load_for(p, "random:alexnet")
    first = evaluate.run(p, ckpt, evaluate.context_for(p, "cpu"))
    evaluate.run(p, ckpt, evaluate.context_for(p, "cpu"))
    assert Toy.calls == {"check_data": 1, "run": 2}
    assert Toy.draws[0] == Toy.draws[1]  # torch and numpy seeded from the seed setting
    assert first.extra["bn_recalibrate"]["ran"] is True  # recorded by the runner from the context
    assert first.wall_s >= 0 and first.settings["seed"] == 3


def test_runner_restores_the_callers_rng(toy):
    p = evaluate.plan("toy-runner", {}, toy)
    ckpt = evaluate.load_for(p, "random:alexnet")
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    evaluate.run(p, ckpt, evaluate.context_for(p, "cpu"))
    assert torch.equal(torch.rand(1), expected)


@pytest.mark.parametrize("spec", ["random:alexnet", "random:alexnet,size=64"])
def test_changed_frozen_backbone_is_an_error_naming_the_protocol(toy, spec, tmp_path):
    p = evaluate.plan("toy-runner", {"mutate": True, "bn_recalibrate": "off"}, toy)
    ckpt = evaluate.load_for(p, spec)
    with ResultStore(tmp_path / "store.db") as store, pytest.raises(ProtocolError, match="toy-runner"):
        evaluate.run_and_store(p, ckpt, store, evaluate.context_for(p, "cpu"))
    with ResultStore(tmp_path / "store.db") as store:
        assert len(store) == 0  # nothing stored


def test_changed_recalibrated_copy_is_caught_too(toy):
    p = evaluate.plan("toy-runner", {"mutate": True}, toy)  # a random init: BN re-estimated on a copy
    ckpt = evaluate.load_for(p, "random:alexnet")
    with pytest.raises(ProtocolError, match="backbone used for features"):
        evaluate.run(p, ckpt, evaluate.context_for(p, "cpu"))


def test_sweep_skips_stored_results_and_expands_seeds(toy, tmp_path):
    plans = evaluate.expand_seeds([evaluate.plan("toy-runner", {}, toy)], [0, 1])
    assert [p.seed for p in plans] == [0, 1]
    with ResultStore(tmp_path / "store.db") as store:
        first = evaluate.sweep(plans, ["random:alexnet"], store, device="cpu")
        again = evaluate.sweep(plans, ["random:alexnet"], store, device="cpu")
        assert len(store) == 2
    assert [i.reused for i in first] == [False, False] and [i.reused for i in again] == [True, True]
    assert Toy.calls["run"] == 2
    assert [i.result.settings["seed"] for i in again] == [0, 1]


class SeedlessToy(Toy):
    """A protocol whose numbers depend on the seed only through BatchNorm re-estimation (as kNN)."""

    name: ClassVar[str] = "toy-seedless"
    seed_dependent: ClassVar[bool] = False


def test_seeds_run_per_seed_only_where_batchnorm_is_re_estimated(toy, tmp_path, monkeypatch):
    """`compare --seeds` on a seed-independent protocol: one run for a checkpoint whose BatchNorm
    is kept, one per seed for a random init (the seed draws its calibration images), so its cell
    gets n = 3 and the spread over seeds, not one seed's value; bn_recalibrate=off: one run each."""
    from dcbench.checkpoint import save_checkpoint
    from dcbench.models import build_backbone

    lines, step = [], progress.Overall.step
    monkeypatch.setattr(progress.Overall, "step", lambda self, *a, **k: lines.append(step(self, *a, **k)))
    register_protocol(SeedlessToy)
    try:
        trained = save_checkpoint(tmp_path / "trained.pth", build_backbone("alexnet", input_size=64, seed=1))
        specs = [str(trained), "random:alexnet"]
        plans = evaluate.expand_seeds([evaluate.plan("toy-seedless", {}, toy)], [0, 1, 2])
        with ResultStore(tmp_path / "store.db") as store:
            items = evaluate.sweep(plans, specs, store, device="cpu", progress=True)
        runs = [(i.checkpoint.name, i.result.settings["seed"], i.result.extra["seed_dependent"]) for i in items]
        assert runs == [("trained", 0, False), ("random:alexnet", 0, True), ("random:alexnet", 1, True),
                        ("random:alexnet", 2, True)]
        assert lines[-1].startswith("compare: 4/4 evaluations done")  # plans a checkpoint skips are not counted
        off = evaluate.expand_seeds([evaluate.plan("toy-seedless", {"bn_recalibrate": "off"}, toy)], [0, 1, 2])
        with ResultStore(tmp_path / "off.db") as store:
            assert len(evaluate.sweep(off, specs, store, device="cpu")) == 2
    finally:
        protocol._REGISTRY.pop(SeedlessToy.name, None)


def test_a_stored_result_is_not_reused_once_the_data_changed(toy, tmp_path):
    """compare reuses a stored result only while the data at its root is what it was computed on:
    an added image (its folder's modification time) makes it run again; unchanged data reuses."""
    plans = [evaluate.plan("toy-runner", {"bn_recalibrate": "off"}, toy)]
    with ResultStore(tmp_path / "store.db") as store:
        first = evaluate.sweep(plans, ["random:alexnet"], store, device="cpu")
        assert first[0].result.data["tree"] == tree_signature(toy)
        assert [i.reused for i in evaluate.sweep(plans, ["random:alexnet"], store, device="cpu")] == [True]
        shutil.copy(next((toy / "train" / "class_00").iterdir()), toy / "train" / "class_00" / "added.png")
        assert [i.reused for i in evaluate.sweep(plans, ["random:alexnet"], store, device="cpu")] == [False]
        assert [i.reused for i in evaluate.sweep(plans, ["random:alexnet"], store, device="cpu")] == [True]
        assert Toy.calls["run"] == 2


def test_tree_signature_follows_folders_not_file_contents(tmp_path):
    root = tmp_path / "d"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "x.jpg").write_bytes(b"1")
    (root / "loop").symlink_to(root)  # followed once, no endless walk
    before = tree_signature(root)
    assert before == tree_signature(root) and len(before) == 16
    (root / "a" / "b" / "x.jpg").write_bytes(b"22")  # rewritten in place: the folders do not change
    assert tree_signature(root) == before
    os.rename(root / "a" / "b" / "x.jpg", root / "a" / "b" / "y.jpg")
    assert tree_signature(root) != before
    assert tree_signature(tmp_path / "missing") is None


def test_common_settings_validate_once():
    with pytest.raises(UsageError, match="workers"):
        apply_settings(CommonSettings(), {"workers": -1})
    with pytest.raises(UsageError, match="taps is empty"):
        apply_settings(FrozenFeatureSettings(), {"taps": []})
    with pytest.raises(UsageError, match="batch_size"):
        apply_settings(ToySettings(), {"batch_size": 0})


def test_record_lists_the_settings_that_leave_the_standard(toy):
    p = evaluate.plan("toy-runner", {"image_size": 72, "workers": 0, "seed": 5}, toy)
    result = evaluate.run(p, evaluate.load_for(p, "random:alexnet"), evaluate.context_for(p, "cpu"))
    deviations = result.extra["deviations"]
    # image_size moves numbers; the seed (a trial) and workers (execution only) do not
    assert deviations == [{"what": "image_size=72", "why": "set by the user; the protocol default is 64",
                           "source": "user"}]
