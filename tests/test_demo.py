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
    assert "linear · top1 (val)" in result.stdout and "knn · top1_k20 (val)" in result.stdout
    assert "conv3" in result.stdout and "conv5" in result.stdout and "n=2" in result.stdout
    assert "deepcluster-digits" in result.stdout and "random:alexnet,size=64 (reference)" in result.stdout
    notes = result.stdout.split("paired tests, 95% CI):")[1].split("wrote")[0].strip().splitlines()
    assert len(notes) == 10  # linear and kNN, conv1..conv5
    for note in notes:  # the claims are the paired test's: significant, not significant, or no test
        assert note.endswith(": significant") or note.endswith(": not significant") or "not testable" in note
    # linear and kNN store per-image outcomes: a paired bootstrap over images (with the 2 seeds for linear)
    assert all("paired-bootstrap over n=" in note for note in notes)
    assert any("paired-bootstrap over n=2" in note for note in notes)
    assert "spread" not in result.stdout
    records = [json.loads(line) for line in (out / "deepcluster-digits" / "metrics.jsonl").read_text().splitlines()]
    batch = demo.DEMO_TRAINING["batch_size"]  # v2 drops the ragged last batch (SwAV's loader: drop_last=True)
    assert len(records) == 2 and records[0]["method"] == "deepcluster-v2"
    assert records[0]["n_images"] == 1347 // batch * batch and records[0]["heads"] == 3
    assert records[1]["loss"] < records[0]["loss"], "the pseudo-label loss falls"
    assert records[1]["nmi_labels"] is not None and records[1]["nmi_prev"] is not None
    md = (out / "leaderboard.md").read_text()
    assert md.count("\n") >= 3 and "random:alexnet" in md
    HTMLParser().feed((out / "leaderboard.html").read_text())
    # its feature cache stays in its folder (not $DCBENCH_CACHE) and it says how long it took
    assert any((out / "cache").rglob("*")) and not (tmp_path / "cache").exists()
    assert "demo wall time: " in result.stdout
    assert "demo evaluations: 1/" in result.stderr  # n of N evaluations done, with the ETA
