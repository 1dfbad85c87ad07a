"""The result record and the SQLite results store.

A :class:`Result` is what one protocol run produces: metric rows plus everything needed to
reproduce them (DESIGN.md, "Result record"). :class:`ResultStore` keeps results in one SQLite
file in WAL mode; each :meth:`ResultStore.add` is a single transaction, so a failed or
interrupted evaluation writes nothing. The full record is kept as JSON (the source of truth)
and the metric rows are also spread into a ``metrics`` table so that leaderboards and ad-hoc
analysis are plain SQL queries.

Identity. A result's *comparability key* (:func:`comparability_key`) is the sha256 of
(checkpoint sha256, protocol, protocol version, every setting except the seed and the
execution-only settings of :data:`EXECUTION_SETTINGS`, dataset fingerprint). Results of one
key are trials (seeds) of one experiment and aggregate; results of different keys never
merge. The *setup key* is the same without the checkpoint: two checkpoints are compared
(paired) only on one setup. Both are columns of the ``results`` table (schema version 2;
older stores are migrated on open).

Re-runs. Storing the same key and seed again keeps both records (nothing is replaced or
deleted); tables use the latest and count the earlier ones as duplicates, and
``dcbench results rm`` removes either.

Outcomes. Per-evaluation-image outcomes (``ProtocolOutput.outcomes``: name -> 1-D array, 0/1
for accuracy-type metrics, or a :class:`dcbench.stats.ImageOutcomes` for mAP / mIoU; named by
:func:`outcome_key`) are stored as one compressed ``.npz`` blob per result in the ``outcomes``
table, written in the same transaction as the result, for the paired bootstrap of
:mod:`dcbench.stats`. The statistic of each ImageOutcomes entry is kept in the blob's reserved
``__statistics__`` entry (JSON bytes).
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import numbers
import os
import re
import shlex
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from dcbench.errors import DcbenchError

__all__ = ["CorruptRecordError", "EXECUTION_SETTINGS", "MetricRow", "Result", "ResultStore", "StoreError",
           "comparability_key", "csv_text", "default_store_path", "export_results", "key_of", "outcome_key",
           "setup_identity", "setup_key", "utc_now"]

#: settings that choose how a run executes, not what it computes (data-loader processes,
#: reading extracted features from the cache, keeping decoded images in memory): left out of the
#: comparability key with the seed
EXECUTION_SETTINGS = ("seed", "workers", "cache", "decode_cache_gb")

SELECTIONS = ("final", "best", None)
_REQUIRED_KEYS = ("protocol", "protocol_version", "checkpoint", "settings", "data", "metrics")


class StoreError(DcbenchError):
    """The results store cannot be opened, read or written; the message is one line."""


class CorruptRecordError(StoreError):
    """A stored record cannot be read back (hand-edited or damaged); ``result_id`` names it, so a
    caller that deletes records (``dcbench results rm``) can still remove it."""

    def __init__(self, path: Path, result_id: int | None, problem: str) -> None:
        self.path, self.result_id, self.problem = path, result_id, problem
        which = f"result {result_id}" if result_id is not None else "a result"
        fix = (f"delete it with `dcbench results rm {result_id} --store {shlex.quote(str(path))}`"
               if result_id is not None
               else "delete it with `dcbench results rm ID`")
        super().__init__(f"results store {path}: {which} is corrupt ({problem}); {fix} "
                         f"(or restore the store from a backup)")


@dataclass
class MetricRow:
    """One measured number: a metric on a tap, split and seed (percentages in 0-100)."""

    metric: str
    value: float
    tap: str | None = None
    split: str | None = None
    selection: str | None = None
    seed: int | None = None

    def validate(self) -> None:
        """Raise ValueError if a field has the wrong type (e.g. a non-numeric value)."""
        if not isinstance(self.metric, str) or not self.metric:
            raise ValueError(f"metric row: metric name must be a non-empty string, "
                             f"got {self.metric!r}")
        where = f"metric {self.metric!r}"
        if isinstance(self.value, bool) or not isinstance(self.value, numbers.Real):
            raise ValueError(f"{where}: value must be a number, got {self.value!r}")
        if not math.isfinite(float(self.value)):
            raise ValueError(f"{where}: value must be finite, got {self.value!r}")
        for name in ("tap", "split"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise ValueError(f"{where}: {name} must be a string or None, got {v!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"{where}: selection must be 'final', 'best' or None, "
                             f"got {self.selection!r}")
        if self.seed is not None and (isinstance(self.seed, bool)
                                      or not isinstance(self.seed, numbers.Integral)):
            raise ValueError(f"{where}: seed must be an integer or None, got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        """The row as plain JSON types (validated; numpy scalars become Python numbers)."""
        self.validate()
        return {"metric": self.metric, "value": float(self.value), "tap": self.tap,
                "split": self.split, "selection": self.selection,
                "seed": None if self.seed is None else int(self.seed)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MetricRow":
        """Build a row from its dict form; ``layer`` is accepted as an old name for ``tap``."""
        return cls(metric=d["metric"], value=d["value"], tap=d.get("tap", d.get("layer")),
                   split=d.get("split"), selection=d.get("selection"), seed=d.get("seed"))


@dataclass
class Result:
    """The record of one protocol run on one checkpoint (DESIGN.md, "Result record")."""

    protocol: str
    protocol_version: str
    checkpoint: dict  # {"name", "sha256", "arch"}
    settings: dict  # every resolved setting
    data: dict  # {"root", "fingerprint"}
    metrics: list[MetricRow]
    versions: dict = field(default_factory=dict)
    git: str | None = None
    started: str = ""  # ISO 8601 UTC
    wall_s: float = 0.0
    extra: dict = field(default_factory=dict)  # protocol-specific metadata
    #: the store's id of this record (set by ResultStore.add and when read back); not part
    #: of the record and ignored by ``==``
    id: int | None = field(default=None, compare=False, repr=False)
    #: per-image outcomes of the run (``ProtocolOutput.outcomes``), stored beside the record by
    #: ResultStore.add; not part of the record and ignored by ``==``
    outcomes: dict = field(default_factory=dict, compare=False, repr=False)

    def validate(self) -> None:
        """Raise ValueError if the record is incomplete or a metric row is malformed."""
        for key in ("protocol", "protocol_version"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value:
                raise ValueError(f"result: {key} must be a non-empty string, got {value!r}")
        if not isinstance(self.checkpoint, dict) or not self.checkpoint.get("sha256"):
            raise ValueError(f"result: checkpoint must be a dict with a sha256, "
                             f"got {self.checkpoint!r}")
        for key in ("settings", "data", "versions", "extra"):
            value = getattr(self, key)
            if not isinstance(value, dict):
                raise ValueError(f"result: {key} must be a dict, got {type(value).__name__}")
        for row in self.metrics:
            if not isinstance(row, MetricRow):
                raise ValueError(f"result: metrics must be MetricRow objects, got {row!r}")
            row.validate()

    def to_dict(self) -> dict[str, Any]:
        """The record as plain JSON types, keys as in DESIGN.md plus ``extra``."""
        self.validate()
        raw = {
            "protocol": self.protocol,
            "protocol_version": self.protocol_version,
            "checkpoint": self.checkpoint,
            "settings": self.settings,
            "data": self.data,
            "metrics": [row.to_dict() for row in self.metrics],
            "versions": self.versions,
            "git": self.git,
            "started": self.started,
            "wall_s": float(self.wall_s),
            "extra": self.extra,
        }
        # A JSON round trip normalises tuples, paths and numpy scalars once, here, so that
        # what is stored, printed and compared is exactly what a reader gets back.
        return json.loads(_dumps(raw))

    def to_json(self) -> str:
        """The record as one line of JSON."""
        return _dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Result":
        """Rebuild a record from :meth:`to_dict` output (unknown keys are ignored)."""
        if not isinstance(d, dict):
            raise ValueError(f"a result record must be a JSON object, got {type(d).__name__}")
        missing = [k for k in _REQUIRED_KEYS if k not in d]
        if missing:
            raise ValueError(f"result record lacks {', '.join(missing)}")
        # named checks: dict("x") would fail with "dictionary update sequence element #0 ..."
        for key, kind in (("checkpoint", dict), ("settings", dict), ("data", dict), ("metrics", list)):
            if not isinstance(d[key], kind):
                raise ValueError(f"result record: {key} must be a JSON {'object' if kind is dict else 'list'}, "
                                 f"got {type(d[key]).__name__}")
        for key in ("versions", "extra"):
            if d.get(key) is not None and not isinstance(d[key], dict):
                raise ValueError(f"result record: {key} must be a JSON object, got {type(d[key]).__name__}")
        if any(not isinstance(row, dict) or "metric" not in row or "value" not in row for row in d["metrics"]):
            raise ValueError("result record: every metric row must be an object with a metric and a value")
        for key, kinds in (("started", str), ("git", str), ("wall_s", numbers.Real)):
            value = d.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
                raise ValueError(f"result record: {key} must be a {'number' if key == 'wall_s' else 'string'} or "
                                 f"null, got {value!r}")
        return cls(
            protocol=d["protocol"], protocol_version=str(d["protocol_version"]),
            checkpoint=dict(d["checkpoint"]), settings=dict(d["settings"]), data=dict(d["data"]),
            metrics=[MetricRow.from_dict(row) for row in d["metrics"]],
            versions=dict(d.get("versions") or {}), git=d.get("git"),
            started=d.get("started") or "", wall_s=float(d.get("wall_s") or 0.0),
            extra=dict(d.get("extra") or {}),
        )

    @classmethod
    def from_json(cls, text: str) -> "Result":
        """Rebuild a record from :meth:`to_json` output."""
        return cls.from_dict(json.loads(text))

    def settings_key(self) -> str:
        """Canonical JSON of the settings: two runs have "the same settings" iff keys match."""
        return settings_key(self.settings)

    def key(self) -> str:
        """The comparability key (see the module docstring)."""
        return comparability_key(self.to_dict())

    def setup_key(self) -> str:
        """The comparability key without the checkpoint: what two compared checkpoints share."""
        return setup_key(self.to_dict())

    @property
    def seed(self) -> Any:
        """The ``seed`` setting of the run (None when the protocol has none)."""
        return self.settings.get("seed")

    @property
    def unverified(self) -> bool:
        """Whether the checkpoint was a ``pretrained add --force`` file that failed its checks."""
        return bool(self.extra.get("checkpoint_unverified"))


def settings_key(settings: dict) -> str:
    """Canonical JSON (sorted keys, compact) of a settings dict."""
    return json.dumps(settings, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False, default=_json_default)


def setup_identity(record: Mapping[str, Any]) -> dict[str, Any]:
    """What makes two results of different checkpoints comparable: protocol, version,
    settings except :data:`EXECUTION_SETTINGS`, dataset fingerprint (``record``: a
    :meth:`Result.to_dict`)."""
    settings = {k: v for k, v in (record.get("settings") or {}).items() if k not in EXECUTION_SETTINGS}
    return {"protocol": record["protocol"], "protocol_version": str(record["protocol_version"]),
            "settings": settings, "data_fingerprint": (record.get("data") or {}).get("fingerprint")}


def _digest(obj: Any) -> str:
    return hashlib.sha256(settings_key(obj).encode("utf-8")).hexdigest()


def setup_key(record: Mapping[str, Any]) -> str:
    """sha256 hex of :func:`setup_identity`."""
    return _digest(setup_identity(record))


def comparability_key(record: Mapping[str, Any]) -> str:
    """sha256 hex of (checkpoint sha256, :func:`setup_identity`): results of one key are seeds
    of one experiment."""
    return key_of(record["checkpoint"]["sha256"], setup_identity(record))


def key_of(checkpoint_sha256: str, identity: Mapping[str, Any]) -> str:
    """:func:`comparability_key` from a checkpoint sha256 and a :func:`setup_identity`."""
    return _digest({"checkpoint": checkpoint_sha256, **identity})


def outcome_key(metric: str, tap: str | None = None, selection: str | None = None) -> str:
    """The name under which a protocol stores the per-image outcomes of a metric row:
    ``metric/tap/selection`` with absent parts left out (``"top1/conv3/final"``, ``"top1_k20/conv3"``)."""
    return "/".join(p for p in (metric, tap, selection) if p)


def utc_now() -> str:
    """The current time as ISO 8601 UTC with seconds, for :attr:`Result.started`."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def _json_default(obj: Any) -> Any:
    """Convert the non-JSON values protocols commonly put in records."""
    if hasattr(obj, "tolist"):  # numpy scalars and arrays, torch tensors
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable: {obj!r}")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                      default=_json_default)


