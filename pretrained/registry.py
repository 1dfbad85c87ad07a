"""The registry of published checkpoints: the manifest, the cache and its lock file.

``manifest.toml`` (beside this file) names each known checkpoint with its URL, arch, source
format, input convention, reference numbers and, where published, its sha256. Files live in
``<cache root>/pretrained/NAME.<ext>`` (:func:`dcbench.env.cache_root`: ``$DCBENCH_CACHE`` or
``~/.cache/dcbench``); ``lock.json`` there
records the sha256 of every file the cache holds, so a checkpoint without a published checksum
is still verified on every load against what was downloaded (or added) the first time.

Trust: loading weights (``torch.load(weights_only=True)``) cannot run code, so a file vouched for
only by TLS and the lock file is fine for that. Full unpickling (``--trust-checkpoint``) runs code
from the file, so it is allowed only for a file whose full sha256 is pinned: in the manifest
(``sha256``, with ``sha256_source`` saying where the value comes from) or by the user
(``dcbench pretrained pin NAME SHA256``, or ``--sha256`` on ``download`` / ``add``), recorded
under ``pins`` in the lock file (:func:`pinned_sha256`).

Only the standard library and :mod:`dcbench.errors` are imported at module level:
``dcbench.checkpoint`` imports this package, so loading goes through a deferred import.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dcbench.checkpoint import load_checkpoint
from dcbench.env import pretrained_cache_dir
from dcbench.errors import CheckpointError, UsageError
from dcbench.fileio import atomic_write, atomic_write_text

MANIFEST_PATH = Path(__file__).with_name("manifest.toml")
LOCK_NAME = "lock.json"
PREFIX = "pretrained:"
_HASH_CHUNK = 1 << 20


# ----------------------------------------------------------------------------- manifest
@dataclass(frozen=True)
class Reference:
    """Published numbers of one protocol (percent), with where they come from."""

    protocol: str
    metric: str
    values: dict[str, float]
    source: str

    def best(self) -> tuple[str, float]:
        """The (tap or mode, value) with the highest value."""
        return max(self.values.items(), key=lambda kv: kv[1])


@dataclass(frozen=True)
class Entry:
    """One published checkpoint of the manifest."""

    name: str
    description: str
    url: str
    url_source: str
    arch: str
    input_size: int
    source_format: str
    converter: str
    sha256: str | None = None
    sha256_prefix: str | None = None
    input: dict[str, Any] = field(default_factory=dict)
    references: tuple[Reference, ...] = ()
    sha256_source: str | None = None  # how the manifest's sha256 was obtained

    @property
    def extension(self) -> str:
        """File extension of the published file (``.pth.tar`` or ``.pth``), kept in the cache."""
        filename = self.url.rsplit("/", 1)[-1]
        return ".pth.tar" if filename.endswith(".pth.tar") else (Path(filename).suffix or ".pth")

    def to_json(self) -> dict[str, Any]:
        """A plain dict (for ``dcbench pretrained list --json``)."""
        return {"name": self.name, "description": self.description, "url": self.url,
                "url_source": self.url_source, "arch": self.arch, "input_size": self.input_size,
                "source_format": self.source_format, "converter": self.converter, "sha256": self.sha256,
                "sha256_prefix": self.sha256_prefix, "sha256_source": self.sha256_source, "input": self.input,
                "references": [vars(r) for r in self.references]}


_REQUIRED = ("description", "url", "url_source", "arch", "input_size", "source_format", "converter")


def _hex(value: Any, name: str, key: str, length: int | None) -> str | None:
    if value is None:
        return None
    text = str(value).lower()
    if any(c not in "0123456789abcdef" for c in text) or (length and len(text) != length) or not text:
        raise UsageError(f"manifest entry {name}: {key} '{value}' is not "
                         f"{'a 64-digit hex sha256' if length else 'hex digits'}")
    return text


def _entry(name: str, table: dict[str, Any]) -> Entry:
    missing = [k for k in _REQUIRED if k not in table]
    if missing:
        raise UsageError(f"manifest entry {name} lacks {', '.join(missing)}; fix {MANIFEST_PATH}")
    if table.get("sha256") and not table.get("sha256_source"):
        raise UsageError(f"manifest entry {name} pins a sha256 without sha256_source (where the value comes "
                         f"from); fix {MANIFEST_PATH}")
    refs = tuple(Reference(r["protocol"], r["metric"], {str(k): float(v) for k, v in r["values"].items()},
                           r["source"]) for r in table.get("reference", []))
    return Entry(name, table["description"], table["url"], table["url_source"], table["arch"],
                 int(table["input_size"]), table["source_format"], table["converter"],
                 _hex(table.get("sha256"), name, "sha256", 64),
                 _hex(table.get("sha256_prefix"), name, "sha256_prefix", None),
                 dict(table.get("input", {})), refs, table.get("sha256_source"))


def load_manifest(path: Path | None = None) -> dict[str, Entry]:
    """All entries of the manifest, by name, in file order."""
    path = path or MANIFEST_PATH
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"cannot read the pretrained manifest {path}: {exc}") from exc
    try:
        return {name: _entry(name, table) for name, table in data.get("checkpoints", {}).items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"malformed pretrained manifest {path}: {exc!r}") from exc


def get_entry(name: str) -> Entry:
    """The manifest entry ``name`` (a ``pretrained:`` prefix is accepted)."""
    name = name.removeprefix(PREFIX)
    entries = load_manifest()
    if name not in entries:
        raise CheckpointError(f"unknown pretrained checkpoint '{name}'; known: {', '.join(entries)} "
                              f"(see `dcbench pretrained list`)")
    return entries[name]


# ----------------------------------------------------------------------------- cache and lock file
def pretrained_dir() -> Path:
    """Where the published files are cached: ``<cache root>/pretrained`` (:mod:`dcbench.env`)."""
    return pretrained_cache_dir()


def cached_path(entry: Entry) -> Path:
    """``<cache>/pretrained/NAME.<ext>`` (whether or not it exists)."""
    return pretrained_dir() / f"{entry.name}{entry.extension}"


def partial_path(entry: Entry) -> Path:
    """``<cache>/pretrained/NAME.part``: an unfinished download, resumed by the next one."""
    return pretrained_dir() / f"{entry.name}.part"


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _lock_guard() -> Iterator[None]:
    """Serialise read-modify-write of the lock file between processes (POSIX advisory lock)."""
    pretrained_dir().mkdir(parents=True, exist_ok=True)
    with open(pretrained_dir() / f".{LOCK_NAME}.guard", "a") as guard:
        try:
            import fcntl
        except ImportError:  # no fcntl (Windows): last writer wins, as without a guard
            yield
            return
        fcntl.flock(guard, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)


def _read_lock_file() -> dict[str, Any]:
    """The whole lock file: ``{"version", "files": {...}, "pins": {...}}`` (empty parts without one)."""
    path = pretrained_dir() / LOCK_NAME
    if not path.exists():
        return {"files": {}, "pins": {}}
    try:
        data = json.loads(path.read_text())
        parts = {key: data.get(key, {}) for key in ("files", "pins")}
    except (OSError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"the cache lock file {path} is unreadable ({exc}); delete it and "
                              f"re-download or re-add the checkpoints") from exc
    return {key: value if isinstance(value, dict) else {} for key, value in parts.items()}


def read_lock() -> dict[str, dict[str, Any]]:
    """``{name: {"file", "sha256", "size", "url", "source", "recorded"}}``; empty without a lock file."""
    return _read_lock_file()["files"]


def read_pins() -> dict[str, dict[str, Any]]:
    """The user's pins: ``{name: {"sha256", "source", "recorded"}}`` (:func:`pin`)."""
    return _read_lock_file()["pins"]


