"""Instance retrieval with R-MAC: Oxford5k / Paris6k and revisited ROxford5k / RParis6k.

Sources (the standard of PROTOCOLS.md, "Instance retrieval"):

- DeepCluster (Caron et al., ECCV 2018, sec. 5 and facebookresearch/deepcluster
  ``eval_retrieval.py``): VGG16 ``conv5_3`` after BN+ReLU, final max-pool removed (AlexNet:
  ``conv5``); largest image side 1024; R-MAC with 3 levels (Tolias et al., ICLR 2016), per
  region max-pool, L2, PCA-whitening learned on the OTHER dataset (Paris for Oxford and vice
  versa), L2, sum, L2; inner-product similarity; queries cropped to their box after resizing;
  Paris's 20 corrupted images left out (``Dataset.blacklisted``).
  Paper (VGG16): DeepCluster Oxford 61.0, Paris 72.0 mAP.
- revisitop (filipradenovic/revisitop, ``example_evaluate.py``, ``compute.py`` and
  ``example_process_images.py``): the revisited ground truth and its Easy/Medium/Hard setups,
  mAP and mP@k for k in {1, 5, 10}; queries cut to their box from the ORIGINAL image before any
  processing (``query_crop=before_resize``, the default of ``roxford5k`` / ``rparis6k``).

The old protocol (``oxford5k`` / ``paris6k``: good+ok positive, junk ignored) reports ``mAP``;
the revisited one (``roxford5k`` / ``rparis6k``) ``mAP_{easy,medium,hard}`` and
``mP@{1,5,10}_{easy,medium,hard}``, all x100. ``whitening_fallback=true`` learns the whitening
on the evaluated database when the other dataset is absent (transductive, recorded).
R-MAC, whitening, ranking and the image preparation live in :mod:`dcbench.retrieval`; region
vectors go through the one extractor and its feature cache, so the database, the queries and
the whitening set are each extracted once per checkpoint (``roxford5k``'s whitening set IS
``rparis6k``'s database entry).

Published weights (timm / torchvision / hf-hub) are normalised with their own mean and std
(``input_convention=weights``, see :func:`dcbench.data.transforms.resolve_convention`); their
interpolation and crop ratio do not apply (R-MAC reads the whole image resized bilinearly to its
largest side, the protocol's geometry). Other checkpoints keep ImageNet mean/std, exactly as before.
The convention is recorded in ``extra.input_convention``.

ViTs: the default tap is ``cls``, the normed CLS token as ONE global descriptor per image (the
same L2 / whitening / L2 chain), as facebookresearch/dino ``eval_image_retrieval.py`` ranks (its
Oxford command, no whitening, whole queries, 224 px: ``--set whitening=none query_crop=none
image_size=224``). Block taps (patch tokens as C x H/p x W/p maps) get R-MAC (dcbench choice).
"""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from torch import nn

from dcbench.data import DataError
from dcbench.data.retrieval import RetrievalDataset, image_set_paths, read_retrieval_dataset
from dcbench.data.transforms import ConventionMode, describe_applied, resolve_uncropped_convention
from dcbench.errors import UsageError
from dcbench.models.vit import ViTBackbone
from dcbench.protocol import (EvalContext, FrozenFeatureSettings, Protocol, ProtocolOutput, register_protocol,
                              setting)
from dcbench.provenance import FROZEN_FEATURE_SOURCES
from dcbench.results import MetricRow, outcome_key
from dcbench.retrieval import (MIN_SIDE, RMAC_OVERLAP, WHITENING_EPS_RATIO, Extracted, bn_images, check_queries,
                               extract_regions, image_sets, rank_tap, retrieval_scores, sets_fingerprint,
                               whitening_for)

log = logging.getLogger("dcbench")

#: the retrieval tap of each known architecture (DeepCluster eval_retrieval.py; ResNets: res5)
DEFAULT_TAPS = ("conv5_3", "conv5", "res5")
#: revisitop's mP@k (example_evaluate.py: ks = [1, 5, 10])
KAPPAS = (1, 5, 10)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_WHITENING_HELP = "dataset under ROOT whose regions learn the PCA-whitening (default: the other one), or 'none'"


