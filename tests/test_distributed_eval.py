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
import torch
from click.testing import CliRunner

from dcbench import evaluate, parallel
from dcbench.checkpoint import save_checkpoint
from dcbench.cli import main
from dcbench.data.synthetic import make_image_folder
from dcbench.errors import UsageError
from dcbench.features import rank_batches
from dcbench.models import build_backbone
from test_train_distributed import fake_nccl_group  # noqa: F401 (the simulated NCCL group fixture)

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


def test_torchrun_augmented_linear_stores_one_record_like_one_process(data, ckpt, tmp_path, monkeypatch):
    # TenCrop val (1 image per val batch: 24 batches shared by 2 ranks), global batch 8 = 4 per rank.
    # Crops depend on (seed, epoch, image) only and the ranks read the one-process order (25 train
    # images: rank 1's last share is a pad, not a repeated image), so the global batches, their
    # crops and therefore the top-1 of every tap equal one process's (linear version 5)
    args = ["eval", "--protocol", "linear", "--checkpoint", str(ckpt), "--data", str(data), *SMALL,
            "--set", "epochs=1", "--set", "lr=0.0001"]
    monkeypatch.setenv("DCBENCH_CACHE", str(tmp_path / "cache1"))
    one = CliRunner().invoke(main, [*args, "--store", str(tmp_path / "one.db"), "--device", "cpu"])
    assert one.exit_code == 0, one.output

    _torchrun(*args, cache=tmp_path / "cache2", store=tmp_path / "two.db")
    [single], [parallel] = _records(tmp_path / "one.db"), _records(tmp_path / "two.db")
    assert parallel["extra"]["world_size"] == 2 and parallel["extra"]["mode"] == "augmented"
    assert parallel["extra"]["ranks_max_abs_diff"] == 0.0 and "sharded" in parallel["extra"]["data_parallel"]
    assert parallel["extra"]["skipped_images"] == single["extra"]["skipped_images"] == {"train": 1, "val": 1}
    a, b = _values(single, "top1"), _values(parallel, "top1")
    assert a.keys() == b.keys() == {"conv1", "conv2", "conv3", "conv4", "conv5"}
    assert a == b and single["extra"]["history_top1"] == parallel["extra"]["history_top1"]


def test_torchrun_voc07_cls_fine_tune_stores_one_record_like_one_process(ckpt, tmp_path):
    # global batch 8 = 4 per rank, gradients averaged over it; the test images scored in 2 blocks and
    # gathered. A tiny lr keeps 24 test images from turning crop and dropout noise into AP swings
    from dcbench.data.synthetic_voc import make_voc
    from dcbench.data.voc import VOC_CLASSES

    voc = make_voc(tmp_path / "voc", classes=VOC_CLASSES[:3], images_per_split={"train": 12, "val": 12, "test": 24},
                   image_size=(64, 56))
    args = ["eval", "--protocol", "voc07-cls", "--checkpoint", str(ckpt), "--data", str(voc), "--set", "image_size=64",
            "--set", "workers=0", "--set", "batch_size=8", "--set", "iterations=3", "--set", "lr=1e-7",
            "--set", "test_crops=tencrop"]
    one = CliRunner().invoke(main, [*args, "--store", str(tmp_path / "one.db"), "--device", "cpu"])
    assert one.exit_code == 0, one.output

    _torchrun(*args, cache=tmp_path / "cache2", store=tmp_path / "two.db")
    [single], [parallel_] = _records(tmp_path / "one.db"), _records(tmp_path / "two.db")
    assert parallel_["extra"]["world_size"] == 2 and parallel_["extra"]["ranks_max_abs_diff"] == 0.0
    assert parallel_["extra"]["trunk_check"]["passed"] and len(parallel_["extra"]["loss"]) == 3
    assert parallel_["extra"]["skipped_test_images"] == single["extra"]["skipped_test_images"] == 0
    a, b = _values(single, "mAP"), _values(parallel_, "mAP")
    assert a.keys() == b.keys() == {"fc6-8"} and abs(a["fc6-8"] - b["fc6-8"]) <= 0.05


