"""Tests for the result record and the SQLite results store."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from dcbench.errors import DcbenchError
from dcbench.results import (MetricRow, Result, ResultStore, StoreError, comparability_key, default_store_path,
                             export_results, outcome_key, setup_key)

RECORD_KEYS = {"protocol", "protocol_version", "checkpoint", "settings", "data", "metrics",
               "versions", "git", "started", "wall_s", "extra"}


def make_result(sha: str = "a" * 64, name: str = "dc_alexnet", protocol: str = "linear",
                settings: dict | None = None, seed: int | None = 0, value: float = 41.25) -> Result:
    """A realistic record with two taps and a best/final pair."""
    settings = {"epochs": 2, "lr": 0.01, "taps": ["conv3", "conv5"], "seed": seed} \
        if settings is None else settings
    return Result(
        protocol=protocol, protocol_version="1.0",
        checkpoint={"name": name, "sha256": sha, "arch": "alexnet"},
        settings=settings, data={"root": "/data/imagenet", "fingerprint": "f00d"},
        metrics=[MetricRow("top1", value, tap="conv3", split="val", selection="final", seed=seed),
                 MetricRow("top1", value + 1, tap="conv3", split="val", selection="best", seed=seed),
                 MetricRow("top5", 66.5, tap="conv5", split="val", selection="final", seed=seed)],
        versions={"python": "3.11.7", "torch": "2.14.1"}, git="abc123", started="2025-01-01T00:00:00+00:00",
        wall_s=12.5, extra={"crops": "center", "epoch_selection": "final"})


@pytest.fixture
def store(tmp_path: Path):
    with ResultStore(tmp_path / "sub" / "results.db") as s:
        yield s


def table_counts(path: Path) -> tuple[int, int]:
    con = sqlite3.connect(path)
    try:
        return (con.execute("SELECT COUNT(*) FROM results").fetchone()[0],
                con.execute("SELECT COUNT(*) FROM metrics").fetchone()[0])
    finally:
        con.close()


# -- the record -----------------------------------------------------------------------------
def test_json_round_trip_keys_and_one_line():
    r = make_result()
    text = r.to_json()
    assert "\n" not in text
    d = json.loads(text)
    assert set(d) == RECORD_KEYS
    assert d["metrics"][0] == {"metric": "top1", "value": 41.25, "tap": "conv3", "split": "val",
                               "selection": "final", "seed": 0}
    assert Result.from_dict(d) == r
    assert Result.from_json(text) == r


def test_to_dict_normalises_numpy_and_tuples():
    r = make_result(settings={"taps": ("conv1", "conv2"), "lr": np.float32(0.5), "n": np.int64(3)})
    r.metrics.append(MetricRow("top1", np.float32(12.5), seed=np.int64(2)))
    d = r.to_dict()
    assert d["settings"] == {"taps": ["conv1", "conv2"], "lr": 0.5, "n": 3}
    assert d["metrics"][-1]["value"] == 12.5 and type(d["metrics"][-1]["seed"]) is int
    json.dumps(d)  # plain JSON types only


def test_from_dict_accepts_layer_alias_and_missing_optionals():
    d = {"protocol": "svm", "protocol_version": "1", "checkpoint": {"sha256": "x"},
         "settings": {}, "data": {}, "metrics": [{"metric": "mAP", "value": 50.0, "layer": "conv5"}]}
    r = Result.from_dict(d)
    assert r.metrics[0].tap == "conv5" and r.metrics[0].seed is None
    assert r.extra == {} and r.git is None
    with pytest.raises(ValueError, match="metrics"):
        Result.from_dict({k: v for k, v in d.items() if k != "metrics"})


def test_settings_key_is_canonical():
    a = make_result(settings={"lr": 0.1, "epochs": 3})
    b = make_result(settings={"epochs": 3, "lr": 0.1})
    assert a.settings_key() == b.settings_key() == '{"epochs":3,"lr":0.1}'


@pytest.mark.parametrize("bad", ["41.2", None, float("nan"), float("inf"), True])
def test_bad_metric_value_rejected(bad):
    r = make_result()
    r.metrics[1].value = bad
    with pytest.raises(ValueError, match="top1"):
        r.to_json()


def test_bad_selection_rejected():
    r = make_result()
    r.metrics[0].selection = "last"
    with pytest.raises(ValueError, match="selection"):
        r.to_dict()


# -- the store ------------------------------------------------------------------------------
def test_store_round_trip(store):
    r = make_result()
    rid = store.add(r)
    assert isinstance(rid, int)
    assert store.results() == [r]
    assert store.results("linear") == [r]
    assert store.results("svm") == []
    assert len(store) == 1


def test_store_persists_across_connections(tmp_path):
    path = tmp_path / "r.db"
    r = make_result()
    with ResultStore(path) as s:
        s.add(r)
    with ResultStore(path) as s:
        assert s.results() == [r]


def test_metric_rows_queryable_in_sql(store):
    rid = store.add(make_result())
    con = sqlite3.connect(store.path)
    rows = con.execute("SELECT r.checkpoint_name, r.arch, m.metric, m.tap, m.value, m.selection, m.seed "
                       "FROM metrics m JOIN results r ON r.id = m.result_id "
                       "WHERE m.result_id = ? ORDER BY m.rowid", (rid,)).fetchall()
    con.close()
    assert rows[0] == ("dc_alexnet", "alexnet", "top1", "conv3", 41.25, "final", 0)
    assert len(rows) == 3


def test_find_matches_identical_settings_and_sha_only(store):
    base = make_result()
    store.add(base)
    store.add(make_result(sha="b" * 64))
    store.add(make_result(settings={**base.settings, "lr": 0.02}))
    store.add(make_result(protocol="svm"))
    # same settings in another key order still match
    reordered = dict(reversed(list(base.settings.items())))
    found = store.find("a" * 64, "linear", reordered)
    assert found == [base]
    assert store.find("a" * 64, "linear", {**base.settings, "epochs": 3}) == []
    assert store.find("c" * 64, "linear", base.settings) == []
    # a subset of the settings is not "the same settings"
    assert store.find("a" * 64, "linear", {"epochs": 2}) == []


def test_failed_add_with_bad_value_writes_nothing(store):
    store.add(make_result())
    before = table_counts(store.path)
    bad = make_result(sha="b" * 64)
    bad.metrics[2].value = "n/a"
    with pytest.raises(ValueError):
        store.add(bad)
    assert table_counts(store.path) == before
    assert len(store.results()) == 1


def test_exception_mid_transaction_rolls_back(store, monkeypatch):
    store.add(make_result())
    before = table_counts(store.path)
    calls = []
    original = ResultStore._insert_metric

    def flaky(conn, result_id, row):
        calls.append(row)
        if len(calls) == 2:  # the results row and one metric row are already inserted
            raise KeyboardInterrupt  # an interrupted eval must write nothing
        original(conn, result_id, row)

    monkeypatch.setattr(ResultStore, "_insert_metric", staticmethod(flaky))
    with pytest.raises(KeyboardInterrupt):
        store.add(make_result(sha="b" * 64))
    assert len(calls) == 2
    assert table_counts(store.path) == before
    monkeypatch.undo()
    # the connection is still usable afterwards
    store.add(make_result(sha="c" * 64))
    assert len(store) == 2


def test_sqlite_error_mid_transaction_becomes_store_error(store, monkeypatch):
    def broken(conn, result_id, row):
        conn.execute("INSERT INTO no_such_table VALUES (1)")

    monkeypatch.setattr(ResultStore, "_insert_metric", staticmethod(broken))
    with pytest.raises(StoreError, match="cannot write"):
        store.add(make_result())
    assert table_counts(store.path) == (0, 0)


def test_wal_mode_and_schema_version(store):
    store.add(make_result())
    con = sqlite3.connect(store.path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "2"
    con.close()
    assert store.schema_version() == ResultStore.SCHEMA_VERSION == 2


def test_newer_schema_refused(tmp_path):
    path = tmp_path / "r.db"
    ResultStore(path).close()
    con = sqlite3.connect(path)
    con.execute("UPDATE meta SET value='3' WHERE key='schema_version'")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="schema version 3") as info:
        ResultStore(path)
    assert isinstance(info.value, DcbenchError)
    assert "\n" not in str(info.value)


def test_unopenable_store_gives_one_line_error(tmp_path):
    not_db = tmp_path / "junk.db"
    not_db.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="cannot open results store .*--store PATH"):
        ResultStore(not_db)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot open results store"):
        ResultStore(blocker / "sub" / "r.db")  # parent is a file


def test_closed_store_raises_store_error(tmp_path):
    s = ResultStore(tmp_path / "r.db")
    s.close()
    s.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        s.results()


def test_default_store_path(monkeypatch, tmp_path):
    monkeypatch.setenv("DCBENCH_STORE", str(tmp_path / "x.db"))
    assert default_store_path() == tmp_path / "x.db"
    monkeypatch.delenv("DCBENCH_STORE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_store_path() == tmp_path / ".dcbench" / "results.db"


# -- identity ---------------------------------------------------------------------------------
def test_comparability_key_ignores_seed_and_execution_settings_only():
    base = make_result()
    key = base.key()
    assert len(key) == 64 and key == comparability_key(base.to_dict())
    assert make_result(seed=7).key() == key  # another trial of the same experiment
    assert make_result(settings={**base.settings, "workers": 8, "cache": False}).key() == key
    assert make_result(settings={**base.settings, "epochs": 3}).key() != key
    other_data = make_result()
    other_data.data = {"root": "/data/imagenet", "fingerprint": "beef"}
    assert other_data.key() != key
    other_version = make_result()
    other_version.protocol_version = "2.0"
    assert other_version.key() != key
    other_ckpt = make_result(sha="b" * 64)
    assert other_ckpt.key() != key and other_ckpt.setup_key() == base.setup_key() == setup_key(base.to_dict())
    moved = make_result()
    moved.data = {"root": "/elsewhere", "fingerprint": "f00d"}  # the same data at another path
    assert moved.key() == key


def test_key_columns_are_stored(store):
    r = make_result(seed=2)
    rid = store.add(r)
    assert r.id == rid == store.results()[0].id
    con = sqlite3.connect(store.path)
    row = con.execute("SELECT comparability_key, setup_key, seed, data_fingerprint FROM results").fetchone()
    con.close()
    assert row == (r.key(), r.setup_key(), 2, "f00d")


def _v1_store(path: Path, records: list[Result]) -> None:
    """A store as dcbench wrote it before schema version 2."""
    con = sqlite3.connect(path)
    con.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
        INSERT INTO meta VALUES ('schema_version', '1');
        CREATE TABLE results (id INTEGER PRIMARY KEY AUTOINCREMENT, protocol TEXT NOT NULL,
            protocol_version TEXT NOT NULL, checkpoint_name TEXT, checkpoint_sha256 TEXT NOT NULL, arch TEXT,
            settings_key TEXT NOT NULL, record_json TEXT NOT NULL, started TEXT, wall_s REAL);
        CREATE TABLE metrics (result_id INTEGER NOT NULL REFERENCES results(id) ON DELETE CASCADE,
            metric TEXT NOT NULL, value REAL NOT NULL, tap TEXT, split TEXT, selection TEXT, seed INTEGER);
    """)
    for r in records:
        con.execute("INSERT INTO results(protocol, protocol_version, checkpoint_name, checkpoint_sha256, arch, "
                    "settings_key, record_json) VALUES (?,?,?,?,?,?,?)",
                    (r.protocol, r.protocol_version, r.checkpoint["name"], r.checkpoint["sha256"], "alexnet",
                     r.settings_key(), r.to_json()))
    con.commit()
    con.close()


