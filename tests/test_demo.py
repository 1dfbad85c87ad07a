"""The demo: DeepCluster on real digits, probes vs a random init, leaderboard files."""
import json
from html.parser import HTMLParser

from click.testing import CliRunner

from dcbench import demo
from dcbench.cli import main


def test_demo_end_to_end_small(tmp_path, monkeypatch):
    monkeypatch.setitem(demo.DEMO_TRAINING, "epochs", 2)
    monkeypatch.setitem(demo.DEMO_PROTOCOLS, "linear", {**demo.DEMO_PROTOCOLS["linear"], "epochs": 3})
    monkeypatch.setattr(demo, "SEEDS", (0, 1))
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "linear/conv3/top1" in result.stdout and "knn/conv5/top1_k20" in result.stdout
    assert "deepcluster-digits" in result.stdout and "random:alexnet,size=64" in result.stdout
    assert "exceeds the spread" in result.stdout or "within the spread" in result.stdout
    records = [json.loads(line) for line in (out / "deepcluster-digits" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and records[0]["n_images"] == 1347
    assert records[1]["loss"] < records[0]["loss"], "the pseudo-label loss falls"
    assert records[1]["nmi_labels"] is not None and records[1]["nmi_prev"] is not None
    md = (out / "leaderboard.md").read_text()
    assert md.count("\n") >= 3 and "random:alexnet" in md
    HTMLParser().feed((out / "leaderboard.html").read_text())