def default_store_path() -> Path:
    """``$DCBENCH_STORE`` if set, else ``~/.dcbench/results.db``."""
    env = os.environ.get("DCBENCH_STORE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".dcbench" / "results.db"


_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    protocol TEXT NOT NULL,
    protocol_version TEXT NOT NULL,
    checkpoint_name TEXT,
    checkpoint_sha256 TEXT NOT NULL,
    arch TEXT,
    settings_key TEXT NOT NULL,
    record_json TEXT NOT NULL,
    started TEXT,
    wall_s REAL
);
CREATE TABLE IF NOT EXISTS metrics (
    result_id INTEGER NOT NULL REFERENCES results(id) ON DELETE CASCADE,
    metric TEXT NOT NULL,
    value REAL NOT NULL,
    tap TEXT,
    split TEXT,
    selection TEXT,
    seed INTEGER
);
CREATE INDEX IF NOT EXISTS results_lookup ON results(checkpoint_sha256, protocol, settings_key);
CREATE INDEX IF NOT EXISTS results_protocol ON results(protocol);
CREATE INDEX IF NOT EXISTS metrics_result ON metrics(result_id);
CREATE INDEX IF NOT EXISTS metrics_metric ON metrics(metric, tap);
"""

#: version 1 -> 2: the comparability key, setup key, seed and data fingerprint as columns
#: (computed from record_json for existing rows) and the outcomes table
_V2_COLUMNS = (("comparability_key", "TEXT"), ("setup_key", "TEXT"), ("seed", "INTEGER"),
               ("data_fingerprint", "TEXT"))
_V2_SCHEMA = """
CREATE TABLE IF NOT EXISTS outcomes (
    result_id INTEGER PRIMARY KEY REFERENCES results(id) ON DELETE CASCADE,
    names TEXT NOT NULL,
    npz BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS results_key ON results(comparability_key, seed);
CREATE INDEX IF NOT EXISTS results_setup ON results(setup_key);
"""


def _statements(script: str) -> list[str]:
    return [s for s in script.split(";") if s.strip()]


def _identity_columns(record: Mapping[str, Any]) -> tuple[str, str, Any, Any]:
    """(comparability key, setup key, seed, data fingerprint) of a record dict."""
    seed = (record.get("settings") or {}).get("seed")
    seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else None
    return (comparability_key(record), setup_key(record), seed,
            (record.get("data") or {}).get("fingerprint"))


def _migrate_1_to_2(conn: sqlite3.Connection) -> None:
    have = {row[1] for row in conn.execute("PRAGMA table_info(results)")}
    for name, kind in _V2_COLUMNS:
        if name not in have:
            conn.execute(f"ALTER TABLE results ADD COLUMN {name} {kind}")
    for rid, text in conn.execute("SELECT id, record_json FROM results").fetchall():
        try:
            columns = _identity_columns(json.loads(text))
        except (ValueError, KeyError, TypeError, AttributeError):
            # a damaged record must not make the store unopenable: its columns stay empty and
            # reading it names it (CorruptRecordError), so `dcbench results rm ID` can remove it
            continue
        conn.execute("UPDATE results SET comparability_key=?, setup_key=?, seed=?, data_fingerprint=? "
                     "WHERE id=?", (*columns, rid))
    for statement in _statements(_V2_SCHEMA):
        conn.execute(statement)


#: migrations[v] brings a store from version v to v + 1, inside the opening transaction
_MIGRATIONS = {1: _migrate_1_to_2}


_STATISTICS_ENTRY = "__statistics__"


def encode_outcomes(outcomes: Mapping[str, Any]) -> tuple[list[str], bytes]:
    """Validate per-image outcomes (name -> finite 1-D numeric array, or an
    :class:`~dcbench.stats.ImageOutcomes` with finite images x columns data) and pack them as a
    compressed ``.npz``; ValueError naming the bad entry otherwise."""
    from dcbench.stats import ImageOutcomes  # noqa: PLC0415 - stats is only needed with outcomes

    arrays, statistics = {}, {}
    for name, value in outcomes.items():
        if not isinstance(name, str) or not name or name == _STATISTICS_ENTRY:
            raise ValueError(f"outcomes: names must be non-empty strings (not {_STATISTICS_ENTRY!r}), got {name!r}")
        structured = isinstance(value, ImageOutcomes)
        arr = np.asarray(value.data if structured else value)
        if arr.ndim != (2 if structured else 1) or arr.dtype.kind not in "biuf":
            raise ValueError(f"outcomes {name!r}: expected a {'2' if structured else '1'}-D numeric array, got "
                             f"shape {arr.shape} dtype {arr.dtype}")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise ValueError(f"outcomes {name!r}: values must be finite")
        arrays[name] = arr
        if structured:
            statistics[name] = value.statistic
    names = sorted(arrays)
    if statistics:
        arrays[_STATISTICS_ENTRY] = np.frombuffer(json.dumps(statistics).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return names, buf.getvalue()


def decode_outcomes(blob: bytes) -> dict[str, Any]:
    """The outcomes of an :func:`encode_outcomes` blob (1-D arrays and ImageOutcomes)."""
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    statistics = json.loads(arrays.pop(_STATISTICS_ENTRY).tobytes()) if _STATISTICS_ENTRY in arrays else {}
    if not statistics:
        return arrays
    from dcbench.stats import ImageOutcomes  # noqa: PLC0415

    return {name: ImageOutcomes(statistics[name], arr) if name in statistics else arr for name, arr in arrays.items()}


class ResultStore:
    """Results in one SQLite file (WAL mode); use as a context manager or call :meth:`close`."""

    SCHEMA_VERSION = 2

    def __init__(self, path: str | Path, readonly: bool = False) -> None:
        """Open (creating parent directories and the schema if needed) the store at ``path``.

        ``readonly`` (the commands that only read: leaderboard, report, results list/show/export)
        never creates a file or folder: a missing store is a :class:`StoreError` saying there
        are no results yet and where it looked; an existing one is opened as it is (a store of
        an older schema is still migrated once, in place).
        """
        self.path = Path(path).expanduser()
        self.readonly = readonly
        self._conn: sqlite3.Connection | None = None
        try:
            if readonly:
                self._open_existing()
                return
            if str(path) != ":memory:":
                self.path.parent.mkdir(parents=True, exist_ok=True)
            # Autocommit mode: transactions are explicit BEGIN/COMMIT in _transaction().
            self._conn = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._init_schema()
        except StoreError:
            self.close()
            raise
        except (OSError, sqlite3.Error) as exc:
            self.close()
            raise StoreError(f"cannot open results store {self.path}: {_one_line(exc)}; "
                             f"pass --store PATH") from exc

    def _open_existing(self) -> None:
        """Connect to an existing store without creating anything (see ``readonly``)."""
        if not self.path.is_file():
            raise StoreError(f"no results yet: there is no results store at {self.path}; run `dcbench eval` or "
                             f"`dcbench compare` first, or pass --store PATH (or set DCBENCH_STORE)")
        uri = self.path.resolve().as_uri()
        try:  # read-write (never creating: mode=rw) so that the last reader removes SQLite's -wal/-shm files
            self._conn = sqlite3.connect(f"{uri}?mode=rw", uri=True, timeout=30.0, isolation_level=None)
            self._conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
        except sqlite3.Error:  # a store others own, in a folder this user cannot write
            if self._conn is not None:
                self._conn.close()
            self._conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=30.0, isolation_level=None)
        self._conn.execute("PRAGMA foreign_keys=ON")
        try:
            row = self._conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path} is not a dcbench results store ({_one_line(exc)}); "
                             f"check --store PATH") from exc
        if row is None or int(row[0]) != self.SCHEMA_VERSION:
            self._init_schema()  # newer: refused with the fix; older: migrated in place, once

    # -- schema -------------------------------------------------------------------------
    def _init_schema(self) -> None:
        with self._transaction():
            self._conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            row = self._conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            found = int(row[0]) if row else None
            # Checked before touching any other table: a newer dcbench may have changed them.
            if found is not None and found > self.SCHEMA_VERSION:
                raise StoreError(
                    f"results store {self.path} has schema version {found}, newer than this "
                    f"dcbench supports ({self.SCHEMA_VERSION}); upgrade dcbench or "
                    f"pass --store PATH")
            for statement in _statements(_SCHEMA):
                self._conn.execute(statement)
            # a new store is a version-1 store migrated like an old one: one code path
            version = 1 if found is None else found
            while version < self.SCHEMA_VERSION:
                _MIGRATIONS[version](self._conn)
                version += 1
            self._conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?)",
                               (str(version),))

    def schema_version(self) -> int:
        """The schema version recorded in the store's ``meta`` table."""
        row = self._execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        return int(row[0])

    # -- transactions -------------------------------------------------------------------
    class _Txn:
        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn

        def __enter__(self) -> sqlite3.Connection:
            # IMMEDIATE takes the write lock up front, so concurrent writers wait (timeout)
            # instead of failing half-way with "database is locked".
            self.conn.execute("BEGIN IMMEDIATE")
            return self.conn

        def __exit__(self, exc_type, exc, tb) -> bool:
            # BaseException included: Ctrl-C during an eval must leave nothing behind.
            if exc_type is None:
                try:
                    self.conn.execute("COMMIT")
                    return False
                except sqlite3.Error:
                    self._rollback()
                    raise
            self._rollback()
            return False

        def _rollback(self) -> None:
            try:
                self.conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # the original error matters more; an open transaction dies on close anyway

    def _transaction(self) -> "ResultStore._Txn":
        return ResultStore._Txn(self._require_open())

    def _require_open(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"results store {self.path} is closed")
        return self._conn

    def _execute(self, sql: str, params: tuple = ()) -> sqlite3.Cursor:
        try:
            return self._require_open().execute(sql, params)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read results store {self.path}: {_one_line(exc)}") from exc

    # -- writing ------------------------------------------------------------------------
    def add(self, result: Result, outcomes: Mapping[str, Any] | None = None) -> int:
        """Store ``result`` (record + metric rows + per-image ``outcomes``, default
        ``result.outcomes``, if any) in one transaction; return its id (also set as ``result.id``).

        Raises ValueError for a malformed record or outcomes (nothing written) and StoreError
        when the database refuses the write (nothing written either).
        """
        record = result.to_dict()  # validates and normalises before anything is written
        record_json = _dumps(record)
        outcomes = result.outcomes if outcomes is None else outcomes
        packed = encode_outcomes(outcomes) if outcomes else None
        try:
            with self._transaction() as conn:
                result_id = self._insert_result(conn, record, record_json)
                for row in record["metrics"]:
                    self._insert_metric(conn, result_id, row)
                if packed is not None:
                    conn.execute("INSERT INTO outcomes(result_id, names, npz) VALUES (?,?,?)",
                                 (result_id, _dumps(packed[0]), packed[1]))
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write to results store {self.path}: "
                             f"{_one_line(exc)}") from exc
        result.id = result_id
        return result_id

    @staticmethod
    def _insert_result(conn: sqlite3.Connection, record: dict, record_json: str) -> int:
        ckpt = record["checkpoint"]
        cur = conn.execute(
            "INSERT INTO results(protocol, protocol_version, checkpoint_name, checkpoint_sha256, "
            "arch, settings_key, record_json, started, wall_s, comparability_key, setup_key, seed, "
            "data_fingerprint) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (record["protocol"], record["protocol_version"], ckpt.get("name"), ckpt["sha256"],
             ckpt.get("arch"), settings_key(record["settings"]), record_json, record["started"],
             record["wall_s"], *_identity_columns(record)))
        return int(cur.lastrowid)

    def remove(self, ids: Iterable[int]) -> int:
        """Delete the results ``ids`` (their metric rows and outcomes too) in one transaction;
        return how many existed."""
        ids = list(dict.fromkeys(int(i) for i in ids))
        try:
            with self._transaction() as conn:
                removed = 0
                for rid in ids:
                    conn.execute("DELETE FROM metrics WHERE result_id=?", (rid,))
                    conn.execute("DELETE FROM outcomes WHERE result_id=?", (rid,))
                    removed += conn.execute("DELETE FROM results WHERE id=?", (rid,)).rowcount
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write to results store {self.path}: {_one_line(exc)}") from exc
        return removed

    @staticmethod
    def _insert_metric(conn: sqlite3.Connection, result_id: int, row: dict) -> None:
        conn.execute(
            "INSERT INTO metrics(result_id, metric, value, tap, split, selection, seed) "
            "VALUES (?,?,?,?,?,?,?)",
            (result_id, row["metric"], row["value"], row["tap"], row["split"], row["selection"],
             row["seed"]))

    # -- reading ------------------------------------------------------------------------
    def find(self, checkpoint_sha256: str, protocol: str, settings: dict) -> list[Result]:
        """Results of ``protocol`` on this checkpoint with exactly these settings, oldest first."""
        cur = self._execute(
            "SELECT id, record_json FROM results WHERE checkpoint_sha256=? AND protocol=? "
            "AND settings_key=? ORDER BY id", (checkpoint_sha256, protocol, settings_key(settings)))
        return [self._load(rec, rid) for rid, rec in cur.fetchall()]

    def results(self, protocol: str | None = None, checkpoint: str | None = None) -> list[Result]:
        """All results, oldest first; of one protocol and/or one checkpoint (its name, or a
        sha256 prefix of 8+ hex digits) when given."""
        sql, params = "SELECT id, record_json FROM results", []
        clauses = []
        if protocol is not None:
            clauses.append("protocol=?")
            params.append(protocol)
        if checkpoint is not None:
            clauses.append("(checkpoint_name=? OR (length(?) >= 8 AND checkpoint_sha256 LIKE ? || '%'))")
            params += [checkpoint, checkpoint, checkpoint.lower()]
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        cur = self._execute(sql + " ORDER BY id", tuple(params))
        return [self._load(rec, rid) for rid, rec in cur.fetchall()]

    def get(self, result_id: int) -> Result:
        """The result stored under ``result_id``; StoreError naming the fix if there is none."""
        row = self._execute("SELECT record_json FROM results WHERE id=?", (int(result_id),)).fetchone()
        if row is None:
            raise StoreError(f"no result {result_id} in {self.path}; see `dcbench results list`")
        return self._load(row[0], int(result_id))

    def outcomes(self, result_id: int) -> dict[str, np.ndarray]:
        """The per-image outcomes stored with ``result_id`` (empty when it has none)."""
        row = self._execute("SELECT npz FROM outcomes WHERE result_id=?", (int(result_id),)).fetchone()
        return {} if row is None else decode_outcomes(row[0])

    def outcome_names(self) -> dict[int, list[str]]:
        """``{result id: outcome names}`` of every result that has outcomes (no arrays read)."""
        cur = self._execute("SELECT result_id, names FROM outcomes")
        return {int(rid): json.loads(names) for rid, names in cur.fetchall()}

    def trials(self, key: str, seed: Any) -> int:
        """How many stored results share comparability ``key`` and ``seed`` (re-runs)."""
        if seed is None:
            cur = self._execute("SELECT COUNT(*) FROM results WHERE comparability_key=? AND seed IS NULL", (key,))
        else:
            cur = self._execute("SELECT COUNT(*) FROM results WHERE comparability_key=? AND seed=?", (key, seed))
        return int(cur.fetchone()[0])

    def __iter__(self) -> Iterator[Result]:
        return iter(self.results())

    def __len__(self) -> int:
        return int(self._execute("SELECT COUNT(*) FROM results").fetchone()[0])

    def _load(self, record_json: str, result_id: int | None = None) -> Result:
        """The stored record, validated: a hand-edited or damaged one (bad JSON, a missing key, a
        non-numeric or NaN value) is one :class:`CorruptRecordError` line naming the store, the id
        and the fix, never an internal error later in a table or an export."""
        try:
            result = Result.from_json(record_json)
            result.validate()
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CorruptRecordError(self.path, result_id, _one_line(exc)) from exc
        result.id = result_id
        return result

    # -- lifetime -----------------------------------------------------------------------
    def close(self) -> None:
        """Close the connection (idempotent)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ResultStore({str(self.path)!r})"


_EXPORT_FIELDS = ("id", "key", "setup_key", "protocol", "protocol_version", "checkpoint_name", "checkpoint_sha256",
                  "arch", "seed", "data_root", "data_fingerprint", "settings", "metric", "value", "tap", "split",
                  "selection", "started", "wall_s", "git", "unverified")


def export_results(results: Iterable[Result], fmt: str = "json") -> str:
    """``json``: a list of full records, each with its store ``id``, ``key`` and ``setup_key``;
    ``csv``: one line per metric row with the identity of its result (settings as JSON)."""
    results = list(results)
    if fmt == "json":
        records = [{"id": r.id, "key": r.key(), "setup_key": r.setup_key(), **r.to_dict()} for r in results]
        return json.dumps(records, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    if fmt != "csv":
        raise ValueError(f"unknown export format {fmt!r}; choose json or csv")
    import csv

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(_EXPORT_FIELDS)
    for r in results:
        ident = [r.id, r.key(), r.setup_key(), r.protocol, r.protocol_version, r.checkpoint.get("name"),
                 r.checkpoint["sha256"], r.checkpoint.get("arch"), r.seed, r.data.get("root"),
                 r.data.get("fingerprint"), settings_key(r.settings)]
        for m in r.metrics:
            row = ident + [m.metric, repr(float(m.value)), m.tap, m.split, m.selection, r.started,
                           r.wall_s, r.git, "true" if r.unverified else "false"]
            # names come from users and files (a checkpoint named "=HYPERLINK(...)"): text, as in the leaderboard
            writer.writerow([csv_text(v) if isinstance(v, str) else v for v in row])
    return buf.getvalue()


#: first characters a spreadsheet reads as a formula (OWASP "CSV Injection": = + - @, and tab
#: and carriage return, which some spreadsheets strip before looking)
_CSV_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def csv_text(text: str) -> str:
    """A text cell a spreadsheet shows as text: one starting like a formula gets a leading
    ``'`` (OWASP's advice), so ``=HYPERLINK(...)`` is never evaluated. A cell that is just a
    number (``-0.3``) is left alone: a spreadsheet reads it as that number, never as a formula."""
    if text.startswith(_CSV_FORMULA_START) and not _PLAIN_NUMBER.fullmatch(text):
        return "'" + text
    return text


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
