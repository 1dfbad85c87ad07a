"""Progress of long work, readable on a terminal and in a log file.

One module for every loop that can take minutes (feature extraction, probes, fine-tunes,
training epochs, downloads, ``compare`` sweeps):

- on a terminal (stderr is a TTY), a tqdm bar as before (rate and ETA on the bar);
- otherwise (output redirected to a file, CI, SLURM logs, ``nohup``), plain log lines on the
  ``dcbench`` logger (INFO, so ``-q`` hides them), each with the phase, done/total, the rate
  and the ETA, following :data:`LOG_RULE`.

:class:`Progress` counts units (``update(n)``), :func:`track` wraps an iterable, and
:class:`Overall` reports whole steps of a run (``compare``'s n of N evaluations, training
epochs) with an ETA from the mean time of the steps done so far, on a terminal too.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO, TypeVar

__all__ = ["LOG_RULE", "Overall", "Progress", "format_duration", "interactive", "track"]

log = logging.getLogger("dcbench")
T = TypeVar("T")

#: seconds before the first log line: work that ends sooner stays silent (its caller's own log
#: line says it happened)
QUIET_S = 10.0
#: a log line at least this often while work runs ...
INTERVAL_S = 30.0
#: ... and also each time this fraction more of the total is done, whichever comes first ...
STEP = 0.05
#: ... but percentage lines at least this far apart (a 40-second epoch would otherwise log 20 lines)
MIN_GAP_S = 10.0
LOG_RULE = (f"without a terminal, a line after {QUIET_S:.0f} s, then every {INTERVAL_S:.0f} s or every "
            f"{STEP:.0%} of the work (at most one per {MIN_GAP_S:.0f} s), whichever comes first, and a last "
            f"line when the work ends")


def interactive(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default stderr, where bars and log lines go) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def format_duration(seconds: float) -> str:
    """``42s``, ``3:05`` (m:ss) or ``1:02:03`` (h:mm:ss); ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def _amount(n: float, unit: str, scale: bool) -> str:
    """``120`` or, with ``scale`` (bytes), ``12.3 MiB``."""
    if not scale:
        return f"{int(n)}"
    for prefix in ("", "Ki", "Mi", "Gi", "Ti"):
        if abs(n) < 1024 or prefix == "Ti":
            return f"{n:.0f} {prefix}{unit}" if not prefix else f"{n:.1f} {prefix}{unit}"
        n /= 1024
    return f"{n:.1f}"  # unreachable


