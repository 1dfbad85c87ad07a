"""A tiny VOCdevkit in the exact on-disk format, with learnable content (test fixture).

:func:`make_voc` writes ``ROOT/VOCdevkit/VOC<year>/`` with ``JPEGImages/*.jpg``,
``Annotations/*.xml`` (size, objects with pose / truncated / difficult / bndbox),
``ImageSets/Main/<split>.txt`` and ``<cls>_<split>.txt`` (``"%s %2d"`` lines, labels 1 / -1 / 0
derived from the objects as VOC does), ``SegmentationClass/*.png`` (palette PNGs: index =
VOC class index + 1, 0 background, 255 a void ring around each object and the whole of each
difficult object) and ``ImageSets/Segmentation/<split>.txt``.

Content: each image has a textured, noisy background and 1-3 objects; an object of VOC class
``i`` is the shape ``SHAPES[i % 4]`` filled with ``class_colour(i)`` (as in
:mod:`dcbench.data.synthetic`), so the classes are learnable and an informative feature
extractor beats a random one. Every image holds at least one non-difficult object (image
``k`` of a split starts with class ``k mod C``, so each class has positives in every split
of at least C images); every third image also holds a small difficult object. Objects near
the border are truncated (box clipped, ``truncated`` 1). A subset of the 20 class names can be
chosen while the layout stays real (the class files of the other classes are simply absent:
see :func:`dcbench.data.voc.available_classes`). Same arguments, same bytes.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dcbench.data.synthetic import SHAPES, _background, _shape_polygon, class_colour
from dcbench.data.voc import VOC_CLASSES, VOID_LABEL, voc_palette

DEFAULT_SPLITS = {"2007": {"train": 12, "val": 12, "test": 16}, "2012": {"train": 12, "val": 12}}


@dataclass(frozen=True)
class _Object:
    cls: str
    shape: str
    colour: tuple[int, int, int]
    cx: float
    cy: float
    r: float
    difficult: bool


def make_voc(root: str | os.PathLike, classes: Sequence[str] = VOC_CLASSES, year: str = "2007",
             images_per_split: Mapping[str, int] | None = None, image_size: tuple[int, int] = (96, 80),
             seed: int = 0, segmented_fraction: float = 1.0) -> Path:
    """Write a VOCdevkit fixture under ``root``; returns ``root`` (what ``--data`` takes).

    Args:
        root: folder that receives ``VOCdevkit/VOC<year>/``.
        classes: VOC class names to use (a subset of :data:`VOC_CLASSES`, any order).
        year: "2007" (ids ``000001``; splits train/val/test) or "2012" (ids ``2008_000001``).
        images_per_split: images of each split among train, val, test (default 12/12/16 for
            2007, 12/12 for 2012); ``trainval`` is written as train + val.
        image_size: (width, height) of every image.
        seed: the content and the split assignment.
        segmented_fraction: share of each split's images that get a SegmentationClass mask and
            enter ``ImageSets/Segmentation`` (the first ones of each split).
    """
    unknown = [c for c in classes if c not in VOC_CLASSES]
    if unknown or not classes:
        raise ValueError(f"classes must be VOC class names, got {unknown or 'none'}")
    counts = dict(images_per_split or DEFAULT_SPLITS.get(year, DEFAULT_SPLITS["2007"]))
    if not set(counts) <= {"train", "val", "test"} or min(counts.values()) < 1:
        raise ValueError(f"images_per_split takes positive counts for train, val and test, got {counts}")
    voc_dir = Path(root) / "VOCdevkit" / f"VOC{year}"
    for sub in ("Annotations", "ImageSets/Main", "ImageSets/Segmentation", "JPEGImages", "SegmentationClass"):
        (voc_dir / sub).mkdir(parents=True, exist_ok=True)
    splits = _assign_ids(counts, year, seed)
    labels: dict[str, dict[str, list[int]]] = {}
    segmented: dict[str, list[str]] = {}
    for split_index, (split, ids) in enumerate(splits.items()):
        rng = np.random.default_rng([seed, 7, split_index])
        n_seg = int(round(segmented_fraction * len(ids)))
        labels[split], segmented[split] = {}, ids[:n_seg]
        for k, image_id in enumerate(ids):
            objects = _sample_objects(k, list(classes), image_size, rng)
            _write_image(voc_dir, image_id, objects, image_size, rng, year, with_mask=k < n_seg)
            labels[split][image_id] = _image_labels(objects, classes)
    if "train" in splits and "val" in splits:
        splits["trainval"] = sorted(splits["train"] + splits["val"])
        labels["trainval"] = {**labels["train"], **labels["val"]}
        segmented["trainval"] = sorted(segmented["train"] + segmented["val"])
    _write_image_sets(voc_dir, splits, labels, segmented, classes)
    return Path(root)


def _assign_ids(counts: Mapping[str, int], year: str, seed: int) -> dict[str, list[str]]:
    """Consecutive ids spread over the splits at random (as in VOC, splits interleave)."""
    total = sum(counts.values())
    fmt = "{:06d}" if year == "2007" else f"{int(year) - 4}_{{:06d}}"
    ids = [fmt.format(i + 1) for i in range(total)]
    order = np.random.default_rng([seed, 3]).permutation(total)
    out, start = {}, 0
    for split, n in counts.items():
        out[split] = sorted(ids[j] for j in order[start:start + n])
        start += n
    return out


def _sample_objects(k: int, classes: list[str], size: tuple[int, int], rng: np.random.Generator) -> list[_Object]:
    """1-3 ordinary objects (the first of class ``k mod C``), plus a small difficult one every 3rd image."""
    w, h = size
    side = min(w, h)
    chosen = [classes[k % len(classes)]] + [classes[int(i)] for i in rng.integers(0, len(classes), rng.integers(0, 3))]
    plan = [(c, rng.uniform(0.16, 0.28) * side, False) for c in chosen]
    if k % 3 == 1:
        plan.append((classes[int(rng.integers(0, len(classes)))], rng.uniform(0.06, 0.09) * side, True))
    objects = []
    for cls, r, difficult in plan:
        index = VOC_CLASSES.index(cls)
        colour = tuple(int(np.clip(v + rng.uniform(-20, 20), 0, 255)) for v in class_colour(index))
        # centres may sit close to the border: some objects get truncated
        cx, cy = rng.uniform(0.5 * r, w - 0.5 * r), rng.uniform(0.5 * r, h - 0.5 * r)
        objects.append(_Object(cls, SHAPES[index % len(SHAPES)], colour, cx, cy, r, difficult))
    return objects


def _draw(draw: ImageDraw.ImageDraw, obj: _Object, fill: int | tuple, grow: float = 0.0) -> None:
    """Fill ``obj``'s shape, its size ``r`` changed by ``grow`` pixels."""
    cx, cy, r = obj.cx, obj.cy, obj.r + grow
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif obj.shape == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    else:
        draw.polygon(_shape_polygon(obj.shape, cx, cy, r), fill=fill)


