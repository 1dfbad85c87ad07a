"""Readers for the instance-retrieval datasets (Oxford5k / Paris6k and their revisited forms).

Two on-disk layouts are supported, each under a dataset ROOT holding one folder per dataset:

* **revisitop** (``roxford5k``, ``rparis6k``), as written by revisitop's download script::

      ROOT/roxford5k/jpg/<name>.jpg
      ROOT/roxford5k/gnd_roxford5k.pkl   # {"imlist": [...], "qimlist": [...], "gnd": [...]}

  ``imlist`` names the database images, ``qimlist`` the query images (names without
  ``.jpg``); ``gnd[i]`` is the ground truth of query ``i``: ``easy``, ``hard``, ``junk``
  (database indices) and ``bbx`` (``x1, y1, x2, y2`` in the query image's pixels).

* **original** (``oxford5k``, ``paris6k``), as distributed by the Oxford VGG group::

      ROOT/oxford5k/jpg/**/<name>.jpg     # every image is a database image
      ROOT/oxford5k/gt/<query>_query.txt  # one line: "oxc1_<name> x1 y1 x2 y2" (Paris: "<name> ...")
      ROOT/oxford5k/gt/<query>_{good,ok,junk}.txt   # one image name per line
                                                    # (gt/ may also be named lab/, as in DeepCluster)

  Queries are the sorted ``*_query.txt`` files; their images are database images too.
  (Paris's tarball keeps images in one subfolder per landmark: ``jpg/`` is searched
  recursively, and names are file stems.)

The revisitop ground truth is a pickle, and a pickle can name any Python callable, so
``gnd_*.pkl`` is read by :class:`GroundTruthUnpickler`, which builds only builtin containers,
numbers, strings and numpy arrays (the objects revisitop's files hold) and refuses every other
global: a crafted dataset file cannot run code.

Every reader checks that each listed image exists and raises :class:`DataError` with one
line naming the first missing piece and the expected layout. Unreadable (corrupt) files are
not checked here: they are skipped at extraction time with a count, like everywhere else.

Paris6k's 20 known corrupted images (:data:`PARIS6K_CORRUPTED`) are left out of the original
``paris6k`` altogether, database and ground-truth lists alike, as the standard protocol does
(facebookresearch/deepcluster ``eval_retrieval.py`` ``Dataset.blacklisted``, after the list the
Oxford VGG group publishes as ``parisbuildings/corrupt.txt``): a corrupted image listed as a
positive would otherwise count as a positive never retrieved. (The revisited ``rparis6k``
lists no such image.)
"""
from __future__ import annotations

import _codecs
import hashlib
import importlib
import os
import pickle
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np

from dcbench.data.datasets import DataError, is_image_file
from dcbench.data.fingerprint import dataset_fingerprint

Layout = Literal["revisitop", "original"]

#: dataset name -> layout of the built-in retrieval datasets
KNOWN_DATASETS: dict[str, Layout] = {"roxford5k": "revisitop", "rparis6k": "revisitop",
                                     "oxford5k": "original", "paris6k": "original"}
#: prefix Oxford's query files put before the image name
_OXFORD_QUERY_PREFIX = "oxc1_"
#: Paris6k's corrupted images (facebookresearch/deepcluster eval_retrieval.py ``Dataset.blacklisted``;
#: the same list in VISSL's instance_retrieval_utils/data_util.py and robots.ox.ac.uk
#: .../parisbuildings/corrupt.txt)
PARIS6K_CORRUPTED: tuple[str, ...] = (
    "paris_louvre_000136", "paris_louvre_000146", "paris_moulinrouge_000422", "paris_museedorsay_001059",
    "paris_notredame_000188", "paris_pantheon_000284", "paris_pantheon_000960", "paris_pantheon_000974",
    "paris_pompidou_000195", "paris_pompidou_000196", "paris_pompidou_000201", "paris_pompidou_000467",
    "paris_pompidou_000640", "paris_sacrecoeur_000299", "paris_sacrecoeur_000330", "paris_sacrecoeur_000353",
    "paris_triomphe_000662", "paris_triomphe_000833", "paris_triomphe_000863", "paris_triomphe_000867",
)
#: dataset name -> image names the standard protocol leaves out
EXCLUDED_IMAGES: dict[str, frozenset[str]] = {"paris6k": frozenset(PARIS6K_CORRUPTED)}

