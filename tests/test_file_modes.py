"""Files dcbench writes honour the user's umask (issue: mode 0600 hid results from colleagues)."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from dcbench.checkpoint import save_checkpoint
from dcbench.fileio import atomic_write_text, default_file_mode
from dcbench.models import build_backbone


@pytest.fixture
def umask():
    """Set a umask for one test and restore the caller's afterwards."""
    saved = os.umask(0o022)
    os.umask(saved)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(saved)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_write_gives_the_mode_open_would(tmp_path, umask, mask, expected):
    umask(mask)
    out = atomic_write_text(tmp_path / "leaderboard.md", "| a |\n")
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert _mode(out) == expected == _mode(plain)
    assert default_file_mode() == expected
    assert out.read_text() == "| a |\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_checkpoint_readable_by_others_under_022(tmp_path, umask):
    umask(0o022)
    path = tmp_path / "run" / "model.pth"
    save_checkpoint(path, build_backbone("alexnet", sobel=False, input_size=64))
    assert _mode(path) & stat.S_IROTH
    assert _mode(path) == 0o644


def test_stale_temp_of_a_killed_writer_is_removed_on_the_next_write(tmp_path):
    """kill -9 skips atomic_write's cleanup: the next write of that file removes an old temp."""
    import time

    from dcbench.fileio import STALE_TEMP_S

    stale = tmp_path / ".checkpoint.pth.abc123.tmp"
    fresh = tmp_path / ".checkpoint.pth.def456.tmp"  # maybe a live concurrent writer: kept
    other = tmp_path / ".other.pth.abc123.tmp"
    for p in (stale, fresh, other):
        p.write_bytes(b"partial")
    old = time.time() - STALE_TEMP_S - 10
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    atomic_write_text(tmp_path / "checkpoint.pth", "new")
    assert not stale.exists() and fresh.exists() and other.exists()


def test_a_reader_that_goes_away_stops_the_output_quietly(tmp_path):
    """`dcbench protocols linear | head -1`: no error line, no traceback (exit as SIGPIPE's 141)."""
    import subprocess
    import sys

    env = {**os.environ, "DCBENCH_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dcbench", "protocols", "linear"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    assert proc.stdout.read(10)  # read a little, then go away like `head`
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (0, 141), err.decode()  # 0 when everything fit in the pipe's buffer
    assert b"error" not in err and b"Traceback" not in err, err.decode()
