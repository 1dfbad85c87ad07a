"""Untrusted inputs and exports: ground-truth pickles never run code, exported names cannot
inject formulas or break a table, plot labels cannot crash matplotlib, one cache root.

(Downloads and pins of published checkpoints are tested in tests/test_pretrained.py, which
holds the local HTTP server.)"""
from __future__ import annotations

import csv
import io
import json
import os
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dcbench import env
from dcbench.cli import main
from dcbench.data.retrieval import (GroundTruthUnpickler, UnsafePickleError, load_ground_truth_pickle, read_revisitop,
                                    safe_pickle_globals)
from dcbench.data.synthetic_retrieval import make_retrieval_dataset
from dcbench.errors import DataError
from dcbench.leaderboard import build_table, csv_text, one_line, render, render_terminal
from dcbench.render import plot_text
from dcbench.results import MetricRow, Result, ResultStore

FAST = ["--set", "image_size=64", "--set", "workers=0"]


# ----------------------------------------------------------------------------- pickles that run code
class _Payload:
    """Unpickling calls ``func(*args)``: the classic pickle exploit."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _touch_command(marker: Path) -> str:
    return f"{sys.executable} -c \"open({str(marker)!r}, 'w').close()\""


def _payloads(marker: Path) -> dict[str, object]:
    touch = f"open({str(marker)!r}, 'w').close()"
    return {"os.system": _Payload(os.system, _touch_command(marker)),
            "builtins.exec": _Payload(exec, touch),
            "builtins.eval": _Payload(eval, f"({touch}, 1)[1]"),
            "pathlib.Path.touch": _Payload(Path.touch, marker)}


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("untrusted") / "data"
    make_retrieval_dataset(root, "roxford5k", n_landmarks=2, queries_per_landmark=1, easy=1, hard=1, junk=1,
                           distractors=2, image_size=48)
    return root


def _copy_root(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "builtins.eval", "pathlib.Path.touch"])
def test_malicious_gnd_pickle_is_refused_by_eval_and_runs_nothing(small_root, tmp_path, kind):
    data = _copy_root(small_root, tmp_path / "data")
    marker = tmp_path / "PWNED"
    gnd = data / "roxford5k" / "gnd_roxford5k.pkl"
    real = pickle.loads(gnd.read_bytes())
    real["imlist"] = _payloads(marker)[kind]  # hidden inside an otherwise valid file
    gnd.write_bytes(pickle.dumps(real, protocol=2))
    result = CliRunner().invoke(main, ["eval", "--protocol", "roxford5k", "--checkpoint", "random:alexnet",
                                       "--data", str(data), "--store", str(tmp_path / "r.db"), *FAST])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ground-truth file "), result.output
    assert "could run code" in lines[0] and "gnd_roxford5k.pkl" in lines[0]
    assert not marker.exists()  # the payload never ran
    if (tmp_path / "r.db").exists():
        with ResultStore(tmp_path / "r.db") as db:
            assert db.results() == []


def test_malicious_gnd_pickle_in_a_subprocess_runs_nothing(small_root, tmp_path):
    """The acceptance check end to end, in a fresh interpreter: `python -m dcbench eval ...`."""
    import subprocess

    data = _copy_root(small_root, tmp_path / "data")
    marker = tmp_path / "PWNED"
    (data / "roxford5k" / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(_Payload(os.system, _touch_command(marker))))
    proc = subprocess.run([sys.executable, "-m", "dcbench", "eval", "--protocol", "roxford5k", "--checkpoint",
                           "random:alexnet", "--data", str(data), "--store", str(tmp_path / "r.db"), *FAST],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "DCBENCH_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 1, proc.stderr
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "posix.system" in lines[0], lines
    assert not marker.exists()


def test_refusals_name_the_global(tmp_path):
    import copyreg

    cases = {"builtins.getattr": _Payload(getattr, object, "__subclasses__"),
             "copyreg._reconstructor": _Payload(copyreg._reconstructor, object, object, None),
             "numpy.load": _Payload(np.load, "x.npy")}
    for name, obj in cases.items():
        with pytest.raises(UnsafePickleError, match=name.replace(".", r"\.")):
            load_ground_truth_pickle(io.BytesIO(pickle.dumps({"gnd": [obj]}, protocol=4)))
    # _codecs.encode is admitted for latin-1 only (codec lookup imports modules by name)
    import _codecs
    evil = pickle.dumps(_Payload(_codecs.encode, "x", "rot13"), protocol=2)
    with pytest.raises(UnsafePickleError, match="rot13"):
        load_ground_truth_pickle(io.BytesIO(evil))
    # a persistent id is never resolved
    class _Persistent(pickle.Pickler):
        def persistent_id(self, obj):
            return "ref" if obj == "secret" else None

    buf = io.BytesIO()
    _Persistent(buf, protocol=2).dump({"a": "secret"})
    with pytest.raises(UnsafePickleError, match="persistent"):
        load_ground_truth_pickle(io.BytesIO(buf.getvalue()))
    # a truncated or garbage file is an ordinary one-line DataError
    folder = tmp_path / "roxford5k"
    folder.mkdir()
    (folder / "gnd_roxford5k.pkl").write_bytes(pickle.dumps({"imlist": []})[:-3])
    with pytest.raises(DataError, match="cannot be read"):
        read_revisitop(tmp_path, "roxford5k")


# ----------------------------------------------------------------------------- real files still load
def _gnd_like_revisitop() -> dict:
    """What revisitop's files hold: name lists and per-query dicts of index arrays and a box."""
    return {"imlist": ["all_souls_000000", "oxford_001", "ashmolean_000283"], "qimlist": ["all_souls_000013"],
            "gnd": [{"easy": np.array([0, 2], dtype=np.int64), "hard": np.array([1]), "junk": np.array([], np.int64),
                     "bbx": [136.5, 34.1, 648.5, 955.7]}],
            "extra": {"scalar": np.float64(0.5), "i32": np.int32(7), "set": {1, 2}, "bytes": b"\x00\xff",
                      "obj": np.array([1, "a", None], dtype=object), "fortran": np.asfortranarray(np.eye(3)),
                      "record": np.array([(1, 2.0)], dtype=[("a", "<i4"), ("b", ">f8")]), "c": 1 + 2j}}