# ----------------------------------------------------------------------------- settings
@dataclass
class RetrievalSettings(FrozenFeatureSettings):
    """Settings shared by the four retrieval protocols (defaults: DeepCluster eval_retrieval.py)."""

    taps: list[str] | None = setting(
        None, "conv taps to describe with R-MAC, one forward pass (default: conv5_3 for vgg16, conv5 for "
              "alexnet, res5 for ResNets, cls for ViTs (a global descriptor), else the last conv tap)", numbers=False)
    # DeepCluster eval_retrieval.py: --imsize 1024 (largest side)
    image_size: int = setting(
        1024, "largest image side in px after resizing (queries are cropped after it). For a random init "
              "give the model's own size, e.g. random:vgg16,size=224: fc layers are built for image_size")
    scales: list[float] = setting(
        help="multi-scale: factors of image_size; the per-scale R-MAC descriptors are summed, then L2",
        factory=lambda: [1.0])
    # Tolias et al. 2016 / DeepCluster: L = 3
    levels: int = setting(3, "R-MAC levels (region side 2*min(H,W)/(l+1), ~40% overlap)")
    # DeepCluster eval_retrieval.py ImageHelper.load_and_prepare_image: resize, then crop the scaled roi
    query_crop: Literal["before_resize", "after_resize", "none"] = setting(
        "after_resize", "cut each query to its box after the resize (box scaled alike; DeepCluster), before it "
                        "(from the original image; revisitop), or not at all")
    whitening: str = setting("", "dataset under ROOT whose regions learn the PCA-whitening (the other one), or 'none'")
    whitening_fallback: bool = setting(
        False, "when the whitening dataset is absent, learn the whitening on the evaluated database itself "
               "(transductive; recorded in the result) instead of failing")
    # DeepCluster eval_retrieval.py: PCA to 512 dims (VGG16 conv5_3 has 512 channels)
    whitening_dim: int = setting(512, "PCA-whitening output dims, capped at the tap's channels (DeepCluster: 512)")
    input_convention: ConventionMode = setting(
        "weights", "weights: published weights (timm/tv/hf-hub) are normalised with their own mean and std (the "
                   "resize stays bilinear, no crop); preset: always ImageNet mean/std")
    batch_size: int = setting(4, "images of one resized shape per forward pass")
    cache: bool = setting(True, "read/write the region vectors in the feature cache", numbers=False)
    seed: int = setting(0, "seed of BN re-estimation (retrieval itself is deterministic)", numbers=False)
    bn_recalibrate: Literal["auto", "on", "off"] = setting(
        "auto", "re-estimate BatchNorm running stats on database images (square crops of image_size) on a copy "
                "before extracting; auto = on for random inits")

    def validate(self) -> None:
        """Raise UsageError for impossible values."""
        if self.taps is not None and not self.taps:
            raise UsageError("taps is empty: name at least one conv tap, or leave it unset for the default")
        super().validate()
        for name, low in (("image_size", MIN_SIDE), ("levels", 1), ("whitening_dim", 1)):
            if getattr(self, name) < low:
                raise UsageError(f"bad value {getattr(self, name)} for {name}: must be at least {low}")
        if not self.scales or any(s <= 0 for s in self.scales):
            raise UsageError(f"bad value {self.scales} for scales: give positive factors, e.g. [1,0.707,0.5]")
        if any(round(self.image_size * s) < MIN_SIDE for s in self.scales):
            raise UsageError(f"scales {self.scales} make images smaller than {MIN_SIDE} px at image_size "
                             f"{self.image_size}; use larger factors")
        if self.whitening != "none" and not _NAME.match(self.whitening):
            raise UsageError(f"bad value {self.whitening!r} for whitening: name a dataset folder under ROOT "
                             f"(e.g. rparis6k) or 'none'")


