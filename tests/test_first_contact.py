"""First contact (issue 18): every hint names an option that exists, --strict, read-only commands
create nothing and name the store, data checked before any checkpoint is loaded, progress
without a terminal, and `dcbench fixtures` datasets that the protocols evaluate."""
import ast
import io
import logging
import os
import re
import shlex
import sqlite3
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from dcbench import progress
from dcbench.cli import main
from dcbench.data.synthetic import make_image_folder

REPO = Path(__file__).resolve().parents[1]
FAST_KNN = ["--set", "image_size=64", "--set", "workers=0", "--set", "ks=[3]"]
HINT = re.compile(r"(?<![\w-])--(?:set\s+([a-z_]+)=|([a-z][a-z0-9-]*))")


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# ----------------------------------------------------------------------------- every hint is true
def _message_nodes(tree: ast.AST):
    """What a user reads: raised exceptions, warnings/errors logged, *message*/*hint* returns."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            yield node.exc
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr in ("warning", "error", "warn"):
            yield node
        elif isinstance(node, ast.FunctionDef) and any(w in node.name for w in ("message", "_error", "hint")):
            yield from (r.value for r in ast.walk(node) if isinstance(r, ast.Return) and r.value is not None)


def _hints() -> dict[tuple[str, str], set[str]]:
    """``("opt", "strict")`` / ``("set", "lr")`` -> where a message suggests it."""
    found: dict[tuple[str, str], set[str]] = {}
    for package in ("dcbench", "protocols", "pretrained"):
        for path in sorted((REPO / package).rglob("*.py")):
            for node in _message_nodes(ast.parse(path.read_text())):
                text = " ".join(s.value for s in ast.walk(node)
                                if isinstance(s, ast.Constant) and isinstance(s.value, str))
                for m in HINT.finditer(text):
                    key = ("set", m.group(1)) if m.group(1) else ("opt", m.group(2))
                    found.setdefault(key, set()).add(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def _commands(group: click.Group = main, prefix: str = "dcbench"):
    for name, cmd in group.commands.items():
        yield f"{prefix} {name}", cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, f"{prefix} {name}")


def _options(cmd: click.Command) -> set[str]:
    return {o.lstrip("-") for p in cmd.params for o in [*p.opts, *p.secondary_opts] if o.startswith("--")}


def _all_settings() -> set[str]:
    import dataclasses

    from dcbench.protocol import get_protocol, list_protocols
    from dcbench.train import config_class

    names = {f.name for m in ("deepcluster", "deepcluster-v2") for f in dataclasses.fields(config_class(m))}
    for proto in list_protocols():
        names |= {f.name for f in dataclasses.fields(get_protocol(proto).Settings)}
    return names


def test_every_option_and_setting_a_message_suggests_exists():
    hints = _hints()
    assert ("opt", "strict") in hints and ("set", "whitening_fallback") in hints  # the scan finds messages
    accepted = set().union(*(_options(cmd) for _, cmd in _commands())) | {"help"}
    settings = _all_settings()
    missing = [f"--{name} ({', '.join(sorted(where))})" for (kind, name), where in sorted(hints.items())
               if kind == "opt" and name not in accepted]
    missing += [f"--set {name}= ({', '.join(sorted(where))})" for (kind, name), where in sorted(hints.items())
                if kind == "set" and name not in settings]
    assert not missing, f"messages suggest options no command has: {missing}"


def test_every_command_that_reads_images_accepts_strict():
    """dcbench.data's skip warning says 'use --strict to stop at the first one' wherever images are read."""
    commands = dict(_commands())
    for name in ("dcbench eval", "dcbench compare", "dcbench train", "dcbench viz top-images"):
        assert "strict" in _options(commands[name]), name


def test_strict_stops_at_the_first_unreadable_image(tmp_path):
    data = make_image_folder(tmp_path / "d", n_classes=2, per_class=3, image_size=64, corrupt=1)
    store = tmp_path / "r.db"
    lenient = _invoke("eval", "--protocol", "knn", "--checkpoint", "random:alexnet", "--data", data, "--store", store,
                      *FAST_KNN)
    assert lenient.exit_code == 0, lenient.output
    assert "skipped 1 unreadable image" in lenient.stderr and "use --strict" in lenient.stderr
    strict = _invoke("eval", "--protocol", "knn", "--checkpoint", "random:alexnet", "--data", data, "--store", store,
                     "--strict", *FAST_KNN, "--set", "cache=false")
    assert strict.exit_code == 1, strict.output
    assert strict.output.startswith("error: cannot read image") and "corrupt_000" in strict.output
    with sqlite3.connect(store) as db:
        assert db.execute("select count(*) from results").fetchone()[0] == 1  # the strict run stored nothing