def _check_loaded(out: dict) -> None:
    ref = _gnd_like_revisitop()
    assert out["imlist"] == ref["imlist"] and out["qimlist"] == ref["qimlist"]
    g = out["gnd"][0]
    assert g["easy"].dtype == np.int64 and g["easy"].tolist() == [0, 2] and g["junk"].size == 0
    assert g["bbx"] == ref["gnd"][0]["bbx"]
    e = out["extra"]
    assert e["scalar"] == 0.5 and e["i32"] == 7 and e["set"] == {1, 2} and e["c"] == 1 + 2j
    assert e["obj"].tolist() == [1, "a", None] and np.array_equal(e["fortran"], np.eye(3))
    assert e["record"]["b"][0] == 2.0 and e["record"].dtype.names == ("a", "b")


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_numpy_pickles_of_every_protocol_load(protocol):
    _check_loaded(load_ground_truth_pickle(io.BytesIO(pickle.dumps(_gnd_like_revisitop(), protocol=protocol))))


class _Py2Pickler(pickle._Pickler):
    """Writes ``bytes`` and ``str`` as Python 2 ``str`` (BINSTRING opcodes), as Python 2's
    pickle did for the byte strings of numpy arrays and for plain names."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        data = obj if isinstance(obj, bytes) else obj.encode("latin1")
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str


def _py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    # Python 2 numpy wrote the 1.x module path; GLOBAL opcodes are newline-terminated text
    return buf.getvalue().replace(b"numpy._core.", b"numpy.core.")


def test_python2_pickle_with_numpy_1x_names_loads():
    data = _py2_pickle(_gnd_like_revisitop())
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in data and b"__builtin__" in data
    _check_loaded(load_ground_truth_pickle(io.BytesIO(data)))


def test_allowlist_is_exactly_builtins_and_numpy_reconstructors():
    modules = {module for module, _ in safe_pickle_globals()}
    assert modules == {"builtins", "__builtin__", "numpy", "_codecs", "numpy.core.multiarray",
                       "numpy._core.multiarray", "numpy.core.numeric", "numpy._core.numeric"}
    names = {name for _, name in safe_pickle_globals()}
    assert names == {"set", "frozenset", "complex", "bytes", "bytearray", "ndarray", "dtype", "encode",
                     "_reconstruct", "scalar", "_frombuffer"}
    assert issubclass(GroundTruthUnpickler, pickle.Unpickler)


def test_synthetic_revisitop_file_holds_numpy_arrays_and_loads(small_root):
    raw = (small_root / "roxford5k" / "gnd_roxford5k.pkl").read_bytes()
    assert b"_reconstruct" in raw  # numpy arrays inside, read through the restricted unpickler
    ds = read_revisitop(small_root, "roxford5k")
    assert ds.gnd[0]["easy"].dtype == np.int64 and len(ds.qimlist) == 2 and ds.query_boxes()[0] is not None


# ----------------------------------------------------------------------------- exports
def _res(name: str, value: float, seed: int = 0, taps=("conv3",)) -> Result:
    rows = [MetricRow("top1", value + i, tap=tap, split="val", selection="final", seed=seed)
            for i, tap in enumerate(taps)]
    return Result(protocol="linear", protocol_version="1", settings={"seed": seed},
                  checkpoint={"name": name, "sha256": name.encode().hex()[:64].ljust(64, "0"), "arch": "alexnet"},
                  data={"root": "/d", "fingerprint": "f"}, metrics=rows)


FORMULA = '=HYPERLINK("x")'


def test_csv_leaderboard_neutralises_formula_names_through_the_cli(tmp_path):
    store = tmp_path / "r.db"
    with ResultStore(store) as db:
        for name, value in [(FORMULA, 40.0), ("@SUM(A1)", 41.0), ("-2+3", 12.0), ("plain", 30.0)]:
            db.add(_res(name, value))
    result = CliRunner().invoke(main, ["leaderboard", "--store", str(store), "--format", "csv",
                                       "--reference", "plain"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    names = {r["checkpoint"] for r in rows}
    assert names == {"'" + FORMULA, "'@SUM(A1)", "'-2+3", "plain"}
    assert not any(cell.startswith(("=", "+", "@", "\t", "\r")) for r in rows for cell in r.values())
    # numbers stay numbers: a negative difference is not quoted
    diffs = {r["checkpoint"]: r["diff"] for r in rows}
    assert float(diffs["'-2+3"]) == pytest.approx(-18.0) and diffs["'-2+3"].startswith("-")


@pytest.mark.parametrize("text, expected", [
    ("=1+1", "'=1+1"), ("+cmd|' /C calc'!A0", "'+cmd|' /C calc'!A0"), ("-2+3", "'-2+3"), ("@SUM(1)", "'@SUM(1)"),
    ("\t=1", "'\t=1"), ("\r=1", "'\r=1"), ("-0.3", "-0.3"), ("+1.5e-3", "+1.5e-3"), ("-", "'-"),
    ("conv3", "conv3"), ("a=b", "a=b"), ("", "")])
def test_csv_text(text, expected):
    assert csv_text(text) == expected


NASTY = "evil\nname | x_1 & 50% $5 #1 {a} ~^ \\ [b]\x1b[31m"


def test_names_with_newlines_and_specials_stay_in_their_cell_in_every_format():
    table = build_table([_res(NASTY, 1.0), _res("plain", 2.0)])
    md = render(table, "md")
    rows = [line for line in md.splitlines() if line.startswith("|")]
    assert len(rows) == 4 and all(line.count(" | ") == 1 for line in rows)  # one cell each side
    assert r"evil name \| x\_1 \& 50% \$5 #1 {a} \~^ \\ \[b\]" in md and "\x1b" not in md
    latex = render(table, "latex")
    body = latex.split(r"\midrule")[1].split(r"\bottomrule")[0].strip().splitlines()
    assert len(body) == 2 and all(line.endswith(r"\\") for line in body)
    assert (r"evil name \textbar{} x\_1 \& 50\% \$5 \#1 \{a\} \textasciitilde{}\textasciicircum{} \textbackslash{} {[}b{]}"
            in latex) and "\x1b" not in latex
    html = render(table, "html")
    assert "evil name | x_1 &amp; 50% $5" in html and "\x1b" not in html
    assert json.loads(render(table, "json"))[0]["checkpoint"] in (NASTY, "plain")  # json keeps the name exactly
    text = render_terminal(table)
    assert "\x1b" not in text and "evil name" in text
    assert one_line("a\r\nb\u2028c\td") == "a  b c d"


def test_dollar_names_do_not_crash_the_report_plots(tmp_path):
    from dcbench.viz.report import ReportInputs, build_report, curve_png

    names = ["ck$pt_{$1", "$\\foo$", "_hidden", "50$ and 60$"]
    png = curve_png("linear (val)", {n: {"conv1": 1.0, "conv2": 2.0} for n in names}, "top1")
    assert png.startswith(b"\x89PNG")
    assert plot_text("a$b") == r"a\$b" and plot_text("_x") == " _x" and plot_text("a\nb") == "a b"
    page = build_report(ReportInputs(results=[_res(n, 10.0 + i, taps=("conv1", "conv2"))
                                              for i, n in enumerate(names)]))
    assert "By layer" in page and "data:image/png;base64," in page


# ----------------------------------------------------------------------------- one cache root
def test_one_cache_root_with_features_and_pretrained_below(tmp_path, monkeypatch):
    from dcbench.pretrained import cache_root, registry

    monkeypatch.setenv("DCBENCH_CACHE", str(tmp_path / "c"))
    assert env.cache_root() == cache_root() == tmp_path / "c"
    assert env.features_cache_dir() == tmp_path / "c" / "features"
    assert env.pretrained_cache_dir() == registry.pretrained_dir() == tmp_path / "c" / "pretrained"
    monkeypatch.delenv("DCBENCH_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert env.cache_root() == tmp_path / "home" / ".cache" / "dcbench"
    assert env.features_cache_dir() == tmp_path / "home" / ".cache" / "dcbench" / "features"
