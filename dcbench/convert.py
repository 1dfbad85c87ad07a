"""``dcbench checkpoint convert``: load any supported format, write another.

Kept apart from :mod:`dcbench.checkpoint` because the detectron2 exporter builds on the
checkpoint loader (one direction only: convert -> export_detectron2 -> checkpoint).
"""
from __future__ import annotations

from pathlib import Path

from dcbench.checkpoint import atomic_save, resolve_checkpoint, save_checkpoint, to_torchvision_state_dict
from dcbench.errors import UsageError
from dcbench.export_detectron2 import export_detectron2


def convert_checkpoint(src: str, dst: str | Path, target: str = "dcbench", arch: str | None = None,
                       trust: bool = False) -> Path:
    """Load ``src`` in any supported format and write it as ``target`` (dcbench, torchvision, detectron2).
    ``dst`` may not be ``src`` itself: a conversion drops what the target format has no place for
    (classifier heads, optimizer state), so the original would be lost."""
    if not str(dst).strip():  # Path("") is the current folder
        raise UsageError("DST is empty; give the file to write, e.g. converted.pth")
    if Path(dst).exists() and Path(src).exists() and Path(dst).resolve() == Path(src).resolve():
        raise UsageError(f"DST {dst} is SRC itself; write the converted checkpoint to another file "
                         f"(the conversion drops heads and training state the original keeps)")
    loaded = resolve_checkpoint(src, arch=arch, trust=trust)
    if target == "detectron2":
        return export_detectron2(loaded, Path(dst))
    if target == "torchvision":
        atomic_save(to_torchvision_state_dict(loaded.backbone), dst)
    else:
        save_checkpoint(dst, loaded.backbone, epoch=loaded.meta.get("epoch"),
                        config={"converted_from": str(src), "source_format": loaded.format})
    return Path(dst)