def _write_json_atomic(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_lock(files: dict[str, Any] | None = None, pins: dict[str, Any] | None = None) -> None:
    """Rewrite the lock file with ``files`` and/or ``pins`` replaced (call under :func:`_lock_guard`)."""
    data = _read_lock_file()
    data = {"version": 1, "files": data["files"] if files is None else files,
            "pins": data["pins"] if pins is None else pins}
    _write_json_atomic(pretrained_dir() / LOCK_NAME, data)


def record(entry: Entry, sha256: str, source: str, unverified: str | None = None) -> None:
    """Record the cached file of ``entry`` and its sha256 in the lock file; ``unverified`` (what
    did not match the manifest) marks a file stored with ``pretrained add --force``."""
    path = cached_path(entry)
    with _lock_guard():
        files = read_lock()
        files[entry.name] = {"file": path.name, "sha256": sha256, "size": path.stat().st_size,
                             "url": entry.url, "source": source,
                             "recorded": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        if unverified:
            files[entry.name]["unverified"] = unverified
        _write_lock(files=files)


def unverified_reason(entry: Entry) -> str | None:
    """What did not match the manifest when the cached file of ``entry`` was forced in, else None."""
    return read_lock().get(entry.name, {}).get("unverified")


def forget(entry: Entry) -> None:
    """Drop ``entry`` from the lock file (its file is being replaced)."""
    with _lock_guard():
        files = read_lock()
        if files.pop(entry.name, None) is not None:
            _write_lock(files=files)


# ----------------------------------------------------------------------------- pins
def parse_sha256(value: str) -> str:
    """A full sha256 in lower-case hex; UsageError otherwise."""
    text = value.strip().lower()
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise UsageError(f"'{value}' is not a sha256: expected 64 hex digits (e.g. from `sha256sum FILE`)")
    return text


def pinned_sha256(entry: Entry) -> tuple[str, str] | None:
    """``(sha256, where it comes from)`` of the full hash ``entry``'s file must have: the
    manifest's (published or independently confirmed, see its ``sha256_source``), else the
    user's pin; None when nothing but the lock file's first download vouches for the file."""
    if entry.sha256:
        return entry.sha256, f"the manifest ({entry.sha256_source})"
    pin_record = read_pins().get(entry.name)
    if pin_record and pin_record.get("sha256"):
        return pin_record["sha256"], f"your pin in {pretrained_dir() / LOCK_NAME} ({pin_record.get('source')})"
    return None


def pin(entry: Entry, sha256: str, source: str) -> None:
    """Pin the full sha256 of ``entry``'s file (a manifest entry without one): every later
    download, add and load must match it, and ``--trust-checkpoint`` is allowed for it.
    Refused when the manifest pins a different value or the cached file differs."""
    sha256 = parse_sha256(sha256)
    if entry.sha256 and entry.sha256 != sha256:
        raise CheckpointError(f"{entry.name}: the manifest already pins sha256 {entry.sha256[:16]}..., not "
                              f"{sha256[:16]}...; the file you checked is not the published one")
    cached = read_lock().get(entry.name, {}).get("sha256")
    if cached and cached != sha256 and is_cached(entry):
        raise CheckpointError(f"{entry.name}: the cached file has sha256 {cached[:16]}..., not the pinned "
                              f"{sha256[:16]}...; run `dcbench pretrained download {entry.name} --force "
                              f"--sha256 {sha256}`")
    with _lock_guard():
        pins = read_pins()
        pins[entry.name] = {"sha256": sha256, "source": source,
                            "recorded": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        _write_lock(pins=pins)


# ----------------------------------------------------------------------------- verification
def checksum_problem(entry: Entry, sha256: str) -> str | None:
    """Why ``sha256`` is not the published file of ``entry`` (manifest sha256, the user's pin,
    or the manifest's prefix), else None."""
    if entry.sha256 and sha256 != entry.sha256:
        return f"sha256 {sha256[:16]}... differs from the published {entry.sha256[:16]}..."
    pinned = pinned_sha256(entry)
    if pinned and sha256 != pinned[0]:
        return f"sha256 {sha256[:16]}... differs from {pinned[0][:16]}... pinned by {pinned[1]}"
    if entry.sha256_prefix and not sha256.startswith(entry.sha256_prefix):
        return (f"sha256 {sha256[:16]}... does not start with {entry.sha256_prefix}, the prefix in the "
                f"published file name")
    return None


def is_cached(entry: Entry) -> bool:
    """Whether the cache holds a file for ``entry`` (not verified)."""
    return cached_path(entry).is_file()


def verify_cached(entry: Entry) -> str:
    """sha256 of the cached file after checking it against the manifest and the lock file."""
    path = cached_path(entry)
    sha = file_sha256(path)
    lock = read_lock().get(entry.name, {})
    locked = lock.get("sha256")
    # a forced (unverified) file is by definition not the published one: only the lock vouches for it
    problem = None if lock.get("unverified") else checksum_problem(entry, sha)
    if problem is None and locked and sha != locked:
        problem = f"sha256 {sha[:16]}... differs from {locked[:16]}... recorded when it was cached"
    if problem:
        raise CheckpointError(f"cached pretrained:{entry.name} ({path}) is corrupted or was replaced: {problem}; "
                              f"run `dcbench pretrained download {entry.name} --force`")
    if not locked:
        if not (entry.sha256 or entry.sha256_prefix or pinned_sha256(entry)):
            raise CheckpointError(f"{path} was not placed by dcbench, so nothing vouches for it; register it "
                                  f"with `dcbench pretrained add {entry.name} FILE`")
        record(entry, sha, "found")  # matches the published checksum: safe to adopt
    return sha


# ----------------------------------------------------------------------------- trust
def _trust_refusal(entry: Entry, sha256: str) -> str:
    return (f"pretrained:{entry.name} needs full unpickling (--trust-checkpoint), which runs code from the file, "
            f"and nothing pins its sha256 {sha256[:16]}... (no published value), so only TLS vouches for it; "
            f"check the file (e.g. against a copy from another machine), then pin its sha256 with "
            f"`dcbench pretrained pin {entry.name} SHA256`")


def _is_pinned_file(entry: Entry, sha256: str) -> bool:
    """Whether a full sha256 is pinned for ``entry`` and ``sha256`` is it."""
    pinned = pinned_sha256(entry)
    return pinned is not None and pinned[0] == sha256


def check_trust_allowed(entry: Entry, path: Path, sha256: str) -> None:
    """CheckpointError when the file of ``entry`` (at ``path``, sha256 ``sha256``) needs full
    unpickling but it is not the file a full sha256 pins (:func:`pinned_sha256`; a file
    stored with ``add --force`` is not, whatever the manifest pins).

    Whether it needs full unpickling is found once per file by a ``weights_only`` read (which
    cannot run code) and kept in the lock file, so later loads cost nothing."""
    if _is_pinned_file(entry, sha256):
        return
    record_ = read_lock().get(entry.name, {})
    needs = record_.get("needs_unpickling") if record_.get("sha256") == sha256 else None
    if needs is None:
        needs = _needs_unpickling(path)
        if needs is None:
            return  # not readable at all: the load itself reports it
        with _lock_guard():
            files = read_lock()
            if files.get(entry.name, {}).get("sha256") == sha256:
                files[entry.name]["needs_unpickling"] = needs
                _write_lock(files=files)
    if needs:
        raise CheckpointError(_trust_refusal(entry, sha256))


def _needs_unpickling(path: Path) -> bool | None:
    """Whether ``path`` loads only with full unpickling (None: it does not load either way)."""
    from dcbench.checkpoint import read_checkpoint_file

    try:
        read_checkpoint_file(path, trust=False)
    except CheckpointError as exc:
        return True if "--trust-checkpoint" in str(exc) else None
    return False


# ----------------------------------------------------------------------------- add
def check_file(entry: Entry, path: Path, sha256: str, trust: bool = False) -> tuple[list[str], str | None]:
    """What differs between the file at ``path`` (sha256 ``sha256``) and the manifest entry:
    sha256 (published or pinned in the lock file), format, arch, input size. Returns
    ``(differences, key report or None when it does not load as the entry's arch)``."""
    problems = []
    published = checksum_problem(entry, sha256)
    pinned = read_lock().get(entry.name, {})
    if published:
        problems.append(published)
    elif pinned.get("sha256") and not pinned.get("unverified") and pinned["sha256"] != sha256:
        problems.append(f"sha256 {sha256[:16]}... differs from {pinned['sha256'][:16]}... pinned in "
                        f"{pretrained_dir() / LOCK_NAME} ({pinned.get('source')})")
    try:
        loaded = load_checkpoint(path, arch=entry.arch, trust=trust, input_size=entry.input_size)
    except CheckpointError as exc:
        return problems + [str(exc).split("; ")[0]], None
    if entry.converter != loaded.format and not (entry.converter == "state_dict"
                                                 and loaded.format in ("torchvision", "timm")):
        problems.append(f"format {loaded.format} (manifest: {entry.converter})")
    if loaded.backbone.arch != entry.arch:
        problems.append(f"arch {loaded.backbone.arch} (manifest: {entry.arch})")
    if loaded.backbone.input_size != entry.input_size:
        problems.append(f"input size {loaded.backbone.input_size} (manifest: {entry.input_size})")
    return problems, loaded.report.summary()


def add_file(name: str, file: str | Path, trust: bool = False, force: bool = False,
             sha256: str | None = None) -> tuple[Entry, Path, str, str, str | None]:
    """Register a local copy of a published checkpoint: check it against the manifest entry
    (:func:`check_file`), copy it into the cache atomically, record its sha256.

    ``sha256``: the full hash the user verified the file against; it must match, and is then
    pinned (:func:`pin`). ``trust`` (full unpickling of the file) needs a pinned sha256.
    A mismatch is a CheckpointError naming what differs, unless ``force``: then the file is
    stored with the differences recorded as ``unverified`` in the lock file (results of it say
    so). Returns ``(entry, cached path, sha256, key report, unverified reason or None)``."""
    entry = get_entry(name)
    src = Path(file).expanduser()
    if not src.is_file():
        raise CheckpointError(f"{src} does not exist or is not a file; pass the downloaded checkpoint file")
    sha = file_sha256(src)
    expected = parse_sha256(sha256) if sha256 else None
    if expected and sha != expected:
        raise CheckpointError(f"{src} has sha256 {sha}, not the {expected} you passed with --sha256; "
                              f"it is not the file you checked")
    if trust and not expected and not _is_pinned_file(entry, sha):
        raise CheckpointError(f"--trust-checkpoint runs code from {src}, and it is not the file a sha256 pinned "
                              f"for {entry.name} names; check the file and pass --sha256 SHA256 (`sha256sum {src}`) "
                              f"with it")
    mismatch = checksum_problem(entry, sha) if trust else None
    if mismatch:  # never unpickle a file the manifest or a pin says is not the published one
        raise CheckpointError(f"{src} is not the published {entry.name} ({mismatch}); refusing to unpickle it "
                              f"fully (--trust-checkpoint runs code from it)")
    problems, report = check_file(entry, src, sha, trust=trust)
    if problems and not force:
        raise CheckpointError(f"{src} is not the published {entry.name}: {'; '.join(problems)} "
                              f"(download it from {entry.url}, or pass --force to store it as unverified)")
    reason = "; ".join(problems) or None
    _copy_into_cache(src, cached_path(entry))
    record(entry, sha, "add", unverified=reason)
    if expected and not entry.sha256 and not reason:
        pin(entry, expected, "add --sha256")
    return entry, cached_path(entry), sha, report or "not loadable as the manifest's arch", reason


def _copy_into_cache(src: Path, dst: Path) -> None:
    """Copy to a temp file beside ``dst``, then rename: a crash never leaves a half copy as ``dst``."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.resolve() == dst.resolve():
        return
    with src.open("rb") as source:
        atomic_write(dst, lambda f: shutil.copyfileobj(source, f))
