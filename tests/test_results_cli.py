"""`dcbench results list|show|rm|export` and the leaderboard's identity and statistics, on a store of
hand-made records (no evaluation runs)."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dcbench.cli import main
from dcbench.results import MetricRow, Result, ResultStore

SHA_DC, SHA_RND = "d" * 64, "e" * 64


def record(name: str, sha: str, values: list[float], seed: int, epochs: int = 2, fingerprint: str = "fp-a",
           protocol: str = "linear", extra: dict | None = None) -> Result:
    """A linear-probe-like result: top1 and top5 per conv tap."""
    rows = []
    for i, v in enumerate(values, start=1):
        rows += [MetricRow("top1", v, f"conv{i}", "val", "final", seed),
                 MetricRow("top5", v + 20, f"conv{i}", "val", "final", seed)]
    return Result(protocol, "1", {"name": name, "sha256": sha, "arch": "alexnet"},
                  {"epochs": epochs, "seed": seed, "workers": 0}, {"root": f"/data/{fingerprint}", "fingerprint": fingerprint},
                  rows, started=f"2025-01-0{seed + 1}T00:00:00+00:00", extra=dict(extra or {}))


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """dc: 3 seeds (epochs 2, data a); random: 3 seeds; dc once more on other data with other epochs."""
    path = tmp_path / "r.db"
    with ResultStore(path) as db:
        for seed, (a, b) in enumerate([(90.0, 60.0), (92.0, 61.0), (93.1, 62.5)]):
            db.add(record("dc", SHA_DC, [a, b], seed))
            db.add(record("random", SHA_RND, [a - 10, b - 15 + 0.7 * seed], seed))
        db.add(record("dc", SHA_DC, [86.8, 50.0], 0, epochs=5, fingerprint="fp-b"))
    return path


def cli(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def board(store: Path, *args) -> list[dict]:
    result = cli("leaderboard", "--store", store, "--format", "json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# ----------------------------------------------------------------------------- identity in the tables
def test_other_data_and_epochs_never_merge_into_one_cell(store):
    items = [i for i in board(store) if i["checkpoint"] == "dc" and i["tap"] == "conv1"]
    assert len(items) == 2  # two distinguishable rows, never one merged cell
    by_setup = {i["setup"]: i for i in items}
    assert set(by_setup) == {"epochs=2, data=fp-a", "epochs=5, data=fp-b"}
    first = by_setup["epochs=2, data=fp-a"]
    assert first["n"] == 3 and first["mean"] == pytest.approx(91.7) and first["std"] == pytest.approx(1.5716, abs=1e-3)
    assert first["ci_low"] < 91.7 < first["ci_high"]
    second = by_setup["epochs=5, data=fp-b"]
    assert second["n"] == 1 and second["std"] is None and second["ci_low"] is None and second["mean"] == 86.8
    assert first["settings"] == {"epochs": 2} and second["data_fingerprint"] == "fp-b"
    # an explicit filter picks one setup, and the column says nothing more is mixed in
    only = board(store, "--where", "epochs=5", "--checkpoint", "dc")
    assert {i["setup"] for i in only} == {""} and {i["n"] for i in only} == {1}
    assert {i["setup"] for i in board(store, "--latest", "--checkpoint", "dc")} == {""}


def test_headline_default_and_metric_tap_filters(store):
    assert {i["metric"] for i in board(store)} == {"top1"}
    items = board(store, "--metric", "all", "--tap", "conv2", "--where", "data=fp-a")
    assert {(i["metric"], i["tap"]) for i in items} == {("top1", "conv2"), ("top5", "conv2")}
    md = cli("leaderboard", "--store", store, "--where", "data=fp-a")
    assert md.exit_code == 0 and "**linear · top1 (val) — n=3 per cell**" in md.stdout and "| conv1 | conv2 |" in md.stdout


def test_reference_gives_paired_difference_ci_and_p_value(store):
    items = board(store, "--reference", "random", "--where", "data=fp-a")
    dc = next(i for i in items if i["checkpoint"] == "dc" and i["tap"] == "conv1")
    assert dc["diff"] == pytest.approx(10.0) and dc["test"] == "paired-t"
    assert dc["diff_ci_low"] == dc["diff_ci_high"] == pytest.approx(10.0)  # the same 10-point gap on every seed
    assert dc["p_value"] == 0.0 and dc["significant"] is True and dc["mark"] == "best"
    conv2 = next(i for i in items if i["checkpoint"] == "dc" and i["tap"] == "conv2")
    assert conv2["diff_ci_low"] < conv2["diff"] < conv2["diff_ci_high"] and conv2["diff"] == pytest.approx(14.3)
    assert 0 < conv2["p_value"] < 0.05
    bad = cli("leaderboard", "--store", store, "--reference", "nope")
    assert bad.exit_code == 2 and "unknown reference 'nope'" in bad.output


# ----------------------------------------------------------------------------- results commands
def test_list_show_export(store):
    listed = cli("results", "list", "--store", store)
    assert listed.exit_code == 0, listed.output
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["id", "started", "protocol", "checkpoint", "seed", "key", "data", "metrics", "flags"]
    assert len(lines) == 8 and lines[1].split()[:5] == ["1", "2025-01-01", "00:00:00", "linear", "v1"]
    only = cli("results", "list", "--store", store, "--checkpoint", "random", "--json")
    rows = [json.loads(line) for line in only.stdout.splitlines()]
    assert [r["id"] for r in rows] == [2, 4, 6] and len(rows[0]["key"]) == 64
    assert rows[0]["key"] == rows[1]["key"]  # seeds of one experiment share the key
    shown = json.loads(cli("results", "show", "2", "--store", store).stdout)
    assert shown["id"] == 2 and shown["checkpoint"]["name"] == "random" and shown["outcomes"] == []
    assert shown["key"] == rows[0]["key"] and shown["settings"]["epochs"] == 2
    exported = cli("results", "export", "--store", store, "--format", "csv", "--protocol", "linear")
    table = list(csv.DictReader(io.StringIO(exported.stdout)))
    assert len(table) == 7 * 4 and {"key", "seed", "data_fingerprint", "settings", "value"} <= set(table[0])
    out = store.parent / "all.json"
    assert cli("results", "export", "--store", store, "--output", out).exit_code == 0
    assert len(json.loads(out.read_text())) == 7


def test_rm_asks_then_removes_and_the_leaderboard_changes(store):
    before = {i["setup"] for i in board(store, "--checkpoint", "dc")}
    assert len(before) == 2
    declined = CliRunner().invoke(main, ["results", "rm", "7", "--store", str(store)], input="n\n")
    assert declined.exit_code == 1 and "delete 1 result(s)?" in declined.output
    assert len(json.loads(cli("results", "export", "--store", store).stdout)) == 7
    removed = cli("results", "rm", "7", "--store", store, "--yes")
    assert removed.exit_code == 0 and "removed 1 result(s)" in removed.output
    after = board(store, "--checkpoint", "dc")
    assert {i["setup"] for i in after} == {""} and {i["n"] for i in after} == {3}


def test_errors_are_one_line(store, tmp_path):
    for args in (["results", "show", "99", "--store", store], ["results", "rm", "1", "99", "--yes", "--store", store],
                 ["results", "list", "--store", tmp_path / "none.db"]):
        result = cli(*args)
        assert result.exit_code == 1 and result.output.startswith("error: ") and result.output.count("\n") == 1
    assert "no result 99" in cli("results", "show", "99", "--store", store).output
    assert not (tmp_path / "none.db").exists()
    assert len(json.loads(cli("results", "export", "--store", store).stdout)) == 7  # rm 1 99: nothing removed


def test_rerun_of_the_same_key_and_seed_is_kept_and_counted(store):
    with ResultStore(store) as db:
        db.add(record("random", SHA_RND, [81.0, 46.0], 0))
    assert len(json.loads(cli("results", "export", "--store", store).stdout)) == 8
    rnd = next(i for i in board(store) if i["checkpoint"] == "random" and i["tap"] == "conv1")
    assert rnd["n"] == 3 and rnd["duplicates"] == 1 and rnd["mean"] == pytest.approx((81.0 + 82.0 + 83.1) / 3)


def test_outcomes_feed_the_bootstrap_through_the_cli(tmp_path):
    rng = np.random.default_rng(0)
    base = (rng.random(300) < 0.5).astype(np.uint8)
    better = base.copy()
    better[np.flatnonzero(base == 0)[:30]] = 1
    path = tmp_path / "o.db"
    with ResultStore(path) as db:
        for name, sha, o in (("a", SHA_DC, better), ("b", SHA_RND, base)):
            r = Result("knn", "1", {"name": name, "sha256": sha, "arch": "alexnet"}, {"seed": 0, "ks": [20]},
                       {"root": "/d", "fingerprint": "x"}, [MetricRow("top1_k20", 100 * o.mean(), "conv5", "val",
                                                                      None, 0)], extra={"seed_dependent": False})
            db.add(r, outcomes={"top1_k20/conv5": o})
    items = {i["checkpoint"]: i for i in board(path, "--reference", "b")}
    assert items["a"]["test"] == "paired-bootstrap" and items["a"]["significant"] is True
    assert items["a"]["diff"] == pytest.approx(10.0) and items["a"]["ci_method"] == "bootstrap"
    text = cli("leaderboard", "--store", path, "--reference", "b").stdout
    assert "n=1 (seed-independent" in text and "†" in text
    listed = cli("results", "list", "--store", path).stdout
    assert "outcomes" in listed.splitlines()[1]


# ----------------------------------------------------------------------------- the runner's side
from dataclasses import dataclass  # noqa: E402
from typing import Any, ClassVar  # noqa: E402

from dcbench import evaluate, protocol  # noqa: E402
from dcbench.errors import UsageError  # noqa: E402
from dcbench.protocol import CommonSettings, Protocol, ProtocolOutput, setting  # noqa: E402


@dataclass
class _OutSettings(CommonSettings):
    workers: int = setting(0, "DataLoader workers")
    shift: int = setting(0, "images the checkpoint gets right beyond the first 10")


class _WithOutcomes(Protocol):
    """Per-image outcomes, seed-independent: what kNN does once wired."""

    name: ClassVar[str] = "toy-outcomes"
    description: ClassVar[str] = "toy"
    seed_dependent: ClassVar[bool] = False
    Settings: ClassVar[type] = _OutSettings
    runs: ClassVar[int] = 0

    def run(self, ckpt: Any, settings: Any, root: Path, ctx: Any) -> ProtocolOutput:
        _WithOutcomes.runs += 1
        right = np.zeros(50, dtype=bool)
        right[:10 + settings.shift] = True
        return ProtocolOutput([MetricRow("top1", 100 * right.mean(), "conv1", "val", None, settings.seed)], "fp",
                              outcomes={"top1/conv1": right})


@pytest.fixture
def toy_outcomes(tmp_path):
    protocol.register_protocol(_WithOutcomes)
    _WithOutcomes.runs = 0
    (tmp_path / "data").mkdir()
    yield tmp_path / "data"
    protocol._REGISTRY.pop(_WithOutcomes.name, None)


def test_run_and_store_keeps_outcomes_and_seed_independent_runs_once(toy_outcomes, tmp_path):
    plans = evaluate.expand_seeds([evaluate.plan("toy-outcomes", {}, toy_outcomes)], [0, 1, 2])
    assert len(plans) == 1  # seed-independent: no seed trials
    with ResultStore(tmp_path / "s.db") as db:
        items = evaluate.sweep(plans, ["random:alexnet,size=64"], db, device="cpu")
        rid = items[0].result.id
        assert items[0].result.extra["seed_dependent"] is False
        np.testing.assert_array_equal(db.outcomes(rid)["top1/conv1"][:11], [True] * 10 + [False])
        again = evaluate.sweep(plans, ["random:alexnet,size=64"], db, device="cpu")
        assert again[0].reused and _WithOutcomes.runs == 1
        other_root = tmp_path / "copy"
        other_root.mkdir()
        moved = evaluate.sweep([evaluate.plan("toy-outcomes", {}, other_root)], ["random:alexnet,size=64"], db,
                               device="cpu")
        assert not moved[0].reused and _WithOutcomes.runs == 2  # another data root is never "already stored"
        assert moved[0].result.key() == items[0].result.key()  # the same data fingerprint: the same key
        # a re-run of the same key and seed is kept beside the earlier ones
        evaluate.run_and_store(plans[0], items[0].checkpoint, db, evaluate.context_for(plans[0], "cpu"))
        assert db.trials(items[0].result.key(), 0) == 3


def test_split_overrides_per_protocol(toy_outcomes):
    over = evaluate.split_overrides(["toy-outcomes", "knn"], {"shift": 3, "knn.ks": [10], "workers": 0,
                                                              "toy-outcomes.workers": 1})
    assert over == {"toy-outcomes": {"shift": 3, "workers": 1}, "knn": {"ks": [10], "workers": 0}}
    with pytest.raises(UsageError, match="unknown setting 'nope'"):
        evaluate.split_overrides(["toy-outcomes", "knn"], {"nope": 1})
    with pytest.raises(UsageError, match="'linear' is not one of the --protocol values"):
        evaluate.split_overrides(["knn"], {"linear.epochs": 1})
