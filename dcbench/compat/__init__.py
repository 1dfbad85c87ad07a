"""Compatibility shims for optional third-party packages.

:func:`ensure_mmcv_ops` makes ``import mmseg.models`` work on mmcv-lite, whose ``mmcv.ops``
cannot be imported (no compiled ``mmcv._ext``): it then registers the pure-PyTorch stand-in
:mod:`dcbench.compat.mmcv_ops` as ``mmcv.ops``. With the full mmcv installed nothing is
replaced.
"""
from __future__ import annotations

import importlib
import logging
import sys
from typing import Literal

log = logging.getLogger("dcbench")

OpsSource = Literal["mmcv", "dcbench"]


def _is_standin(module: object) -> bool:
    return bool(getattr(module, "IS_DCBENCH_STANDIN", False))


def ensure_mmcv_ops() -> OpsSource:
    """Make ``mmcv.ops`` importable; return who provides it.

    Returns "mmcv" when the real ``mmcv.ops`` imports, "dcbench" when the stand-in was (or had
    already been) installed into ``sys.modules['mmcv.ops']``. Raises ImportError naming the
    fix when ``mmcv`` itself is missing (the stand-in replaces only the compiled ops).
    """
    current = sys.modules.get("mmcv.ops")
    if current is not None:
        return "dcbench" if _is_standin(current) else "mmcv"
    try:
        import mmcv
    except ImportError as exc:
        raise ImportError(f"mmcv is not installed ({exc}); install the segmentation extra: "
                          f"pip install -e '.[seg]'") from None
    try:
        importlib.import_module("mmcv.ops")
        return "mmcv"
    except ImportError as exc:  # mmcv-lite: "No module named 'mmcv._ext'"
        reason = str(exc)
    standin = importlib.import_module("dcbench.compat.mmcv_ops")
    sys.modules["mmcv.ops"] = standin
    mmcv.ops = standin  # attribute access (mmcv.ops.x) finds it too
    log.debug("mmcv.ops unavailable (%s): using dcbench's pure-PyTorch stand-in", reason)
    return "dcbench"


def mmcv_ops_source() -> OpsSource | None:
    """Who provides ``mmcv.ops`` now, without importing anything (None: not imported yet)."""
    current = sys.modules.get("mmcv.ops")
    if current is None:
        return None
    return "dcbench" if _is_standin(current) else "mmcv"


__all__ = ["ensure_mmcv_ops", "mmcv_ops_source"]
