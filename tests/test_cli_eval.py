"""The evaluation CLI: eval, compare (store reuse, seeds), leaderboard exports, protocols, errors."""
import csv
import io
import json
import sqlite3
from html.parser import HTMLParser

import pytest
from click.testing import CliRunner

from dcbench.checkpoint import save_checkpoint
from dcbench.cli import main
from dcbench.data.synthetic import make_image_folder
from dcbench.models import build_backbone

FAST_LINEAR = ["--set", "image_size=64", "--set", "epochs=1", "--set", "batch_size=16", "--set", "cached=true",
               "--set", "crops=center", "--set", "workers=0"]
FAST_KNN = ["--set", "image_size=64", "--set", "workers=0", "--set", "ks=[10]"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("d") / "shapes", n_classes=3, per_class=8, image_size=64)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("c") / "mine.pth"
    save_checkpoint(path, build_backbone("alexnet", input_size=64, seed=5))
    return path


def _invoke(*args):
    return CliRunner().invoke(main, list(map(str, args)))


def _count(store) -> int:
    with sqlite3.connect(store) as db:
        return db.execute("select count(*) from results").fetchone()[0]


@pytest.mark.parametrize("protocol,fast,metric", [("linear", FAST_LINEAR, "top1"), ("knn", FAST_KNN, "top1_k10")])
def test_eval_json_has_top1_per_conv_layer(data, ckpt, tmp_path, protocol, fast, metric):
    store = tmp_path / "r.db"
    result = _invoke("eval", "--protocol", protocol, "--checkpoint", ckpt, "--data", data, "--store", store,
                     "--json", *fast)
    assert result.exit_code == 0, result.output
    record = json.loads(result.output.strip().splitlines()[-1])
    assert record["protocol"] == protocol and record["checkpoint"]["name"] == "mine"
    assert len(record["checkpoint"]["sha256"]) == 64 and record["data"]["fingerprint"]
    taps = {m["tap"] for m in record["metrics"] if m["metric"] == metric}
    assert taps == {"conv1", "conv2", "conv3", "conv4", "conv5"}
    assert all(0 <= m["value"] <= 100 for m in record["metrics"])
    assert record["settings"]["image_size"] == 64 and record["versions"]["torch"]
    assert _count(store) == 1


def test_compare_runs_once_then_reuses_the_store(data, ckpt, tmp_path):
    store = tmp_path / "r.db"
    args = ["compare", ckpt, "random:alexnet", "--protocol", "linear", "--data", data, "--store", store,
            "--seeds", "0,1", *FAST_LINEAR]
    first = _invoke(*args, "--reference", "random:alexnet")
    assert first.exit_code == 0, first.output
    assert _count(store) == 4
    assert "mine" in first.output and "random:alexnet (reference)" in first.output
    assert "linear · top1 (val)" in first.stdout and "conv3" in first.stdout and "n=2" in first.stdout
    assert "Δ vs random:alexnet" in first.stdout and "[" in first.stdout  # paired t over the 2 seeds: a CI
    second = _invoke(*args, "--reference", "random:alexnet")
    assert second.exit_code == 0 and _count(store) == 4
    assert second.stdout == first.stdout and "stored: linear" in second.output


def test_compare_per_protocol_settings_and_data(data, ckpt, tmp_path):
    store = tmp_path / "r.db"
    args = ["compare", ckpt, "--protocol", "linear", "--protocol", "knn", "--data", data, "--data", f"knn={data}",
            "--store", store, "--set", "linear.cached=true", "--set", "knn.ks=[10]", "--set", "image_size=64",
            "--set", "workers=0", "--set", "linear.epochs=1", "--set", "linear.crops=center",
            "--set", "batch_size=16"]
    result = _invoke(*args)
    assert result.exit_code == 0, result.output
    assert "linear · top1 (val)" in result.stdout and "knn · top1_k10 (val)" in result.stdout
    with sqlite3.connect(store) as db:
        records = [json.loads(r) for (r,) in db.execute("select record_json from results order by id")]
    linear, knn = records
    assert linear["settings"]["cached"] is True and knn["settings"]["ks"] == [10]
    assert linear["settings"]["image_size"] == knn["settings"]["image_size"] == 64  # shared: both have it
    bad = _invoke("compare", ckpt, "--protocol", "linear", "--protocol", "knn", "--data", data, "--store", store,
                  "--set", "nope=1")
    assert bad.exit_code == 2 and "unknown setting 'nope' for linear, knn" in bad.output
    bad = _invoke("compare", ckpt, "--protocol", "knn", "--data", data, "--store", store, "--set", "linear.epochs=1")
    assert bad.exit_code == 2 and "'linear' is not one of the --protocol values" in bad.output


