"""Deviations and per-image outcomes end to end (issues 13 and 14): an eval away from its preset
stores the deviation and every leaderboard format shows it; kNN and linear results carry
per-image outcomes, so a comparison against a reference is a paired bootstrap over images."""
from __future__ import annotations

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
from dcbench.results import MetricRow, Result
from dcbench.viz.report import ReportInputs, build_report

SMALL = ["--set", "image_size=64", "--set", "workers=0", "--set", "batch_size=16"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple:
    """(an ImageFolder of 3 classes x 8 images, a checkpoint file of a seeded AlexNet at 64 px)."""
    folder = tmp_path_factory.mktemp("inputs")
    save_checkpoint(folder / "mine.pth", build_backbone("alexnet", input_size=64, seed=5))
    return make_image_folder(folder / "shapes", n_classes=3, per_class=8, image_size=64), folder / "mine.pth"


def _ok(*args: object):
    """The CLI's result for ``args``, which must succeed."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def _records(store) -> list[dict]:
    with sqlite3.connect(store) as db:
        return [json.loads(r) for (r,) in db.execute("select record_json from results order by id")]


def test_crops_center_under_deepcluster_is_stored_and_shown_in_every_format(inputs, tmp_path):
    """Issue 13's acceptance: --set crops=center under the deepcluster preset."""
    data, ckpt = inputs
    store = tmp_path / "r.db"
    _ok("eval", "--protocol", "linear", "--checkpoint", ckpt, "--data", data, "--store", store,
            "--set", "crops=center", "--set", "epochs=1", "--set", "taps=[conv1]", *SMALL)
    (record,) = _records(store)
    assert record["settings"]["preset"] == "deepcluster"
    user = [d for d in record["extra"]["deviations"] if d["source"] == "user"]
    assert {"what": "crops=center", "why": "set by the user; the deepcluster default is tencrop",
            "source": "user"} in user
    boards = {fmt: _ok("leaderboard", "--store", store, "--format", fmt).stdout
              for fmt in ("md", "latex", "html", "csv", "json")}
    assert "‡1" in boards["md"] and "crops=center" in boards["md"]
    assert r"\textsuperscript{\ddag{}1}" in boards["latex"] and "crops=center" in boards["latex"]
    assert '<sup class="dev">‡1</sup>' in boards["html"] and "crops=center" in boards["html"]
    HTMLParser().feed(boards["html"])
    row = next(csv.DictReader(io.StringIO(boards["csv"])))
    assert row["deviation_mark"] == "‡1" and "crops=center" in [d["what"] for d in json.loads(row["deviations"])]
    item = json.loads(boards["json"])[0]
    assert item["deviation_mark"] == "‡1" and any(d["what"] == "crops=center" for d in item["deviations"])


@pytest.mark.parametrize("protocol, extra, column", [
    ("knn", ["--set", "ks=[10]"], "knn/conv3/top1_k10"),
    ("linear", ["--set", "cached=true", "--set", "epochs=1", "--set", "crops=center"], "linear/conv3/top1"),
])
def test_reference_comparison_is_a_paired_bootstrap_over_images(inputs, tmp_path, protocol, extra, column):
    """Issue 14 item 3: kNN and linear store per-image outcomes, so --reference uses the bootstrap."""
    data, ckpt = inputs
    store = tmp_path / "r.db"
    _ok("compare", ckpt, "random:alexnet", "--protocol", protocol, "--data", data, "--store", store,
            "--set", "taps=[conv3]", *SMALL, *extra)
    with sqlite3.connect(store) as db:
        assert db.execute("select count(*) from outcomes").fetchone()[0] == 2
    items = json.loads(_ok("leaderboard", "--store", store, "--format", "json",
                               "--reference", "random:alexnet").stdout)
    mine = next(i for i in items if i["checkpoint"] == "mine" and i["column"] == column)
    assert mine["test"] == "paired-bootstrap" and mine["ci_method"] == "bootstrap"
    assert mine["diff_ci_low"] is not None and mine["diff_ci_low"] <= mine["diff"] <= mine["diff_ci_high"]
    assert 0 < mine["p_value"] <= 1


def test_report_marks_and_lists_the_deviations():
    """The report embeds the leaderboard fragment: the same marks and notes as the html leaderboard."""
    rows = [MetricRow("top1", 40.0, "conv3", "val", "final", 0)]
    deviations = [{"what": "crops=center", "why": "set by the user; the deepcluster default is tencrop",
                   "source": "user"},
                  {"what": "heads N(0, 0.01)", "why": "DeepCluster's choice", "source": "card"}]
    result = Result("linear", "3", {"name": "m", "sha256": "a" * 64}, {"preset": "deepcluster", "seed": 0},
                    {"fingerprint": "f"}, rows, extra={"deviations": deviations})
    page = build_report(ReportInputs(results=[result]))
    assert '<sup class="dev">‡1</sup>' in page and "crops=center (set by the user" in page
    assert "known deviations of linear (preset deepcluster) from its sources: heads N(0, 0.01)" in page
