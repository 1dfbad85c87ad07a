"""Training under torch.distributed: collectives on the group's device, every model family under
2-process torchrun (gloo), device strings per rank, rank 0's clustering threads, per-rank state."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from dcbench import parallel
from dcbench.checkpoint import load_checkpoint
from dcbench.data.synthetic import make_image_folder
from dcbench.errors import DcbenchError, UsageError
from dcbench.models import build_backbone
from dcbench.train import distributed as tdist
from dcbench.train.common import freeze_unreached

#: the fake "GPU" of a simulated NCCL group: not the CPU, where the NCCL class of bug puts tensors
FAKE_GROUP_DEVICE = torch.device("meta")


# ----------------------------------------------------------------------------- collectives
@pytest.fixture
def fake_nccl_group(monkeypatch):
    """A simulated 2-rank group whose device is not the CPU: every collective checks that each
    tensor it is handed lives on the group's device (NCCL accepts CUDA tensors only), records
    the call, and leaves the data alone. Results come back through ``parallel.to_host``."""
    calls: list[str] = []

    def check(name, *tensors):
        for t in tensors:
            assert t.device == FAKE_GROUP_DEVICE, f"{name} was handed a tensor on {t.device}, not the group's device"
        calls.append(name)

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(parallel, "group_device", lambda: FAKE_GROUP_DEVICE)
    monkeypatch.setattr(tdist, "group_device", lambda: FAKE_GROUP_DEVICE)
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None, group=None, async_op=False: check("all_reduce", t))
    monkeypatch.setattr(dist, "broadcast", lambda t, src=0, group=None, async_op=False: check("broadcast", t))
    monkeypatch.setattr(dist, "all_gather", lambda out, t, group=None, async_op=False: check("all_gather", t, *out))
    monkeypatch.setattr(dist, "barrier", lambda group=None, async_op=False, device_ids=None: calls.append("barrier"))

    def broadcast_object_list(objs, src=0, group=None, device=None):
        assert device == FAKE_GROUP_DEVICE, f"broadcast_object_list on {device}, not the group's device"
        calls.append("broadcast_object_list")

    def gather_object(obj, out=None, dst=0, group=None):
        out[:] = [obj, obj]
        calls.append("gather_object")

    monkeypatch.setattr(dist, "broadcast_object_list", broadcast_object_list)
    monkeypatch.setattr(dist, "gather_object", gather_object)

    def to_host(t):  # meta tensors hold no data: stand-in values of the right shape and dtype
        return torch.ones(t.shape, dtype=t.dtype)

    monkeypatch.setattr(parallel, "to_host", to_host)
    monkeypatch.setattr(tdist, "to_host", to_host)
    return calls


def test_training_collectives_hand_tensors_on_the_group_device(fake_nccl_group):
    info = tdist.DistInfo(rank=0, world_size=2, device=torch.device("cpu"))
    assert tdist.all_reduce_sum(info, 2.5) == 1.0  # the stand-in value came back through to_host
    assert tdist.all_agree(info, True) is True
    assert tdist.broadcast_from_main(info, {"a": 1}) == {"a": 1}
    assert tdist.gather_to_main(info, 3) == [3, 3]
    tdist.barrier(info)
    assert fake_nccl_group == ["all_reduce", "all_reduce", "broadcast_object_list", "gather_object", "barrier"]


def test_evaluation_collectives_hand_tensors_on_the_group_device(fake_nccl_group):
    assert parallel.all_reduce_sum([1, 2]).tolist() == [1, 1]
    assert parallel.broadcast_object(7) == 7
    # the stand-in shapes say 1 row of width 1 per rank: hand in exactly that
    rows, owner = parallel.all_gather_rows(np.ones((1, 1), np.float32), np.arange(1), chunk_bytes=32)
    assert rows.shape == (2, 1) and owner.shape == (2,)
    parallel.broadcast_module_(torch.nn.Linear(2, 2))
    parallel.barrier()
    assert fake_nccl_group.count("all_gather") == 3 and fake_nccl_group.count("broadcast") == 2
    assert "all_reduce" in fake_nccl_group and "broadcast_object_list" in fake_nccl_group


def test_gloo_group_device_is_the_cpu_and_no_group_is_the_identity():
    assert parallel.group_device() == torch.device("cpu")
    info = tdist.DistInfo()
    assert tdist.all_reduce_sum(info, 2.5) == 2.5 and tdist.all_agree(info, False) is False


# ----------------------------------------------------------------------------- devices
def test_device_strings_per_rank(monkeypatch):
    assert tdist.pick_device("cpu", local_rank=1, world_size=2) == torch.device("cpu")
    with pytest.raises(UsageError, match="bad device"):
        tdist.pick_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert tdist.pick_device("cuda", local_rank=1, world_size=2) == torch.device("cuda:1")
    assert tdist.pick_device("auto", local_rank=1, world_size=2) == torch.device("cuda:1")
    assert tdist.pick_device("cuda:1") == torch.device("cuda:1")  # one process: the index asked for
    with pytest.raises(UsageError, match="LOCAL_RANK.*--device cuda"):
        tdist.pick_device("cuda:0", local_rank=1, world_size=2)
    with pytest.raises(DcbenchError, match="2 GPU"):
        tdist.pick_device("cuda:5")


def test_one_process_on_cuda_n_makes_it_the_current_device(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("WORLD_SIZE", "1")
    info = tdist.init_distributed("cuda:1")
    assert info.device == torch.device("cuda:1") and chosen == [torch.device("cuda:1")]


def test_cpu_training_never_asks_faiss_for_its_gpu_index(monkeypatch):
    from dcbench.train import loop
    from dcbench.train.config import TrainConfig

    seen = []
    monkeypatch.setattr(loop, "faiss_has_gpu", lambda: True)  # faiss-gpu installed, GPUs visible
    monkeypatch.setattr(loop, "run_kmeans", lambda x, k, n_iter, seed, use_gpu: seen.append(use_gpu) or
                        __import__("dcbench.cluster", fromlist=["run_kmeans"]).run_kmeans(x, k, n_iter, seed,
                                                                                           use_gpu=False))
    points = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    cfg = TrainConfig(k=3)
    loop._cluster_points(cfg, points, np.arange(20), 20, seed=0, gpu=False)
    loop._cluster_points(cfg, points, np.arange(20), 20, seed=0, gpu=True)
    assert seen == [False, True]


def test_rank0_gets_the_cores_while_clustering_and_gives_them_back(monkeypatch):
    import faiss

    monkeypatch.setattr(tdist, "affinity_cores", lambda: 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    before_torch, before_faiss = torch.get_num_threads(), faiss.omp_get_max_threads()
    main = tdist.DistInfo(rank=0, world_size=2)
    with tdist.main_rank_threads(main) as threads:
        assert threads == 7 and torch.get_num_threads() == 7 and faiss.omp_get_max_threads() == 7
    assert torch.get_num_threads() == before_torch and faiss.omp_get_max_threads() == before_faiss
    with tdist.main_rank_threads(tdist.DistInfo(rank=1, world_size=2)):  # other ranks wait: unchanged
        assert torch.get_num_threads() == before_torch


# ----------------------------------------------------------------------------- DDP reach
@pytest.mark.parametrize("arch, unreached", [("timm:convnext_atto", "model.head.norm.weight"),
                                             ("timm:efficientnet_b0", "model.conv_head.weight"),
                                             ("alexnet", None)])
def test_parameters_after_the_last_tap_are_frozen(arch, unreached):
    model = build_backbone(arch, sobel=False, input_size=64)
    model.train()
    frozen = freeze_unreached(model, 64)
    assert model.training  # mode restored
    assert all(p.grad is None for p in model.parameters())
    if unreached is None:
        assert frozen == []
    else:
        assert unreached in frozen and not dict(model.named_parameters())[unreached].requires_grad
    # what stays trainable gets a gradient: DDP's reducer needs exactly that
    model(torch.randn(2, 3, 64, 64), taps=["cluster"])["cluster"].sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_hybrid_vit_takes_small_images():
    bb = build_backbone("timm:vit_tiny_r_s16_p8_224", sobel=False, input_size=32)
    assert bb(torch.randn(2, 3, 32, 32), taps=["cluster"])["cluster"].shape == (2, 192)


# ----------------------------------------------------------------------------- torchrun
_DRIVER = textwrap.dedent("""
    import json, sys
    from dcbench.train import train
    from dcbench.train.presets import resolve_config

    import torch.distributed as dist

    data, out, archs = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    dist.init_process_group("gloo")  # one group for every run of this launch: train() keeps a group it finds
    for arch in archs:
        method = "deepcluster-v2" if arch.startswith("v2:") else "deepcluster"
        arch = arch.removeprefix("v2:")
        settings = {"data": data, "method": method, "arch": arch, "sobel": False, "image_size": 32,
                    "batch_size": 4, "workers": 0, "epochs": 2, "device": "cpu", "snapshot_every": 0,
                    "out": f"{out}/{method}-{arch.replace(':', '_')}"}
        settings.update({"k": 3, "pca_dim": 4} if method == "deepcluster" else
                        {"prototypes": [3, 3], "small_crops": 0, "hidden_mlp": 32, "feat_dim": 16})
        train(resolve_config(settings))
    dist.destroy_process_group()