class Progress:
    """Counts done units of one phase of work; see the module docstring for what it shows.

    ``enabled=False`` shows nothing (ranks > 0, tests, library callers that did not ask).
    ``initial`` counts units done before (a resumed download); they do not enter the rate.
    ``unit_scale`` shows amounts with binary prefixes (bytes). ``stream``/``clock`` are for tests.
    """

    def __init__(self, total: int | None, desc: str, unit: str = "it", *, enabled: bool = True, initial: int = 0,
                 unit_scale: bool = False, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total = None if total is None else int(total)
        self.desc, self.unit, self.unit_scale = desc, unit, unit_scale
        self.n = self.initial = int(initial)
        self.clock = clock
        self.started = self.last_line = clock()
        self.last_n = self.initial  # units done at the last line
        self.lines = 0  # log lines written
        self.bar: Any = None
        self.mode = "off"
        if enabled:
            self.mode = "bar" if interactive(stream) else "log"
        if self.mode == "bar":
            from tqdm import tqdm  # noqa: PLC0415 (only when a bar is drawn)

            self.bar = tqdm(total=self.total, desc=desc, unit=unit, leave=False, initial=self.initial,
                            unit_scale=unit_scale, unit_divisor=1024 if unit_scale else 1000, dynamic_ncols=True,
                            file=stream)

    def update(self, n: int = 1) -> None:
        """Record ``n`` more units done."""
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.mode == "log" and self._due():
            self._line()

    def _due(self) -> bool:
        now = self.clock()
        if now - self.started < QUIET_S:
            return False
        if now - self.last_line >= INTERVAL_S or self.lines == 0:
            return True
        return (bool(self.total) and self.n - self.last_n >= STEP * self.total
                and now - self.last_line >= MIN_GAP_S)

    def rate(self) -> float:
        """Units per second since the start (units done before, ``initial``, left out)."""
        elapsed = self.clock() - self.started
        return (self.n - self.initial) / elapsed if elapsed > 0 else 0.0

    def eta(self) -> float | None:
        """Seconds left at the current rate; None without a total or a rate."""
        rate = self.rate()
        if not self.total or rate <= 0:
            return None
        return max(0.0, (self.total - self.n) / rate)

    def status(self) -> str:
        """``desc: 120/500 batch (24%), 3.1 batch/s, 0:40 elapsed, ETA 2:03``."""
        done = _amount(self.n, self.unit, self.unit_scale)
        unit = "" if self.unit_scale else f" {self.unit}"
        if self.total:
            amount = f"{done}/{_amount(self.total, self.unit, self.unit_scale)}{unit} ({self.n / self.total:.0%})"
        else:
            amount = f"{done}{unit}"
        rate = self.rate()
        speed = (f"{_amount(rate, self.unit, True)}/s" if self.unit_scale
                 else f"{rate:.3g} {self.unit}/s" if rate >= 1 or rate == 0 else f"{1 / rate:.3g} s/{self.unit}")
        elapsed = format_duration(self.clock() - self.started)
        eta = self.eta()
        return f"{self.desc}: {amount}, {speed}, {elapsed} elapsed" + ("" if eta is None else
                                                                       f", ETA {format_duration(eta)}")

    def _line(self) -> None:
        log.info("%s", self.status())
        self.lines += 1
        self.last_line = self.clock()
        self.last_n = self.n

    def close(self) -> None:
        """End the phase: close the bar, or write the last line if any line was written."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.mode == "log" and self.lines:
            log.info("%s: done, %s in %s", self.desc, _amount(self.n, self.unit, self.unit_scale)
                     + ("" if self.unit_scale else f" {self.unit}"), format_duration(self.clock() - self.started))
        self.mode = "off"

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def track(iterable: Iterable[T], desc: str, unit: str = "it", *, total: int | None = None, enabled: bool = True,
          **options: Any) -> Iterator[T]:
    """Iterate ``iterable`` with a :class:`Progress` of one unit per item (total: ``len(iterable)``
    when it has one). The progress closes when the iteration ends, breaks or fails."""
    if not enabled:
        yield from iterable
        return
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with Progress(total, desc, unit, **options) as bar:
        for item in iterable:
            yield item
            bar.update(1)


class Overall:
    """Whole steps of a run (the evaluations of ``compare``, training epochs): after each step
    one log line, terminal or not, with n of N done, the elapsed time and the ETA from the mean
    time of the steps computed so far (``free`` steps, e.g. results already stored, count as
    done but not in the mean)."""

    def __init__(self, total: int, desc: str, noun: str = "runs", *, initial: int = 0, enabled: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.desc, self.noun, self.enabled = int(total), desc, noun, enabled
        self.done = int(initial)
        self.computed = 0
        self.clock = clock
        self.started = clock()

    def eta(self) -> float | None:
        """Seconds left at the mean time of the steps computed so far; None before the first."""
        if not self.computed:
            return None if self.done < self.total else 0.0
        return (self.clock() - self.started) / self.computed * max(0, self.total - self.done)

    def status(self) -> str:
        """``compare: 3/12 runs done, 5:10 elapsed, ETA 15:30``."""
        eta = self.eta()
        left = "" if eta is None or self.done >= self.total else f", ETA {format_duration(eta)}"
        return (f"{self.desc}: {self.done}/{self.total} {self.noun} done, "
                f"{format_duration(self.clock() - self.started)} elapsed{left}")

    def drop(self, n: int = 1) -> None:
        """``n`` of the planned steps turned out not to be needed (no line is logged)."""
        self.total -= n

    def step(self, n: int = 1, free: bool = False) -> str:
        """Count ``n`` steps done (``free``: not computed, e.g. reused) and log the status line."""
        self.done += n
        if not free:
            self.computed += n
        line = self.status()
        if self.enabled:
            log.info("%s", line)
        return line
