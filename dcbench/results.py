"""The result record and the SQLite results store.

A :class:`Result` is what one protocol run produces: metric rows plus everything needed to
reproduce them (DESIGN.md, "Result record"). :class:`ResultStore` keeps results in one SQLite
file in WAL mode; each :meth:`ResultStore.add` is a single transaction, so a failed or
interrupted evaluation writes nothing. The full record is kept as JSON (the source of truth)
and the metric rows are also spread into a ``metrics`` table so that leaderboards and ad-hoc
analysis are plain SQL queries.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import sqlite3
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from dcbench.errors import DcbenchError

__all__ = ["MetricRow", "Result", "ResultStore", "StoreError", "default_store_path", "utc_now"]

SELECTIONS = ("final", "best", None)
_REQUIRED_KEYS = ("protocol", "protocol_version", "checkpoint", "settings", "data", "metrics")


class StoreError(DcbenchError):
    """The results store cannot be opened, read or written; the message is one line."""


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
        missing = [k for k in _REQUIRED_KEYS if k not in d]
        if missing:
            raise ValueError(f"result record lacks {', '.join(missing)}")
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


def settings_key(settings: dict) -> str:
    """Canonical JSON (sorted keys, compact) of a settings dict."""
    return json.dumps(settings, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False, default=_json_default)


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


class ResultStore:
    """Results in one SQLite file (WAL mode); use as a context manager or call :meth:`close`."""

    SCHEMA_VERSION = 1

    def __init__(self, path: str | Path) -> None:
        """Open (creating parent directories and the schema if needed) the store at ``path``."""
        self.path = Path(path).expanduser()
        self._conn: sqlite3.Connection | None = None
        try:
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
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._conn.execute(statement)
            if found is None:
                self._conn.execute("INSERT INTO meta(key, value) VALUES ('schema_version', ?)",
                                   (str(self.SCHEMA_VERSION),))

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
    def add(self, result: Result) -> int:
        """Store ``result`` (record + metric rows) in one transaction; return its id.

        Raises ValueError for a malformed record (nothing written) and StoreError when the
        database refuses the write (nothing written either).
        """
        record = result.to_dict()  # validates and normalises before anything is written
        record_json = _dumps(record)
        try:
            with self._transaction() as conn:
                result_id = self._insert_result(conn, record, record_json)
                for row in record["metrics"]:
                    self._insert_metric(conn, result_id, row)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write to results store {self.path}: "
                             f"{_one_line(exc)}") from exc
        return result_id

    @staticmethod
    def _insert_result(conn: sqlite3.Connection, record: dict, record_json: str) -> int:
        ckpt = record["checkpoint"]
        cur = conn.execute(
            "INSERT INTO results(protocol, protocol_version, checkpoint_name, checkpoint_sha256, "
            "arch, settings_key, record_json, started, wall_s) VALUES (?,?,?,?,?,?,?,?,?)",
            (record["protocol"], record["protocol_version"], ckpt.get("name"), ckpt["sha256"],
             ckpt.get("arch"), settings_key(record["settings"]), record_json, record["started"],
             record["wall_s"]))
        return int(cur.lastrowid)

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
            "SELECT record_json FROM results WHERE checkpoint_sha256=? AND protocol=? "
            "AND settings_key=? ORDER BY id", (checkpoint_sha256, protocol, settings_key(settings)))
        return [self._load(rec) for (rec,) in cur.fetchall()]

    def results(self, protocol: str | None = None) -> list[Result]:
        """All results (of one protocol when given), oldest first."""
        if protocol is None:
            cur = self._execute("SELECT record_json FROM results ORDER BY id")
        else:
            cur = self._execute("SELECT record_json FROM results WHERE protocol=? ORDER BY id",
                                (protocol,))
        return [self._load(rec) for (rec,) in cur.fetchall()]

    def __iter__(self) -> Iterator[Result]:
        return iter(self.results())

    def __len__(self) -> int:
        return int(self._execute("SELECT COUNT(*) FROM results").fetchone()[0])

    def _load(self, record_json: str) -> Result:
        try:
            return Result.from_json(record_json)
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"results store {self.path} holds a corrupt record: "
                             f"{_one_line(exc)}") from exc

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


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
