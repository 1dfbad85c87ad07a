"""Shared pytest setup: deterministic, single-threaded torch, no network."""
import os

os.environ.setdefault("DCBENCH_STORE", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "store.db"))

import pytest  # noqa: E402
import torch  # noqa: E402

# One torch thread: the suite runs many tiny ops, and OpenMP spin-waits made them several
# times slower with 2 threads whenever anything else used the 2 cores. (Subprocess tests
# set OMP_NUM_THREADS=1 for the same reason.)
torch.set_num_threads(1)

#: Modules that keep one pytest worker busy for a minute or more (`pytest --durations=0` on a 2-core
#: VM), longest first. `make test` runs them before the rest (`--no-loadscope-reorder`, xdist >= 3.8):
#: xdist's own order (most tests first) left the one-test demo module for last, alone on one worker
#: for three minutes while the other idled. A module missing here only runs later.
SLOW_MODULES = ("test_distributed_eval.py", "test_demo.py", "test_dcv2.py", "test_train.py", "test_faults.py",
                "test_protocol_numbers.py", "test_voc_det.py", "test_launch.py", "test_train_faults.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow modules first, in SLOW_MODULES order; the others keep pytest's order (a stable sort)."""
    rank = {name: i for i, name in enumerate(SLOW_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_MODULES)))


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Keep caches and the default results store inside the test's temp folder."""
    monkeypatch.setenv("DCBENCH_STORE", str(tmp_path / "store.db"))
    monkeypatch.setenv("DCBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
