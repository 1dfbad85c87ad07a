"""Instance retrieval with R-MAC: image preparation, regions, whitening, descriptors, ranking.

The engine side of the Oxford/Paris protocols (``dcbench.protocols.retrieval`` is the recipe;
:mod:`dcbench.data.retrieval` reads the datasets, :mod:`dcbench.metrics.retrieval` scores):

- every image is resized so its largest side is ``max_side`` (bilinear); a query is cropped
  to its box AFTER that resize (the box scaled alike; ``query_crop="after_resize"``), as
  DeepCluster's ``eval_retrieval.py`` does for the original Oxford/Paris, or BEFORE it
  (``"before_resize"``: the box cut from the original image, then resized by the ratio of the
  whole image), as revisitop prescribes (``example_process_images.py``: ``.crop(bbx)`` on the
  loaded image); either way the object keeps the scale it has in the database images;
- R-MAC (Tolias et al., ICLR 2016) on a frozen conv tap: ``levels`` levels of square regions
  of side ``2 * min(H, W) / (l + 1)`` with ~40 % overlap, max-pool per region, L2,
  PCA-whitening, L2, sum over the regions, L2 (multi-scale: per-scale descriptors summed, L2);
- the PCA-whitening is :class:`dcbench.cluster.PCAWhitening` with DeepCluster's retrieval
  recipe (float64, eigenvalues floored at ``1e-5`` of the largest);
- similarity is the inner product (faiss ``IndexFlatIP``).

A tap without a spatial map (a ViT's ``cls``: the final-normed CLS token, the descriptor of
facebookresearch/dino ``eval_image_retrieval.py``) is one region per image, the whole image's
vector (:class:`GlobalPool`); the same L2, whitening, L2 chain then applies to it.

Region vectors (max-pooled and L2-normalised, before whitening) come from the one extractor,
:func:`dcbench.features.extract_rows`, through its feature cache: a per-region pool makes
every region a row, and the entry's index array names the image of each row. Images of the
same prepared shape are batched together; the others go one by one.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Sampler
from torchvision import transforms as T

from dcbench.cluster.pca import PCAWhitening, l2_normalize_rows
from dcbench.data import DataError, ImageDataset, eval_transform, load_rgb, normalize
from dcbench.data.retrieval import RetrievalDataset
from dcbench.data.transforms import InputConvention, norm_id
from dcbench.features import extract_rows
from dcbench.metrics.retrieval import old_protocol_map, revisited_setups

#: shorter side below which an image (a small query box, an extreme panorama) is upscaled:
#: AlexNet's conv5 needs 31 px, VGG16's conv5_3 16 px
MIN_SIDE = 32
#: R-MAC grid: overlap wanted between neighbouring regions, candidate region counts (level 1)
RMAC_OVERLAP = 0.4
RMAC_STEPS = (2, 3, 4, 5, 6, 7)
#: eigenvalues below this fraction of the largest are raised to it (DeepCluster's PCA)
WHITENING_EPS_RATIO = 1e-5
_ROWS_PER_CHUNK = 65536  # whitening and descriptors work on region chunks: bounded memory on 100k+ regions

Box = tuple[float, float, float, float]


# ----------------------------------------------------------------------------- geometry
#: where a query is cut to its box: after the resize (DeepCluster, the original protocol), or
#: from the original image before it (revisitop); "none" keeps the whole query image
QUERY_CROPS = ("before_resize", "after_resize", "none")


class Geometry(NamedTuple):
    """How one image is prepared: resize to ``resize``, crop ``crop`` (or not), scale to ``size``;
    with ``crop_first`` the crop (in original pixels) comes before the resize, and ``resize`` is
    the whole image's (the crop is scaled straight to ``size``)."""

    resize: tuple[int, int]
    crop: tuple[int, int, int, int] | None
    size: tuple[int, int]
    crop_first: bool = False


def _clamped_box(box: Box, scale: float, limits: tuple[int, int]) -> tuple[int, int, int, int]:
    """``box * scale`` rounded and kept inside ``limits`` (width, height), at least 1 px wide."""
    x1, y1 = (min(max(round(v * scale), 0), lim - 1) for v, lim in zip(box[:2], limits))
    x2, y2 = (min(max(round(v * scale), lo + 1), lim) for v, lo, lim in zip(box[2:], (x1, y1), limits))
    return x1, y1, x2, y2


