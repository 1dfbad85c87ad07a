"""Instance retrieval with R-MAC: Oxford5k / Paris6k and revisited ROxford5k / RParis6k.

Semantics follow ../shared/PROTOCOLS.md, "Instance retrieval" (DeepCluster's
``eval_retrieval.py`` and revisitop):

- every image is resized so its largest side is ``image_size`` (1024; bilinear); a query is
  cropped to its box AFTER that resize (the box scaled alike), so the object keeps the scale
  it has in the database images; ``scales`` adds resized copies (multi-scale);
- R-MAC on a frozen conv tap (default: VGG16 ``conv5_3`` after BN+ReLU, before the last
  max-pool; AlexNet ``conv5``; ResNets ``res5``): 3 levels of square regions of side
  ``2 * min(H, W) / (l + 1)`` with ~40 % overlap (Tolias et al.'s grid), max-pool per region,
  L2, PCA-whitening, L2, sum over the regions, L2 (multi-scale: the per-scale descriptors are
  summed, then L2);
- the PCA-whitening is learned on the regions of the OTHER dataset (Paris for Oxford and vice
  versa), which must be under the same ROOT; ``whitening_fallback=true`` learns it on the
  evaluated database instead when that set is absent (transductive, recorded in the result);
- similarity is the inner product (faiss ``IndexFlatIP``); metrics follow revisitop
  (:mod:`dcbench.metrics.retrieval`): the old protocol (``oxford5k``/``paris6k``: good+ok
  positive, junk ignored) reports ``mAP``; the revisited one (``roxford5k``/``rparis6k``)
  reports ``mAP_{easy,medium,hard}`` and ``mP@{1,5,10}_{easy,medium,hard}``, all x100.

Region vectors (max-pooled and L2-normalised, before whitening) go through the feature cache
(:class:`dcbench.features.FeatureCache`), one entry per (tap, scale, image set): rows are
regions and the entry's index array names the image of each row. So the database, the queries
and the whitening set are each extracted once per checkpoint, and the whitening set of
``roxford5k`` (RParis6k's database) is the very entry ``rparis6k`` uses for its database.
Images of the same resized shape are batched together; the others go one by one.
"""
from __future__ import annotations

import hashlib
import logging
import math
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Sampler
from torchvision import transforms as T
from tqdm import tqdm

from dcbench.data import DataError, ImageDataset, SkipCounter, load_rgb, normalize, skip_collate
from dcbench.data.retrieval import RetrievalDataset, image_set_paths, read_retrieval_dataset
from dcbench.errors import UsageError
from dcbench.features import FeatureCache, feature_key, frozen, prepared_backbone, show_progress
from dcbench.metrics.retrieval import old_protocol_map, revisited_setups
from dcbench.results import MetricRow
from dcbench.protocol import EvalContext, Protocol, ProtocolOutput, register_protocol

log = logging.getLogger("dcbench")

#: shorter side below which an image (a small query box, an extreme panorama) is upscaled:
#: AlexNet's conv5 needs 31 px, VGG16's conv5_3 16 px
MIN_SIDE = 32
#: R-MAC grid: overlap wanted between neighbouring regions, candidate region counts (level 1)
RMAC_OVERLAP = 0.4
RMAC_STEPS = (2, 3, 4, 5, 6, 7)
#: eigenvalues below this fraction of the largest are raised to it (DeepCluster's PCA)
WHITENING_EPS_RATIO = 1e-5
#: the retrieval tap of each known architecture (PROTOCOLS.md)
DEFAULT_TAPS = ("conv5_3", "conv5", "res5")
KAPPAS = (1, 5, 10)
_ROWS_PER_CHUNK = 65536  # whitening works on region chunks: bounded memory on 100k+ regions


# ----------------------------------------------------------------------------- geometry
class Geometry(NamedTuple):
    """How one image is prepared: resize to ``resize``, crop ``crop`` (or not), scale to ``size``."""

    resize: tuple[int, int]
    crop: tuple[int, int, int, int] | None
    size: tuple[int, int]


def plan_geometry(width: int, height: int, max_side: int,
                  box: tuple[float, float, float, float] | None = None) -> Geometry:
    """Resize so the largest side is ``max_side``; crop the box scaled alike; upscale tiny results.

    As DeepCluster's ``eval_retrieval.py``: the box (``x1, y1, x2, y2`` in original pixels) is
    scaled by the resize ratio and rounded, so a query crop keeps the database's scale. A
    result whose shorter side is below :data:`MIN_SIDE` is upscaled to it (keeping the
    aspect), so every backbone has a feature map to pool.
    """
    ratio = max_side / max(width, height)
    resize = (max(1, round(width * ratio)), max(1, round(height * ratio)))
    crop = None
    size = resize
    if box is not None:
        x1, y1 = (min(max(round(v * ratio), 0), lim - 1) for v, lim in zip(box[:2], resize))
        x2, y2 = (min(max(round(v * ratio), lo + 1), lim) for v, lo, lim in zip(box[2:], (x1, y1), resize))
        crop = (x1, y1, x2, y2)
        size = (x2 - x1, y2 - y1)
    if min(size) < MIN_SIDE:
        up = MIN_SIDE / min(size)
        size = (max(MIN_SIDE, round(size[0] * up)), max(MIN_SIDE, round(size[1] * up)))
    return Geometry(resize, crop, size)


