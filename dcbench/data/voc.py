"""Pascal VOC (VOCdevkit) reader, shared by the classification, detection and segmentation
protocols.

Layout (VOC2007 and VOC2012 alike; ``YYYY`` the year)::

    ROOT/VOCdevkit/VOCYYYY/
        Annotations/<id>.xml                 one per image: size, objects (name, pose,
                                             truncated, difficult, bndbox)
        ImageSets/Main/<split>.txt           image ids of a split, one per line
        ImageSets/Main/<cls>_<split>.txt     "<id> <label>" per image of the split:
                                             1 positive, -1 negative, 0 difficult (only
                                             difficult objects of the class)
        ImageSets/Segmentation/<split>.txt   ids of the segmented images of a split
        JPEGImages/<id>.jpg
        SegmentationClass/<id>.png           palette PNG: index = class (0 background,
                                             1..20 the VOC classes), 255 = void

``--data`` may name ROOT, ROOT/VOCdevkit or the VOCYYYY folder itself. Splits: train, val,
trainval, test (the VOC2007 test set is a separate download extracted into the same
VOCdevkit; VOC2012 publishes no test labels).

Per-class files: :func:`load_voc_split` needs ``<cls>_<split>.txt`` for every class it is
asked for (the 20 VOC classes by default); a missing one is a :class:`DataError` naming it.
:func:`available_classes` is the one documented tolerance: it returns the VOC classes whose
files exist, for devkits that hold a subset of the classes (test fixtures, custom data in
the VOC layout), and still refuses a class whose files exist for some splits but not others.

Every problem is one :class:`DataError` line naming the file and the expected layout.
"""
from __future__ import annotations

import hashlib
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dcbench.data.datasets import DataError, ImageDataset

#: the 20 VOC classes in the official order; segmentation label of class i is i + 1
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor")
VOC_SPLITS: tuple[str, ...] = ("train", "val", "trainval", "test")
POSITIVE, NEGATIVE, DIFFICULT = 1, -1, 0
#: segmentation label of object boundaries and difficult regions (ignored by the metrics)
VOID_LABEL = 255

LAYOUT = ("ROOT/VOCdevkit/VOC{year}/{{Annotations/*.xml, ImageSets/Main/<cls>_<split>.txt and "
          "<split>.txt, JPEGImages/*.jpg}}")


def layout(year: str = "2007") -> str:
    """The expected layout, one line (used in error messages and protocol docs)."""
    return LAYOUT.format(year=year)