def test_version_1_store_is_migrated(tmp_path):
    path = tmp_path / "old.db"
    old = [make_result(seed=0), make_result(seed=1, settings={"epochs": 5, "seed": 1})]
    _v1_store(path, old)
    with ResultStore(path) as s:
        assert s.schema_version() == 2
        assert s.results() == old
        con = sqlite3.connect(path)
        keys = con.execute("SELECT comparability_key, seed FROM results ORDER BY id").fetchall()
        con.close()
        assert keys == [(old[0].key(), 0), (old[1].key(), 1)]
        assert s.trials(old[0].key(), 0) == 1
        s.add(make_result(seed=0), outcomes={"top1/conv3/final": np.ones(4, bool)})  # the outcomes table exists
        assert s.trials(old[0].key(), 0) == 2
    with ResultStore(path) as s:  # opening again migrates nothing
        assert s.schema_version() == 2 and len(s) == 3


# -- outcomes -----------------------------------------------------------------------------------
def test_outcomes_round_trip_and_key_names(store):
    assert outcome_key("top1", "conv3", "final") == "top1/conv3/final"
    assert outcome_key("top1_k20", "conv3") == "top1_k20/conv3" and outcome_key("mAP") == "mAP"
    r = make_result()
    r.outcomes = {"top1/conv3/final": np.array([True, False, True]), "top5/conv5": np.arange(3, dtype=np.float32)}
    rid = store.add(r)
    got = store.outcomes(rid)
    assert set(got) == set(r.outcomes) and got["top1/conv3/final"].dtype == bool
    np.testing.assert_array_equal(got["top1/conv3/final"], [True, False, True])
    assert store.outcome_names() == {rid: ["top1/conv3/final", "top5/conv5"]}
    assert store.outcomes(store.add(make_result(sha="b" * 64))) == {}


