"""Data-parallel evaluation under torchrun (2 gloo processes on the CPU): same numbers as one
process, the same feature cache byte for byte, one record with world_size 2; the collectives."""
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dcbench import evaluate
from dcbench.checkpoint import save_checkpoint
from dcbench.cli import main
from dcbench.data.synthetic import make_image_folder
from dcbench.errors import UsageError
from dcbench.features import rank_batches
from dcbench.models import build_backbone

SMALL = ["--set", "image_size=64", "--set", "workers=0", "--set", "batch_size=8"]
KNN = ["--set", "ks=[5]"]
LINEAR = ["--set", "cached=true", "--set", "epochs=2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 3 x 8 images + 1 unreadable per split: 4 batches of 8 -> rank 0 reads 2, rank 1 reads 2
    return make_image_folder(tmp_path_factory.mktemp("d") / "shapes", n_classes=3, per_class=8, image_size=64,
                             corrupt=1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("c") / "mine.pth"
    save_checkpoint(path, build_backbone("alexnet", input_size=64, seed=5))
    return path


def _torchrun(*args, cache: Path, store: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DCBENCH_CACHE": str(cache), "DCBENCH_STORE": str(store)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "dcbench", *map(str, args), "--device", "cpu"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _records(store: Path) -> list[dict]:
    with sqlite3.connect(store) as db:
        return [json.loads(r) for (r,) in db.execute("select record_json from results order by id")]


def _values(record: dict, metric: str) -> dict:
    return {m["tap"]: m["value"] for m in record["metrics"] if m["metric"] == metric and m["selection"] != "best"}


def _files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_torchrun_knn_equals_one_process_and_writes_the_same_cache(data, ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("DCBENCH_CACHE", str(tmp_path / "cache1"))
    one = CliRunner().invoke(main, ["eval", "--protocol", "knn", "--checkpoint", str(ckpt), "--data", str(data),
                                    "--store", str(tmp_path / "one.db"), "--device", "cpu", *SMALL, *KNN])
    assert one.exit_code == 0, one.output

    run = _torchrun("eval", "--protocol", "knn", "--checkpoint", ckpt, "--data", data, "--json", *SMALL, *KNN,
                    cache=tmp_path / "cache2", store=tmp_path / "two.db")
    assert run.stdout.count("knn on mine") == 1  # only rank 0 prints
    [single], [parallel] = _records(tmp_path / "one.db"), _records(tmp_path / "two.db")
    assert parallel["extra"]["world_size"] == 2 and parallel["extra"]["launcher"] == "torchrun"
    assert single["extra"]["world_size"] == 1 and single["extra"]["launcher"] == "process"
    assert parallel["extra"]["ranks_max_abs_diff"] == 0.0
    assert parallel["extra"]["skipped_images"] == single["extra"]["skipped_images"] == {"train": 1, "val": 1}
    for metric in ("top1_k5", "top5_k5"):
        a, b = _values(single, metric), _values(parallel, metric)
        assert a.keys() == b.keys() and all(abs(a[t] - b[t]) <= 1e-6 for t in a)
    cache1, cache2 = _files(tmp_path / "cache1"), _files(tmp_path / "cache2")
    assert cache1 and cache1 == cache2  # every .npy, .idx.npy and sidecar, byte for byte


def test_torchrun_compare_cached_linear_and_a_random_init(data, ckpt, tmp_path, monkeypatch):
    args = ["compare", str(ckpt), "random:alexnet", "--protocol", "linear", "--data", str(data), *SMALL, *LINEAR]
    monkeypatch.setenv("DCBENCH_CACHE", str(tmp_path / "cache1"))
    one = CliRunner().invoke(main, [*args, "--store", str(tmp_path / "one.db"), "--device", "cpu"])
    assert one.exit_code == 0, one.output

    run = _torchrun(*args, cache=tmp_path / "cache2", store=tmp_path / "two.db")
    assert run.stdout.count("linear · top1 (val)") == 1
    singles, parallels = _records(tmp_path / "one.db"), _records(tmp_path / "two.db")
    assert len(parallels) == 2 and all(r["extra"]["world_size"] == 2 for r in parallels)
    for single, parallel in zip(singles, parallels):
        assert single["checkpoint"] == parallel["checkpoint"]
        a, b = _values(single, "top1"), _values(parallel, "top1")
        assert a.keys() == b.keys() and all(abs(a[t] - b[t]) <= 0.5 for t in a)
    random_init = parallels[1]
    assert random_init["extra"]["bn_recalibrate"]["ran"] is True  # rank 0 re-estimated, rank 1 received it
    assert _files(tmp_path / "cache1") == _files(tmp_path / "cache2")


def test_protocols_that_are_not_data_parallel_are_refused_before_any_work(data, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="cached=true"):
        evaluate.plan("linear", {"cached": False}, data)
    with pytest.raises(UsageError, match="fine-tunes"):
        evaluate.plan("voc07-cls", {}, data)
    assert evaluate.plan("linear", {"cached": True}, data).settings.cached
    assert evaluate.plan("knn", {}, data).protocol.name == "knn"


def test_rank_batches_are_the_one_process_batches_in_contiguous_blocks():
    one = rank_batches(21, 4, (0, 1))
    assert one == [list(range(s, min(s + 4, 21))) for s in range(0, 21, 4)]
    for world in (2, 3, 4, 8):
        parts = [rank_batches(21, 4, (r, world)) for r in range(world)]
        assert [b for part in parts for b in part] == one
    assert rank_batches(5, 4, (1, 4)) == [[4]] and rank_batches(5, 4, (3, 4)) == []
    grouped = rank_batches(6, 2, (1, 2), batch_sampler=lambda idx, bs: [[5, 3], [1], [4, 2, 0]])
    assert grouped == [[4, 2, 0]]


_WORKER = textwrap.dedent("""
    import sys, numpy as np, torch, torch.distributed as dist
    from dcbench import parallel
    rank, store = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    rows = np.arange(30, dtype=np.float32).reshape(10, 3) + 100 * rank if rank == 0 else np.zeros((0, 0), np.float32)
    owner = np.arange(10, dtype=np.int64) if rank == 0 else np.zeros(0, dtype=np.int64)
    if rank == 1:
        rows, owner = np.full((3, 3), 7.5, np.float32), np.array([20, 21, 22])
    got, got_owner = parallel.all_gather_rows(rows, owner, chunk_bytes=24)  # 2 rows per chunk: 5 rounds
    assert got.dtype == np.float32 and got.shape == (13, 3), got.shape
    assert (got[:10] == np.arange(30).reshape(10, 3)).all() and (got[10:] == 7.5).all()
    assert got_owner.tolist() == list(range(10)) + [20, 21, 22]
    empty, _ = parallel.all_gather_rows(np.zeros((0, 0), np.float32), np.zeros(0, np.int64))
    assert empty.shape[0] == 0
    counts = parallel.all_reduce_sum([2**40 + rank, 1])
    assert counts.dtype == np.int64 and counts.tolist() == [2**41 + 1, 2]
    module = torch.nn.BatchNorm1d(3)
    module.running_mean.fill_(float(rank + 1))
    parallel.broadcast_module_(module)
    assert (module.running_mean == 1).all()
    assert parallel.broadcast_object({"rank": rank}) == {"rank": 0}
    dist.destroy_process_group()
""")


def test_collectives_on_two_gloo_processes(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(tmp_path / "rendezvous")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs


def test_one_process_collectives_are_identities():
    from dcbench import parallel

    rows = np.ones((2, 3), np.float32)
    assert parallel.all_gather_rows(rows, np.arange(2))[0] is rows
    assert parallel.all_reduce_sum([1, 2]).tolist() == [1, 2] and parallel.broadcast_object(3) == 3
    assert parallel.gather_objects("x") == ["x"] and parallel.world_size() == 1 and parallel.rank() == 0