def _draw_label(draw: ImageDraw.ImageDraw, obj: _Object, ring: float) -> None:
    """The mask of ``obj``: a void band of width ``ring`` across its boundary (as VOC marks
    object boundaries), the class index inside; a difficult object is void throughout."""
    _draw(draw, obj, VOID_LABEL, grow=ring / 2)
    if not obj.difficult:
        _draw(draw, obj, VOC_CLASSES.index(obj.cls) + 1, grow=-ring / 2)


def _box(obj: _Object, size: tuple[int, int]) -> tuple[tuple[int, int, int, int], bool]:
    """1-based inclusive box of the object's pixels, and whether the border cut it."""
    w, h = size
    big = Image.new("L", (w + 2 * w, h + 2 * h), 0)  # room around the image to see truncation
    shifted = _Object(obj.cls, obj.shape, obj.colour, obj.cx + w, obj.cy + h, obj.r, obj.difficult)
    _draw(ImageDraw.Draw(big), shifted, 255)
    ys, xs = np.nonzero(np.asarray(big))
    x0, x1, y0, y1 = xs.min() - w, xs.max() - w, ys.min() - h, ys.max() - h
    truncated = x0 < 0 or y0 < 0 or x1 >= w or y1 >= h
    box = (max(x0, 0) + 1, max(y0, 0) + 1, min(x1, w - 1) + 1, min(y1, h - 1) + 1)
    return tuple(int(v) for v in box), bool(truncated)


