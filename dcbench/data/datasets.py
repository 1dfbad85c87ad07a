"""Image datasets: labelled ImageFolder, unlabelled folders and file lists, and the
corrupt-image policy shared by every loader.

Corrupt images: a dataset item that cannot be decoded comes back as ``None`` (or raises
:class:`DataError` when ``strict=True``). :func:`skip_collate` drops those items from the
batch and reports how many it dropped; :class:`SkipCounter` adds the counts over an epoch
and logs one warning naming the first unreadable file. A bad JPEG among 1.2M images
therefore costs one log line, never a crash mid-epoch.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import hashlib
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision.transforms import functional as TF

from dcbench.data.decoded import DecodedImages, cache_budget_bytes, open_decoded_cache
from dcbench.data.fingerprint import dataset_fingerprint
from dcbench.data.transforms import split_normalisation
from dcbench.errors import DataError, DcbenchError  # noqa: F401 (DataError: re-exported, its historical home)

logger = logging.getLogger("dcbench")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# Names that mark a dataset root holding splits rather than classes.
_SPLIT_NAMES = {"val", "valid", "validation", "test"}

_LAYOUT_HINT = (
    "expected an ImageFolder (ROOT/CLASS/IMG.jpg), a folder of images, "
    "or a text file listing image paths"
)


# --------------------------------------------------------------------------- loading


def is_image_file(name: str) -> bool:
    """True for a non-hidden file name with one of :data:`IMAGE_EXTENSIONS` (any case)."""
    base = os.path.basename(name)
    return not base.startswith(".") and base.lower().endswith(IMAGE_EXTENSIONS)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (greyscale is replicated to 3 channels)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / float greyscale would clip to white under a plain convert("RGB").
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr / 257.0
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids PIL's per-image transparency warning
    return img.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    """Open and fully decode an image file as RGB; raises on unreadable files."""
    fast = _decode_jpeg(path)
    if fast is not None:
        return fast
    with Image.open(path) as img:
        img.load()  # decode now, so truncated files fail here and not in a transform
        return _to_rgb(img)


_JPEG_MAGIC = b"\xff\xd8\xff"


def _decode_jpeg(path: str) -> Image.Image | None:
    """A greyscale or colour JPEG decoded by libjpeg-turbo through torchvision, as RGB: the pixels
    PIL gives (the same library and settings: integer IDCT, fancy upsampling; tested on qualities,
    subsamplings, progressive and greyscale files) at about half PIL's cost for small images (PIL
    parses the markers in Python) and ~10% less at 500 x 375. None where it does not apply: not a
    JPEG, 4 channels (CMYK: PIL converts it differently), any decoding error (PIL then reads the
    file and reports it as before), no torchvision image decoder."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(_JPEG_MAGIC))  # other formats go to PIL without reading the whole file twice
            return decode_jpeg_bytes(head + f.read()) if head == _JPEG_MAGIC else None
    except OSError:
        return None


def decode_jpeg_bytes(data: bytes) -> Image.Image | None:
    """:func:`_decode_jpeg` of a file's bytes (None: not a 1- or 3-channel JPEG libjpeg decodes)."""
    if not data.startswith(_JPEG_MAGIC):
        return None
    try:
        from torchvision.io import ImageReadMode, decode_jpeg

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision 0.29 deprecates its decoders in favour of torchcodec
            pixels = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)
    except (ImportError, RuntimeError):
        return None
    if pixels.shape[0] == 1:  # replicated to 3 channels exactly as PIL's convert("RGB") of an L image
        return Image.fromarray(pixels[0].numpy()).convert("RGB")  # a 2-D uint8 array is an L image
    if pixels.shape[0] == 3:
        return Image.fromarray(pixels.permute(1, 2, 0).numpy())
    return None


def _one_line(exc: BaseException, path: str = "") -> str:
    """``Type: message`` on one line, without repeating ``path`` (the caller names it)."""
    text = str(exc).replace(f"'{path}'", "").replace(path, "") if path else str(exc)
    text = " ".join(text.split()) or "no details"
    return f"{type(exc).__name__}: {text}"


# --------------------------------------------------------------------------- datasets


class UnreadableImageError(DataError):
    """An image that cannot be decoded, with ``strict=True`` (one line: the path, the reason and
    :attr:`HINT`). Callers that know a better fix (the trainer: resume without strict) replace
    the hint (:meth:`problem`)."""

    HINT = "replace or delete the file, or run without --strict to skip unreadable images"

    def problem(self) -> str:
        """The message without :attr:`HINT`: which image, and why it cannot be read."""
        return str(self).removesuffix("; " + self.HINT)


