"""``dcbench fixtures``: tiny synthetic datasets in the real on-disk layouts, to try every
protocol without downloading anything.

The images come from the generators the tests use (:mod:`dcbench.data.synthetic`,
:mod:`dcbench.data.synthetic_voc`, :mod:`dcbench.data.synthetic_retrieval`); this module only
chooses their sizes and writes them safely: into a fresh folder next to ``OUT`` that is renamed
to ``OUT`` once complete, so an interrupted run leaves no half-written dataset, and never into
a folder that already holds something. Same arguments, same bytes.
"""
from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dcbench.errors import UsageError

KINDS = ("imagefolder", "voc", "retrieval")
RETRIEVAL_LAYOUTS = ("revisitop", "original", "both")

#: per kind: classes (VOC classes / retrieval landmarks), images per class, image side in px.
#: Small enough that a CPU evaluates them in seconds, large enough that every protocol's
#: checks pass (each class has positives in every split).
DEFAULTS = {"imagefolder": (4, 10, 64), "voc": (4, 6, 96), "retrieval": (4, 6, 128)}


@dataclass
class Fixture:
    """What :func:`write_fixture` wrote: the ``--data`` root, one line describing it, and
    commands that evaluate it (fast settings)."""

    root: Path
    summary: str
    try_commands: list[str]


def write_fixture(kind: str, out: str | os.PathLike, classes: int | None = None, per_class: int | None = None,
                  size: int | None = None, layout: str = "both", year: str = "2007", seed: int = 0) -> Fixture:
    """Write the ``kind`` dataset (one of :data:`KINDS`) to ``out``, which must not exist or be
    empty; UsageError (one line, the fix) otherwise or for impossible sizes."""
    if kind not in KINDS:
        raise UsageError(f"unknown fixture kind '{kind}'; choose from: {', '.join(KINDS)}")
    d_classes, d_per_class, d_size = DEFAULTS[kind]
    # None = not given; 0 is a value (and an error below), never the default
    classes = d_classes if classes is None else classes
    per_class = d_per_class if per_class is None else per_class
    size = d_size if size is None else size
    _check_sizes(kind, classes, per_class, size)
    if not str(out).strip():  # Path("") is the current folder
        raise UsageError("OUT is empty; give the folder to write, e.g. dcbench fixtures imagefolder data")
    target = Path(out).expanduser()
    _check_target(target)
    writer: Callable[[Path], tuple[str, list[str]]]
    if kind == "imagefolder":
        writer = lambda folder: _imagefolder(folder, classes, per_class, size, seed)  # noqa: E731
    elif kind == "voc":
        writer = lambda folder: _voc(folder, classes, per_class, size, year, seed)  # noqa: E731
    else:
        if layout not in RETRIEVAL_LAYOUTS:
            raise UsageError(f"unknown layout '{layout}'; choose from: {', '.join(RETRIEVAL_LAYOUTS)}")
        writer = lambda folder: _retrieval(folder, classes, per_class, size, layout, seed)  # noqa: E731
    summary, commands = _write_then_rename(target, writer)
    return Fixture(target, summary, [c.replace("OUT", _quoted(target)) for c in commands])


def _check_sizes(kind: str, classes: int, per_class: int, size: int) -> None:
    from dcbench.data.voc import VOC_CLASSES  # noqa: PLC0415

    if classes < 1 or per_class < 1:
        raise UsageError(f"--classes and --per-class must be at least 1, got {classes} and {per_class}")
    if kind == "imagefolder" and classes < 2:
        raise UsageError("--classes must be at least 2 for an ImageFolder (a classifier needs two classes)")
    if kind == "voc" and classes < 2:  # the SVMs and AP need images without the class (negatives)
        raise UsageError("--classes must be at least 2 for voc (every class needs negative images)")
    if kind == "voc" and classes > len(VOC_CLASSES):
        raise UsageError(f"--classes is at most {len(VOC_CLASSES)} for voc (the VOC classes)")
    if size < 32:
        raise UsageError(f"--size {size} is too small: use at least 32 (the networks need 32 px or more)")


def _check_target(target: Path) -> None:
    if target.exists() and not target.is_dir():
        raise UsageError(f"{target} is a file; give a new folder as OUT")
    if target.is_dir() and any(target.iterdir()):
        raise UsageError(f"{target} is not empty; give a new or empty folder as OUT (nothing was written)")