def test_torchrun_voc_seg_fine_tune_stores_one_record_like_one_process(ckpt, tmp_path):
    # mmseg's train_step on 2 images per rank (global batch 4), gradients averaged before each step;
    # val images scored in 2 blocks, per-image confusion matrices gathered in order
    from dcbench.data.synthetic_voc import make_voc
    from dcbench.data.voc import VOC_CLASSES

    voc = make_voc(tmp_path / "voc", classes=VOC_CLASSES[:3], year="2012", images_per_split={"train": 8, "val": 8},
                   image_size=(64, 56))
    args = ["eval", "--protocol", "voc-seg", "--checkpoint", str(ckpt), "--data", str(voc), "--set", "workers=0",
            "--set", "crop_size=64", "--set", "batch_size=4", "--set", "iterations=2", "--set", "lr=1e-6",
            "--set", "min_lr=0"]
    one = CliRunner().invoke(main, [*args, "--store", str(tmp_path / "one.db"), "--device", "cpu"])
    assert one.exit_code == 0, one.output

    _torchrun(*args, cache=tmp_path / "cache2", store=tmp_path / "two.db")
    [single], [parallel_] = _records(tmp_path / "one.db"), _records(tmp_path / "two.db")
    assert parallel_["extra"]["world_size"] == 2 and parallel_["extra"]["ranks_max_abs_diff"] == 0.0
    assert parallel_["extra"]["train"]["data_parallel"]["batch_per_process"] == 2
    assert len(parallel_["extra"]["train"]["loss"]) == 2 and parallel_["extra"]["trunk_check"]["passed"]
    a, b = _values(single, "mIoU"), _values(parallel_, "mIoU")
    assert a.keys() == b.keys() and all(abs(a[t] - b[t]) <= 0.5 for t in a)


def test_torchrun_voc_det_fine_tune_stores_one_record_like_one_process(ckpt, tmp_path):
    # torchvision Faster R-CNN, 1 image per rank (global batch 2); test detections gathered in order
    from dcbench.data.synthetic_voc import make_voc
    from dcbench.data.voc import VOC_CLASSES

    voc = make_voc(tmp_path / "voc", classes=VOC_CLASSES[:3], images_per_split={"train": 6, "val": 6, "test": 12},
                   image_size=(96, 80))
    args = ["eval", "--protocol", "voc-det", "--checkpoint", str(ckpt), "--data", str(voc), "--set", "workers=0",
            "--set", "iterations=2", "--set", "batch_size=2", "--set", "lr=1e-6", "--set", "min_size=[128]",
            "--set", "test_size=128", "--set", "max_size=192", "--set", "proposals_train=50",
            "--set", "proposals_test=30", "--set", "rois_per_image=16"]
    one = CliRunner().invoke(main, [*args, "--store", str(tmp_path / "one.db"), "--device", "cpu"])
    assert one.exit_code == 0, one.output

    _torchrun(*args, cache=tmp_path / "cache2", store=tmp_path / "two.db")
    [single], [parallel_] = _records(tmp_path / "one.db"), _records(tmp_path / "two.db")
    assert parallel_["extra"]["world_size"] == 2 and parallel_["extra"]["ranks_max_abs_diff"] == 0.0
    assert parallel_["extra"]["trunk_check"]["passed"] and parallel_["extra"]["skipped_test_images"] == 0
    a, b = _values(single, "AP50"), _values(parallel_, "AP50")
    assert a.keys() == b.keys() == {"fc6-8"} and abs(a["fc6-8"] - b["fc6-8"]) <= 0.5


def test_torchrun_retrieval_shards_the_rmac_regions(ckpt, tmp_path, monkeypatch):
    # R-MAC regions through the run context: same-shape batches split in blocks, regions gathered in order
    from dcbench.data.synthetic_retrieval import make_retrieval_root

    root = make_retrieval_root(tmp_path / "ret", names=("roxford5k",), image_size=96)
    args = ["eval", "--protocol", "roxford5k", "--checkpoint", str(ckpt), "--data", str(root), "--set", "workers=0",
            "--set", "image_size=96", "--set", "whitening=none"]
    monkeypatch.setenv("DCBENCH_CACHE", str(tmp_path / "cache1"))
    one = CliRunner().invoke(main, [*args, "--store", str(tmp_path / "one.db"), "--device", "cpu"])
    assert one.exit_code == 0, one.output

    _torchrun(*args, cache=tmp_path / "cache2", store=tmp_path / "two.db")
    [single], [parallel_] = _records(tmp_path / "one.db"), _records(tmp_path / "two.db")
    assert parallel_["extra"]["world_size"] == 2 and "sharded" in parallel_["extra"]["data_parallel"]
    a, b = _values(single, "mAP_medium"), _values(parallel_, "mAP_medium")
    assert a.keys() == b.keys() and a and all(abs(a[t] - b[t]) <= 1e-6 for t in a)
    cache1, cache2 = _files(tmp_path / "cache1"), _files(tmp_path / "cache2")
    assert cache1 and cache1 == cache2  # the region rows, written once by rank 0