def prepare_image(img: Image.Image, max_side: int,
                  box: tuple[float, float, float, float] | None = None) -> Image.Image:
    """Apply :func:`plan_geometry` to a PIL image (bilinear resampling)."""
    geo = plan_geometry(img.width, img.height, max_side, box)
    out = img.resize(geo.resize, Image.Resampling.BILINEAR)
    if geo.crop is not None:
        out = out.crop(geo.crop)
    if out.size != geo.size:
        out = out.resize(geo.size, Image.Resampling.BILINEAR)
    return out


def header_size(path: str) -> tuple[int, int] | None:
    """(width, height) from the file header without decoding; None when unreadable."""
    try:
        with Image.open(path) as im:
            return im.size
    except Exception:  # noqa: BLE001 - unreadable files are skipped at decode time
        return None


class RetrievalImages(ImageDataset):
    """Images resized to a largest side of ``max_side`` (queries: cropped to their ``boxes``).

    Items are ``(normalised tensor, -1, index)``, or None for an unreadable file (skipped, as
    every dcbench dataset). ``root`` is the image folder, so the fingerprint does not depend
    on where the dataset lives; boxes are part of the fingerprint.
    """

    def __init__(self, paths: Sequence[str], root: str | Path, max_side: int,
                 boxes: Sequence[tuple[float, float, float, float] | None] | None = None) -> None:
        super().__init__(paths, root=str(root), transform=T.Compose([T.ToTensor(), normalize()]))
        self.max_side = max_side
        self.boxes = list(boxes) if boxes is not None else None

    def box(self, index: int) -> tuple[float, float, float, float] | None:
        """The crop box of image ``index`` (None: the whole image)."""
        return None if self.boxes is None else self.boxes[index]

    def load_image(self, index: int) -> Image.Image:
        return prepare_image(load_rgb(self.paths[index]), self.max_side, self.box(index))

    def shapes(self) -> list[tuple[int, int] | None]:
        """The prepared (width, height) of every image, from the headers (None: unreadable)."""
        out = []
        for i, path in enumerate(self.paths):
            size = header_size(path)
            out.append(None if size is None else plan_geometry(*size, self.max_side, self.box(i)).size)
        return out

    def fingerprint(self) -> str:
        files = super().fingerprint()
        if self.boxes is None:
            return files
        return hashlib.sha256(f"{files}|{self.boxes!r}".encode()).hexdigest()[:16]


