"""Shared pytest setup: deterministic, single-threaded torch, no network."""
import os

os.environ.setdefault("DCBENCH_STORE", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "store.db"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Keep caches and the default results store inside the test's temp folder."""
    monkeypatch.setenv("DCBENCH_STORE", str(tmp_path / "store.db"))
    monkeypatch.setenv("DCBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