def test_protocols_that_are_not_data_parallel_are_refused_before_any_work(data, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not evaluate.plan("linear", {"cached": False}, data).settings.cached  # augmented: data-parallel
    with pytest.raises(UsageError, match="batch_size 9 is not divisible by the 2 processes"):
        evaluate.plan("linear", {"cached": False, "batch_size": 9}, data)
    assert evaluate.plan("linear", {"cached": True, "batch_size": 9}, data).settings.cached  # heads on features
    with pytest.raises(UsageError, match="batch_size 9 is not divisible"):
        evaluate.plan("voc07-cls", {"batch_size": 9}, data)  # refused before the data is looked at
    with pytest.raises(UsageError, match="batch_size 3 is not divisible"):
        evaluate.plan("voc-seg", {"batch_size": 3}, data)
    with pytest.raises(UsageError, match="batch_size 5 is not divisible"):
        evaluate.plan("voc-det", {"batch_size": 5}, data)
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
    # a global batch from unequal shares (rank 0: 1 row, rank 1: 2), then one rank with none
    batch = parallel.all_gather_batch(torch.full((rank + 1, 2), float(rank)))
    assert batch.tolist() == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
    assert parallel.all_gather_batch(torch.ones((2 * rank, 3))).shape == (2, 3)
    # gradients of per-rank mean losses -> the gradient of the global mean (weighted by counts)
    weight, unused = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    weight.grad = torch.full((2,), float(rank + 1))
    assert parallel.average_gradients_([weight, unused], 3 if rank == 0 else 1) == 4
    assert torch.allclose(weight.grad, torch.full((2,), (3 * 1 + 1 * 2) / 4)) and (unused.grad == 0).all()
    assert parallel.average_gradients_([weight], 0) == 0 and (weight.grad == 0).all()
    assert parallel.all_gather_objects(rank) == [0, 1]
    assert parallel.split_map(lambda share: [10 * t[0] for t in share], [(i,) for i in range(5)]) == [0, 10, 20, 30, 40]
    assert parallel.split_map(lambda share: [len(share)] * len(share), [(0,)]) == [1]  # rank 1 gets no task
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


_WORKER_1_OR_2 = textwrap.dedent("""
    # run in one process and on 2 gloo ranks; rank 0 writes what it found (JSON)
    import json, sys, numpy as np, torch, torch.distributed as dist
    from dcbench.data import image_folder
    from dcbench.data.transforms import center_transform
    from dcbench.lowshot import lowshot_tap
    from dcbench.models import build_backbone
    from dcbench.pooling import probe_pooling
    from dcbench.probe import ProbeLoop, ProbeOutcomes, ProbeSet, _train_on_images_parallel
    from dcbench.svm import FitStore, SvmParams, svm_tap
    from protocols.linear import probe_optim
    rank, world, data, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{out}.rdv", rank=rank, world_size=world)
    found = {}

    # the data-parallel probe pass with deterministic crops: the same global batches as one process,
    # so 2 ranks must give the one-process history and per-image outcomes (BatchNorm heads included)
    torch.manual_seed(0)
    backbone = build_backbone("alexnet", input_size=64, seed=5).eval()
    train, val = (image_folder(f"{data}/{s}", center_transform(64)) for s in ("train", "val"))
    for preset in ("deepcluster", "vissl"):
        plans = probe_pooling(backbone, ["conv2", "conv5"], 64, preset)
        probes = ProbeSet(plans, 3, probe_optim(preset, 0.05, 1e-4, 0.9, [1]), "cpu", seed=3)
        loop = ProbeLoop({t: p.module() for t, p in plans.items()}, 2, 8, seed=1, shard=(rank, world))
        outcomes = ProbeOutcomes()
        history, skipped = _train_on_images_parallel(backbone, probes, train, val, 1, loop, outcomes)
        found[preset] = {"history": history, "skipped": skipped,
                         "outcomes": {k: v.tolist() for k, v in outcomes.named().items()},
                         "weights": [float(p.double().sum()) for p in probes.heads.parameters()]}

    # SVM fits shared by the ranks (classes for voc07-svm, units for low-shot) and gathered
    rng = np.random.default_rng(0)
    x, x_test = rng.normal(size=(60, 12)), rng.normal(size=(40, 12))
    y, y_test = (rng.choice([1, -1, -1, 0], size=(n, 5)) for n in (60, 40))
    x[:, :5] += 2.0 * (y == 1)  # learnable
    classes, costs, params = [f"c{i}" for i in range(5)], [0.01, 0.1, 1.0], SvmParams(cv_folds=2)
    aps, results = svm_tap(x, y, x_test, y_test, classes, costs, params, FitStore(None), jobs=1)
    sets = {(k, s): [rng.permutation(60)[:20 + 5 * s].tolist() for _ in classes] for k in (1, 2) for s in range(2)}
    low, fitted = lowshot_tap(x, y, x_test, y_test, sets, classes, costs, params, FitStore(None), jobs=1)
    found["svm"] = {"aps": aps, "coef": [r.coef.tolist() for r in results], "cost": [r.cost for r in results],
                    "cv": [np.nan_to_num(r.cv_aps).tolist() for r in results], "fitted": sum(r.fitted for r in results),
                    "lowshot": np.nan_to_num(low, nan=-1).tolist(), "lowshot_fitted": fitted}
    if rank == 0:
        open(out, "w").write(json.dumps(found))
    if world > 1:
        dist.destroy_process_group()
""")


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory):
    """What the worker found in one process and on rank 0 of two (run once for the tests below)."""
    tmp = tmp_path_factory.mktemp("w")
    # 24 readable images per split (even: the DistributedSampler pads nothing), 3 steps of 8 per epoch
    data = make_image_folder(tmp / "d", n_classes=3, per_class=8, image_size=64)
    script = tmp / "worker.py"
    script.write_text(_WORKER_1_OR_2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(w), str(data), str(tmp / f"w{w}")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for w, r in ((1, 0), (2, 0), (2, 1))]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    return tuple(json.loads((tmp / f"w{w}").read_text()) for w in (1, 2))


