"""`dcbench doctor`: one JSON object with what a long run needs, and the fix for each problem."""
from __future__ import annotations

import json

from click.testing import CliRunner

from dcbench import doctor
from dcbench.cli import main


def test_doctor_json_is_one_object_with_every_item(tmp_path, monkeypatch):
    monkeypatch.setenv("DCBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DCBENCH_STORE", str(tmp_path / "store" / "results.db"))
    result = CliRunner().invoke(main, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)  # exactly one JSON object
    import faiss
    import torch

    assert report["torch"]["version"] == torch.__version__
    assert report["torch"]["cuda_available"] == torch.cuda.is_available()
    assert report["faiss"]["version"] == faiss.__version__
    assert report["faiss"]["gpu_build"] == hasattr(faiss, "StandardGpuResources")
    assert report["autocast_bf16"]["cpu"] is True  # bfloat16 autocast runs on every supported CPU
    assert set(report["packages"]) >= {"timm", "mmsegmentation", "mmcv", "detectron2"}
    assert {"gloo", "nccl"} <= set(report["distributed"])
    from dcbench.env import default_workers

    assert report["data"] == {"loader_workers_auto": default_workers(), "jpeg_decoder": "libjpeg-turbo (torchvision.io)"}
    assert report["cache"]["path"] == str(tmp_path / "cache") and report["cache"]["free_gb"] > 0
    assert report["store"]["path"] == str(tmp_path / "store" / "results.db")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "store").exists()  # it creates nothing
    assert all(set(p) == {"severity", "problem", "fix"} and p["fix"] for p in report["problems"])


def test_doctor_text_names_each_problem_and_its_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("DCBENCH_CACHE", str(tmp_path))
    monkeypatch.setattr(doctor, "LOW_DISK_GB", 1e12)  # every disk is "low"
    result = CliRunner().invoke(main, ["doctor"])
    assert result.exit_code == 0, result.output
    assert "bf16 amp    cpu: yes" in result.output
    assert "warning: only" in result.output and "fix: free space or set DCBENCH_CACHE" in result.output


def test_faiss_cpu_on_a_gpu_machine_gets_the_exact_pip_commands(monkeypatch):
    problems: list[doctor.Problem] = []
    info = doctor._faiss_info({"cuda_available": True, "cuda": "12.4"}, problems)
    if info["gpus"]:  # a faiss GPU build with GPUs: nothing to fix
        assert not problems
        return
    installed = info["distribution"] or "faiss-cpu"
    assert [p.fix.split("  ")[0] for p in problems] == [f"pip uninstall -y {installed} && pip install faiss-gpu-cu12"]
    assert problems[0].severity == "warning"


def test_a_jpeg_decoder_that_fails_its_check_falls_back_to_pil_with_a_fix(monkeypatch):
    import dcbench.data.datasets as datasets

    monkeypatch.setattr(datasets, "decode_jpeg_bytes", lambda data: None)
    problems: list[doctor.Problem] = []
    assert doctor._data_info(problems)["jpeg_decoder"] == "PIL"
    assert len(problems) == 1 and problems[0].severity == "info"
    assert problems[0].fix.startswith("pip install --force-reinstall torchvision==")


def test_an_error_makes_the_exit_code_1(monkeypatch):
    def broken(problems):
        problems.append(doctor.Problem("error", "torch does not import: boom", "pip install -e ."))
        return {"version": None}

    monkeypatch.setattr(doctor, "_torch_info", broken)
    result = CliRunner().invoke(main, ["doctor", "--json"])
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert report["problems"][0]["problem"] == "torch does not import: boom"
    assert report["autocast_bf16"] == {"cpu": None, "cuda": None}


def test_default_workers_follow_the_usable_cores(monkeypatch):
    """Training's loader workers: the cores this process may use, shared by the torchrun processes
    of the node, within 1..8 (a fixed 4 made PyTorch warn on 2-core machines)."""
    import os

    from dcbench.train import config_class
    from dcbench.train.config import default_workers

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(2)))
    assert default_workers() == 2
    assert config_class("deepcluster")().workers == 2 and config_class("deepcluster-v2")().workers == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(64)))
    assert default_workers() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert default_workers() == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0})
    assert default_workers() == 1