def _write_image(voc_dir: Path, image_id: str, objects: list[_Object], size: tuple[int, int],
                 rng: np.random.Generator, year: str, with_mask: bool) -> None:
    w, h = size
    side = max(w, h)
    canvas = Image.fromarray(np.clip(_background(rng, side), 0, 255).astype(np.uint8)[:h, :w])
    mask = Image.new("P", (w, h), 0)
    mask.putpalette(voc_palette())
    paint, label = ImageDraw.Draw(canvas), ImageDraw.Draw(mask)
    ring = max(1.0, 0.025 * min(w, h))  # VOC's void band: ~5 px on ~400 px images, thicker here to show
    boxes = []
    for obj in objects:  # later objects occlude earlier ones, in the image and the mask alike
        _draw(paint, obj, obj.colour)
        _draw_label(label, obj, ring)
        boxes.append(_box(obj, size))
    canvas.save(voc_dir / "JPEGImages" / f"{image_id}.jpg", format="JPEG", quality=90)
    if with_mask:
        mask.save(voc_dir / "SegmentationClass" / f"{image_id}.png", format="PNG")
    xml = _annotation_xml(image_id, objects, boxes, size, year, with_mask)
    (voc_dir / "Annotations" / f"{image_id}.xml").write_text(xml)


def _annotation_xml(image_id: str, objects: list[_Object], boxes: list, size: tuple[int, int], year: str,
                    segmented: bool) -> str:
    """The XML as the VOC devkit writes it (tab-indented, same element order)."""
    w, h = size
    lines = ["<annotation>", f"\t<folder>VOC{year}</folder>", f"\t<filename>{image_id}.jpg</filename>",
             "\t<source>", f"\t\t<database>The VOC{year} Database</database>",
             f"\t\t<annotation>PASCAL VOC{year}</annotation>", "\t\t<image>flickr</image>", "\t</source>",
             "\t<size>", f"\t\t<width>{w}</width>", f"\t\t<height>{h}</height>", "\t\t<depth>3</depth>",
             "\t</size>", f"\t<segmented>{int(segmented)}</segmented>"]
    for obj, ((x0, y0, x1, y1), truncated) in zip(objects, boxes):
        lines += ["\t<object>", f"\t\t<name>{obj.cls}</name>", "\t\t<pose>Unspecified</pose>",
                  f"\t\t<truncated>{int(truncated)}</truncated>", f"\t\t<difficult>{int(obj.difficult)}</difficult>",
                  "\t\t<bndbox>", f"\t\t\t<xmin>{x0}</xmin>", f"\t\t\t<ymin>{y0}</ymin>",
                  f"\t\t\t<xmax>{x1}</xmax>", f"\t\t\t<ymax>{y1}</ymax>", "\t\t</bndbox>", "\t</object>"]
    return "\n".join(lines + ["</annotation>", ""])


def _image_labels(objects: list[_Object], classes: Sequence[str]) -> list[int]:
    """VOC's rule: 1 with a non-difficult object of the class, 0 with only difficult ones, else -1."""
    out = []
    for cls in classes:
        mine = [o for o in objects if o.cls == cls]
        out.append(1 if any(not o.difficult for o in mine) else (0 if mine else -1))
    return out


def _write_image_sets(voc_dir: Path, splits: Mapping[str, list[str]], labels: Mapping[str, Mapping[str, list[int]]],
                      segmented: Mapping[str, list[str]], classes: Sequence[str]) -> None:
    main, seg = voc_dir / "ImageSets" / "Main", voc_dir / "ImageSets" / "Segmentation"
    for split, ids in splits.items():
        (main / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        (seg / f"{split}.txt").write_text("".join(f"{i}\n" for i in segmented[split]))
        for col, cls in enumerate(classes):
            (main / f"{cls}_{split}.txt").write_text("".join(f"{i} {labels[split][i][col]:2d}\n" for i in ids))