def test_data_parallel_probe_steps_equal_one_process(one_and_two):
    one, two = one_and_two
    for preset in ("deepcluster", "vissl"):
        assert two[preset]["history"] == one[preset]["history"]  # val hits are counts: exactly equal
        assert two[preset]["outcomes"] == one[preset]["outcomes"]  # per image, dataset order
        assert two[preset]["skipped"] == one[preset]["skipped"] == {"train": 0, "val": 0}
        assert np.allclose(two[preset]["weights"], one[preset]["weights"], rtol=1e-5, atol=1e-6)
    assert len(one["vissl"]["outcomes"]["top1/conv2/final"]) == 24
    assert len({json.dumps(h) for h in one["deepcluster"]["history"]}) == 2  # the heads moved between epochs


def test_svm_fits_shared_by_ranks_equal_one_process(one_and_two):
    one, two = (found["svm"] for found in one_and_two)
    assert two == one  # bit for bit: the same deterministic fits, gathered in class / unit order
    assert one["fitted"] == 5 * 3 and one["lowshot_fitted"] == 2 * 2 * 5 * 3 and 0 < np.mean(one["aps"]) < 1


def test_probe_and_finetune_collectives_hand_tensors_on_the_group_device(fake_nccl_group):
    # the simulated NCCL group of tests/test_train_distributed.py: stand-in sizes are 1 row per rank
    batch = parallel.all_gather_batch(torch.ones((1, 3)))
    assert batch.shape == (2, 3) and batch.device.type == "cpu"
    weight = torch.nn.Parameter(torch.zeros(2))
    weight.grad = torch.ones(2)
    assert parallel.average_gradients_([weight], 1) == 1 and weight.grad.device.type == "cpu"
    assert fake_nccl_group.count("all_gather") == 2 and fake_nccl_group.count("all_reduce") == 1


def test_one_process_collectives_are_identities():
    from dcbench import parallel

    rows = np.ones((2, 3), np.float32)
    assert parallel.all_gather_rows(rows, np.arange(2))[0] is rows
    assert parallel.all_reduce_sum([1, 2]).tolist() == [1, 2] and parallel.broadcast_object(3) == 3
    assert parallel.gather_objects("x") == ["x"] and parallel.world_size() == 1 and parallel.rank() == 0
    assert parallel.all_gather_objects("x") == ["x"] and parallel.split_map(lambda t: [len(t)] * len(t), [(1,), (2,)]) == [2, 2]
    assert parallel.per_rank_batch(256, 1) == 256 and parallel.per_rank_batch(256, 8) == 32
    with pytest.raises(UsageError, match="batch_size 256 is not divisible by the 3 processes"):
        parallel.per_rank_batch(256, 3)
