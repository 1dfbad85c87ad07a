"""Metric functions (public API): AP variants, revisited-Oxford mAP, mIoU, NMI.

Each submodule holds one family; this module re-exports the public functions.
"""
from dcbench.cluster.nmi import nmi

__all__ = ["nmi"]