""")

FAMILIES = ["tv:resnet18", "timm:convnext_atto", "timm:efficientnet_b0", "timm:vit_tiny_patch16_224"]


def test_every_family_trains_under_two_process_torchrun(tmp_path):
    data = make_image_folder(tmp_path / "data", n_classes=3, per_class=8, image_size=32, splits=None)
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    runs = [*FAMILIES, "v2:timm:convnext_atto"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(driver),
           str(data), str(tmp_path / "runs"), ",".join(runs)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for run in sorted((tmp_path / "runs").iterdir()):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 2, run.name
        record = load_checkpoint(run / "checkpoint.pth")
        assert record.meta["epoch"] == 2
        ranks = torch.load(run / "checkpoint.pth", map_location="cpu", weights_only=True)["train_state"]["ranks"]
        assert len(ranks) == 2 and not torch.equal(ranks[0]["rng"]["torch"], ranks[1]["rng"]["torch"])
    assert len(list((tmp_path / "runs").iterdir())) == len(runs)


def test_resume_gives_each_rank_its_own_rng_and_loss(tmp_path):
    """Unit level: the restore picks entry ``rank`` of the saved per-rank list."""
    from types import SimpleNamespace

    from dcbench.train.common import EpochState, restore_rank_state
    from dcbench.train.rundir import capture_rng

    torch.manual_seed(1)
    rng1 = capture_rng()
    torch.manual_seed(2)
    rng2 = capture_rng()
    ts = {"rng": rng1, "loss_sum": 1.0, "loss_count": 1,
          "ranks": [{"rng": rng1, "loss_sum": 1.0, "loss_count": 1}, {"rng": rng2, "loss_sum": 5.0, "loss_count": 3}]}
    t = SimpleNamespace(state=EpochState(), dist=tdist.DistInfo(rank=1, world_size=2),
                        run=SimpleNamespace(checkpoint=Path("x")))
    restore_rank_state(t, ts)
    assert (t.state.loss_sum, t.state.loss_count) == (5.0, 3)
    assert torch.equal(torch.get_rng_state(), rng2["torch"])
    # another world size: rank 0 carries the whole loss sum, the others none
    t0 = SimpleNamespace(state=EpochState(), dist=tdist.DistInfo(rank=0, world_size=1),
                         run=SimpleNamespace(checkpoint=Path("x")))
    restore_rank_state(t0, ts)
    assert (t0.state.loss_sum, t0.state.loss_count) == (6.0, 4)


def test_cuda_rng_restore_on_a_machine_with_fewer_gpus(monkeypatch, caplog):
    from dcbench.train.rundir import capture_rng, restore_rng

    state = capture_rng()
    state["cuda"] = [torch.zeros(8, dtype=torch.uint8)] * 4  # saved on a 4-GPU machine
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.append(device))
    restore_rng(state)
    assert restored == [0]
    assert "4 GPUs and this machine has 1" in caplog.text
