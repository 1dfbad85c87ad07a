"""Tiny instance-retrieval datasets in the real Oxford/Paris layouts, for tests and demos.

The content is learnable on purpose. Each dataset has a few synthetic "landmarks": a large
procedurally drawn scene (a facade of coloured shapes, stripes and a window grid) whose
central part, the *core*, is what queries show. Database photos are crops of a landmark's
scene under different positions, scales and colour jitter, assigned to the ground truth by
how strongly the view was altered (as the revisited annotation does by visibility):

* ``easy``: the whole core is visible, mild scale change and colour jitter;
* ``hard``: only part of the core is visible (shifted, zoomed), stronger jitter;
* ``junk``: the view barely overlaps the core (less than a quarter of it).

Distractors are crops of other scenes that no query shows. A query photo pastes the core
of its landmark onto an unrelated cluttered scene, and its bounding box marks the core, so
cropping the query to its box helps. Any reasonable feature extractor (even a random
network) with R-MAC retrieves the right landmark far above chance.

The same photos can be written in both layouts (:mod:`dcbench.data.retrieval`): revisitop
(``ROOT/roxford5k/jpg`` + ``gnd_roxford5k.pkl``) and original (``ROOT/oxford5k/jpg`` +
``gt/*_{good,ok,junk,query}.txt``, with easy -> good, hard -> ok, junk -> junk, and the
query photos also in the database and in their own ``good`` list). Oxford-named datasets
and Paris-named ones show different landmarks, so one can whiten the other.
"""
from __future__ import annotations

import colorsys
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dcbench.data.retrieval import PARIS6K_CORRUPTED

#: landmark names (Oxford's and Paris's real ones), cycled
OXFORD_LANDMARKS = ("all_souls", "ashmolean", "balliol", "bodleian", "christ_church", "cornmarket",
                    "hertford", "keble", "magdalen", "pitt_rivers", "radcliffe_camera")
PARIS_LANDMARKS = ("defense", "eiffel", "invalides", "louvre", "moulinrouge", "museedorsay",
                   "notredame", "pantheon", "pompidou", "sacrecoeur", "triomphe")
SCENE_W, SCENE_H = 360, 270
CORE = (90.0, 68.0, 270.0, 202.0)  # x1, y1, x2, y2 of the core inside a scene


@dataclass
class _Photo:
    name: str
    image: Image.Image
    landmark: int  # -1 for distractors
    kind: str  # query, easy, hard, junk, distractor
    box: tuple[float, float, float, float] | None = None


@dataclass
class _Collection:
    """The photos of one synthetic dataset, independent of the layout they are written in."""

    family: str  # oxford | paris
    queries: list[_Photo] = field(default_factory=list)
    database: list[_Photo] = field(default_factory=list)


# ----------------------------------------------------------------------------- drawing
def _palette(rng: np.random.Generator, n: int = 4) -> list[np.ndarray]:
    """``n`` RGB colours around one hue: a scene's colours, distinct from other scenes'."""
    hue = rng.uniform()
    out = []
    for k in range(n):
        h = (hue + rng.uniform(-0.08, 0.08) + (0.5 if k == n - 1 else 0.0)) % 1.0  # one contrast colour
        rgb = colorsys.hsv_to_rgb(h, rng.uniform(0.45, 0.95), rng.uniform(0.35, 0.95))
        out.append(np.array(rgb) * 255.0)
    return out


def _blocks(rng: np.random.Generator, x0: float, y0: float, x1: float, y1: float,
            depth: int = 0) -> list[tuple[int, int, int, int]]:
    """Recursive split of a rectangle into facade-like blocks."""
    w, h = x1 - x0, y1 - y0
    if depth >= 3 or max(w, h) < 70 or (depth >= 2 and rng.random() < 0.4):
        return [(round(x0), round(y0), round(x1), round(y1))]
    if w >= h:
        cut = x0 + w * rng.uniform(0.3, 0.7)
        return _blocks(rng, x0, y0, cut, y1, depth + 1) + _blocks(rng, cut, y0, x1, y1, depth + 1)
    cut = y0 + h * rng.uniform(0.3, 0.7)
    return _blocks(rng, x0, y0, x1, cut, depth + 1) + _blocks(rng, x0, cut, x1, y1, depth + 1)