# ----------------------------------------------------------------------------- locating
def find_voc_dir(root: str | os.PathLike, year: str = "2007") -> Path:
    """The ``VOC<year>`` folder for ``root`` = ROOT, ROOT/VOCdevkit or the VOC<year> folder."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data root {root} is not a folder; expected {layout(year)}")
    name = f"VOC{year}"
    for candidate in (root / "VOCdevkit" / name, root / name):
        if candidate.is_dir():
            return candidate
    other_year = root.name.startswith("VOC") and root.name[3:].isdigit() and root.name != name
    if not other_year and ((root / "ImageSets").is_dir() or (root / "JPEGImages").is_dir()):
        return root  # the VOC<year> folder itself, under any name
    found = sorted(p.name for folder in (root, root / "VOCdevkit") if folder.is_dir()
                   for p in folder.iterdir() if p.is_dir() and p.name.startswith("VOC") and p.name[3:].isdigit())
    seen = f" (found: {', '.join(found)})" if found else ""
    raise DataError(f"no {name} folder under {root}{seen}; expected {layout(year)}")


def _require_file(path: Path, hint: str = "") -> None:
    if not path.is_file():
        raise DataError(f"{path} is missing{hint}; expected {layout(_year_of(path))}")


def _year_of(path: Path) -> str:
    for part in reversed(path.parts):
        if part.startswith("VOC") and part[3:].isdigit():
            return part[3:]
    return "2007"


# ----------------------------------------------------------------------------- image sets
def read_image_set(path: str | os.PathLike) -> list[str]:
    """Image ids of ``ImageSets/<task>/<split>.txt`` (one per line, blank lines skipped)."""
    path = Path(path)
    _require_file(path, _test_hint(path))
    ids = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 1:
            raise DataError(f"{path} line {number}: expected one image id, got '{line.strip()}'")
        ids.append(fields[0])
    _check_unique(ids, path)
    return ids


def read_class_set(path: str | os.PathLike) -> dict[str, int]:
    """``{image id: label}`` of ``ImageSets/Main/<cls>_<split>.txt`` (labels 1 / -1 / 0)."""
    path = Path(path)
    _require_file(path, _test_hint(path))
    labels: dict[str, int] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ("1", "-1", "0"):
            raise DataError(f"{path} line {number}: expected '<image id> <label>' with label 1, -1 or 0, "
                            f"got '{line.strip()}'")
        if fields[0] in labels:
            raise DataError(f"{path} lists image {fields[0]} twice; each image of a split appears once")
        labels[fields[0]] = int(fields[1])
    return labels


def _check_unique(ids: list[str], path: Path) -> None:
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        twice = next(i for i in ids if i in seen or seen.add(i))
        raise DataError(f"{path} lists image {twice} twice; each image of a split appears once")


def _test_hint(path: Path) -> str:
    if "_test" in path.stem or path.stem == "test":
        return (" (the VOC2007 test set is a separate download, VOCtest_06-Nov-2007.tar, "
                "to extract into the same VOCdevkit)")
    return ""


def available_classes(root: str | os.PathLike, splits: Sequence[str], year: str = "2007",
                      candidates: Sequence[str] = VOC_CLASSES) -> list[str]:
    """The ``candidates`` (VOC order) with ``ImageSets/Main/<cls>_<split>.txt`` for every split.

    A class whose files exist for some splits but not for others is a DataError naming the
    missing file; so is a devkit without any class file.
    """
    main = find_voc_dir(root, year) / "ImageSets" / "Main"
    if not main.is_dir():
        raise DataError(f"{main} is missing; expected {layout(year)}")
    found = []
    for cls in candidates:
        present = [(main / f"{cls}_{s}.txt").is_file() for s in splits]
        if any(present) and not all(present):
            missing = main / f"{cls}_{splits[present.index(False)]}.txt"
            raise DataError(f"{missing} is missing while {cls} files exist for other splits; "
                            f"expected {layout(year)}")
        if all(present):
            found.append(cls)
    if not found:
        raise DataError(f"{main / f'{candidates[0]}_{splits[0]}.txt'} is missing (no per-class image set "
                        f"in {main}); expected {layout(year)}")
    return found


# ----------------------------------------------------------------------------- annotations
@dataclass(frozen=True)
class VOCObject:
    """One annotated object. ``bbox`` = (xmin, ymin, xmax, ymax) as written in the XML:
    1-based, inclusive pixel coordinates."""

    name: str
    bbox: tuple[float, float, float, float]
    difficult: bool
    truncated: bool
    pose: str = "Unspecified"


@dataclass(frozen=True)
class VOCAnnotation:
    """The content of ``Annotations/<id>.xml``."""

    image_id: str
    filename: str
    width: int
    height: int
    depth: int
    segmented: bool
    objects: tuple[VOCObject, ...]


def _text(node: ET.Element, tag: str, path: Path, default: str | None = None) -> str:
    child = node.find(tag)
    if child is None or child.text is None:
        if default is not None:
            return default
        raise DataError(f"{path}: <{node.tag}> has no <{tag}>; the file is not a VOC annotation")
    return child.text.strip()


def _number(node: ET.Element, tag: str, path: Path, default: str | None = None) -> float:
    text = _text(node, tag, path, default)
    try:
        return float(text)
    except ValueError:
        raise DataError(f"{path}: <{tag}> is '{text}', not a number") from None


def parse_annotation(path: str | os.PathLike) -> VOCAnnotation:
    """Parse one ``Annotations/<id>.xml`` (a missing ``<difficult>`` counts as 0, as in VOC2012 test)."""
    path = Path(path)
    _require_file(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise DataError(f"{path} is not valid XML ({exc}); re-extract the VOC annotations") from None
    size = root.find("size")
    if size is None:
        raise DataError(f"{path}: no <size>; the file is not a VOC annotation")
    objects = []
    for obj in root.iter("object"):
        box = obj.find("bndbox")
        if box is None:
            raise DataError(f"{path}: an <object> has no <bndbox>")
        bbox = tuple(_number(box, t, path) for t in ("xmin", "ymin", "xmax", "ymax"))
        objects.append(VOCObject(name=_text(obj, "name", path), bbox=bbox,  # type: ignore[arg-type]
                                 difficult=_number(obj, "difficult", path, "0") > 0,
                                 truncated=_number(obj, "truncated", path, "0") > 0,
                                 pose=_text(obj, "pose", path, "Unspecified")))
    return VOCAnnotation(image_id=path.stem, filename=_text(root, "filename", path, f"{path.stem}.jpg"),
                         width=int(_number(size, "width", path)), height=int(_number(size, "height", path)),
                         depth=int(_number(size, "depth", path, "3")),
                         segmented=_number(root, "segmented", path, "0") > 0, objects=tuple(objects))


def labels_from_annotations(annotations: Sequence[VOCAnnotation], classes: Sequence[str]) -> np.ndarray:
    """N x C int8 image labels as VOC derives them: 1 if a non-difficult object of the class is
    present, 0 if only difficult ones, -1 otherwise."""
    index = {c: i for i, c in enumerate(classes)}
    out = np.full((len(annotations), len(classes)), NEGATIVE, dtype=np.int8)
    for row, ann in enumerate(annotations):
        for obj in ann.objects:
            col = index.get(obj.name)
            if col is None:
                continue
            if not obj.difficult:
                out[row, col] = POSITIVE
            elif out[row, col] == NEGATIVE:
                out[row, col] = DIFFICULT
    return out


# ----------------------------------------------------------------------------- splits
@dataclass
class VOCSplit:
    """One split of a VOC year: image ids, and (when read) the per-class 1/-1/0 labels."""

    voc_dir: Path
    year: str
    split: str
    image_ids: list[str]
    classes: tuple[str, ...]
    labels: np.ndarray | None  # N x C int8 (POSITIVE / NEGATIVE / DIFFICULT), rows in image_ids order
    sets_sha256: str  # of the image-set files read, so a relabelled split changes the fingerprint

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, image_id: str) -> Path:
        """``JPEGImages/<id>.jpg``."""
        return self.voc_dir / "JPEGImages" / f"{image_id}.jpg"

    def annotation_path(self, image_id: str) -> Path:
        """``Annotations/<id>.xml``."""
        return self.voc_dir / "Annotations" / f"{image_id}.xml"

    def annotation(self, image_id: str) -> VOCAnnotation:
        """The parsed XML of ``image_id``."""
        return parse_annotation(self.annotation_path(image_id))

    def annotations(self) -> list[VOCAnnotation]:
        """Every image's parsed XML, in ``image_ids`` order (checks they exist first)."""
        self.check_annotations()
        return [self.annotation(i) for i in self.image_ids]

    def check_images(self) -> None:
        """DataError naming the first missing ``JPEGImages/<id>.jpg`` (one folder listing)."""
        _check_listed(self.voc_dir / "JPEGImages", self.image_ids, ".jpg", self._set_file())

    def check_annotations(self) -> None:
        """DataError naming the first missing ``Annotations/<id>.xml``."""
        _check_listed(self.voc_dir / "Annotations", self.image_ids, ".xml", self._set_file())

    def _set_file(self) -> Path:
        return self.voc_dir / "ImageSets" / "Main" / f"{self.split}.txt"

    def dataset(self, transform: Callable | None = None) -> ImageDataset:
        """An :class:`ImageDataset` over the split's JPEGs (targets -1: labels are ``self.labels``,
        looked up by the dataset index the loader returns)."""
        paths = [str(self.image_path(i)) for i in self.image_ids]
        return ImageDataset(paths, targets=None, classes=list(self.classes), root=str(self.voc_dir),
                            transform=transform)

    def fingerprint(self) -> str:
        """16 hex chars over the images (relative path + size) and the image-set files' contents."""
        images = self.dataset().fingerprint()
        text = f"voc{self.year}:{self.split}\nimages:{images}\nsets:{self.sets_sha256}\n"
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _check_listed(folder: Path, ids: Sequence[str], suffix: str, listed_in: Path) -> None:
    if not folder.is_dir():
        raise DataError(f"{folder} is missing; expected {layout(_year_of(folder))}")
    with os.scandir(folder) as entries:
        present = {e.name for e in entries}
    missing = [i for i in ids if f"{i}{suffix}" not in present]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DataError(f"{folder / (missing[0] + suffix)} is missing{more} (listed in "
                        f"{listed_in.relative_to(listed_in.parents[2])}); re-extract the VOC archives")