REVISITOP_HINT = "ROOT/{name}/jpg/*.jpg and ROOT/{name}/gnd_{name}.pkl (revisitop layout)"
ORIGINAL_HINT = "ROOT/{name}/jpg/*.jpg and ROOT/{name}/gt/*_{{good,ok,junk,query}}.txt (original layout)"


@dataclass
class RetrievalDataset:
    """One retrieval benchmark: database and query image names, their files and ground truth.

    ``gnd[i]`` holds int64 arrays of database indices (revisitop: ``easy``, ``hard``,
    ``junk``; original: ``good``, ``ok``, ``junk``) and ``bbx``, the query box
    ``(x1, y1, x2, y2)`` as floats, or None when the query has no box.
    """

    name: str
    layout: Layout
    folder: Path  # ROOT/<name>
    imlist: list[str]
    qimlist: list[str]
    gnd: list[dict[str, Any]]
    files: dict[str, str] = field(repr=False, default_factory=dict)  # image name -> path
    #: known-bad images present on disk but left out (:data:`EXCLUDED_IMAGES`)
    excluded: list[str] = field(default_factory=list)

    @property
    def image_dir(self) -> Path:
        """The folder holding the images (``ROOT/<name>/jpg``)."""
        return self.folder / "jpg"

    def db_paths(self) -> list[str]:
        """Paths of the database images, in ``imlist`` order."""
        return [self.files[n] for n in self.imlist]

    def query_paths(self) -> list[str]:
        """Paths of the query images, in ``qimlist`` order."""
        return [self.files[n] for n in self.qimlist]

    def query_boxes(self) -> list[tuple[float, float, float, float] | None]:
        """The query boxes ``(x1, y1, x2, y2)`` in ``qimlist`` order (None: no box)."""
        return [None if g.get("bbx") is None else tuple(float(v) for v in g["bbx"]) for g in self.gnd]

    def fingerprint(self) -> str:
        """Hash of the image files (relative path + size) and of the ground truth."""
        names = sorted(set(self.imlist) | set(self.qimlist))
        files = dataset_fingerprint(str(self.image_dir), [os.path.relpath(self.files[n], self.image_dir)
                                                          for n in names])
        digest = hashlib.sha256(files.encode())
        digest.update(repr((self.imlist, self.qimlist, [_gnd_repr(g) for g in self.gnd])).encode())
        return digest.hexdigest()[:16]


def _gnd_repr(entry: dict[str, Any]) -> tuple:
    return tuple(sorted((k, tuple(np.asarray(v).reshape(-1).tolist()) if v is not None else None)
                        for k, v in entry.items()))


# ----------------------------------------------------------------------------- images
def index_images(image_dir: Path) -> dict[str, str]:
    """``{file stem: path}`` of every image under ``image_dir`` (recursive, sorted walk).

    Recursive because Paris's original tarball keeps one subfolder per landmark. When two
    files share a stem, the first in sorted order wins.
    """
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in sorted(os.walk(image_dir, followlinks=True)):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if is_image_file(name):
                found.setdefault(os.path.splitext(name)[0], os.path.join(dirpath, name))
    return found


def _require_folder(path: Path, what: str, hint: str) -> None:
    if not path.is_dir():
        raise DataError(f"{what} {path} is missing; expected {hint}")


def _check_listed(names: list[str], files: dict[str, str], source: str, image_dir: Path) -> None:
    """DataError naming the first listed image with no file (and how many are missing)."""
    missing = [n for n in names if n not in files]
    if missing:
        more = f" ({len(missing)} of {len(names)} listed images are missing)" if len(missing) > 1 else ""
        raise DataError(f"image {image_dir / (missing[0] + '.jpg')} listed in {source} is missing{more}; "
                        f"restore the dataset's jpg/ folder")


# ----------------------------------------------------------------------------- restricted unpickling
class UnsafePickleError(pickle.UnpicklingError):
    """A pickle names a global outside :func:`safe_pickle_globals` (it could run code)."""