class SameShapeBatches(Sampler):
    """Batches of up to ``batch_size`` indices whose prepared images share one shape.

    Images must be stacked into one tensor per forward pass; Oxford/Paris photos come in a
    few shapes (mostly 1024x768 and 768x1024), so grouping keeps batches full. Unknown shapes
    (unreadable headers) go alone; they are skipped at decode time.
    """

    def __init__(self, shapes: Sequence[tuple[int, int] | None], batch_size: int) -> None:
        groups: dict[Any, list[int]] = {}
        for i, shape in enumerate(shapes):
            groups.setdefault(shape if shape is not None else ("alone", i), []).append(i)
        self.batches = [members[s:s + batch_size] for members in groups.values()
                        for s in range(0, len(members), batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


# ----------------------------------------------------------------------------- R-MAC regions
def _region_starts(length: int, side: int, count: int) -> list[int]:
    """Top/left coordinates of ``count`` regions of ``side`` spread evenly over ``length``."""
    half = math.floor(side / 2 - 1)
    step = (length - side) / (count - 1) if count > 1 else 0.0
    starts = [math.floor(half + step * i) - half for i in range(count)]
    # the grid is computed on centres and may run past the far border by rounding: shift back
    return [min(max(s, 0), length - side) for s in starts]


def rmac_regions(height: int, width: int, levels: int = 3) -> list[tuple[int, int, int]]:
    """Square R-MAC regions ``(x, y, side)`` on a ``height x width`` map (Tolias et al., 2016).

    Level ``l`` (1..levels) uses regions of side ``floor(2 * min(H, W) / (l + 1))``: ``l``
    along the shorter dimension and ``l + m`` along the longer one, where ``m`` makes the
    level-1 regions overlap by about 40 % (``m = 0`` for a square map).
    """
    short, long_ = min(height, width), max(height, width)
    steps = np.asarray(RMAC_STEPS, dtype=np.float64)
    spacing = (long_ - short) / (steps - 1)
    extra = int(np.argmin(np.abs((short ** 2 - short * spacing) / short ** 2 - RMAC_OVERLAP))) + 1
    extra_w, extra_h = (extra, 0) if height < width else ((0, extra) if height > width else (0, 0))
    regions = []
    for level in range(1, levels + 1):
        side = math.floor(2 * short / (level + 1))
        if side < 1:
            continue  # the map is too small for this level
        for y in _region_starts(height, side, level + extra_h):
            for x in _region_starts(width, side, level + extra_w):
                regions.append((x, y, side))
    return regions


def pool_regions(fmap: torch.Tensor, levels: int) -> torch.Tensor:
    """``B x C x H x W`` -> ``B x R x C``: max over each R-MAC region, then L2 per region."""
    regions = rmac_regions(fmap.shape[-2], fmap.shape[-1], levels)
    pooled = [fmap[:, :, y:y + s, x:x + s].amax(dim=(-2, -1)) for x, y, s in regions]
    return F.normalize(torch.stack(pooled, dim=1).float(), dim=-1)


class Regions(NamedTuple):
    """Region vectors of an image set for one tap: rows are regions, ``owner`` their image."""

    vectors: np.ndarray  # float32 R x C, L2-normalised, before whitening
    owner: np.ndarray  # int64 R, dataset index of each region's image
    n_images: int  # images in the set (unreadable ones own no region)


class Extraction(NamedTuple):
    """What :func:`extract_regions` returns: regions per tap, and how they were obtained."""

    regions: dict[str, Regions]
    images_per_s: float | None  # None when every tap came from the cache
    cached: bool


def transform_id(max_side: int, cropped: bool) -> str:
    """Cache-key text of :func:`prepare_image` at ``max_side`` (crops are in the fingerprint)."""
    return f"retrieval:max-side={max_side}:bilinear:box-crop={'yes' if cropped else 'no'}:min-side={MIN_SIDE}"


def pooling_id(levels: int) -> str:
    """Cache-key text of :func:`pool_regions`."""
    return f"rmac-regions:levels={levels}:overlap={RMAC_OVERLAP}:max:l2"


def extract_regions(backbone: nn.Module, dataset: RetrievalImages, taps: Sequence[str], levels: int,
                    ckpt_sha: str, cache_dir: Path | None, batch_size: int = 4, workers: int = 0,
                    device: str | torch.device = "cpu", progress: bool = False) -> Extraction:
    """R-MAC region vectors of every readable image of ``dataset``, through the feature cache.

    ONE frozen forward per batch for all taps not cached yet. The cache entry of a tap stores
    the regions as rows and their image indices as the entry's index array.
    """
    cache = FeatureCache(cache_dir) if cache_dir is not None else None
    keys = {}
    if cache is not None:
        fingerprint = dataset.fingerprint()
        keys = {t: feature_key(ckpt_sha, t, transform_id(dataset.max_side, dataset.boxes is not None),
                               fingerprint, pooling_id(levels)) for t in taps}
    found: dict[str, Regions] = {}
    for tap in taps:
        hit = cache.load(keys[tap], mmap=True) if cache is not None else None
        if hit is not None:
            found[tap] = Regions(hit[0], hit[1], len(dataset))
    missing = [t for t in taps if t not in found]
    if not missing:
        return Extraction(found, None, True)
    started = time.perf_counter()
    fresh = _forward_regions(backbone, dataset, missing, levels, batch_size, workers, device, progress)
    rate = len(dataset) / max(time.perf_counter() - started, 1e-9)
    for tap, regions in fresh.items():
        if cache is not None:
            cache.save(keys[tap], regions.vectors, regions.owner)
        found[tap] = regions
    return Extraction({t: found[t] for t in taps}, rate, False)


def _forward_regions(backbone: nn.Module, dataset: RetrievalImages, taps: list[str], levels: int,
                     batch_size: int, workers: int, device: str | torch.device,
                     progress: bool) -> dict[str, Regions]:
    """One pass over ``dataset`` in same-shape batches, pooling the regions of every tap."""
    loader = DataLoader(dataset, batch_sampler=SameShapeBatches(dataset.shapes(), batch_size),
                        num_workers=workers, collate_fn=skip_collate,
                        pin_memory=torch.device(device).type == "cuda")
    counter = SkipCounter(dataset)
    vectors: dict[str, list[np.ndarray]] = {t: [] for t in taps}
    owners: dict[str, list[np.ndarray]] = {t: [] for t in taps}  # region counts differ per tap
    bar = tqdm(loader, desc=f"R-MAC {','.join(taps)}", unit="batch", disable=not show_progress(progress),
               leave=False)
    with frozen(backbone), torch.inference_mode():
        for images, _targets, idx, n_skipped in bar:
            counter.update(idx, n_skipped)
            if len(idx) == 0:
                continue
            out = backbone(images.to(device, non_blocking=True), taps=list(taps))
            for tap in taps:
                pooled = pool_regions(out[tap], levels)  # B x R x C
                vectors[tap].append(pooled.reshape(-1, pooled.shape[-1]).cpu().numpy())
                owners[tap].append(np.repeat(idx.numpy().astype(np.int64), pooled.shape[1]))
    counter.report()
    if not owners[taps[0]]:
        raise DataError(f"no readable image in {dataset.root}; check the files (every image failed to decode)")
    return {t: Regions(np.concatenate(vectors[t]).astype(np.float32), np.concatenate(owners[t]), len(dataset))
            for t in taps}


# ----------------------------------------------------------------------------- whitening + descriptors
@dataclass
class PCAWhitening:
    """PCA-whitening of region vectors, as DeepCluster's retrieval code.

    Centre, project on the top ``dim`` eigenvectors of the covariance, divide by the square
    root of their eigenvalues (eigenvalues below ``1e-5`` of the largest are raised to it).
    """

    mean: np.ndarray  # C, float64
    projection: np.ndarray  # C x dim, float32, eigenvectors / sqrt(eigenvalues)
    kept_energy: float  # fraction of the variance in the kept components

    @classmethod
    def fit(cls, blocks: Sequence[np.ndarray], dim: int) -> "PCAWhitening":
        """Fit on the rows of ``blocks`` (arrays or memmaps, N_i x C), read in chunks."""
        n = sum(len(b) for b in blocks)
        c = blocks[0].shape[1]
        total, gram = np.zeros(c), np.zeros((c, c))
        for chunk in _chunks(blocks):
            total += chunk.sum(axis=0)
            gram += chunk.T @ chunk
        mean = total / n
        cov = gram / n - np.outer(mean, mean)
        values, vectors = np.linalg.eigh(cov)
        values = np.maximum(values, values.max() * WHITENING_EPS_RATIO)
        order = np.argsort(values)[::-1][:dim]
        projection = vectors[:, order] / np.sqrt(values[order])
        return cls(mean, projection.astype(np.float32), float(values[order].sum() / values.sum()))

    @property
    def dim(self) -> int:
        """Output dimension."""
        return self.projection.shape[1]

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Whitened, L2-normalised rows of ``x`` (N x C) as float32."""
        out = (np.asarray(x, dtype=np.float64) - self.mean).astype(np.float32) @ self.projection
        return _l2_rows(out)


def _chunks(blocks: Sequence[np.ndarray]) -> Iterator[np.ndarray]:
    for block in blocks:
        for start in range(0, len(block), _ROWS_PER_CHUNK):
            yield np.asarray(block[start:start + _ROWS_PER_CHUNK], dtype=np.float64)


def _l2_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def rmac_descriptors(regions: Regions, whitening: PCAWhitening | None) -> np.ndarray:
    """``n_images x D`` R-MAC descriptors: whiten + L2 each region, sum per image, L2.

    Without ``whitening`` the L2-normalised regions are summed as they are. Images without
    regions (unreadable) get a zero row.
    """
    dim = whitening.dim if whitening is not None else regions.vectors.shape[1]
    out = torch.zeros(regions.n_images, dim, dtype=torch.float64)
    for start in range(0, len(regions.owner), _ROWS_PER_CHUNK):
        rows = np.asarray(regions.vectors[start:start + _ROWS_PER_CHUNK])
        rows = whitening.apply(rows) if whitening is not None else rows
        owner = torch.from_numpy(np.ascontiguousarray(regions.owner[start:start + _ROWS_PER_CHUNK]))
        out.index_add_(0, owner, torch.from_numpy(np.asarray(rows, dtype=np.float64)))  # 6x np.add.at
    return _l2_rows(out.numpy())


def multiscale_descriptors(per_scale: Sequence[np.ndarray]) -> np.ndarray:
    """Sum of the per-scale descriptors, L2-normalised (one scale: unchanged)."""
    return per_scale[0] if len(per_scale) == 1 else _l2_rows(np.sum(per_scale, axis=0))


def rank_database(database: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """``n_db x n_queries`` database rows by decreasing inner product (faiss ``IndexFlatIP``)."""
    import faiss  # imported here: heavy, and only retrieval needs it

    index = faiss.IndexFlatIP(database.shape[1])
    index.add(np.ascontiguousarray(database, dtype=np.float32))
    _, order = index.search(np.ascontiguousarray(queries, dtype=np.float32), len(database))
    return order.T


# ----------------------------------------------------------------------------- settings
def _help(text: str) -> dict[str, str]:
    return {"help": text}


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class RetrievalSettings:
    """Settings shared by the four retrieval protocols (defaults = PROTOCOLS.md)."""

    taps: list[str] | None = field(default=None, metadata=_help(
        "conv taps to describe with R-MAC, one forward pass (default: conv5_3 for vgg16, conv5 for "
        "alexnet, res5 for ResNets, else the last conv tap)"))
    image_size: int = field(default=1024, metadata=_help(
        "largest image side in px after resizing (queries are cropped after it). For a random init "
        "give the model's own size, e.g. random:vgg16,size=224: fc layers are built for image_size"))
    scales: list[float] = field(default_factory=lambda: [1.0], metadata=_help(
        "multi-scale: factors of image_size; the per-scale R-MAC descriptors are summed, then L2"))
    levels: int = field(default=3, metadata=_help("R-MAC levels (region side 2*min(H,W)/(l+1), ~40% overlap)"))
    query_crop: bool = field(default=True, metadata=_help("crop each query image to its bounding box"))
    whitening: str = field(default="", metadata=_help(
        "dataset under ROOT whose regions learn the PCA-whitening (the other one), or 'none'"))
    whitening_fallback: bool = field(default=False, metadata=_help(
        "when the whitening dataset is absent, learn the whitening on the evaluated database itself "
        "(transductive; recorded in the result) instead of failing"))
    whitening_dim: int = field(default=512, metadata=_help(
        "PCA-whitening output dims, capped at the tap's channels (DeepCluster: 512)"))
    batch_size: int = field(default=4, metadata=_help("images of one resized shape per forward pass"))
    cache: bool = field(default=True, metadata=_help("read/write the region vectors in the feature cache"))
    workers: int = field(default=4, metadata=_help("DataLoader worker processes"))
    seed: int = field(default=0, metadata=_help("seed of BN re-estimation (retrieval itself is deterministic)"))
    bn_recalibrate: Literal["auto", "on", "off"] = field(default="auto", metadata=_help(
        "re-estimate BatchNorm running stats on database images (square crops of image_size) on a copy "
        "before extracting; auto = on for random inits"))

    def validate(self) -> None:
        """Raise UsageError for impossible values."""
        for name, low in (("image_size", MIN_SIDE), ("levels", 1), ("whitening_dim", 1), ("batch_size", 1)):
            if getattr(self, name) < low:
                raise UsageError(f"bad value {getattr(self, name)} for {name}: must be at least {low}")
        if self.workers < 0:
            raise UsageError(f"bad value {self.workers} for workers: must be >= 0")
        if not self.scales or any(s <= 0 for s in self.scales):
            raise UsageError(f"bad value {self.scales} for scales: give positive factors, e.g. [1,0.707,0.5]")
        if any(round(self.image_size * s) < MIN_SIDE for s in self.scales):
            raise UsageError(f"scales {self.scales} make images smaller than {MIN_SIDE} px at image_size "
                             f"{self.image_size}; use larger factors")
        if self.taps is not None and not self.taps:
            raise UsageError("taps is empty: name at least one conv tap, or leave it unset for the default")
        if self.whitening != "none" and not _NAME.match(self.whitening):
            raise UsageError(f"bad value {self.whitening!r} for whitening: name a dataset folder under ROOT "
                             f"(e.g. rparis6k) or 'none'")


@dataclass
class ROxfordSettings(RetrievalSettings):
    """``roxford5k`` settings: whitening learned on RParis6k."""

    whitening: str = field(default="rparis6k", metadata=_help(
        "dataset under ROOT whose regions learn the PCA-whitening (default: the other one), or 'none'"))


@dataclass
class RParisSettings(RetrievalSettings):
    """``rparis6k`` settings: whitening learned on ROxford5k."""

    whitening: str = field(default="roxford5k", metadata=_help(
        "dataset under ROOT whose regions learn the PCA-whitening (default: the other one), or 'none'"))


@dataclass
class OxfordSettings(RetrievalSettings):
    """``oxford5k`` settings: whitening learned on Paris6k."""

    whitening: str = field(default="paris6k", metadata=_help(
        "dataset under ROOT whose regions learn the PCA-whitening (default: the other one), or 'none'"))


@dataclass
class ParisSettings(RetrievalSettings):
    """``paris6k`` settings: whitening learned on Oxford5k."""

    whitening: str = field(default="oxford5k", metadata=_help(
        "dataset under ROOT whose regions learn the PCA-whitening (default: the other one), or 'none'"))


def retrieval_taps(backbone: nn.Module, taps: Sequence[str] | None) -> list[str]:
    """``taps`` checked to be conv taps of ``backbone``; default: its retrieval tap."""
    conv = list(backbone.conv_tap_names)
    if taps is None:
        return [next((t for t in DEFAULT_TAPS if t in conv), conv[-1])]
    wanted = list(dict.fromkeys(taps))
    bad = [t for t in wanted if t not in conv]
    if bad:
        raise UsageError(f"tap '{bad[0]}' of {backbone.arch} is not a conv tap; R-MAC needs a feature map: "
                         f"choose from {', '.join(conv)}")
    return wanted


# ----------------------------------------------------------------------------- the protocols
def _layout_text(dataset: str, other: str, layout: str) -> str:
    if layout == "revisitop":
        files = f"ROOT/{dataset}/jpg/*.jpg and ROOT/{dataset}/gnd_{dataset}.pkl (revisitop layout)"
        gnd = f"gnd_{dataset}.pkl: dict with imlist, qimlist and gnd[i] = {{easy, hard, junk, bbx}}."
    else:
        files = f"ROOT/{dataset}/jpg/*.jpg and ROOT/{dataset}/gt/*_{{good,ok,junk,query}}.txt (original layout)"
        gnd = ("gt/: per query Q, Q_query.txt ('oxc1_IMAGE x1 y1 x2 y2'; Paris: 'IMAGE x1 y1 x2 y2') and "
               "Q_good.txt, Q_ok.txt, Q_junk.txt (one image name per line); the database is every image in jpg/.")
    return f"""\
{files}; whitening set ROOT/{other}/jpg/*.jpg
{gnd}
Whitening (setting 'whitening', default {other}): PCA-whitening learned on the R-MAC regions of
ROOT/<whitening>/: its database images when its ground truth is present (then the features are
shared with that protocol), else every image in its jpg/ folder. Without it, set
whitening_fallback=true (whiten on the database itself, recorded) or whitening=none.
A missing ground-truth file or listed image is an error; unreadable images are skipped (counted).
"""


class _RetrievalProtocol(Protocol):
    """Shared implementation; subclasses name the dataset and the protocol (old/revisited)."""

    dataset: ClassVar[str]
    revisited: ClassVar[bool]

    def model_input_size(self, settings: RetrievalSettings) -> int | None:
        """None: ``image_size`` is the largest image side, not the size fc layers are built for.

        Only conv taps are used, at any size, so a checkpoint must load at its own input size
        (a hook for the runner, which otherwise builds models at ``image_size``).
        """
        return None

    def check_data(self, root: Path, settings: RetrievalSettings) -> None:
        """Ground truth and listed images of the dataset, and the whitening set: DataError if missing."""
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DataError(f"data root {root} is not a folder; {self.name} expects: "
                            f"{self.data_layout.strip().splitlines()[0]}")
        read_retrieval_dataset(root, self.dataset)
        self._whitening_paths(root, settings)

    def _whitening_paths(self, root: Path, settings: RetrievalSettings) -> list[str] | None:
        """Image paths of the whitening set; None for whitening=none or the database fallback."""
        if settings.whitening == "none":
            return None
        try:
            return image_set_paths(root, settings.whitening)
        except DataError as exc:
            if settings.whitening_fallback:
                return None
            raise DataError(f"{exc} -- {self.name} learns its PCA-whitening on {settings.whitening} "
                            f"(ROOT/{settings.whitening}/jpg); add it, or --set whitening_fallback=true to "
                            f"whiten on the database itself (recorded), or --set whitening=none") from None

    def run(self, ckpt: Any, settings: RetrievalSettings, root: Path, ctx: EvalContext) -> ProtocolOutput:
        """Extract (or read) the regions, learn the whitening, rank the database, score."""
        root = Path(root).expanduser()
        started = time.perf_counter()
        self.check_data(root, settings)
        ds = read_retrieval_dataset(root, self.dataset)
        taps = retrieval_taps(ckpt.backbone, settings.taps)  # settings errors before expensive work
        white_paths = self._whitening_paths(root, settings)
        with torch.random.fork_rng(devices=[]), prepared_backbone(
                ckpt, settings.bn_recalibrate, _bn_dataset(ds, settings.image_size), settings.batch_size,
                settings.workers, ctx.device, settings.seed, ctx.progress) as (backbone, sha, bn_info):
            sets = _image_sets(ds, root, settings, white_paths)
            extracted = {(role, scale): extract_regions(backbone, images, taps, settings.levels, sha,
                                                        ctx.cache_dir if settings.cache else None,
                                                        settings.batch_size, settings.workers, ctx.device,
                                                        ctx.progress)
                         for (role, scale), images in sets.items()}
        rows, per_tap = [], {}
        for tap in taps:
            tap_rows, info = self._score_tap(tap, ds, settings, extracted)
            rows += tap_rows
            per_tap[tap] = info
        extra = self._extra(ds, settings, extracted, white_paths, bn_info, per_tap, started)
        return ProtocolOutput(rows, _fingerprint(ds, sets), extra)

    def _score_tap(self, tap: str, ds: RetrievalDataset, settings: RetrievalSettings,
                   extracted: dict[tuple[str, float], Extraction]) -> tuple[list[MetricRow], dict[str, Any]]:
        """Whitening, descriptors, ranking and metric rows of one tap."""
        _check_queries(ds, extracted, tap, settings.scales)
        whitening = _fit_whitening(tap, settings, extracted)
        db, queries = (multiscale_descriptors([rmac_descriptors(extracted[(role, s)].regions[tap], whitening)
                                               for s in settings.scales]) for role in ("database", "queries"))
        db_regions = extracted[("database", settings.scales[0])].regions[tap]
        kept = np.unique(db_regions.owner)  # unreadable database images are never ranked
        ranks = kept[rank_database(db[kept], queries)]
        info = {"whitening_dim": None if whitening is None else whitening.dim,
                "whitening_energy": None if whitening is None else round(whitening.kept_energy, 4),
                "regions_per_image": round(len(db_regions.owner) / max(len(kept), 1), 2),
                "descriptor_dim": int(db.shape[1]), "database_ranked": int(len(kept))}
        return self._metric_rows(ranks, ds, tap, settings.seed), info

    def _metric_rows(self, ranks: np.ndarray, ds: RetrievalDataset, tap: str, seed: int) -> list[MetricRow]:
        """``mAP`` (old protocol) or mAP and mP@k per revisited setup, x100; NaN setups left out."""
        if not self.revisited:
            result = old_protocol_map(ranks, ds.gnd)
            return _rows({"mAP": result.map}, tap, seed)
        values: dict[str, float] = {}
        for setup, result in revisited_setups(ranks, ds.gnd, KAPPAS).items():
            values[f"mAP_{setup}"] = result.map
            values.update({f"mP@{k}_{setup}": float(p) for k, p in zip(KAPPAS, result.mpr)})
        return _rows(values, tap, seed)

    def _extra(self, ds: RetrievalDataset, settings: RetrievalSettings, extracted: dict[tuple[str, float], Extraction],
               white_paths: list[str] | None, bn_info: dict, per_tap: dict, started: float) -> dict[str, Any]:
        """Everything needed to read and reproduce the numbers (the result's ``extra``)."""
        n_ranked = min(info["database_ranked"] for info in per_tap.values())
        whitened = "PCA-whitening, L2, " if settings.whitening != "none" else ""
        return {
            "dataset": ds.name, "layout": ds.layout,
            "protocol": "revisited (revisitop)" if self.revisited else "original (good+ok positive, junk ignored)",
            "database_images": len(ds.imlist), "queries": len(ds.qimlist),
            "skipped_images": {"database": len(ds.imlist) - n_ranked},
            "descriptor": f"R-MAC, {settings.levels} levels, overlap {RMAC_OVERLAP}, max-pool, L2, {whitened}sum, L2",
            "whitening": _whitening_info(ds, settings, white_paths), "whitening_eps_ratio": WHITENING_EPS_RATIO,
            "query_crop": settings.query_crop,
            "resize": f"largest side {settings.image_size} (bilinear), min side {MIN_SIDE}",
            "similarity": "inner product (faiss IndexFlatIP)", "kappas": list(KAPPAS),
            "images_per_s": {f"{role}@{scale}": None if e.images_per_s is None else round(e.images_per_s, 2)
                             for (role, scale), e in extracted.items()},
            "feature_cache": {f"{role}@{scale}": "hit" if e.cached else "extracted"
                              for (role, scale), e in extracted.items()},
            "taps": per_tap, "bn_recalibrate": bn_info,
            "retrieval_wall_s": round(time.perf_counter() - started, 3),
        }


def _fit_whitening(tap: str, settings: RetrievalSettings,
                   extracted: dict[tuple[str, float], Extraction]) -> PCAWhitening | None:
    """PCA-whitening on the whitening set's regions (all scales), or the database's as fallback."""
    if settings.whitening == "none":
        return None
    role = "whitening" if any(r == "whitening" for r, _ in extracted) else "database"
    blocks = [e.regions[tap].vectors for (r, _), e in extracted.items() if r == role]
    n_regions = sum(len(b) for b in blocks)
    # more dims than regions would whiten pure noise (only tiny test sets come near this)
    dim = min(settings.whitening_dim, blocks[0].shape[1], max(1, n_regions - 1))
    return PCAWhitening.fit(blocks, dim)


def _whitening_info(ds: RetrievalDataset, settings: RetrievalSettings,
                    white_paths: list[str] | None) -> dict[str, Any]:
    """Which images learned the whitening, and whether the transductive fallback was used."""
    if settings.whitening == "none":
        return {"dataset": None, "fallback_used": False}
    if white_paths is None:
        return {"dataset": "database (fallback: transductive)", "wanted": settings.whitening,
                "fallback_used": True, "images": len(ds.imlist)}
    return {"dataset": settings.whitening, "fallback_used": False, "images": len(white_paths)}


def _rows(values: dict[str, float], tap: str, seed: int) -> list[MetricRow]:
    rows = []
    for metric, value in values.items():
        if math.isnan(value):
            log.warning("%s: no query has positives, metric left out", metric)
            continue
        rows.append(MetricRow(metric, 100.0 * float(value), tap, "test", None, seed))
    return rows


def _bn_dataset(ds: RetrievalDataset, image_size: int) -> ImageDataset:
    """Database images as square crops of ``image_size`` (BN re-estimation needs equal shapes)."""
    transform = T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.ToTensor(), normalize()])
    return ImageDataset(ds.db_paths(), root=str(ds.image_dir), transform=transform)


def _image_sets(ds: RetrievalDataset, root: Path, settings: RetrievalSettings,
                white_paths: list[str] | None) -> dict[tuple[str, float], RetrievalImages]:
    """``{(role, scale): images}`` for the database, the queries and the whitening set."""
    boxes = ds.query_boxes() if settings.query_crop else None
    sets = {}
    for scale in settings.scales:
        side = round(settings.image_size * scale)
        sets[("database", scale)] = RetrievalImages(ds.db_paths(), ds.image_dir, side)
        sets[("queries", scale)] = RetrievalImages(ds.query_paths(), ds.image_dir, side, boxes)
        if white_paths is not None:
            sets[("whitening", scale)] = RetrievalImages(white_paths, root / settings.whitening / "jpg", side)
    return sets


def _check_queries(ds: RetrievalDataset, extracted: dict, tap: str, scales: Sequence[float]) -> None:
    """Every query must be readable: a query left out would silently change the benchmark."""
    for scale in scales:
        seen = set(np.unique(extracted[("queries", scale)].regions[tap].owner).tolist())
        missing = [i for i in range(len(ds.qimlist)) if i not in seen]
        if missing:
            raise DataError(f"query image {ds.query_paths()[missing[0]]} cannot be read; "
                            f"replace it from the original dataset")


def _fingerprint(ds: RetrievalDataset, sets: dict[tuple[str, float], RetrievalImages]) -> str:
    """One 16-hex fingerprint of the benchmark (files + ground truth) and the whitening set."""
    parts = [f"dataset:{ds.fingerprint()}"]
    white = [images for (role, _), images in sets.items() if role == "whitening"]
    if white:
        parts.append(f"whitening:{white[0].fingerprint()}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


@register_protocol
class ROxford5k(_RetrievalProtocol):
    """Revisited Oxford (revisitop): mAP Easy/Medium/Hard and mP@1,5,10 with R-MAC."""

    name: ClassVar[str] = "roxford5k"
    description: ClassVar[str] = "revisited Oxford5k instance retrieval (R-MAC, whitened on RParis6k): mAP E/M/H, mP@k"
    version: ClassVar[str] = "1"
    dataset: ClassVar[str] = "roxford5k"
    revisited: ClassVar[bool] = True
    Settings: ClassVar[type] = ROxfordSettings
    data_layout: ClassVar[str] = _layout_text("roxford5k", "rparis6k", "revisitop")


@register_protocol
class RParis6k(_RetrievalProtocol):
    """Revisited Paris (revisitop): mAP Easy/Medium/Hard and mP@1,5,10 with R-MAC."""

    name: ClassVar[str] = "rparis6k"
    description: ClassVar[str] = "revisited Paris6k instance retrieval (R-MAC, whitened on ROxford5k): mAP E/M/H, mP@k"
    version: ClassVar[str] = "1"
    dataset: ClassVar[str] = "rparis6k"
    revisited: ClassVar[bool] = True
    Settings: ClassVar[type] = RParisSettings
    data_layout: ClassVar[str] = _layout_text("rparis6k", "roxford5k", "revisitop")


@register_protocol
class Oxford5k(_RetrievalProtocol):
    """Original Oxford5k (DeepCluster paper): mAP with good+ok positive, junk ignored."""

    name: ClassVar[str] = "oxford5k"
    description: ClassVar[str] = "Oxford5k instance retrieval, paper protocol (R-MAC, whitened on Paris6k): mAP"
    version: ClassVar[str] = "1"
    dataset: ClassVar[str] = "oxford5k"
    revisited: ClassVar[bool] = False
    Settings: ClassVar[type] = OxfordSettings
    data_layout: ClassVar[str] = _layout_text("oxford5k", "paris6k", "original")


@register_protocol
class Paris6k(_RetrievalProtocol):
    """Original Paris6k (DeepCluster paper): mAP with good+ok positive, junk ignored."""

    name: ClassVar[str] = "paris6k"
    description: ClassVar[str] = "Paris6k instance retrieval, paper protocol (R-MAC, whitened on Oxford5k): mAP"
    version: ClassVar[str] = "1"
    dataset: ClassVar[str] = "paris6k"
    revisited: ClassVar[bool] = False
    Settings: ClassVar[type] = ParisSettings
    data_layout: ClassVar[str] = _layout_text("paris6k", "oxford5k", "original")
