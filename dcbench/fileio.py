"""Atomic file writes: a temp file in the target's folder, then ``os.replace``.

Readers never see a half-written checkpoint, result export or cache entry, whatever
interrupts the writer (an exception, Ctrl-C, ``kill -9``). The final file gets the mode an
ordinary ``open(path, "w")`` would give (0666 less the umask: 0644 under the usual 022), not
``mkstemp``'s private 0600, so colleagues on a shared server can read results and checkpoints.
"""
from __future__ import annotations

import contextlib
import glob
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def _current_umask() -> int:
    # os.umask can only be read by setting it; set it straight back (no thread in dcbench
    # creates files concurrently with this read, and the window is two system calls).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file under the current umask."""
    return 0o666 & ~_current_umask()


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any], fsync: bool = False) -> Path:
    """Call ``write(file)`` on a temp file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _remove_stale_temps(path)
    return path


#: a temp file of ``path`` older than this was left by a writer killed with ``kill -9`` (whose
#: cleanup never ran): no write of one file takes an hour, so it is garbage (checkpoint temps
#: are ~200 MB each)
STALE_TEMP_S = 3600.0


def _remove_stale_temps(path: Path) -> None:
    now = time.time()
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(OSError):  # another writer may remove it first
            if now - tmp.stat().st_mtime > STALE_TEMP_S:
                tmp.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))