def _texture(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A boolean pattern (stripes, checker, dots or windows) with random period and angle."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    period = rng.uniform(10, 28)
    kind = rng.integers(0, 4)
    if kind == 0:
        angle = rng.uniform(0, np.pi)
        return ((x * np.cos(angle) + y * np.sin(angle)) / period) % 1.0 < rng.uniform(0.3, 0.6)
    if kind == 1:
        return (np.floor(x / period) + np.floor(y / period)) % 2 == 0
    if kind == 2:
        dx, dy = (x % period) - period / 2, (y % period) - period / 2
        return dx * dx + dy * dy < (period * rng.uniform(0.2, 0.4)) ** 2
    return ((x % period) < period * 0.5) & ((y % (period * 1.5)) < period * 0.9)


def draw_scene(rng: np.random.Generator) -> Image.Image:
    """A random "landmark" scene: a facade of textured blocks in the scene's own palette."""
    palette = _palette(rng)
    canvas = np.zeros((SCENE_H, SCENE_W, 3))
    for x0, y0, x1, y1 in _blocks(rng, 0, 0, SCENE_W, SCENE_H):
        a, b = rng.choice(len(palette), 2, replace=False)
        pattern = _texture(rng, x1 - x0, y1 - y0)[..., None]
        canvas[y0:y1, x0:x1] = np.where(pattern, palette[a], palette[b])
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    _ornaments(ImageDraw.Draw(img), rng, palette)
    return img


def _ornaments(draw: ImageDraw.ImageDraw, rng: np.random.Generator, palette: list[np.ndarray]) -> None:
    """A few solid shapes on top (towers, domes, arches): unique, non-repeating structure."""
    for _ in range(int(rng.integers(4, 8))):
        x, y = rng.uniform(0, SCENE_W), rng.uniform(0, SCENE_H)
        w, h = rng.uniform(20, 60), rng.uniform(20, 60)
        colour = tuple(int(v) for v in palette[int(rng.integers(len(palette)))])
        if rng.random() < 0.5:
            draw.ellipse([x, y, x + w, y + h], fill=colour)
        else:
            draw.polygon([(x, y + h), (x + w / 2, y), (x + w, y + h)], fill=colour)


def _jitter(img: Image.Image, rng: np.random.Generator, strength: float) -> Image.Image:
    """Per-channel gain, brightness offset and pixel noise, scaled by ``strength`` (0..1)."""
    arr = np.asarray(img, dtype=np.float64)
    gain = 1.0 + rng.uniform(-0.25, 0.25, 3) * strength
    offset = rng.uniform(-30, 30) * strength
    noisy = arr * gain + offset + rng.normal(0, 3 + 6 * strength, arr.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _photo_size(rng: np.random.Generator, long_side: int) -> tuple[int, int]:
    """(width, height) of a photo: landscape 4:3 twice as often as portrait 3:4."""
    short = round(long_side * 3 / 4)
    return (long_side, short) if rng.random() < 2 / 3 else (short, long_side)


def _crop_view(scene: Image.Image, centre: tuple[float, float], width: float, size: tuple[int, int],
               rng: np.random.Generator, strength: float) -> Image.Image:
    """The part of ``scene`` of ``width`` scene pixels around ``centre``, at the photo's aspect."""
    aspect = size[1] / size[0]
    w = min(width, SCENE_W, SCENE_H / aspect)  # never past the scene's borders (no black bars)
    h = w * aspect
    cx = float(np.clip(centre[0], w / 2, SCENE_W - w / 2))
    cy = float(np.clip(centre[1], h / 2, SCENE_H - h / 2))
    view = scene.crop((round(cx - w / 2), round(cy - h / 2), round(cx + w / 2), round(cy + h / 2)))
    return _jitter(view.resize(size, Image.Resampling.BILINEAR), rng, strength)


def _core_overlap(centre: tuple[float, float], width: float, aspect: float) -> float:
    """Fraction of the core's area inside a view of ``width`` around ``centre`` (unclipped)."""
    x1, y1, x2, y2 = CORE
    w = min(width, SCENE_W, SCENE_H / aspect)
    h = w * aspect
    cx = float(np.clip(centre[0], w / 2, SCENE_W - w / 2))
    cy = float(np.clip(centre[1], h / 2, SCENE_H - h / 2))
    ix = max(0.0, min(x2, cx + w / 2) - max(x1, cx - w / 2))
    iy = max(0.0, min(y2, cy + h / 2) - max(y1, cy - h / 2))
    return ix * iy / ((x2 - x1) * (y2 - y1))


def _view_geometry(kind: str, rng: np.random.Generator, aspect: float) -> tuple[tuple[float, float], float]:
    """Centre and width of a view of the given difficulty (rejection-sampled on core overlap)."""
    x1, y1, x2, y2 = CORE
    cw, ch = x2 - x1, y2 - y1
    centre0 = ((x1 + x2) / 2, (y1 + y2) / 2)
    for _ in range(200):
        if kind == "easy":
            width = max(cw, ch / aspect) * rng.uniform(1.05, 1.35)
            shift = rng.uniform(-0.08, 0.08, 2)
        elif kind == "hard":
            width = cw * rng.uniform(0.55, 0.85)
            shift = rng.choice([-1, 1], 2) * rng.uniform(0.15, 0.3, 2)
        else:  # junk: mostly outside the core
            width = cw * rng.uniform(0.5, 0.7)
            shift = rng.choice([-1, 1], 2) * rng.uniform(0.55, 0.75, 2)
        centre = (centre0[0] + shift[0] * cw, centre0[1] + shift[1] * ch)
        overlap = _core_overlap(centre, width, aspect)
        if (kind == "easy" and overlap > 0.97) or (kind == "hard" and 0.25 <= overlap <= 0.7) \
                or (kind == "junk" and overlap < 0.2):
            return centre, width
    raise RuntimeError(f"could not sample a {kind} view")  # pragma: no cover - geometry makes it easy


def _query_photo(scene: Image.Image, clutter: Image.Image, rng: np.random.Generator,
                 long_side: int) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """The landmark's core pasted on a cluttered photo; returns the photo and the core's box."""
    size = _photo_size(rng, long_side)
    photo = _crop_view(clutter, (SCENE_W / 2, SCENE_H / 2), SCENE_W * 0.8, size, rng, 0.3)
    core = scene.crop(tuple(round(v) for v in CORE))
    scale = rng.uniform(0.6, 0.75) * min(size[0] / core.width, size[1] / core.height)
    cw, ch = max(1, round(core.width * scale)), max(1, round(core.height * scale))
    x, y = int(rng.integers(0, size[0] - cw + 1)), int(rng.integers(0, size[1] - ch + 1))
    photo.paste(_jitter(core.resize((cw, ch), Image.Resampling.BILINEAR), rng, 0.2), (x, y))
    return photo, (float(x), float(y), float(x + cw), float(y + ch))


# ----------------------------------------------------------------------------- collections
def _family(name: str) -> str:
    return "paris" if "paris" in name.lower() else "oxford"


def _image_name(family: str, label: str, number: int) -> str:
    return f"paris_{label}_{number:06d}" if family == "paris" else f"{label}_{number:06d}"


def build_collection(family: str, n_landmarks: int = 4, queries_per_landmark: int = 2, easy: int = 3,
                     hard: int = 2, junk: int = 1, distractors: int = 10, image_size: int = 128,
                     seed: int = 0) -> _Collection:
    """The photos of one synthetic dataset (``family`` 'oxford' or 'paris': other landmarks)."""
    rng = np.random.default_rng([seed, 0 if family == "oxford" else 1])
    names = OXFORD_LANDMARKS if family == "oxford" else PARIS_LANDMARKS
    out, counter = _Collection(family), iter(range(1, 10**6))
    for lm in range(n_landmarks):
        label = names[lm % len(names)] + ("" if lm < len(names) else f"{lm // len(names)}")
        scene = draw_scene(rng)
        for kind, count in (("easy", easy), ("hard", hard), ("junk", junk)):
            for _ in range(count):
                size = _photo_size(rng, image_size)
                centre, width = _view_geometry(kind, rng, size[1] / size[0])
                strength = {"easy": 0.3, "hard": 0.8, "junk": 0.6}[kind]
                image = _crop_view(scene, centre, width, size, rng, strength)
                out.database.append(_Photo(_image_name(family, label, next(counter)), image, lm, kind))
        for _ in range(queries_per_landmark):
            photo, box = _query_photo(scene, draw_scene(rng), rng, image_size)
            out.queries.append(_Photo(_image_name(family, label, next(counter)), photo, lm, "query", box))
    for _ in range(distractors):
        size = _photo_size(rng, image_size)
        view = _crop_view(draw_scene(rng), (rng.uniform(100, 260), rng.uniform(80, 190)),
                          rng.uniform(150, 260), size, rng, 0.5)
        out.database.append(_Photo(_image_name(family, "general", next(counter)), view, -1, "distractor"))
    order = rng.permutation(len(out.database))  # landmark views are not contiguous in imlist
    out.database = [out.database[i] for i in order]
    return out


def _save_jpg(photo: _Photo, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    photo.image.save(folder / f"{photo.name}.jpg", format="JPEG", quality=92)


def _indices(database: list[_Photo], landmark: int, kind: str) -> list[int]:
    """Database positions of the ``kind`` views of ``landmark``."""
    return [i for i, p in enumerate(database) if p.landmark == landmark and p.kind == kind]


def write_revisitop(collection: _Collection, folder: Path) -> Path:
    """``folder/jpg/*.jpg`` + ``folder/gnd_<folder name>.pkl`` (queries not in the database)."""
    for photo in collection.database + collection.queries:
        _save_jpg(photo, folder / "jpg")
    imlist = [p.name for p in collection.database]
    gnd = [{**{kind: np.array(_indices(collection.database, q.landmark, kind), dtype=np.int64)
                for kind in ("easy", "hard", "junk")},
            "bbx": list(q.box)} for q in collection.queries]
    data = {"imlist": imlist, "qimlist": [q.name for q in collection.queries], "gnd": gnd}
    # numpy arrays and protocol 2 (the pickle form Python 2 and 3 share): every test reading a
    # synthetic dataset goes through the restricted unpickler's numpy and bytes paths
    # (dcbench.data.retrieval.GroundTruthUnpickler), not only through plain lists
    with open(folder / f"gnd_{folder.name}.pkl", "wb") as f:
        pickle.dump(data, f, protocol=2)
    return folder


#: what the real Paris6k's corrupted files hold instead of a JPEG
CORRUPTED_BYTES = b"<html><head><title>302 Found</title></head><body><h1>Found</h1></body></html>\n"


def write_original(collection: _Collection, folder: Path, corrupted: tuple[str, ...] = ()) -> Path:
    """``folder/jpg/*.jpg`` + ``folder/gt/<landmark>_<n>_{good,ok,junk,query}.txt``.

    As in the real datasets, query photos are database images and listed in their own (and
    their landmark's other queries') ``good`` files. ``corrupted``: image names written as
    the HTML pages Paris6k's corrupted files are, each listed in the first query's ``ok`` file.
    """
    for photo in collection.database + collection.queries:
        _save_jpg(photo, folder / "jpg")
    for name in corrupted:
        (folder / "jpg" / f"{name}.jpg").write_bytes(CORRUPTED_BYTES)
    gt = folder / "gt"
    gt.mkdir(parents=True, exist_ok=True)
    seen: dict[int, int] = {}
    prefix = "oxc1_" if collection.family == "oxford" else ""
    for q in collection.queries:
        seen[q.landmark] = seen.get(q.landmark, 0) + 1
        label = q.name.rsplit("_", 1)[0].removeprefix("paris_")
        stem = f"{label}_{seen[q.landmark]}"
        same = [p for p in collection.database if p.landmark == q.landmark]
        lists = {"good": [p.name for p in same if p.kind == "easy"]
                 + [o.name for o in collection.queries if o.landmark == q.landmark],
                 "ok": [p.name for p in same if p.kind == "hard"] + (list(corrupted) if q is collection.queries[0]
                                                                     else []),
                 "junk": [p.name for p in same if p.kind == "junk"]}
        for kind, names in lists.items():
            (gt / f"{stem}_{kind}.txt").write_text("".join(f"{n}\n" for n in names))
        x1, y1, x2, y2 = q.box
        (gt / f"{stem}_query.txt").write_text(f"{prefix}{q.name} {x1:.1f} {y1:.1f} {x2:.1f} {y2:.1f}\n")
    return folder


def make_retrieval_dataset(root: str | os.PathLike, name: str = "roxford5k", layout: str | None = None,
                           n_landmarks: int = 4, queries_per_landmark: int = 2, easy: int = 3, hard: int = 2,
                           junk: int = 1, distractors: int = 10, image_size: int = 128, seed: int = 0,
                           corrupted: int = 0) -> Path:
    """Write one synthetic dataset as ``ROOT/<name>``; returns that folder.

    ``layout`` defaults to revisitop for names starting with ``r`` (``roxford5k``,
    ``rparis6k``) and original otherwise. Names containing ``paris`` get Paris's landmarks
    (different scenes from Oxford's) and ``paris_`` image names. Photos are ``image_size`` px
    on their long side, 4:3 or 3:4. The database holds ``n_landmarks * (easy + hard + junk) +
    distractors`` photos (original layout: plus the queries). Same arguments, same bytes.
    ``corrupted`` (original layout only): also write the first ``corrupted`` names of Paris6k's
    corrupted-image list as unreadable files, listed as positives of the first query (what the
    ``paris6k`` reader must leave out).
    """
    layout = layout or ("revisitop" if name.startswith("r") else "original")
    if layout not in ("revisitop", "original"):
        raise ValueError(f"layout must be revisitop or original, got {layout!r}")
    collection = build_collection(_family(name), n_landmarks, queries_per_landmark, easy, hard, junk,
                                  distractors, image_size, seed)
    folder = Path(root) / name
    if layout == "revisitop":
        return write_revisitop(collection, folder)
    return write_original(collection, folder, PARIS6K_CORRUPTED[:corrupted])


def make_retrieval_root(root: str | os.PathLike, names: tuple[str, ...] = ("roxford5k", "rparis6k"),
                        **kwargs: int) -> Path:
    """Write several synthetic datasets under ``root`` (e.g. a test set and its whitening set)."""
    for name in names:
        make_retrieval_dataset(root, name, **kwargs)
    return Path(root)