def _numpy_attr(submodule: str, name: str) -> Any:
    """``numpy._core.<submodule>.<name>`` (numpy >= 2), else ``numpy.core.<submodule>.<name>``
    (numpy 1.x); importing the 1.x path on numpy 2 would warn, so the new one comes first."""
    for package in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{package}.{submodule}"), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"numpy has no {submodule}.{name}")


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as pickles use it: protocols 0-2 write ``bytes`` (numpy's array
    data among them) as ``_codecs.encode(text, "latin1")``. Other codecs are refused: codec
    lookup imports modules by name."""
    if str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1"):
        raise UnsafePickleError(f"_codecs.encode with codec {encoding!r}")
    return _codecs.encode(text, "latin1", errors)


@lru_cache(maxsize=1)
def safe_pickle_globals() -> dict[tuple[str, str], Any]:
    """``{(module, name): object}`` a ground-truth pickle may name: builtin containers and
    numbers, and what numpy's ``__reduce__`` writes for arrays, dtypes and scalars, under both
    the numpy 1.x (``numpy.core``) and 2.x (``numpy._core``) module names, so files pickled by
    either (or by Python 2, whose ``__builtin__`` is listed too) load with either."""
    reconstruct, scalar = _numpy_attr("multiarray", "_reconstruct"), _numpy_attr("multiarray", "scalar")
    frombuffer = _numpy_attr("numeric", "_frombuffer")  # protocol 5 arrays (numpy's __reduce_ex__)
    out: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                                       ("_codecs", "encode"): _latin1_encode}
    for package in ("numpy.core", "numpy._core"):
        out[(f"{package}.multiarray", "_reconstruct")] = reconstruct
        out[(f"{package}.multiarray", "scalar")] = scalar
        out[(f"{package}.numeric", "_frombuffer")] = frombuffer
    for module in ("builtins", "__builtin__"):
        # the builtins protocols 0-4 reach through a global (lists, dicts, str, int ... have opcodes)
        for kind in (set, frozenset, complex, bytes, bytearray):
            out[(module, kind.__name__)] = kind
    return out


class GroundTruthUnpickler(pickle.Unpickler):
    """An unpickler that builds only builtin containers, numbers, strings and numpy arrays;
    any other global (``os.system``, a class, ``eval`` ...) raises :class:`UnsafePickleError`
    before it is called. Python 2 strings are decoded as latin-1, as numpy's docs advise for
    its arrays (``numpy.load(..., encoding="latin1")``)."""

    def __init__(self, file: BinaryIO) -> None:
        super().__init__(file, encoding="latin1")

    def find_class(self, module: str, name: str) -> Any:
        found = safe_pickle_globals().get((module, name))
        if found is None:
            raise UnsafePickleError(f"{module}.{name}")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("a persistent id")


def load_ground_truth_pickle(file: BinaryIO) -> Any:
    """Unpickle ``file`` with :class:`GroundTruthUnpickler` (never runs code from the file)."""
    return GroundTruthUnpickler(file).load()


# ----------------------------------------------------------------------------- revisitop layout
def _load_pickle(path: Path, hint: str) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"ground-truth file {path} is missing; expected {hint} "
                        f"(revisitop's download script writes it)")
    try:
        with open(path, "rb") as f:
            data = load_ground_truth_pickle(f)
    except UnsafePickleError as exc:
        raise DataError(f"ground-truth file {path} refers to the Python object {exc}, which a revisitop file "
                        f"never holds (only lists, dicts, strings, numbers and numpy arrays), so it was not "
                        f"loaded: it could run code; download the file again from revisitop") from None
    except Exception as exc:  # noqa: BLE001 - pickle raises many types on bad files
        raise DataError(f"ground-truth file {path} cannot be read ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split()) or 'no details'}); download it again") from None
    if not isinstance(data, dict) or not {"imlist", "qimlist", "gnd"} <= set(data):
        raise DataError(f"ground-truth file {path} is not a revisitop gnd file: expected a dict with "
                        f"imlist, qimlist and gnd")
    return data


def _revisitop_entry(entry: Any, q: int, n_db: int, path: Path) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise DataError(f"{path}: gnd[{q}] is not a dict with easy/hard/junk/bbx; the file is damaged")
    out: dict[str, Any] = {}
    for key in ("easy", "hard", "junk"):
        ids = np.asarray(entry.get(key, []), dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= n_db):
            raise DataError(f"{path}: gnd[{q}]['{key}'] holds index {int(ids.max())} outside the "
                            f"{n_db} database images; the file does not match this imlist")
        out[key] = ids
    bbx = entry.get("bbx")
    out["bbx"] = None if bbx is None else np.asarray(bbx, dtype=np.float64).reshape(-1)[:4]
    return out


def read_revisitop(root: str | os.PathLike, name: str) -> RetrievalDataset:
    """Read ``ROOT/<name>/`` in the revisitop layout (see the module docstring).

    Raises:
        DataError: the folder, the gnd pickle or a listed image is missing, or the pickle
            is not a revisitop gnd file.
    """
    folder = Path(root).expanduser() / name
    hint = REVISITOP_HINT.format(name=name)
    _require_folder(folder, f"{name} folder", hint)
    gnd_path = folder / f"gnd_{name}.pkl"
    data = _load_pickle(gnd_path, hint)
    imlist = [str(n) for n in data["imlist"]]
    qimlist = [str(n) for n in data["qimlist"]]
    if len(data["gnd"]) != len(qimlist):
        raise DataError(f"{gnd_path}: {len(qimlist)} queries but {len(data['gnd'])} gnd entries; "
                        f"the file is damaged, download it again")
    gnd = [_revisitop_entry(e, q, len(imlist), gnd_path) for q, e in enumerate(data["gnd"])]
    _require_folder(folder / "jpg", "image folder", hint)
    files = index_images(folder / "jpg")
    _check_listed(imlist + qimlist, files, gnd_path.name, folder / "jpg")
    return RetrievalDataset(name, "revisitop", folder, imlist, qimlist, gnd, files)


# ----------------------------------------------------------------------------- original layout
def gt_folder(folder: Path) -> Path:
    """``folder/gt``, or ``folder/lab`` where DeepCluster's ``eval_retrieval.py`` kept the files."""
    return folder / "lab" if not (folder / "gt").is_dir() and (folder / "lab").is_dir() else folder / "gt"