def load_voc_split(root: str | os.PathLike, split: str, year: str = "2007",
                   classes: Sequence[str] | None = VOC_CLASSES, check_images: bool = True) -> VOCSplit:
    """Read ``ImageSets/Main/<split>.txt`` and, unless ``classes`` is None, every
    ``<cls>_<split>.txt``; check that each class file lists exactly the split's images and
    (``check_images``) that every JPEG exists. Cheap: text files and one folder listing.
    """
    if split not in VOC_SPLITS:
        raise DataError(f"unknown VOC split '{split}'; choose one of {', '.join(VOC_SPLITS)}")
    voc_dir = find_voc_dir(root, year)
    main = voc_dir / "ImageSets" / "Main"
    if not main.is_dir():
        raise DataError(f"{main} is missing; expected {layout(year)}")
    set_file = main / f"{split}.txt"
    ids = read_image_set(set_file)
    digest = hashlib.sha256(set_file.read_bytes())
    labels = None
    if classes is not None:
        labels = np.empty((len(ids), len(classes)), dtype=np.int8)
        for col, cls in enumerate(classes):
            path = main / f"{cls}_{split}.txt"
            by_id = read_class_set(path)
            _check_same_images(by_id, ids, path, set_file)
            labels[:, col] = [by_id[i] for i in ids]
            digest.update(path.read_bytes())
    result = VOCSplit(voc_dir, year, split, ids, tuple(classes or ()), labels, digest.hexdigest())
    if check_images:
        result.check_images()
    return result