# ----------------------------------------------------------------------------- the store
def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_read_only_commands_create_nothing_and_say_where_they_looked(tmp_path, monkeypatch):
    monkeypatch.delenv("DCBENCH_STORE")
    home = Path(os.environ["HOME"])
    home.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(tmp_path)
    before = _tree(tmp_path)
    default = home / ".dcbench" / "results.db"
    typo = tmp_path / "typo" / "dir" / "r.db"
    for args in (["leaderboard"], ["leaderboard", "--store", typo], ["results", "list"], ["results", "show", "1"],
                 ["results", "export", "--store", typo], ["results", "rm", "1", "--yes", "--store", typo]):
        result = _invoke(*args)
        assert result.exit_code == 1, (args, result.output)
        where = typo if "--store" in args else default
        assert result.output == f"error: no results yet: there is no results store at {where}; run `dcbench eval` " \
                                f"or `dcbench compare` first, or pass --store PATH (or set DCBENCH_STORE)\n"
    assert _tree(tmp_path) == before  # neither ~/.dcbench nor typo/dir/


def test_unknown_protocol_is_a_usage_error_with_the_choices(tmp_path):
    for args in (["leaderboard", "--protocol", "linaer"], ["results", "list", "--protocol", "linaer"],
                 ["results", "export", "--protocol", "linaer"]):
        result = _invoke(*args, "--store", tmp_path / "none.db")
        assert result.exit_code == 2, result.output
        assert result.output.startswith("error: unknown protocol 'linaer'; choose from: ") and "linear" in result.output
        assert result.output.count("\n") == 1
    assert not (tmp_path / "none.db").exists()


def test_eval_and_leaderboard_name_the_store_once(tmp_path):
    data = make_image_folder(tmp_path / "d", n_classes=2, per_class=3, image_size=64)
    store = tmp_path / "r.db"
    ran = _invoke("eval", "--protocol", "knn", "--checkpoint", "random:alexnet", "--data", data, "--store", store,
                  *FAST_KNN)
    assert ran.exit_code == 0, ran.output
    assert ran.stderr.count(str(store)) == 1 and f"stored as result 1 in {store}" in ran.stderr
    board = _invoke("leaderboard", "--store", store)
    assert board.exit_code == 0, board.output
    assert board.stderr.count(str(store)) == 1 and f"read 1 result(s) from {store}" in board.stderr
    listed = _invoke("results", "list", "--store", store)
    assert listed.exit_code == 0 and listed.stderr.count(str(store)) == 1
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("r.db-")]  # no -wal/-shm left behind


# ----------------------------------------------------------------------------- data before checkpoint
@pytest.fixture
def broken_checkpoint(tmp_path) -> Path:
    path = tmp_path / "broken.pth"
    path.write_bytes(b"not a checkpoint")
    return path


def test_empty_class_folders_fail_before_the_checkpoint_is_loaded(tmp_path, broken_checkpoint):
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / "data" / split / cls).mkdir(parents=True)
    for command in (["eval", "--protocol", "knn"], ["eval", "--protocol", "linear"], ["compare", "--protocol", "knn"]):
        args = [*command, "--checkpoint", broken_checkpoint] if command[0] == "eval" else \
            [command[0], broken_checkpoint, *command[1:]]
        result = _invoke(*args, "--data", tmp_path / "data", "--store", tmp_path / "r.db")
        assert result.exit_code == 1, result.output
        assert result.output.startswith(f"error: no image in {tmp_path / 'data' / 'train'}"), result.output
    top = _invoke("viz", "top-images", broken_checkpoint, "--data", tmp_path / "data" / "train" / "a",
                  "--out", tmp_path / "top")
    assert top.exit_code == 1 and "no image" in top.output.lower() and "checkpoint" not in top.output.lower()


def test_voc_data_errors_come_before_the_checkpoint(tmp_path, broken_checkpoint):
    assert _invoke("fixtures", "voc", tmp_path / "voc", "--classes", "2", "--per-class", "1", "--size", "48") \
        .exit_code == 0
    jpeg = next((tmp_path / "voc" / "VOCdevkit" / "VOC2007" / "JPEGImages").iterdir())
    jpeg.unlink()
    result = _invoke("eval", "--protocol", "voc07-svm", "--checkpoint", broken_checkpoint, "--data", tmp_path / "voc",
                     "--store", tmp_path / "r.db")
    assert result.exit_code == 1 and jpeg.stem in result.output and "checkpoint" not in result.output.lower()


# ----------------------------------------------------------------------------- fixtures
def _try_command(output: str, protocol: str) -> list[str]:
    line = next(line for line in output.splitlines() if f"--protocol {protocol}" in line)
    return shlex.split(line.split("try: ", 1)[1])[1:]  # without the leading "dcbench"