class ImageDataset(Dataset):
    """A list of image paths with optional integer targets.

    ``dataset[i]`` returns ``(image, target, i)``: ``image`` is ``transform(pil_rgb_image)``
    (``to_tensor`` when ``transform`` is None), ``target`` is -1 for unlabelled data. An
    unreadable image returns ``None`` (use :func:`skip_collate`), or raises
    :class:`DataError` naming the file when ``strict=True``.
    """

    def __init__(
        self,
        paths: Sequence[str],
        targets: Sequence[int] | None = None,
        classes: Sequence[str] | None = None,
        root: str = "",
        transform: Callable | None = None,
        strict: bool = False,
    ) -> None:
        if targets is not None and len(targets) != len(paths):
            raise ValueError(f"{len(paths)} paths but {len(targets)} targets")
        self.paths: list[str] = [str(p) for p in paths]
        self.targets: list[int] | None = None if targets is None else [int(t) for t in targets]
        self.classes: list[str] | None = None if classes is None else list(classes)
        self.root: str = str(root)
        self.transform = transform
        self.strict = strict
        self._fingerprint: str | None = None
        #: decoded pixels shared by copies of this dataset and its loader workers (see
        #: :meth:`cache_decoded`); None: every read decodes the file
        self.decoded: DecodedImages | None = None

    @property
    def has_labels(self) -> bool:
        """Whether the dataset carries class targets."""
        return self.targets is not None

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        labels = f", {len(self.classes)} classes" if self.classes is not None else ""
        return f"{type(self).__name__}({len(self)} images{labels}, root={self.root!r})"

    def load_image(self, index: int) -> Image.Image:
        """Decode image ``index`` as an RGB PIL image (from the decoded-image cache when it holds
        it); raises on unreadable files."""
        cache = self.decoded
        if cache is None:
            return load_rgb(self.paths[index])
        img = cache.get(index)
        if img is None:
            img = load_rgb(self.paths[index])
            cache.put(index, img)
        return img

    def cache_decoded(self, budget_gb: float) -> bool:
        """Keep decoded pixels in memory (:mod:`dcbench.data.decoded`) when they fit ``budget_gb``;
        copies made afterwards (``copy.copy`` with another transform) share them. Whether it does."""
        self.decoded = open_decoded_cache(self.paths, budget_gb)
        return self.decoded is not None

    def __getitem__(self, index: int) -> tuple[Any, int, int] | None:
        index = int(index)
        try:
            img = self.load_image(index)
        except Exception as exc:  # noqa: BLE001 - PIL plugins raise many types for bad files
            reason = _one_line(exc, self.paths[index])
            if self.strict:
                raise UnreadableImageError(f"cannot read image {self.paths[index]} ({reason}); "
                                           f"{UnreadableImageError.HINT}") from exc
            logger.debug("unreadable image %s: %s", self.paths[index], reason)
            return None
        # Transform errors are bugs, not bad data, so they are not caught above.
        image = self.transform(img) if self.transform is not None else TF.to_tensor(img)
        target = self.targets[index] if self.targets is not None else -1
        return image, target, index

    def base_dir(self) -> str:
        """Folder the fingerprint's relative paths start from: ``root``, else the
        deepest folder common to all paths."""
        if self.root or not self.paths:
            return self.root
        return os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in self.paths])

    def relative_paths(self) -> list[str]:
        """Paths relative to :meth:`base_dir`."""
        base = self.base_dir()
        return [os.path.relpath(p, base) for p in self.paths]

    def fingerprint(self) -> str:
        """:func:`dataset_fingerprint` of the files (relative path + size), cached."""
        if self._fingerprint is None:
            self._fingerprint = dataset_fingerprint(self.base_dir(), self.relative_paths())
        return self._fingerprint


