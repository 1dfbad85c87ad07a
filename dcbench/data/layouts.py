"""Fast checks of the labelled train/val layout every classification protocol reads.

Folder listings only, so a wrong ``--data`` fails in milliseconds with one line naming the
problem and the expected layout, before any checkpoint is loaded.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from dcbench.data.datasets import DataError, has_direct_images, is_image_file, subfolders


def _some(names: Sequence[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def check_train_val(root: Path, protocol: str, layout: str, expected_classes: int | None = None,
                    dataset_name: str = "") -> list[str]:
    """Check ROOT/train/CLASS/* and ROOT/val/CLASS/* with the same classes; return the classes.

    Cheap (folder listings, stopping at the first image of each split: empty class folders fail
    here, before a checkpoint is loaded). Raises :class:`DataError` with one line naming the
    problem and the expected layout.
    """
    root = Path(root)
    where = f"expected layout for {protocol}: {layout}"
    if not root.is_dir():
        raise DataError(f"data root {root} is not a folder; {where}")
    if (root / "images").is_dir() and any(n.startswith("trainvalsplit") for n in subfolders(root)):
        raise DataError(f"{root} is the original Places205 layout (images/ + trainvalsplit_places205/); "
                        f"{where}: link images/<x>/<class>/ into train/<x_class>/ and val/<x_class>/ "
                        f"following the split CSVs")
    classes = {}
    for split in ("train", "val"):
        folder = root / split
        if not folder.is_dir():
            if root.name in ("train", "val") and (root.parent / split).is_dir():
                raise DataError(f"{root} is one split of the data; pass its parent {root.parent} (it holds "
                                f"train/ and val/); {where}")
            found = subfolders(root)
            seen = f" (found: {_some([f + '/' for f in found], 5)})" if found else ""
            raise DataError(f"{folder} is missing{seen}; {where}")
        names = subfolders(folder)
        if not names:
            if has_direct_images(folder):
                raise DataError(f"{folder} holds images but no class folders (ImageNet's val/ comes flat: "
                                f"sort it into val/CLASS/ folders, e.g. with valprep.sh); {where}")
            raise DataError(f"{folder} has no class folders; {where}")
        classes[split] = names
    only_train = sorted(set(classes["train"]) - set(classes["val"]))
    only_val = sorted(set(classes["val"]) - set(classes["train"]))
    if only_train or only_val:
        parts = [f"{len(only_train)} only in train/ ({_some(only_train)})" if only_train else "",
                 f"{len(only_val)} only in val/ ({_some(only_val)})" if only_val else ""]
        raise DataError(f"class folders differ between {root}/train and {root}/val: "
                        f"{'; '.join(p for p in parts if p)}; both splits need the same class folders")
    n = len(classes["train"])
    if expected_classes is not None and n != expected_classes:
        raise DataError(f"{protocol} expects the {expected_classes} {dataset_name} classes but {root}/train "
                        f"has {n} class folders; use --protocol linear for other labelled datasets")
    for split in ("train", "val"):
        if not any(is_image_file(name) for _d, _s, files in os.walk(root / split, followlinks=True) for name in files):
            raise DataError(f"no image in {root / split} (no image file in any class folder); add the images, {where}")
    return classes["train"]


def train_val_fingerprint(train_fp: str, val_fp: str) -> str:
    """One 16-hex fingerprint of a train/val pair."""
    return hashlib.sha256(f"train:{train_fp}\nval:{val_fp}\n".encode()).hexdigest()[:16]