def test_leaderboard_exports_parse(data, ckpt, tmp_path):
    store = tmp_path / "r.db"
    assert _invoke("compare", ckpt, "random:alexnet", "--protocol", "linear", "--data", data, "--store", store,
                   *FAST_LINEAR).exit_code == 0
    outputs = {}
    for fmt in ("md", "csv", "latex", "html", "json"):
        out = tmp_path / f"board.{fmt}"
        result = _invoke("leaderboard", "--store", store, "--format", fmt, "--output", out,
                         "--reference", "random:alexnet")
        assert result.exit_code == 0, result.output
        outputs[fmt] = out.read_text()
    rows = list(csv.DictReader(io.StringIO(outputs["csv"])))
    assert len(rows) == 10 and {r["column"] for r in rows} == {f"linear/conv{i}/top1" for i in range(1, 6)}
    items = json.loads(outputs["json"])
    assert {d["checkpoint"] for d in items} == {"mine", "random:alexnet"}
    assert all(d["n"] == 1 and d["reference"] == "random:alexnet" and "p_value" in d for d in items)
    parser = HTMLParser()
    parser.feed(outputs["html"])
    assert "<table" in outputs["html"] and "mine" in outputs["html"]
    assert "\\begin{tabular}" in outputs["latex"] and "\\toprule" in outputs["latex"]
    assert "| mine" in outputs["md"] or "mine |" in outputs["md"]


def test_leaderboard_empty_store_is_one_line(tmp_path):
    result = _invoke("leaderboard", "--store", tmp_path / "empty.db")
    assert result.exit_code == 1 and result.output.startswith("error: no results")


@pytest.mark.parametrize("args,code,text", [
    (["--protocol", "nope"], 2, "unknown protocol 'nope'"),
    (["--protocol", "linear", "--set", "learning_rate=0.1"], 2, "unknown setting 'learning_rate' for linear"),
    (["--protocol", "linear", "--set", "epochs=many"], 2, "bad value 'many' for epochs"),
    (["--protocol", "linear", "--data", "WRONG"], 1, "expected"),
])
def test_eval_errors_are_one_line_and_store_nothing(data, ckpt, tmp_path, args, code, text):
    store = tmp_path / "r.db"
    args = [a if a != "WRONG" else str(tmp_path) for a in args]
    if "--data" not in args:
        args += ["--data", str(data)]
    result = _invoke("eval", "--checkpoint", ckpt, "--store", store, *args)
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], result.output
    assert not store.exists() or _count(store) == 0


def test_protocols_list_and_describe():
    listing = _invoke("protocols")
    assert listing.exit_code == 0
    for name in ("linear", "imagenet-linear", "places-linear", "knn"):
        assert name in listing.output
    described = _invoke("protocols", "imagenet-linear")
    assert described.exit_code == 0
    assert "train/" in described.output and "preset" in described.output and "deepcluster" in described.output


def test_yaml_words_stay_choices():
    from dcbench.settings import parse_assignments

    assert parse_assignments(["bn_recalibrate=off", "cached=true", "lr=1e-3"]) == \
        {"bn_recalibrate": "off", "cached": True, "lr": 1e-3}


def test_workers_default_to_the_usable_cores_and_are_recorded(data, ckpt, tmp_path, monkeypatch):
    """`workers` defaults to auto (the cores this process may use, 1..8): a fixed 4 made PyTorch
    warn on 2-core machines. The count a run used is in the record; the setting stays `auto`."""
    import os

    from dcbench.errors import UsageError
    from dcbench.protocol import RunContext, get_protocol
    from dcbench.settings import apply_settings

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0}, raising=False)
    settings = get_protocol("knn").default_settings()
    assert settings.workers == "auto" and settings.loader_workers() == 1
    assert apply_settings(settings, {"workers": "3"}).loader_workers() == 3
    assert RunContext(workers="auto").workers == 1
    for bad, message in ((-1, "must be >= 0 or auto"), ("many", "expected an integer or one of auto")):
        with pytest.raises(UsageError, match=message):
            apply_settings(settings, {"workers": bad})

    result = _invoke("eval", "--protocol", "knn", "--checkpoint", ckpt, "--data", data, "--store", tmp_path / "r.db",
                     "--json", "--set", "image_size=64", "--set", "ks=[10]", "--set", "cache=false")
    assert result.exit_code == 0, result.output
    record = json.loads(result.output.strip().splitlines()[-1])
    assert record["settings"]["workers"] == "auto" and record["extra"]["workers"] == 1
    # how long the extraction took, and of it how long its forward passes waited for images
    extra = record["extra"]
    assert 0 < extra["extract_wait_s"] < extra["extract_s"]
    assert 0 < extra["load_wait_s"] < extra["extract_s"]  # every loop's wait: here the extraction's