class InMemoryImageDataset(ImageDataset):
    """An :class:`ImageDataset` over PIL images held in memory (e.g. the embedded digits).

    ``paths`` are display names only; the fingerprint hashes the pixels and targets.
    """

    def __init__(
        self,
        images: Sequence[Image.Image],
        targets: Sequence[int] | None = None,
        classes: Sequence[str] | None = None,
        names: Sequence[str] | None = None,
        transform: Callable | None = None,
        root: str = "<memory>",
    ) -> None:
        names = list(names) if names is not None else [f"{root}/{i}" for i in range(len(images))]
        super().__init__(names, targets, classes, root=root, transform=transform)
        self.images = [_to_rgb(im) for im in images]

    def load_image(self, index: int) -> Image.Image:
        return self.images[index]

    def cache_decoded(self, budget_gb: float) -> bool:
        """Nothing to do: the images are decoded already."""
        del budget_gb
        return False

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for i, im in enumerate(self.images):
                digest.update(f"{im.size}".encode())
                digest.update(im.tobytes())
                digest.update(str(self.targets[i] if self.targets else -1).encode())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint


# --------------------------------------------------------------------------- scanning


def _walk_images(folder: str) -> list[str]:
    """Image files under ``folder``, recursively, in torchvision's ImageFolder order.

    Hidden files and folders (``.ipynb_checkpoints``, ``.DS_Store`` ...) are skipped, and
    symlinked folders are followed once (a link loop does not recurse forever).
    """
    found: list[tuple[str, list[str]]] = []
    visited: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:
            dirnames[:] = []
            continue
        visited.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.append((dirpath, sorted(f for f in filenames if is_image_file(f))))
    return [os.path.join(d, f) for d, files in sorted(found) for f in files]


def _has_image(folder: str) -> bool:
    """Whether ``folder`` holds at least one image anywhere below it (stops at the first)."""
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if any(is_image_file(f) for f in filenames):
            return True
    return False


def _count_files(folder: str) -> int:
    return sum(
        len([f for f in files if not f.startswith(".")])
        for _, _, files in os.walk(folder)
    )


def _no_images_error(folder: str) -> DataError:
    n_files = _count_files(folder)
    if n_files:
        detail = (f"it holds {n_files} file(s) but none ends in "
                  f"{', '.join(IMAGE_EXTENSIONS)}")
    else:
        detail = "it is empty"
    return DataError(f"no images found under {folder} ({detail}): {_LAYOUT_HINT}")


def _existing(source: str | os.PathLike) -> Path:
    path = Path(os.path.expanduser(str(source))).absolute()
    if not path.exists():
        raise DataError(f"no such file or folder: {path}; check the path ({_LAYOUT_HINT})")
    return path