def _check_same_images(by_id: dict[str, int], ids: list[str], path: Path, set_file: Path) -> None:
    if len(by_id) == len(ids) and all(i in by_id for i in ids):
        return
    missing = [i for i in ids if i not in by_id]
    if missing:
        what = f"lacks image {missing[0]} of {set_file.name}"
    else:
        what = f"lists image {sorted(set(by_id) - set(ids))[0]} that {set_file.name} does not"
    raise DataError(f"{path} is inconsistent with {set_file.name}: it {what} ({len(by_id)} vs {len(ids)} "
                    f"images); the image sets of one split must list the same images")


# ----------------------------------------------------------------------------- segmentation
@dataclass
class VOCSegmentationSplit:
    """The segmented images of one split: ids from ``ImageSets/Segmentation/<split>.txt``."""

    voc_dir: Path
    year: str
    split: str
    image_ids: list[str]

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, image_id: str) -> Path:
        """``JPEGImages/<id>.jpg``."""
        return self.voc_dir / "JPEGImages" / f"{image_id}.jpg"

    def mask_path(self, image_id: str) -> Path:
        """``SegmentationClass/<id>.png`` (palette indices: class, 0 background, 255 void)."""
        return self.voc_dir / "SegmentationClass" / f"{image_id}.png"


def load_segmentation_split(root: str | os.PathLike, split: str, year: str = "2012",
                            check_files: bool = True) -> VOCSegmentationSplit:
    """Read ``ImageSets/Segmentation/<split>.txt``; check images and masks exist."""
    voc_dir = find_voc_dir(root, year)
    set_file = voc_dir / "ImageSets" / "Segmentation" / f"{split}.txt"
    ids = read_image_set(set_file)
    if check_files:
        _check_listed(voc_dir / "JPEGImages", ids, ".jpg", set_file)
        _check_listed(voc_dir / "SegmentationClass", ids, ".png", set_file)
    return VOCSegmentationSplit(voc_dir, year, split, ids)


def voc_palette() -> list[int]:
    """The 256-colour VOC palette (768 ints, R G B per index) of the SegmentationClass PNGs."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):  # bit j of (c >> 3j) goes to bit 7-j of each channel
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette += [r, g, b]
    return palette
