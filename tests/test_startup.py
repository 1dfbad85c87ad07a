"""CLI start-up (issue 17): `dcbench --help`, `--version` and `protocols` import neither torch nor
the protocols, and what they print is what the fully imported CLI prints."""
from __future__ import annotations

import json
import logging
import subprocess
import sys

import click

from dcbench import lazycli

HEAVY = ("torch", "torchvision", "timm", "faiss", "numpy", "sklearn", "matplotlib")

# runs the CLI like `python -m dcbench ARGS` and reports the heavy modules it imported
_PROBE = """
import runpy, sys
sys.argv = ["dcbench", *sys.argv[1:]]
try:
    runpy.run_module("dcbench", run_name="__main__")
except SystemExit as exc:
    code = exc.code or 0
print("HEAVY=" + ",".join(sorted({m.split(".")[0] for m in sys.modules} & set(%r))))
sys.exit(code)
""" % (HEAVY,)


def _run(*args: str, env_cache) -> tuple[str, str]:
    env = {"DCBENCH_CACHE": str(env_cache), "PATH": "/usr/bin:/bin", "COLUMNS": "80"}
    proc = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    out, _, heavy = proc.stdout.rpartition("HEAVY=")
    return out, heavy.strip()


def test_help_and_version_import_no_heavy_module(tmp_path):
    out, heavy = _run("--help", env_cache=tmp_path)
    assert heavy == "", f"`dcbench --help` imported {heavy}"
    for name in ("train", "eval", "viz", "report", "pretrained", "protocols"):
        assert f"\n  {name} " in out
    out, heavy = _run("--version", env_cache=tmp_path)
    assert heavy == "" and out.strip().startswith("dcbench, version ")


def test_protocol_listing_is_cached_and_equals_the_imported_one(tmp_path):
    first, heavy_first = _run("protocols", env_cache=tmp_path)
    assert "torch" in heavy_first.split(",")  # the first listing imports the protocols
    assert (tmp_path / "cli" / "protocols.json").is_file()
    second, heavy = _run("protocols", env_cache=tmp_path)
    assert heavy == "" and second == first
    assert "knn " in first and "linear " in first


def test_lazy_help_listing_equals_the_loaded_one():
    code = """
from click.testing import CliRunner
from dcbench.cli import main
lazy = CliRunner().invoke(main, ["--help"], terminal_width=80).output
assert "viz" not in dict.keys(main.commands)
loaded = sorted(main.commands)  # iterating loads every command, as it always did
print(lazy == CliRunner().invoke(main, ["--help"], terminal_width=80).output, loaded)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    same, _, names = proc.stdout.partition(" ")
    assert same == "True"
    assert {"viz", "report", "pretrained", "train"} <= set(eval(names))


def test_a_broken_plugin_is_left_out_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(lazycli, "_plugin_specs", lambda: {"broken": "dcbench_no_such_module:group"})
    group = click.Group("g")
    group.commands = lazycli.LazyCommands(group, {})
    with caplog.at_level(logging.WARNING, logger="dcbench"):
        logging.getLogger("dcbench").propagate = True
        try:
            assert "broken" not in group.commands
        finally:
            logging.getLogger("dcbench").propagate = False
    assert any("dcbench_no_such_module:group failed to load" in r.getMessage() for r in caplog.records)
    assert "broken" in lazycli.command_names(group)  # listed by name, but never loads


def test_static_help_reads_the_command_docstring_not_an_option_help():
    doc, short, hidden = lazycli.static_help("dcbench.viz.cli:report_command")
    assert doc.startswith("One standalone HTML page") and short is None and not hidden
    assert lazycli.static_help("dcbench.viz.cli:no_such_function") is None
    assert lazycli.source_file("dcbench_no_such_module.x") is None


def test_a_stale_protocol_listing_is_recomputed(tmp_path, monkeypatch):
    monkeypatch.setenv("DCBENCH_CACHE", str(tmp_path))
    from dcbench import protocol

    monkeypatch.setattr(protocol, "_REGISTRY", {})
    monkeypatch.setattr(protocol, "_discovered", False)
    path = tmp_path / "cli" / "protocols.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"key": "stale", "protocols": [["old", "gone"]]}))  # an older file's layout too
    fresh = {"new": {"description": "fresh", "headline_metrics": None, "seed_dependent": True}}
    assert lazycli.protocol_facts(lambda: fresh) == fresh
    assert json.loads(path.read_text())["facts"] == fresh
    assert lazycli.protocol_facts(lambda: {"other": {}}) == fresh  # same key: cached
    path.write_text("[1, 2]")  # damaged: recomputed, not a traceback
    assert lazycli.protocol_facts(lambda: fresh) == fresh


def test_metrics_and_statistics_import_without_torch():
    """The tables' statistics and the metric functions are numpy code: importing them (as
    `dcbench leaderboard` and `results` do) must not start torch or faiss (seconds at start-up);
    `dcbench.cluster` imports its torch / faiss parts on first use."""
    code = ("import sys, dcbench.metrics, dcbench.stats, dcbench.cluster as c; "
            "assert c.nmi.__module__ == 'dcbench.cluster.nmi' and callable(c.nmi); "
            "print(','.join(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'faiss'})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""


def test_leaderboard_reads_protocol_facts_from_the_listing_cache(tmp_path):
    """`dcbench leaderboard` needs each protocol's headline metrics and seed dependence; once the
    listing cache holds them it imports no protocol (no torch) and prints what the fully
    imported CLI prints."""
    from click.testing import CliRunner

    from dcbench.cli import main
    from dcbench.results import MetricRow, Result, ResultStore

    store = tmp_path / "results.db"
    with ResultStore(store) as db:
        for name, sha, top1 in (("a", "a" * 64, 41.0), ("b", "b" * 64, 43.5)):
            db.add(Result(protocol="knn", protocol_version="4", checkpoint={"name": name, "sha256": sha, "arch": "alexnet"},
                          settings={"ks": [20]}, data={"root": "/d", "fingerprint": "f00d"},
                          metrics=[MetricRow("top1_k20", top1, tap="conv5", split="val"),
                                   MetricRow("top5_k20", top1 + 20, tap="conv5", split="val")],
                          versions={}, git=None, started="2026-01-01T00:00:00+00:00", wall_s=1.0, extra={}))
    _run("protocols", env_cache=tmp_path / "cache")  # fills the cache
    out, heavy = _run("leaderboard", "--store", str(store), env_cache=tmp_path / "cache")
    assert "torch" not in heavy.split(","), heavy
    assert "knn · top1\\_k20" in out and "top5" not in out  # knn's declared headline metric only
    assert "seed-independent" in out  # an old record without the flag: knn's own answer
    assert out == CliRunner().invoke(main, ["leaderboard", "--store", str(store)]).stdout