# Presets: each dataset is whitened on the other one (DeepCluster eval_retrieval.py).
_QUERY_CROP_HELP = ("cut each query to its box from the original image before the resize (revisitop), after "
                    "the resize (box scaled alike; DeepCluster), or not at all")


@dataclass
class ROxfordSettings(RetrievalSettings):
    """``roxford5k`` settings: whitening learned on RParis6k, queries cropped as revisitop."""

    query_crop: Literal["before_resize", "after_resize", "none"] = setting("before_resize", _QUERY_CROP_HELP)
    whitening: str = setting("rparis6k", _WHITENING_HELP)


@dataclass
class RParisSettings(RetrievalSettings):
    """``rparis6k`` settings: whitening learned on ROxford5k, queries cropped as revisitop."""

    query_crop: Literal["before_resize", "after_resize", "none"] = setting("before_resize", _QUERY_CROP_HELP)
    whitening: str = setting("roxford5k", _WHITENING_HELP)


@dataclass
class OxfordSettings(RetrievalSettings):
    """``oxford5k`` settings: whitening learned on Paris6k."""

    whitening: str = setting("paris6k", _WHITENING_HELP)


@dataclass
class ParisSettings(RetrievalSettings):
    """``paris6k`` settings: whitening learned on Oxford5k."""

    whitening: str = setting("oxford5k", _WHITENING_HELP)


def retrieval_taps(backbone: nn.Module, taps: Sequence[str] | None) -> list[str]:
    """``taps`` checked to be conv taps of ``backbone`` (R-MAC) or, on a ViT, its token features
    (``cls``, ``avgpool``, ``clsN``: global descriptors); default: its retrieval tap (ViTs: ``cls``,
    DINO eval_image_retrieval.py's descriptor)."""
    conv = list(backbone.conv_tap_names)
    vit = isinstance(backbone, ViTBackbone)
    if taps is None:
        return [backbone.image_feature_tap] if vit else [next((t for t in DEFAULT_TAPS if t in conv), conv[-1])]
    wanted = list(dict.fromkeys(taps))
    bad = [t for t in wanted if t not in conv and not (vit and backbone.has_tap(t))]
    if bad:
        extra = f" (or a global ViT tap: {backbone.image_feature_tap}, avgpool)" if vit else ""
        raise UsageError(f"tap '{bad[0]}' of {backbone.arch} is not a conv tap; R-MAC needs a feature map: "
                         f"choose from {', '.join(conv)}{extra}")
    return wanted


# ----------------------------------------------------------------------------- provenance
_DC_RET = "facebookresearch/deepcluster eval_retrieval.py"
RETRIEVAL_SOURCES = {**FROZEN_FEATURE_SOURCES,
    "seed": "dcbench choice: seeds BN re-estimation only (retrieval is deterministic); cannot be a deviation",
    "batch_size": "dcbench choice: images of one shape per forward pass (eval_retrieval.py: one at a time); "
                  "moves only BN re-estimation of random inits",
    "taps": f"{_DC_RET}: net.features without its last layer (VGG16 conv5_3 after BN + ReLU, final max-pool "
            "removed); AlexNet conv5 and ResNet res5 by the same rule (dcbench choice); ViTs: cls, the normed CLS "
            "token as one global descriptor, facebookresearch/dino eval_image_retrieval.py (vits with num_classes=0; "
            "DINO: no whitening, uncropped queries, --imsize 224 on Oxford: --set whitening=none query_crop=none "
            "image_size=224)",
    "image_size": f"{_DC_RET} --S 1024 (largest side, Image.BILINEAR); below 32 px a side is upscaled "
                  "(dcbench choice, for tiny query boxes only)",
    "scales": f"{_DC_RET} --multires off by default: one scale",
    "levels": f"{_DC_RET} --L 3 (Tolias et al., ICLR 2016 R-MAC, get_rmac_region_coordinates)",
    "whitening_fallback": "dcbench choice: off; learning the whitening on the evaluated database is transductive",
    "whitening_dim": f"{_DC_RET} --n_pca 512 (PCA.fit: eigenvalues floored at 1e-5 of the largest)",
    "input_convention": "dcbench choice (issue 19): published weights (timm pretrained_cfg, torchvision "
                        "weights.transforms()) are normalised with their own mean and std; the resize to the largest "
                        f"side stays {_DC_RET}'s (bilinear, no crop: a crop ratio has no meaning for R-MAC); random "
                        "inits and dcbench/DeepCluster checkpoints get ImageNet mean/std",
}
DC_QUERY_CROP = (f"{_DC_RET} ImageHelper.load_and_prepare_image: resize, then crop np.round(roi * ratio) "
                 "(the original protocol)")