def plan_geometry(width: int, height: int, max_side: int, box: Box | None = None,
                  crop_first: bool = False) -> Geometry:
    """Resize so the largest side is ``max_side``; crop the box; upscale tiny results.

    The box (``x1, y1, x2, y2`` in original pixels) is either scaled by the resize ratio and
    rounded, then cut from the resized image (DeepCluster's ``eval_retrieval.py``), or, with
    ``crop_first``, rounded and cut from the original image (revisitop; PIL's ``crop`` rounds
    the same way), then resized by the whole image's ratio. Either way a query crop keeps the
    database's scale. A result whose shorter side is below :data:`MIN_SIDE` is upscaled to it
    (keeping the aspect), so every backbone has a feature map to pool.
    """
    ratio = max_side / max(width, height)
    resize = (max(1, round(width * ratio)), max(1, round(height * ratio)))
    crop = None
    size = resize
    if box is not None and crop_first:
        crop = _clamped_box(box, 1.0, (width, height))
        size = (max(1, round((crop[2] - crop[0]) * ratio)), max(1, round((crop[3] - crop[1]) * ratio)))
    elif box is not None:
        crop = _clamped_box(box, ratio, resize)
        size = (crop[2] - crop[0], crop[3] - crop[1])
    if min(size) < MIN_SIDE:
        up = MIN_SIDE / min(size)
        size = (max(MIN_SIDE, round(size[0] * up)), max(MIN_SIDE, round(size[1] * up)))
    return Geometry(resize, crop, size, crop_first and crop is not None)