def _read_names(path: Path, excluded: frozenset[str] = frozenset()) -> list[str]:
    if not path.is_file():
        raise DataError(f"ground-truth file {path} is missing; every *_query.txt needs its "
                        f"_good.txt, _ok.txt and _junk.txt next to it")
    return [n for n in (line.strip() for line in path.read_text().splitlines()) if n and n not in excluded]


def _without_excluded(name: str, files: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """``files`` without the images :data:`EXCLUDED_IMAGES` names for dataset ``name``, and
    the names left out (those present)."""
    excluded = EXCLUDED_IMAGES.get(name, frozenset())
    return {n: p for n, p in files.items() if n not in excluded}, sorted(n for n in files if n in excluded)


def parse_query_line(line: str, path: Path) -> tuple[str, tuple[float, float, float, float]]:
    """``"oxc1_all_souls_000013 136.5 34.1 648.5 955.7"`` -> (image name, box).

    Oxford's lines prefix the image name with ``oxc1_``; Paris's give the name as is.
    """
    parts = line.split()
    try:
        box = tuple(float(v) for v in parts[1:5])
    except ValueError:
        box = ()
    if len(parts) < 5 or len(box) != 4:
        raise DataError(f"{path}: expected one line 'IMAGE x1 y1 x2 y2', got {line.strip()!r}")
    image = parts[0][len(_OXFORD_QUERY_PREFIX):] if parts[0].startswith(_OXFORD_QUERY_PREFIX) else parts[0]
    return image, box  # type: ignore[return-value]


def read_original(root: str | os.PathLike, name: str) -> RetrievalDataset:
    """Read ``ROOT/<name>/`` in the original Oxford/Paris layout (see the module docstring).

    The database is every image under ``jpg/`` (sorted by name) but the dataset's known
    corrupted ones (:data:`EXCLUDED_IMAGES`, also dropped from the lists); ``gnd[i]`` holds
    ``good``, ``ok``, ``junk`` (database indices) and ``bbx`` of the ``i``-th query file.

    Raises:
        DataError: the folder, ``gt/``, a ground-truth file or a listed image is missing, or a
            query file is malformed.
    """
    folder = Path(root).expanduser() / name
    hint = ORIGINAL_HINT.format(name=name)
    _require_folder(folder, f"{name} folder", hint)
    gt = gt_folder(folder)
    _require_folder(gt, "ground-truth folder", hint)
    query_files = sorted(gt.glob("*_query.txt"))
    if not query_files:
        raise DataError(f"no *_query.txt ground-truth file in {gt}; expected {hint}")
    _require_folder(folder / "jpg", "image folder", hint)
    files, excluded = _without_excluded(name, index_images(folder / "jpg"))
    imlist = sorted(files)
    position = {n: i for i, n in enumerate(imlist)}
    dropped = EXCLUDED_IMAGES.get(name, frozenset())
    qimlist, gnd = [], []
    for qfile in query_files:
        lines = [line for line in qfile.read_text().splitlines() if line.strip()]
        image, box = parse_query_line(lines[0] if lines else "", qfile)
        stem = qfile.name[: -len("_query.txt")]
        lists = {kind: _read_names(gt / f"{stem}_{kind}.txt", dropped) for kind in ("good", "ok", "junk")}
        for kind, names in lists.items():
            _check_listed(names, files, f"{gt.name}/{stem}_{kind}.txt", folder / "jpg")
        _check_listed([image], files, f"{gt.name}/{qfile.name}", folder / "jpg")
        qimlist.append(image)
        gnd.append({**{k: np.array([position[n] for n in v], dtype=np.int64) for k, v in lists.items()},
                    "bbx": np.asarray(box, dtype=np.float64), "query": stem})
    return RetrievalDataset(name, "original", folder, imlist, qimlist, gnd, files, excluded)


# ----------------------------------------------------------------------------- dispatch
def layout_of(root: str | os.PathLike, name: str) -> Layout | None:
    """The layout ``ROOT/<name>`` is in, from its ground-truth files (None: neither)."""
    folder = Path(root).expanduser() / name
    if (folder / f"gnd_{name}.pkl").is_file():
        return "revisitop"
    if gt_folder(folder).is_dir():
        return "original"
    return None


def read_retrieval_dataset(root: str | os.PathLike, name: str, layout: Layout | None = None) -> RetrievalDataset:
    """Read ``ROOT/<name>`` in ``layout`` (default: the known layout of ``name``, else sniffed)."""
    layout = layout or KNOWN_DATASETS.get(name) or layout_of(root, name)
    if layout == "revisitop":
        return read_revisitop(root, name)
    if layout == "original":
        return read_original(root, name)
    raise DataError(f"{Path(root).expanduser() / name} holds neither gnd_{name}.pkl nor gt/; expected "
                    f"{REVISITOP_HINT.format(name=name)} or {ORIGINAL_HINT.format(name=name)}")


def image_set_paths(root: str | os.PathLike, name: str) -> list[str]:
    """The images of ``ROOT/<name>`` used as a training set (e.g. to learn a whitening).

    Its database images when its ground truth is there (so they share cached features with
    the evaluation of that dataset), else every image under ``ROOT/<name>/jpg``.

    Raises:
        DataError: ``ROOT/<name>/jpg`` is missing or holds no image.
    """
    folder = Path(root).expanduser() / name
    if layout_of(root, name) is not None:
        return read_retrieval_dataset(root, name, layout_of(root, name)).db_paths()
    if not (folder / "jpg").is_dir():
        raise DataError(f"image folder {folder / 'jpg'} is missing; expected ROOT/{name}/jpg/*.jpg")
    files, _ = _without_excluded(name, index_images(folder / "jpg"))
    if not files:
        raise DataError(f"no images in {folder / 'jpg'}; expected ROOT/{name}/jpg/*.jpg")
    return [files[n] for n in sorted(files)]
