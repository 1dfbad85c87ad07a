"""User-facing errors.

Every error a user can cause derives from :class:`DcbenchError`. The CLI prints
``error: <message>`` on one line and exits with ``exit_code``; a traceback appears only
with ``--debug``. Messages name the problem and the fix.
"""
from __future__ import annotations


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
