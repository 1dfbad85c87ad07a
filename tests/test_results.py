"""Tests for the result record and the SQLite results store."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from dcbench.errors import DcbenchError
from dcbench.results import MetricRow, Result, ResultStore, StoreError, default_store_path

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
    assert con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "1"
    con.close()
    assert store.schema_version() == ResultStore.SCHEMA_VERSION == 1


def test_newer_schema_refused(tmp_path):
    path = tmp_path / "r.db"
    ResultStore(path).close()
    con = sqlite3.connect(path)
    con.execute("UPDATE meta SET value='2' WHERE key='schema_version'")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="schema version 2") as info:
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