def subfolders(folder: Path) -> list[str]:
    """Sorted names of the visible subfolders of ``folder``."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def has_direct_images(folder: Path) -> bool:
    """Whether ``folder`` itself (not a subfolder) holds an image file."""
    with os.scandir(folder) as entries:
        return any(e.is_file() and is_image_file(e.name) for e in entries)


# --------------------------------------------------------------------------- public constructors


def image_folder(
    root: str | os.PathLike, transform: Callable | None = None, strict: bool = False
) -> ImageDataset:
    """Labelled dataset in the ImageFolder layout ``ROOT/CLASS/**/IMG.ext``.

    Classes are the sorted non-hidden subfolders of ``root`` (so class indices match
    torchvision's ``ImageFolder``); images are found recursively in each class folder.
    Unlike torchvision, an empty class folder is kept (with a warning) rather than an
    error, so the class indices of a train and a val split stay aligned.

    Raises:
        DataError: ``root`` is missing, is not a folder, has no class subfolders, or
            holds no image.
    """
    path = _existing(root)
    if not path.is_dir():
        raise DataError(f"{path} is not a folder: an ImageFolder is ROOT/CLASS/IMG.jpg")
    classes = subfolders(path)
    if not classes:
        if has_direct_images(path):
            raise DataError(
                f"{path} has images but no class subfolders: a labelled dataset needs "
                "ROOT/CLASS/IMG.jpg (move each image into a folder named after its class)"
            )
        raise _no_images_error(str(path))
    paths: list[str] = []
    targets: list[int] = []
    empty: list[str] = []
    for index, name in enumerate(classes):
        files = _walk_images(str(path / name))
        if not files:
            empty.append(name)
        paths.extend(files)
        targets.extend([index] * len(files))
    if not paths:
        raise _no_images_error(str(path))
    if empty:
        logger.warning("%d class folder(s) under %s hold no images: %s",
                       len(empty), path, ", ".join(empty[:10]))
    return ImageDataset(paths, targets, classes, root=str(path), transform=transform,
                        strict=strict)


def read_file_list(list_path: str | os.PathLike, check_exists: bool = True) -> list[str]:
    """Image paths listed in a text file, one per line.

    Relative paths are resolved against the list file's folder; blank lines and lines
    starting with ``#`` are ignored. With ``check_exists`` every listed file is checked
    (one ``stat`` per line; pass False for huge lists on slow file systems).

    Raises:
        DataError: the file is not text, lists nothing, or a line names a non-image or a
            missing file (the message gives the line number and the path).
    """
    list_path = _existing(list_path)
    if is_image_file(list_path.name):
        raise DataError(
            f"{list_path} is a single image, not a dataset: pass the folder holding the "
            "images or a text file listing them"
        )
    try:
        text = list_path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(
            f"{list_path} is not a text file: pass a folder of images or a text file "
            "with one image path per line"
        ) from None
    base = list_path.parent
    paths = [_list_entry(list_path, lineno, line.strip(), base, check_exists)
             for lineno, line in enumerate(text.splitlines(), start=1)
             if line.strip() and not line.strip().startswith("#")]
    if not paths:
        raise DataError(f"{list_path} lists no images: write one image path per line")
    return paths


def _list_entry(list_path: Path, lineno: int, entry: str, base: Path, check: bool) -> str:
    where = f"{list_path} line {lineno}"
    if not is_image_file(entry):
        raise DataError(
            f"{where}: {entry!r} is not an image file (expected one of "
            f"{', '.join(IMAGE_EXTENSIONS)}); fix or remove the line"
        )
    full = os.path.normpath(os.path.join(base, os.path.expanduser(entry)))
    if check and not os.path.isfile(full):
        raise DataError(f"{where}: {full} does not exist; fix or remove the line")
    return full


def unlabelled_images(
    source: str | os.PathLike, transform: Callable | None = None, strict: bool = False
) -> ImageDataset:
    """Unlabelled dataset from a folder (searched recursively, sorted) or a file list.

    A file list is a text file with one image path per line (see :func:`read_file_list`);
    its folder is the dataset root used for the fingerprint. ``targets`` is None.

    Raises:
        DataError: missing source, no images, or a bad line in the file list.
    """
    path = _existing(source)
    if path.is_file():
        paths = read_file_list(path)
        root = str(path.parent)
    else:
        paths = _walk_images(str(path))
        if not paths:
            raise _no_images_error(str(path))
        root = str(path)
    return ImageDataset(paths, None, None, root=root, transform=transform, strict=strict)


def open_training_data(
    source: str | os.PathLike, transform: Callable | None = None, strict: bool = False
) -> ImageDataset:
    """Open whatever ``dcbench train --data SOURCE`` was given.

    - a text file: :func:`unlabelled_images` (file list);
    - a folder with images directly in it: :func:`unlabelled_images` (recursive), so no
      image is silently left out;
    - a folder whose subfolders hold images: :func:`image_folder` (the labels are only
      used for logging, e.g. NMI against the clusters);
    - a dataset root holding splits (``train/`` next to ``val/``), an empty folder or a
      folder without images: :class:`DataError` with one line saying what to pass.
    """
    path = _existing(source)
    if path.is_file():
        return unlabelled_images(path, transform, strict)
    if has_direct_images(path):
        return unlabelled_images(path, transform, strict)
    names = subfolders(path)
    lowered = {name.lower() for name in names}
    if "train" in lowered and lowered & _SPLIT_NAMES:
        split = next(name for name in names if name.lower() == "train")
        raise DataError(
            f"{path} holds dataset splits ({', '.join(s + '/' for s in names)}), not "
            f"classes: pass {path / split} to train on the training split"
        )
    if any(_has_image(str(path / name)) for name in names):
        return image_folder(path, transform, strict)
    raise _no_images_error(str(path))


# --------------------------------------------------------------------------- batching


class Padding:
    """What a padding item of a seeded order reads as (:mod:`dcbench.data.seeded`): dropped by
    :func:`skip_collate` without counting as an unreadable image (a class, not a sentinel object:
    it crosses process boundaries from the loader workers by pickling)."""


def readable_items(batch: list[Any]) -> tuple[list[Any], int]:
    """The readable items of a loader batch and the count of unreadable (``None``) ones; the pads
    of a seeded order (:class:`Padding`) are dropped without being counted."""
    real = [item for item in batch if not isinstance(item, Padding)]
    kept = [item for item in real if item is not None]
    return kept, len(real) - len(kept)


def skip_collate(batch: list[Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """DataLoader ``collate_fn`` that drops unreadable (``None``) items, and the pads of a seeded
    order (:class:`Padding`) without counting them.

    Returns ``(images, targets, indices, n_skipped)``. When no item was readable, ``images``,
    ``targets`` and ``indices`` are empty (``len(indices) == 0``) and ``n_skipped`` is the
    number of unreadable items: callers skip such a batch.
    """
    kept, n_skipped = readable_items(batch)
    if not kept:
        empty = torch.empty(0, dtype=torch.long)
        return torch.empty(0), empty, empty.clone(), n_skipped
    images, targets, indices = default_collate(kept)
    return images, targets, indices, n_skipped


def uint8_batches(dataset: Any) -> tuple[Any, Callable[[torch.Tensor], torch.Tensor] | None]:
    """``(a copy of dataset that reads uint8 pixels, the step that finishes its batches)`` when it is
    an :class:`ImageDataset` whose transform ends in ToTensor + Normalize (the centre and squash
    views, the trainer's and the probes' random crops); ``(dataset, None)`` otherwise. The same
    inputs bit for bit, a quarter of the bytes through the loader and to the device
    (:func:`dcbench.data.transforms.split_normalisation`)."""
    split = split_normalisation(dataset.transform) if isinstance(dataset, ImageDataset) else None
    if split is None:
        return dataset, None
    pixels = copy.copy(dataset)  # shares the decoded-image cache and the strict flag
    pixels.transform = split[0]
    return pixels, split[1]


def cache_decoded_images(datasets: Sequence[Any], budget_gb: float) -> list[bool]:
    """Decoded-image caches (:meth:`ImageDataset.cache_decoded`) for ``datasets`` in order, within
    one budget: ``budget_gb`` capped once at half the available memory, each dataset taking what it
    needs when it fits what is left. Call it before the loaders fork their workers. Whether each
    dataset got one (datasets without :meth:`ImageDataset.cache_decoded` never do)."""
    left_gb = cache_budget_bytes(budget_gb) / 1e9
    cached = []
    for dataset in datasets:
        cached.append(left_gb > 0 and hasattr(dataset, "cache_decoded") and dataset.cache_decoded(left_gb))
        if cached[-1]:
            left_gb -= dataset.decoded.nbytes / 1e9
    return cached


def decoded_in_memory(dataset: Any) -> int | None:
    """Images of ``dataset`` this process holds decoded in memory (None: no decoded-image cache)."""
    cache = getattr(dataset, "decoded", None)
    return None if cache is None else cache.n_filled()


class FinishedBatches:
    """The batches of ``loader`` (``(images, ...)`` tuples, e.g. :func:`skip_collate`'s) with the
    images moved to ``device`` and finished there by ``finish`` (from :func:`uint8_batches`)."""

    def __init__(self, loader: Iterable, finish: Callable[[torch.Tensor], torch.Tensor],
                 device: str | torch.device) -> None:
        self.loader, self.finish, self.device = loader, finish, torch.device(device)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple]:
        for images, *rest in self.loader:
            images = images.to(self.device, non_blocking=True)
            # a batch without a readable image collates to an empty tensor: nothing to scale
            yield (self.finish(images) if images.dim() == 4 else images.float(), *rest)


class WaitedBatches:
    """The batches of ``batches``, adding to :attr:`seconds` the time each ``next()`` took: how long
    the loop that consumes them waited for images (decoding, augmenting, collating, finishing:
    loader workers that do not keep up, or all of it with ``workers=0``; starting the workers
    counts too). A loader that keeps ahead of the loop costs ~0. On a GPU the device idles while
    the loop waits (beyond the work it has queued); on the CPU, loading and computing share the
    cores. ``clock``: seconds, monotonic (tests pass a fake one)."""

    def __init__(self, batches: Iterable, clock: Callable[[], float] = time.perf_counter) -> None:
        self.batches, self.clock, self.seconds = batches, clock, 0.0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Any]:
        start = self.clock()
        iterator = iter(self.batches)
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                self.seconds += self.clock() - start  # the last wait: the loader's end of epoch
                return
            self.seconds += self.clock() - start
            yield batch
            start = self.clock()


class WaitMeter:
    """Seconds that the loops of one run (:func:`metered_waits`) waited for images."""

    def __init__(self) -> None:
        self.seconds = 0.0


_METER: contextvars.ContextVar[WaitMeter | None] = contextvars.ContextVar("dcbench_wait_meter", default=None)


@contextlib.contextmanager
def metered_waits() -> Iterator[WaitMeter]:
    """Within the block, every :class:`MeteredLoader` iterated (in this thread) adds the time each
    ``next()`` took to the meter yielded: how long the run's loops (extraction, training, testing)
    waited for images in all, whatever loops a protocol writes."""
    meter = WaitMeter()
    token = _METER.set(meter)
    try:
        yield meter
    finally:
        _METER.reset(token)


class MeteredLoader(DataLoader):
    """A DataLoader that reports its waits to the :func:`metered_waits` meter around it (none
    around it: a plain DataLoader). The loaders the engine hands out (:func:`dcbench.data.seeded.
    seeded_loader`, :func:`dcbench.features.make_loader`) are these."""

    def __iter__(self) -> Iterator[Any]:
        meter = _METER.get()
        batches = super().__iter__()
        return batches if meter is None else self._metered(batches, meter)

    @staticmethod
    def _metered(batches: Iterator[Any], meter: WaitMeter) -> Iterator[Any]:
        waited = WaitedBatches(batches)  # a loader's iterator is its own iterable
        try:
            yield from waited
        finally:
            meter.seconds += waited.seconds


def normalised_batches(dataset: Any, make_loader: Callable[[Any], Iterable], device: str | torch.device) -> Iterable:
    """``make_loader(dataset)``, reading uint8 pixels and normalising each batch on ``device`` when
    :func:`uint8_batches` can split ``dataset``'s transform; the batches are the same bit for bit."""
    pixels, finish = uint8_batches(dataset)
    loader = make_loader(pixels)
    return loader if finish is None else FinishedBatches(loader, finish, device)


class SkipCounter:
    """Adds up skipped images over an epoch and logs one warning at the end.

    DataLoader workers cannot share state, so :func:`skip_collate` only reports a count.
    The counter instead records which dataset indices *did* arrive; at the end of the
    epoch the unreadable files are the expected indices that never arrived, and the
    first of them (lowest index) is named in the warning. ``expected`` defaults to the
    whole dataset; pass the sampler's indices when an epoch covers only part of it
    (a DistributedSampler shard, DeepCluster's cluster-uniform sampler). Cost: one bool
    per image.

    Usage::

        counter = SkipCounter(dataset)
        for images, targets, indices, n_skipped in loader:
            counter.update(indices, n_skipped)
            if len(indices) == 0:
                continue
            ...
        counter.report()          # logs 'skipped 3 unreadable images (first: ...)'
    """

    def __init__(self, dataset: ImageDataset | None = None) -> None:
        self.dataset = dataset
        self.count = 0
        self._seen = np.zeros(len(dataset) if dataset is not None else 0, dtype=bool)

    def update(self, indices: torch.Tensor | Iterable[int], n_skipped: int) -> None:
        """Record one batch: the indices that arrived and how many were skipped."""
        self.count += int(n_skipped)
        if self._seen.size:
            idx = torch.as_tensor(indices, dtype=torch.long).cpu().numpy()
            self._seen[idx] = True

    def reset(self) -> None:
        """Start a new epoch."""
        self.count = 0
        self._seen[:] = False

    def missing_indices(self, expected: Iterable[int] | None = None) -> np.ndarray:
        """Indices expected this epoch that never arrived (sorted)."""
        if not self._seen.size:
            return np.zeros(0, dtype=np.int64)
        mask = ~self._seen
        if expected is not None:
            wanted = np.zeros_like(mask)
            if not hasattr(expected, "__len__"):
                expected = list(expected)
            wanted[np.asarray(expected, dtype=np.int64)] = True
            mask &= wanted
        return np.flatnonzero(mask)

    def message(self, expected: Iterable[int] | None = None) -> str | None:
        """The warning text, or None when nothing was skipped."""
        if self.count == 0:
            return None
        noun = "image" if self.count == 1 else "images"
        first = ""
        missing = self.missing_indices(expected) if self.dataset is not None else []
        if len(missing):
            first = f" (first: {self.dataset.paths[int(missing[0])]})"
        return (f"skipped {self.count} unreadable {noun}{first}; "
                "use --strict to stop at the first one")

    def report(self, expected: Iterable[int] | None = None) -> str | None:
        """Log the epoch's warning (if anything was skipped), reset, return the text."""
        text = self.message(expected)
        if text is not None:
            logger.warning(text)
        self.reset()
        return text
