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
    path.write_text(json.dumps({"key": "stale", "protocols": [["old", "gone"]]}))
    assert lazycli.protocol_listing(lambda: [("new", "fresh")]) == [("new", "fresh")]
    assert json.loads(path.read_text())["protocols"] == [["new", "fresh"]]
    assert lazycli.protocol_listing(lambda: [("other", "x")]) == [("new", "fresh")]  # same key: cached


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