@pytest.mark.parametrize("bad", [np.zeros((2, 2)), np.array(["a", "b"]), np.array([1.0, np.nan])])
def test_bad_outcomes_write_nothing(store, bad):
    with pytest.raises(ValueError, match="outcomes"):
        store.add(make_result(), outcomes={"top1/conv3/final": bad})
    assert len(store) == 0


def test_outcomes_are_in_the_results_transaction(store, monkeypatch):
    def broken(conn, result_id, row):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(ResultStore, "_insert_metric", staticmethod(broken))
    with pytest.raises(StoreError):
        store.add(make_result(), outcomes={"top1/conv3/final": np.ones(3)})
    con = sqlite3.connect(store.path)
    assert con.execute("SELECT COUNT(*) FROM outcomes").fetchone()[0] == 0
    con.close()


# -- curating -----------------------------------------------------------------------------------
def test_get_remove_and_filters(store):
    a = store.add(make_result(), outcomes={"top1/conv3/final": np.ones(2)})
    b = store.add(make_result(sha="b" * 64, name="other"))
    store.add(make_result(protocol="knn"))
    assert store.get(b).checkpoint["name"] == "other"
    with pytest.raises(StoreError, match="no result 99 .*results list"):
        store.get(99)
    assert [r.id for r in store.results(checkpoint="other")] == [b]
    assert [r.id for r in store.results(checkpoint="bbbbbbbb")] == [b]
    assert [r.id for r in store.results(checkpoint="bbbb")] == []  # too short a prefix
    assert [r.id for r in store.results("linear", "dc_alexnet")] == [a]
    assert store.remove([a, 42]) == 1
    assert len(store) == 2 and store.outcomes(a) == {}
    assert table_counts(store.path) == (2, 6)


def test_export_json_and_csv(store):
    store.add(make_result())
    results = store.results()
    records = json.loads(export_results(results, "json"))
    assert records[0]["id"] == 1 and records[0]["key"] == results[0].key() and records[0]["settings"]["lr"] == 0.01
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(export_results(results, "csv"))))
    assert len(rows) == 3 and rows[0]["metric"] == "top1" and float(rows[0]["value"]) == 41.25
    assert rows[0]["key"] == results[0].key() and json.loads(rows[0]["settings"])["epochs"] == 2
    assert rows[0]["data_fingerprint"] == "f00d" and rows[0]["seed"] == "0"
    with pytest.raises(ValueError, match="json or csv"):
        export_results(results, "xml")