def prepare_image(img: Image.Image, max_side: int, box: Box | None = None, crop_first: bool = False) -> Image.Image:
    """Apply :func:`plan_geometry` to a PIL image (bilinear resampling)."""
    geo = plan_geometry(img.width, img.height, max_side, box, crop_first)
    if geo.crop_first:
        return img.crop(geo.crop).resize(geo.size, Image.Resampling.BILINEAR)
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
    on where the dataset lives; boxes are part of the fingerprint. ``crop_first``: boxes are
    cut from the original images, before the resize (see :func:`plan_geometry`). ``convention``:
    the input convention whose mean and std normalise the images (default: ImageNet's); its
    filter and crop ratio do not apply (the resize to ``max_side`` is the protocol's, bilinear).
    """

    def __init__(self, paths: Sequence[str], root: str | Path, max_side: int,
                 boxes: Sequence[Box | None] | None = None, crop_first: bool = False,
                 convention: InputConvention | None = None) -> None:
        self.convention = convention or InputConvention()
        norm = normalize() if self.convention.source is None else self.convention.normalize()
        super().__init__(paths, root=str(root), transform=T.Compose([T.ToTensor(), norm]))
        self.max_side = max_side
        self.boxes = list(boxes) if boxes is not None else None
        self.crop_first = crop_first

    def box(self, index: int) -> Box | None:
        """The crop box of image ``index`` (None: the whole image)."""
        return None if self.boxes is None else self.boxes[index]

    def load_image(self, index: int) -> Image.Image:
        return prepare_image(load_rgb(self.paths[index]), self.max_side, self.box(index), self.crop_first)

    def shapes(self) -> list[tuple[int, int] | None]:
        """The prepared (width, height) of every image, from the headers (None: unreadable)."""
        out = []
        for i, path in enumerate(self.paths):
            size = header_size(path)
            out.append(None if size is None else plan_geometry(*size, self.max_side, self.box(i), self.crop_first).size)
        return out

    def same_shape_batches(self, indices: Sequence[int], batch_size: int) -> "SameShapeBatches":
        """Batches of ``indices`` by prepared shape (a ``batch_sampler`` for the extractor)."""
        shapes = self.shapes()
        return SameShapeBatches([shapes[i] for i in indices], batch_size, indices)

    @property
    def transform_id(self) -> str:
        """Feature-cache text of :func:`prepare_image` at ``max_side`` (crops are in the fingerprint)."""
        # "yes" (crop after the resize) keeps the cache ids of version 1
        cropped = "no" if self.boxes is None else ("before-resize" if self.crop_first else "yes")
        # a preset's normalisation adds nothing, so the ids of earlier caches stay
        norm = "" if self.convention.source is None else f":{norm_id(self.convention)}"
        return f"retrieval:max-side={self.max_side}:bilinear:box-crop={cropped}:min-side={MIN_SIDE}{norm}"

    def fingerprint(self) -> str:
        files = super().fingerprint()
        if self.boxes is None:
            return files
        return hashlib.sha256(f"{files}|{self.boxes!r}".encode()).hexdigest()[:16]


class SameShapeBatches(Sampler):
    """Batches of up to ``batch_size`` indices whose prepared images share one shape.

    Images must be stacked into one tensor per forward pass; Oxford/Paris photos come in a
    few shapes (mostly 1024x768 and 768x1024), so grouping keeps batches full. Unknown shapes
    (unreadable headers) go alone; they are skipped at decode time. ``indices`` (default
    ``0..len(shapes)-1``) are the dataset indices the shapes belong to.
    """

    def __init__(self, shapes: Sequence[tuple[int, int] | None], batch_size: int,
                 indices: Sequence[int] | None = None) -> None:
        indices = range(len(shapes)) if indices is None else indices
        groups: dict[Any, list[int]] = {}
        for i, shape in zip(indices, shapes):
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


class RMACPool:
    """:func:`pool_regions` as a per-region pool of the extractor (one row per region)."""

    per_region = True

    def __init__(self, levels: int) -> None:
        self.levels = levels
        self.pool_id = f"rmac-regions:levels={levels}:overlap={RMAC_OVERLAP}:max:l2"  # the cache key's part

    def __call__(self, fmap: torch.Tensor) -> torch.Tensor:
        return pool_regions(fmap, self.levels)


class GlobalPool:
    """A 2-D tap (``B x D``, e.g. a ViT's ``cls``) as ONE region per image, L2-normalised
    (``B x 1 x D``): the global descriptor of DINO's eval_image_retrieval.py, in R-MAC's chain."""

    per_region = True
    pool_id = "global:l2"  # the cache key's part

    def __call__(self, feature: torch.Tensor) -> torch.Tensor:
        if feature.dim() != 2:
            raise ValueError(f"GlobalPool takes N x D features, got shape {tuple(feature.shape)}")
        return F.normalize(feature.float(), dim=-1)[:, None, :]


def region_pool(backbone: nn.Module, tap: str, levels: int) -> RMACPool | GlobalPool:
    """R-MAC on a conv tap (a feature map), the global descriptor on any other tap."""
    return RMACPool(levels) if tap in backbone.conv_tap_names else GlobalPool()


class Regions(NamedTuple):
    """Region vectors of an image set for one tap: rows are regions, ``owner`` their image."""

    vectors: np.ndarray  # float32 R x C, L2-normalised, before whitening
    owner: np.ndarray  # int64 R, dataset index of each region's image
    n_images: int  # images in the set (unreadable ones own no region)


class RegionExtraction(NamedTuple):
    """What :func:`extract_regions` returns: regions per tap, and how they were obtained."""

    regions: dict[str, Regions]
    images_per_s: float | None  # None when every tap came from the cache
    cached: bool


def extract_regions(backbone: nn.Module, dataset: RetrievalImages, taps: Sequence[str], levels: int,
                    ckpt_sha: str, cache_dir: Path | None = None, batch_size: int = 4, workers: int = 0,
                    device: str | torch.device = "cpu", progress: bool = False,
                    rows_of: Callable[..., Any] | None = None) -> RegionExtraction:
    """R-MAC region vectors of every readable image of ``dataset``, through the feature cache.

    ONE frozen forward per same-shape batch for all taps not cached yet (the extractor).
    ``rows_of``: the run context's :meth:`~dcbench.protocol.RunContext.extract_rows` (its cache,
    batch size, workers, device and progress; under torchrun each rank forwards its block of the
    same-shape batches and every rank gets all regions, in dataset order); without it, the
    extractor with the arguments given here, in this process.
    """
    pools = {t: region_pool(backbone, t, levels) for t in taps}
    options = {"mmap": True, "batch_sampler": dataset.same_shape_batches, "desc": f"R-MAC {','.join(taps)}"}
    if rows_of is not None:
        out = rows_of(backbone, ckpt_sha, dataset, taps, pools, dataset.transform_id, **options)
    else:
        out = extract_rows(backbone, dataset, taps, pools, dataset.transform_id, ckpt_sha,
                           cache_dir, batch_size, workers, device, progress, **options)
    regions = {t: Regions(rows.rows, rows.owner, len(dataset)) for t, rows in out.taps.items()}
    return RegionExtraction(regions, out.items_per_s, not set(taps) - set(out.cached))


# ----------------------------------------------------------------------------- image sets
#: ``(role, scale)`` -> images; roles: database, queries, whitening
ImageSets = dict[tuple[str, float], RetrievalImages]
Extracted = Mapping[tuple[str, float], RegionExtraction]


def image_sets(ds: RetrievalDataset, scales: Sequence[float], image_size: int, query_crop: str,
               whitening: tuple[Path, list[str]] | None, convention: InputConvention | None = None) -> ImageSets:
    """The database, the queries (cut to their boxes per ``query_crop``, one of
    :data:`QUERY_CROPS`) and the whitening set (``(image folder, paths)``, or None) at every
    scale of ``image_size``, normalised with ``convention``'s mean and std (default: ImageNet's)."""
    if query_crop not in QUERY_CROPS:
        raise ValueError(f"query_crop must be one of {', '.join(QUERY_CROPS)}, got {query_crop!r}")
    boxes = None if query_crop == "none" else ds.query_boxes()
    sets = {}
    for scale in scales:
        side = round(image_size * scale)
        sets[("database", scale)] = RetrievalImages(ds.db_paths(), ds.image_dir, side, convention=convention)
        sets[("queries", scale)] = RetrievalImages(ds.query_paths(), ds.image_dir, side, boxes,
                                                   crop_first=query_crop == "before_resize", convention=convention)
        if whitening is not None:
            sets[("whitening", scale)] = RetrievalImages(whitening[1], whitening[0], side, convention=convention)
    return sets


def bn_images(ds: RetrievalDataset, image_size: int, convention: InputConvention | None = None) -> ImageDataset:
    """Database images as square crops of ``image_size`` (BN re-estimation needs equal shapes),
    normalised with ``convention``'s mean and std (default: ImageNet's)."""
    if convention is None or convention.source is None:
        transform = eval_transform(image_size, image_size)
    else:
        transform = T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.ToTensor(), convention.normalize()])
    return ImageDataset(ds.db_paths(), root=str(ds.image_dir), transform=transform)


def sets_fingerprint(ds: RetrievalDataset, sets: ImageSets) -> str:
    """One 16-hex fingerprint of the benchmark (files + ground truth) and the whitening set."""
    parts = [f"dataset:{ds.fingerprint()}"]
    white = [images for (role, _), images in sets.items() if role == "whitening"]
    if white:
        parts.append(f"whitening:{white[0].fingerprint()}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def check_queries(ds: RetrievalDataset, extracted: Extracted, tap: str, scales: Sequence[float]) -> None:
    """Every query must be readable: a query left out would silently change the benchmark."""
    for scale in scales:
        seen = set(np.unique(extracted[("queries", scale)].regions[tap].owner).tolist())
        missing = [i for i in range(len(ds.qimlist)) if i not in seen]
        if missing:
            raise DataError(f"query image {ds.query_paths()[missing[0]]} cannot be read; "
                            f"replace it from the original dataset")


# ----------------------------------------------------------------------------- whitening + descriptors
def learn_whitening(blocks: Sequence[np.ndarray], dim: int) -> PCAWhitening:
    """PCA-whitening of region vectors (N_i x C blocks, arrays or memmaps), DeepCluster's recipe.

    Centre, project on the top ``dim`` eigenvectors of the covariance, divide by the square
    root of their eigenvalues (eigenvalues below ``1e-5`` of the largest are raised to it).
    """
    white = PCAWhitening(dim, eps=WHITENING_EPS_RATIO, eps_rule="relative_floor", precision="float64")
    return white.fit(list(blocks), chunk_rows=_ROWS_PER_CHUNK)


def whitening_for(extracted: Extracted, tap: str, dim: int) -> PCAWhitening:
    """Whitening learned on the whitening set's regions (all scales), else on the database's."""
    role = "whitening" if any(r == "whitening" for r, _ in extracted) else "database"
    blocks = [e.regions[tap].vectors for (r, _), e in extracted.items() if r == role]
    n_regions = sum(len(b) for b in blocks)
    # more dims than regions would whiten pure noise (only tiny test sets come near this)
    return learn_whitening(blocks, min(dim, blocks[0].shape[1], max(1, n_regions - 1)))


def rmac_descriptors(regions: Regions, whitening: PCAWhitening | None) -> np.ndarray:
    """``n_images x D`` R-MAC descriptors: whiten + L2 each region, sum per image, L2.

    Without ``whitening`` the L2-normalised regions are summed as they are. Images without
    regions (unreadable) get a zero row.
    """
    dim = whitening.dim if whitening is not None else regions.vectors.shape[1]
    out = torch.zeros(regions.n_images, dim, dtype=torch.float64)
    for start in range(0, len(regions.owner), _ROWS_PER_CHUNK):
        rows = np.asarray(regions.vectors[start:start + _ROWS_PER_CHUNK])
        rows = whitening.transform(rows) if whitening is not None else rows
        owner = torch.from_numpy(np.ascontiguousarray(regions.owner[start:start + _ROWS_PER_CHUNK]))
        out.index_add_(0, owner, torch.from_numpy(np.asarray(rows, dtype=np.float64)))  # 6x np.add.at
    return l2_normalize_rows(out.numpy())


def multiscale_descriptors(per_scale: Sequence[np.ndarray]) -> np.ndarray:
    """Sum of the per-scale descriptors, L2-normalised (one scale: unchanged)."""
    return per_scale[0] if len(per_scale) == 1 else l2_normalize_rows(np.sum(per_scale, axis=0))


def rank_database(database: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """``n_db x n_queries`` database rows by decreasing inner product (faiss ``IndexFlatIP``)."""
    import faiss  # imported here: heavy, and only retrieval needs it

    index = faiss.IndexFlatIP(database.shape[1])
    index.add(np.ascontiguousarray(database, dtype=np.float32))
    _, order = index.search(np.ascontiguousarray(queries, dtype=np.float32), len(database))
    return order.T


def rank_tap(extracted: Extracted, tap: str, scales: Sequence[float],
             whitening: PCAWhitening | None) -> tuple[np.ndarray, dict[str, Any]]:
    """Rank the readable database images for every query with ``tap``'s R-MAC descriptors.

    Returns ``(ranks, info)``: ranks as :func:`rank_database` in dataset indices (unreadable
    database images are never ranked), and the numbers that describe the descriptors.
    """
    db, queries = (multiscale_descriptors([rmac_descriptors(extracted[(role, s)].regions[tap], whitening)
                                           for s in scales]) for role in ("database", "queries"))
    db_regions = extracted[("database", scales[0])].regions[tap]
    kept = np.unique(db_regions.owner)
    ranks = kept[rank_database(db[kept], queries)]
    info = {"whitening_dim": None if whitening is None else whitening.dim,
            "whitening_energy": None if whitening is None else round(whitening.kept_energy_, 4),
            "regions_per_image": round(len(db_regions.owner) / max(len(kept), 1), 2),
            "descriptor_dim": int(db.shape[1]), "database_ranked": int(len(kept))}
    return ranks, info


def retrieval_scores(ranks: np.ndarray, gnd: Sequence[Mapping[str, Any]], revisited: bool,
                     kappas: Sequence[int]) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """``mAP`` (old protocol: good+ok positive, junk ignored), or ``mAP_<setup>`` and
    ``mP@k_<setup>`` for the revisited Easy/Medium/Hard setups; fractions in 0-1, NaN when no
    query has positives. Also, per mAP metric, the AP of each query that has positives (in query
    order): their mean is the mAP, so the tables' paired bootstrap resamples queries."""
    results = {"mAP": old_protocol_map(ranks, gnd)} if not revisited else \
        {f"mAP_{setup}": result for setup, result in revisited_setups(ranks, gnd, kappas).items()}
    values: dict[str, float] = {}
    per_query: dict[str, np.ndarray] = {}
    for metric, result in results.items():
        values[metric] = result.map
        per_query[metric] = result.aps[~np.isnan(result.aps)]
        if revisited:
            setup = metric.removeprefix("mAP_")
            values.update({f"mP@{k}_{setup}": float(p) for k, p in zip(kappas, result.mpr)})
    return values, per_query
