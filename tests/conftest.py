"""Shared pytest setup: deterministic, single-threaded torch, no network."""
import os

os.environ.setdefault("DCBENCH_STORE", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "store.db"))

import pytest  # noqa: E402
import torch  # noqa: E402

# One torch thread: the suite runs many tiny ops, and OpenMP spin-waits made them several
# times slower with 2 threads whenever anything else used the 2 cores. (Subprocess tests
# set OMP_NUM_THREADS=1 for the same reason.)
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Keep caches and the default results store inside the test's temp folder."""
    monkeypatch.setenv("DCBENCH_STORE", str(tmp_path / "store.db"))
    monkeypatch.setenv("DCBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
