"""User-facing errors.

Every error a user can cause derives from :class:`DcbenchError`. The CLI prints
``error: <message>`` on one line and exits with ``exit_code``; a traceback appears only
with ``--debug``. Messages name the problem and the fix.
"""
from __future__ import annotations

import re


class DcbenchError(Exception):
    """An error caused by input the user controls (paths, settings, checkpoints)."""

    exit_code = 1


class UsageError(DcbenchError):
    """Bad command-line usage or settings (exit code 2, like click's usage errors)."""

    exit_code = 2


class CheckpointError(DcbenchError):
    """A checkpoint that cannot be read, recognised or loaded into the requested arch."""


class ArchError(DcbenchError):
    """An unknown architecture name or an impossible architecture option."""


class DataError(DcbenchError):
    """A user-caused data problem (missing path, wrong layout, unreadable file).

    ``str(e)`` is one line naming the problem and the fix. A DataLoader re-raises a
    worker's exception as ``DataError(<"Caught DataError in DataLoader worker" + the
    worker's traceback>)``; that form is reduced to the original one-line message, and
    the full text is kept in ``worker_traceback``.
    """

    def __init__(self, message: str = "") -> None:
        self.worker_traceback: str | None = None
        if "\nOriginal Traceback" in message:
            self.worker_traceback = message
            last = [line for line in message.splitlines() if line.strip()][-1]
            # the traceback's last line is "<module>.<ErrorClass>: <message>" (a subclass too)
            message = re.sub(r"^(?:\w+\.)*\w+Error: ", "", last.strip(), count=1)
        super().__init__(message)