def _write_then_rename(target: Path, writer: Callable[[Path], tuple[str, list[str]]]) -> tuple[str, list[str]]:
    """Write into a fresh sibling folder, then rename it to ``target``: complete or absent."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()  # default mode: the user's umask, as every folder dcbench writes
    try:
        result = writer(staging)
        if target.is_dir():
            target.rmdir()  # empty (checked): replaced by the complete folder
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return result


def _quoted(path: Path) -> str:
    text = str(path)
    return f"'{text}'" if any(c in text for c in " \t'\"$&;|<>()*?") else text


def _imagefolder(folder: Path, classes: int, per_class: int, size: int, seed: int) -> tuple[str, list[str]]:
    from dcbench.data.synthetic import make_image_folder  # noqa: PLC0415

    make_image_folder(folder, n_classes=classes, per_class=per_class, image_size=size, seed=seed)
    fast = "--set image_size=64 --set workers=0"  # 64: the smallest input every built-in network takes
    k = min(10, classes * per_class)  # at most the memory bank's size
    return (f"ImageFolder: train/ and val/, {classes} classes x {per_class} images each ({size} px)",
            [f"dcbench eval --protocol knn --checkpoint random:alexnet --data OUT {fast} --set 'ks=[{k}]'",
             f"dcbench eval --protocol linear --checkpoint random:alexnet --data OUT {fast} --set epochs=2 "
             f"--set cached=true --set crops=center"])


def _voc(folder: Path, classes: int, per_class: int, size: int, year: str, seed: int) -> tuple[str, list[str]]:
    from dcbench.data.synthetic_voc import make_voc  # noqa: PLC0415
    from dcbench.data.voc import VOC_CLASSES  # noqa: PLC0415

    n = classes * per_class  # each image holds objects of one or more classes: ~per_class images per class
    splits = {"train": n, "val": n, "test": n} if year == "2007" else {"train": n, "val": n}
    make_voc(folder, classes=VOC_CLASSES[:classes], year=year, images_per_split=splits,
             image_size=(size, max(32, size * 5 // 6)), seed=seed)
    layout = f"VOCdevkit/VOC{year}: {'/'.join(map(str, splits.values()))} {'/'.join(splits)} images"
    if year != "2007":
        return (f"{layout}, {classes} classes ({', '.join(VOC_CLASSES[:classes])}), segmentation masks",
                ["dcbench eval --protocol voc-seg --checkpoint random:alexnet --data OUT --set workers=0"])
    return (f"{layout}, {classes} classes ({', '.join(VOC_CLASSES[:classes])}), boxes and masks",
            ["dcbench eval --protocol voc07-svm --checkpoint random:alexnet --data OUT --set image_size=64 "
             "--set workers=0 --set 'costs=[0.1,1]'",
             "dcbench eval --protocol voc07-cls --checkpoint random:alexnet --data OUT --set image_size=64 "
             "--set workers=0 --set iterations=20 --set batch_size=8"])


def _retrieval(folder: Path, classes: int, per_class: int, size: int, layout: str, seed: int) -> tuple[str, list[str]]:
    from dcbench.data.synthetic_retrieval import make_retrieval_dataset  # noqa: PLC0415

    names = {"revisitop": ("roxford5k", "rparis6k"), "original": ("oxford5k", "paris6k")}
    chosen = [n for key in (("revisitop", "original") if layout == "both" else (layout,)) for n in names[key]]
    # per landmark: half the views easy, one junk (from 3 views on), the rest hard (dcbench.data.synthetic_retrieval)
    junk = 1 if per_class >= 3 else 0
    easy = max(1, per_class // 2)
    hard = max(0, per_class - easy - junk)
    for name in chosen:
        make_retrieval_dataset(folder, name, n_landmarks=classes, easy=easy, hard=hard, junk=junk,
                               distractors=2 * classes, image_size=size, seed=seed)
    first = chosen[0]
    return (f"{', '.join(chosen)}: {classes} landmarks x {per_class} database photos + 2 queries each, "
            f"{2 * classes} distractors ({size} px)",
            [f"dcbench eval --protocol {first} --checkpoint random:alexnet --data OUT --set image_size={max(64, size)} "
             f"--set workers=0"])
