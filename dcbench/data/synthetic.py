"""Deterministic fixture generators for tests: small datasets in the real on-disk formats.

The images are learnable on purpose: class ``c`` is a shape (circle, square, triangle,
cross, cycling) filled with a class colour, at a random position and size on a random
textured, noisy background. A working feature extractor or classifier therefore does
measurably better than chance on them, which lets tests check behaviour, not just shapes.
"""
from __future__ import annotations

import colorsys
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross")
# Well-separated saturated colours for the first classes; later ones use golden-ratio hues.
_PALETTE = [(220, 40, 40), (40, 180, 60), (40, 80, 230), (235, 200, 30),
            (200, 50, 200), (30, 200, 200), (245, 130, 20), (120, 60, 20)]


def class_name(c: int) -> str:
    """Folder name of synthetic class ``c`` (zero-padded so sorting keeps the order)."""
    return f"class_{c:02d}"


def class_colour(c: int) -> tuple[int, int, int]:
    """RGB colour of synthetic class ``c``."""
    if c < len(_PALETTE):
        return _PALETTE[c]
    r, g, b = colorsys.hsv_to_rgb((c * 0.618034) % 1.0, 0.85, 0.9)
    return int(r * 255), int(g * 255), int(b * 255)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Grey-ish base + smooth blobs + fine noise (float H x W x 3).

    The background varies mostly in brightness and little in hue, so the class colour
    (and the shape) is what separates the classes.
    """
    base = rng.uniform(85, 170) + rng.uniform(-10, 10, 3)
    blobs = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(blobs).resize((size, size), Image.Resampling.BILINEAR),
                        dtype=np.float64) - 127.5
    brightness = smooth.mean(axis=2, keepdims=True)
    texture = 0.35 * brightness + 0.08 * (smooth - brightness)
    return base + texture + rng.normal(0, 10, (size, size, 3))


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx - r * 0.95, cy + r * 0.8), (cx + r * 0.95, cy + r * 0.8)]
    w = r * 0.38  # cross arm half-width
    return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w),
            (cx + r, cy + w), (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r),
            (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w)]


def render_sample(c: int, rng: np.random.Generator, image_size: int = 48) -> Image.Image:
    """One RGB image of synthetic class ``c``."""
    canvas = Image.fromarray(np.clip(_background(rng, image_size), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    r = rng.uniform(0.22, 0.36) * image_size
    cx, cy = rng.uniform(r, image_size - r, 2)
    colour = tuple(int(np.clip(v + rng.uniform(-20, 20), 0, 255)) for v in class_colour(c))
    shape = SHAPES[c % len(SHAPES)]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=colour)
    else:
        draw.polygon(_shape_polygon(shape, cx, cy, r), fill=colour)
    return canvas


def _save(img: Image.Image, path: Path) -> None:
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    img.save(path, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))


def _corrupt_bytes(k: int, rng: np.random.Generator) -> tuple[str, bytes]:
    """(extension, content) of corrupt file ``k``: garbage, truncated JPEG or empty, cycling."""
    kind = k % 3
    if kind == 0:
        return ".jpg", rng.integers(0, 256, 512, dtype=np.uint8).tobytes()
    if kind == 1:
        buf = io.BytesIO()
        render_sample(0, rng, 48).save(buf, format="JPEG", quality=90)
        data = buf.getvalue()
        return ".jpg", data[: len(data) * 2 // 5]  # valid header, missing scan data
    return ".png", b""


def _write_classes(folder: Path, n_classes: int, per_class: int, image_size: int,
                   rng: np.random.Generator, corrupt: int) -> None:
    for c in range(n_classes):
        class_dir = folder / class_name(c)
        class_dir.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            _save(render_sample(c, rng, image_size), class_dir / f"{i:04d}.jpg")
    for k in range(corrupt):
        ext, data = _corrupt_bytes(k, rng)
        (folder / class_name(k % n_classes) / f"corrupt_{k:03d}{ext}").write_bytes(data)


def make_image_folder(
    root: str | os.PathLike,
    n_classes: int = 4,
    per_class: int = 20,
    image_size: int = 48,
    seed: int = 0,
    splits: tuple[str, ...] | None = ("train", "val"),
    corrupt: int = 0,
) -> Path:
    """Write a labelled ImageFolder of JPEGs; returns ``root``.

    With ``splits``: ``root/<split>/class_XX/NNNN.jpg``, ``per_class`` images per class
    in *each* split (independent draws); without: ``root/class_XX/NNNN.jpg``. ``corrupt``
    adds that many unreadable files (random bytes, truncated JPEG, empty ``.png``,
    cycling) per split, named ``corrupt_NNN.*`` and spread over the classes, so a split
    holds ``n_classes * per_class + corrupt`` image files. Same arguments, same bytes.
    """
    root = Path(root)
    for split_index, split in enumerate(splits or (None,)):
        rng = np.random.default_rng([seed, split_index])
        folder = root / split if split else root
        _write_classes(folder, n_classes, per_class, image_size, rng, corrupt)
    return root


def make_unlabelled_folder(
    root: str | os.PathLike, n: int = 30, image_size: int = 48, seed: int = 0
) -> Path:
    """Write ``n`` images directly in ``root`` (every 5th a PNG, the rest JPEG); returns ``root``.

    The content cycles over four synthetic classes (image ``i`` is class ``i % 4``).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 100])
    for i in range(n):
        ext = ".png" if i % 5 == 4 else ".jpg"
        _save(render_sample(i % 4, rng, image_size), root / f"img_{i:04d}{ext}")
    return root


def make_file_list(
    root: str | os.PathLike,
    n: int = 30,
    image_size: int = 48,
    seed: int = 0,
    name: str = "list.txt",
) -> Path:
    """Write ``n`` images under ``root/images/`` and a file list ``root/<name>``; returns its path.

    The list has a ``#`` comment header, a blank line, and paths relative to ``root``.
    """
    root = Path(root)
    images = make_unlabelled_folder(root / "images", n=n, image_size=image_size, seed=seed)
    entries = sorted(p.name for p in images.iterdir())
    lines = ["# dcbench synthetic file list: one image path per line", ""]
    lines += [f"images/{entry}" for entry in entries]
    list_path = root / name
    list_path.write_text("\n".join(lines) + "\n")
    return list_path