REVISITOP_QUERY_CROP = ("filipradenovic/revisitop example_process_images.py / README: query = the original image "
                        ".crop(gnd[i]['bbx']) before any processing; then resized by the whole image's ratio "
                        "(cnnimageretrieval-pytorch ImagesFromList with bbxs)")


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
""" + ("Paris6k's 20 known corrupted images (DeepCluster eval_retrieval.py Dataset.blacklisted) are left out "
       "of the database and the ground-truth lists.\n" if dataset == "paris6k" else "")


class _RetrievalProtocol(Protocol):
    """Shared recipe; subclasses name the dataset, the protocol (old/revisited) and the settings."""

    dataset: ClassVar[str]
    revisited: ClassVar[bool]
    #: 2: roxford5k / rparis6k cut queries from the original image (revisitop); paris6k leaves out
    #: its 20 corrupted images (database and ground truth), the whitening set of oxford5k too.
    #: 3: published weights are read with their own input convention (input_convention=weights): mean and std
    version: ClassVar[str] = "3"
    #: ranking is deterministic; only BatchNorm re-estimation of random inits uses the seed (run())
    seed_dependent: ClassVar[bool] = False
    #: revisitop papers report Medium and Hard; the original protocol has one mAP
    headline_metrics: ClassVar[tuple[str, ...]] = (r"mAP_(medium|hard)", "mAP")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """The layout text of the dataset, whitened on its preset's ``whitening`` set."""
        super().__init_subclass__(**kwargs)
        layout = "revisitop" if cls.revisited else "original"
        cls.data_layout = _layout_text(cls.dataset, cls.Settings().whitening, layout)

    def model_input_size(self, settings: RetrievalSettings) -> int | None:
        """None: ``image_size`` is the largest image side, not the size fc layers are built for.

        Only conv taps are used, at any size, so a checkpoint must load at its own input size.
        """
        return None

    def sources_for(self, preset: str | None) -> dict[str, str]:
        """Where each default comes from (DeepCluster's descriptor; revisitop's benchmark)."""
        other = self.Settings().whitening
        return {**RETRIEVAL_SOURCES,
                "query_crop": REVISITOP_QUERY_CROP if self.revisited else DC_QUERY_CROP,
                "whitening": f"{_DC_RET} stage db_features: 'for tests on Paris, use Oxford PCA, and vice-versa' "
                             f"(here: {other})"}

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
        ds = read_retrieval_dataset(root, self.dataset)
        taps = retrieval_taps(ckpt.backbone, settings.taps)  # settings errors before expensive work
        white_paths = self._whitening_paths(root, settings)
        white = None if white_paths is None else (root / settings.whitening / "jpg", white_paths)
        convention = resolve_uncropped_convention(ckpt.backbone, settings.input_convention)
        sets = image_sets(ds, settings.scales, settings.image_size, settings.query_crop, white, convention)
        with ctx.frozen_backbone(ckpt, bn_images(ds, settings.image_size, convention)) as (backbone, sha):
            # through the run context: its cache (the cache setting), batch size and device, and
            # under torchrun the R-MAC regions extracted sharded across ranks, gathered in order
            extracted = {key: extract_regions(backbone, images, taps, settings.levels, sha,
                                              rows_of=ctx.extract_rows)
                         for key, images in sets.items()}
        rows, per_tap, outcomes = [], {}, {}
        for tap in taps:
            check_queries(ds, extracted, tap, settings.scales)
            whitening = None if settings.whitening == "none" else whitening_for(extracted, tap,
                                                                                settings.whitening_dim)
            ranks, per_tap[tap] = rank_tap(extracted, tap, settings.scales, whitening)
            values, per_query = retrieval_scores(ranks, ds.gnd, self.revisited, KAPPAS)
            tap_rows = _rows(values, tap, settings.seed)
            rows += tap_rows
            # per-query APs (mean = the mAP row) for the paired bootstrap over queries (dcbench.stats)
            outcomes.update({outcome_key(r.metric, tap): per_query[r.metric] for r in tap_rows if r.metric in per_query})
        extra = self._extra(ds, settings, extracted, white_paths, ctx.bn_info, per_tap)
        # the seeded re-estimation of a random init's BatchNorm makes this run seed-dependent
        extra["seed_dependent"] = bool((ctx.bn_info or {}).get("ran"))
        # taps without a map (a ViT's cls): one global vector per image in the chain, not R-MAC
        extra["global_taps"] = [t for t in taps if t not in ckpt.backbone.conv_tap_names]
        extra["input_convention"] = describe_applied(
            convention, "mean, std (the resize to the largest side stays bilinear; no crop, so no crop ratio)")
        return ProtocolOutput(rows, sets_fingerprint(ds, sets), extra, outcomes=outcomes)

    def _extra(self, ds: RetrievalDataset, settings: RetrievalSettings, extracted: Extracted,
               white_paths: list[str] | None, bn_info: dict | None, per_tap: dict) -> dict[str, Any]:
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
            "query_crop": settings.query_crop, "excluded_images": ds.excluded,
            "resize": f"largest side {settings.image_size} (bilinear), min side {MIN_SIDE}",
            "similarity": "inner product (faiss IndexFlatIP)", "kappas": list(KAPPAS),
            "images_per_s": {f"{role}@{scale}": None if e.images_per_s is None else round(e.images_per_s, 2)
                             for (role, scale), e in extracted.items()},
            "feature_cache": {f"{role}@{scale}": "hit" if e.cached else "extracted"
                              for (role, scale), e in extracted.items()},
            "taps": per_tap, "bn_recalibrate": bn_info,
        }


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
    """Metric rows x100; a NaN metric (no query with positives) is left out with a warning."""
    rows = []
    for metric, value in values.items():
        if math.isnan(value):
            log.warning("%s: no query has positives, metric left out", metric)
            continue
        rows.append(MetricRow(metric, 100.0 * float(value), tap, "test", None, seed))
    return rows


