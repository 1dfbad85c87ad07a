"""VOC2012 segmentation data for ``voc-seg``: the splits, optional SBD augmentation, label
remapping for class subsets, and a torch Dataset that runs an mmseg pipeline per image.

Layouts (under the ``VOC2012`` folder; :func:`dcbench.data.voc.find_voc_dir` locates it):

- ``ImageSets/Segmentation/{train,val}.txt`` + ``SegmentationClass/<id>.png``: the official
  palette PNGs, palette index = class (0 background, 1..20 the VOC classes in the official
  order), 255 = void (object boundaries, difficult regions; never evaluated or trained on);
- SBD augmentation, mmsegmentation's layout (``tools/dataset_converters/voc_aug.py``):
  ``ImageSets/Segmentation/aug.txt`` + ``SegmentationClassAug/<id>.png`` (index PNGs). The aug
  images that are also in train or val are dropped, so val never leaks into training
  (mmseg's ``aug.txt`` already excludes them: train + aug = the usual 10,582 images).
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from dcbench.data import DataError
from dcbench.data.fingerprint import dataset_fingerprint
from dcbench.data.voc import VOC_CLASSES, VOID_LABEL, find_voc_dir, load_segmentation_split, read_image_set

log = logging.getLogger("dcbench")

YEAR = "2012"
AUG_SET = "ImageSets/Segmentation/aug.txt"
AUG_MASKS = "SegmentationClassAug"
LAYOUT = ("ROOT/VOCdevkit/VOC2012/{JPEGImages/<id>.jpg, SegmentationClass/<id>.png, "
          "ImageSets/Segmentation/{train,val}.txt}")


@dataclass(frozen=True)
class SegItem:
    """One image and its label PNG."""

    image_id: str
    image: Path
    mask: Path


@dataclass
class SegData:
    """The training and evaluation images of a run."""

    voc_dir: Path
    train: list[SegItem]
    val: list[SegItem]
    n_train: int  # images of train.txt
    n_aug: int  # SBD images added (0 when absent or off)
    aug: str  # "used" | "absent" | "off"
    classes: list[str]  # the evaluated classes, label order, "background" first
    label_map: dict[int, int] | None  # VOC label -> network label (None: identity, all 21 classes)
    sets_sha256: str

    def fingerprint(self) -> str:
        """16 hex chars over every image and mask (relative path + size) and the image sets."""
        rel = [os.path.relpath(p, self.voc_dir) for item in self.train + self.val for p in (item.image, item.mask)]
        files = dataset_fingerprint(str(self.voc_dir), rel)
        text = f"voc{YEAR}-seg\nfiles:{files}\nsets:{self.sets_sha256}\nclasses:{','.join(self.classes)}\n"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        """JSON-safe facts recorded in the result."""
        return {"voc_dir": str(self.voc_dir), "classes": self.classes,
                "all_voc_classes": self.label_map is None,
                "images": {"train": self.n_train, "aug": self.n_aug, "val": len(self.val)},
                "sbd_aug": self.aug}


def class_names(classes: Sequence[str] | None) -> list[str]:
    """``["background", *classes]`` (all 20 VOC classes when None)."""
    return ["background", *(classes or VOC_CLASSES)]


def label_map_for(classes: Sequence[str] | None) -> dict[int, int] | None:
    """VOC label -> network label for a class subset: background 0, the chosen classes 1..k in
    the given order, every other VOC class void (255: neither trained on nor evaluated)."""
    if classes is None or list(classes) == list(VOC_CLASSES):
        return None
    unknown = [c for c in classes if c not in VOC_CLASSES]
    if unknown:
        raise DataError(f"unknown VOC class(es) {', '.join(unknown)}; choose among {', '.join(VOC_CLASSES)}")
    chosen = {VOC_CLASSES.index(c) + 1: i + 1 for i, c in enumerate(classes)}
    return {0: 0, **{v: chosen.get(v, VOID_LABEL) for v in range(1, len(VOC_CLASSES) + 1)}}


def check_mask_format(path: Path) -> None:
    """DataError unless ``path`` is an index PNG (palette 'P' or greyscale 'L'): colour (RGB)
    renderings of the labels would be read as three channels, not class indices."""
    try:
        with Image.open(path) as img:
            mode = img.mode
    except OSError as exc:
        raise DataError(f"{path} is not a readable PNG ({exc}); re-extract the VOC archives") from None
    if mode not in ("P", "L"):
        raise DataError(f"{path} is a {mode} image; segmentation labels must be palette or greyscale index PNGs "
                        f"(index = class, 255 = void) as in VOC's SegmentationClass")


def _items(voc_dir: Path, ids: Sequence[str], masks: str) -> list[SegItem]:
    return [SegItem(i, voc_dir / "JPEGImages" / f"{i}.jpg", voc_dir / masks / f"{i}.png") for i in ids]


def _check_exist(items: Sequence[SegItem], listed_in: str) -> None:
    """DataError naming the first missing image or mask (one folder listing each)."""
    if not items:
        return
    for attr in ("image", "mask"):
        folder = getattr(items[0], attr).parent
        present = {e.name for e in os.scandir(folder)} if folder.is_dir() else set()
        missing = [getattr(it, attr) for it in items if getattr(it, attr).name not in present]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise DataError(f"{missing[0]} is missing{more} (listed in {listed_in}); re-extract the archives "
                            f"or regenerate the SBD conversion")


def _load_aug(voc_dir: Path, setting: str, exclude: set[str]) -> tuple[list[SegItem], str, bytes]:
    """The SBD images to add: (items, "used" | "absent" | "off", image-set bytes)."""
    if setting == "off":
        return [], "off", b""
    set_file, masks = voc_dir / AUG_SET, voc_dir / AUG_MASKS
    if not (set_file.is_file() and masks.is_dir()):
        if setting == "on":
            missing = set_file if not set_file.is_file() else masks
            raise DataError(f"{missing} is missing (sbd_aug=on); convert SBD with mmsegmentation's "
                            f"tools/dataset_converters/voc_aug.py, or set sbd_aug=auto/off")
        return [], "absent", b""
    ids = [i for i in read_image_set(set_file) if i not in exclude]
    items = _items(voc_dir, ids, AUG_MASKS)
    _check_exist(items, AUG_SET)
    return items, "used", set_file.read_bytes()


def load_seg_data(root: str | os.PathLike, sbd_aug: str = "auto", classes: Sequence[str] | None = None,
                  check_files: bool = True) -> SegData:
    """Read the image sets of train, val (and SBD aug per ``sbd_aug``: auto / on / off), check
    that images and masks exist and that the masks are index PNGs. Cheap: text files, folder
    listings, two PNG headers."""
    voc_dir = find_voc_dir(root, YEAR)
    seg_sets = voc_dir / "ImageSets" / "Segmentation"
    splits = {s: load_segmentation_split(voc_dir, s, YEAR, check_files=check_files) for s in ("train", "val")}
    for name, split in splits.items():
        if not split.image_ids:
            raise DataError(f"{seg_sets / f'{name}.txt'} lists no image; expected {LAYOUT}")
        if check_files:
            check_mask_format(split.mask_path(split.image_ids[0]))
    train = _items(voc_dir, splits["train"].image_ids, "SegmentationClass")
    val = _items(voc_dir, splits["val"].image_ids, "SegmentationClass")
    seen = set(splits["train"].image_ids) | set(splits["val"].image_ids)
    aug, aug_state, aug_bytes = _load_aug(voc_dir, sbd_aug, seen)
    if aug and check_files:
        check_mask_format(aug[0].mask)
    digest = hashlib.sha256()
    for name in ("train", "val"):
        digest.update((seg_sets / f"{name}.txt").read_bytes())
    digest.update(aug_bytes)
    return SegData(voc_dir, train + aug, val, len(train), len(aug), aug_state, class_names(classes),
                   label_map_for(classes), digest.hexdigest())


# ----------------------------------------------------------------------------- torch side
class SegDataset(Dataset):
    """Items through an mmseg pipeline (a callable on mmseg's ``results`` dict).

    An image or mask that cannot be read or transformed yields None (counted by
    :func:`collate`), so one bad file never stops a run mid-way; with ``strict``
    (``--strict``) it raises a DataError naming the file instead.
    """

    def __init__(self, items: Sequence[SegItem], pipeline: Callable[[dict], dict], num_classes: int,
                 label_map: dict[int, int] | None = None, strict: bool = False) -> None:
        self.items, self.pipeline, self.label_map = list(items), pipeline, label_map
        self.num_classes = num_classes
        self.strict = strict

    def __len__(self) -> int:
        return len(self.items)

    def results(self, index: int) -> dict[str, Any]:
        """The dict mmseg's ``LoadImageFromFile`` / ``LoadAnnotations`` start from."""
        item = self.items[index]
        return dict(img_path=str(item.image), seg_map_path=str(item.mask), reduce_zero_label=False,
                    seg_fields=[], label_map=self.label_map, sample_idx=index)

    def __getitem__(self, index: int) -> tuple[int, dict[str, Any] | None, str]:
        try:
            out = self.pipeline(self.results(index))
            check_labels(out["data_samples"].gt_sem_seg.data.numpy(), self.num_classes)
            return index, out, ""
        except Exception as exc:  # noqa: BLE001 - cv2/PIL/mmcv raise many types on a corrupt file
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if self.strict:
                raise DataError(f"cannot read {self.items[index].image} or its mask ({first}); replace or delete "
                                f"the file, or run without --strict to skip unreadable images") from exc
            return index, None, f"{self.items[index].image.name}: {first}"


def collate(batch: Sequence[tuple[int, dict[str, Any] | None, str]]) -> dict[str, Any]:
    """mmengine's ``pseudo_collate`` of the readable items, plus their indices and the failures."""
    from mmengine.dataset import pseudo_collate

    good = [(i, r) for i, r, _ in batch if r is not None]
    failed = [msg for _, r, msg in batch if r is None]
    data = pseudo_collate([r for _, r in good]) if good else {"inputs": [], "data_samples": []}
    data["indices"] = [i for i, _ in good]
    data["failed"] = failed
    return data


def check_labels(gt: np.ndarray, num_classes: int) -> None:
    """ValueError when a label map holds a value that is neither a class nor void (such an
    image is skipped and named in the log instead of failing the loss mid-run)."""
    bad = (gt >= num_classes) & (gt != VOID_LABEL)
    if bad.any():
        raise ValueError(f"label value {int(gt[bad][0])} is neither a class index (< {num_classes}) nor void (255)")