@pytest.mark.parametrize("kind,args,protocol", [
    ("imagefolder", ["--classes", "2", "--per-class", "3", "--size", "32"], "knn"),
    ("voc", ["--classes", "2", "--per-class", "3", "--size", "64"], "voc07-svm"),
    ("retrieval", ["--classes", "2", "--per-class", "3", "--size", "64", "--layout", "revisitop"], "roxford5k"),
])
def test_fixtures_write_the_real_layouts_and_their_suggested_eval_runs(tmp_path, kind, args, protocol):
    out = tmp_path / kind
    written = _invoke("fixtures", kind, out, *args)
    assert written.exit_code == 0, written.output
    assert written.output.startswith(f"wrote {out}: ")
    layout = {"imagefolder": ["train/class_00", "val/class_01"],
              "voc": ["VOCdevkit/VOC2007/JPEGImages", "VOCdevkit/VOC2007/ImageSets/Main/aeroplane_trainval.txt",
                      "VOCdevkit/VOC2007/Annotations"],
              "retrieval": ["roxford5k/gnd_roxford5k.pkl", "rparis6k/jpg"]}[kind]
    assert all((out / part).exists() for part in layout)
    assert [p.name for p in tmp_path.iterdir()] == [kind]  # no staging folder left behind
    command = _try_command(written.output, protocol)
    ran = _invoke(*command, "--store", tmp_path / "r.db", "--json")
    assert ran.exit_code == 0, ran.output
    assert f'"protocol":"{protocol}"' in ran.stdout.splitlines()[-1]


def test_fixtures_refuse_a_non_empty_folder_and_honour_the_umask(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    refused = _invoke("fixtures", "imagefolder", out)
    assert refused.exit_code == 2 and refused.output.count("\n") == 1
    assert refused.output.startswith(f"error: {out} is not empty; give a new or empty folder as OUT")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    old = os.umask(0o022)
    try:
        fresh = tmp_path / "fresh"
        assert _invoke("fixtures", "imagefolder", fresh, "--classes", "2", "--per-class", "1").exit_code == 0
    finally:
        os.umask(old)
    assert fresh.stat().st_mode & 0o777 == 0o755 and (fresh / "train").stat().st_mode & 0o777 == 0o755


# ----------------------------------------------------------------------------- progress
class _Lines(logging.Handler):
    """The dcbench logger's messages (the CLI turns its propagation off, so caplog misses them)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def lines():
    logger, handler = logging.getLogger("dcbench"), _Lines()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(level)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_without_a_terminal_logs_lines_by_the_rule(lines):
    clock = _Clock()
    with progress.Progress(1000, "features conv5", "batch", stream=io.StringIO(), clock=clock) as bar:
        for _ in range(1000):
            clock.now += 0.5  # 500 s in all: 5% = 25 s comes before 30 s
            bar.update(1)
    assert lines[0].startswith("features conv5: 20/1000 batch (2%), 2 batch/s, 10s elapsed, ETA 8:10")
    assert len(lines) == 21  # at 10 s, then every 5% (25 s) up to 100%, and the closing line
    assert lines[-1] == "features conv5: done, 1000 batch in 8:20"


def test_progress_is_silent_for_short_work_and_draws_a_bar_on_a_terminal(lines):
    clock = _Clock()
    for _ in progress.track(range(50), "quick", stream=io.StringIO(), clock=clock):
        clock.now += 0.1  # 5 s: under the 10 s before a first line
    assert lines == []

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    assert list(progress.track(range(3), "bar", stream=tty)) == [0, 1, 2]
    assert "bar" in tty.getvalue() and lines == []  # a tqdm bar, no log lines


def test_overall_eta_counts_computed_steps_only(lines):
    clock = _Clock()
    overall = progress.Overall(4, "compare", "evaluations", clock=clock)
    overall.step(free=True)  # a stored result: no time, no ETA yet
    clock.now = 60.0
    line = overall.step()
    assert line == "compare: 2/4 evaluations done, 1:00 elapsed, ETA 2:00"
    assert lines[-1] == line
    assert progress.format_duration(3725) == "1:02:05" and progress.format_duration(42) == "42s"


def test_strict_error_from_a_loader_worker_is_one_line(tmp_path):
    data = make_image_folder(tmp_path / "d", n_classes=2, per_class=2, image_size=64, corrupt=1)
    result = _invoke("eval", "--protocol", "knn", "--checkpoint", "random:alexnet", "--data", data, "--strict",
                     "--store", tmp_path / "r.db", "--set", "image_size=64", "--set", "workers=1", "--set", "ks=[2]",
                     "--set", "cache=false")
    assert result.exit_code == 1, result.output
    assert result.output.startswith("error: cannot read image ") and result.output.count("\n") == 1, result.output