@register_protocol
class ROxford5k(_RetrievalProtocol):
    """Revisited Oxford (revisitop): mAP Easy/Medium/Hard and mP@1,5,10 with R-MAC."""

    name = dataset = "roxford5k"
    description = "revisited Oxford5k instance retrieval (R-MAC, whitened on RParis6k): mAP E/M/H, mP@k"
    revisited, Settings = True, ROxfordSettings


@register_protocol
class RParis6k(_RetrievalProtocol):
    """Revisited Paris (revisitop): mAP Easy/Medium/Hard and mP@1,5,10 with R-MAC."""

    name = dataset = "rparis6k"
    description = "revisited Paris6k instance retrieval (R-MAC, whitened on ROxford5k): mAP E/M/H, mP@k"
    revisited, Settings = True, RParisSettings


@register_protocol
class Oxford5k(_RetrievalProtocol):
    """Original Oxford5k (DeepCluster paper): mAP with good+ok positive, junk ignored."""

    name = dataset = "oxford5k"
    description = "Oxford5k instance retrieval, paper protocol (R-MAC, whitened on Paris6k): mAP"
    revisited, Settings = False, OxfordSettings


@register_protocol
class Paris6k(_RetrievalProtocol):
    """Original Paris6k (DeepCluster paper): mAP with good+ok positive, junk ignored."""

    name = dataset = "paris6k"
    description = "Paris6k instance retrieval, paper protocol (R-MAC, whitened on Oxford5k): mAP"
    revisited, Settings = False, ParisSettings
