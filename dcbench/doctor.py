"""``dcbench doctor``: what a user needs to know before a long run (issue 17).

Versions (Python, torch with its CUDA and cuDNN, faiss and whether it can use GPUs, timm,
torchvision, mmsegmentation/mmcv, detectron2), devices and their memory, whether bfloat16
autocast runs (CPU and CUDA: ``--set amp=true`` uses it), NCCL, how many loader workers
``workers=auto`` starts and which JPEG decoder reads the images, where the cache and the results
store live with the free space there, and for each problem found the command that fixes it.
Every probe is guarded: a broken library is reported, never a traceback.
"""
from __future__ import annotations

import os
import platform
import shutil
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

#: free space under which the cache / store folder is reported (features of a large set: GBs)
LOW_DISK_GB = 10.0

#: faiss GPU wheels by CUDA major version (PyPI: faiss-gpu-cu12 / faiss-gpu-cu11, built by
#: github.com/kyamagu/faiss-wheels); conda's faiss-gpu is the upstream build (faiss INSTALL.md)
FAISS_GPU_WHEEL = {"12": "faiss-gpu-cu12", "11": "faiss-gpu-cu11"}


@dataclass
class Problem:
    """One thing that will fail or be slow, with the fix. ``severity``: error | warning | info."""

    severity: str
    problem: str
    fix: str


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _first_version(*dists: str) -> str | None:
    return next((v for v in map(_version, dists) if v), None)


def _cpu_info() -> dict[str, Any]:
    """Usable cores (the affinity mask: what a container or taskset grants) and memory."""
    from dcbench.env import affinity_cores

    info: dict[str, Any] = {"cores_usable": affinity_cores(), "cores_total": os.cpu_count(),
                            "machine": platform.machine()}
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        info["memory_gb"] = round(int(meminfo["MemTotal"].split()[0]) / 2**20, 1)
        info["memory_available_gb"] = round(int(meminfo["MemAvailable"].split()[0]) / 2**20, 1)
    except (OSError, KeyError, ValueError):
        pass
    return info


def _torch_info(problems: list[Problem]) -> dict[str, Any]:
    try:
        import torch
    except Exception as exc:  # noqa: BLE001  (any import failure is the finding)
        problems.append(Problem("error", f"torch does not import: {exc}",
                                "pip install -e . (the repository's pinned torch and torchvision)"))
        return {"version": None}
    info: dict[str, Any] = {"version": torch.__version__, "cuda": torch.version.cuda,
                            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                            "cuda_available": torch.cuda.is_available(), "threads": torch.get_num_threads(),
                            "devices": []}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            info["devices"].append({"index": i, "name": props.name, "memory_gb": round(total / 2**30, 1),
                                    "free_gb": round(free / 2**30, 1),
                                    "capability": f"{props.major}.{props.minor}"})
    elif _nvidia_gpu_present():
        problems.append(Problem("warning", f"an NVIDIA GPU is present but torch {torch.__version__} "
                                           f"({'CPU-only build' if torch.version.cuda is None else 'CUDA ' + torch.version.cuda}) "
                                           f"cannot use it",
                                "install the CUDA build of the pinned torch for your driver (https://pytorch.org/get-started/"
                                "locally), e.g. pip install torch==" + torch.__version__.split("+")[0] +
                                " --index-url https://download.pytorch.org/whl/cu126"))
    return info


def _nvidia_gpu_present() -> bool:
    return Path("/proc/driver/nvidia/gpus").is_dir() and any(Path("/proc/driver/nvidia/gpus").iterdir())


def _autocast_ok(device: str) -> tuple[bool, str | None]:
    """Whether a conv + linear forward runs under bfloat16 autocast on ``device`` and gives
    finite bfloat16 outputs (what ``--set amp=true`` relies on)."""
    try:
        import torch

        torch.manual_seed(0)
        conv = torch.nn.Conv2d(3, 8, 3).to(device)
        fc = torch.nn.Linear(8, 4).to(device)
        x = torch.randn(2, 3, 16, 16, device=device)
        with torch.no_grad(), torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16):
            y = fc(conv(x).mean(dim=(2, 3)))
        ok = y.dtype == torch.bfloat16 and bool(torch.isfinite(y.float()).all())
        return ok, None if ok else f"output dtype {y.dtype}"
    except Exception as exc:  # noqa: BLE001
        return False, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"


def _autocast_info(torch_info: dict, problems: list[Problem]) -> dict[str, Any]:
    if torch_info.get("version") is None:
        return {"cpu": None, "cuda": None}
    cpu_ok, cpu_why = _autocast_ok("cpu")
    out: dict[str, Any] = {"cpu": cpu_ok, "cuda": None}
    if not cpu_ok:
        out["cpu_error"] = cpu_why
    if torch_info.get("cuda_available"):
        cuda_ok, cuda_why = _autocast_ok("cuda")
        out["cuda"] = cuda_ok
        if not cuda_ok:
            out["cuda_error"] = cuda_why
            problems.append(Problem("warning", f"bfloat16 autocast fails on CUDA ({cuda_why})",
                                    "train without --set amp=true (bfloat16 needs compute capability >= 8.0)"))
    return out


def _faiss_info(torch_info: dict, problems: list[Problem]) -> dict[str, Any]:
    try:
        import faiss
    except Exception as exc:  # noqa: BLE001
        problems.append(Problem("error", f"faiss does not import: {exc}", "pip install faiss-cpu"))
        return {"version": None}
    gpu_build = hasattr(faiss, "StandardGpuResources")
    info = {"version": getattr(faiss, "__version__", None), "gpu_build": gpu_build,
            "gpus": faiss.get_num_gpus() if gpu_build else 0,
            "distribution": next((d for d in ("faiss-cpu", "faiss-gpu", *FAISS_GPU_WHEEL.values()) if _version(d)),
                                 None)}
    if torch_info.get("cuda_available") and not info["gpus"]:
        cuda_major = (torch_info.get("cuda") or "12").split(".")[0]
        wheel = FAISS_GPU_WHEEL.get(cuda_major, "faiss-gpu-cu12")
        installed = info["distribution"] or "faiss-cpu"
        problems.append(Problem(
            "warning", f"faiss {info['version']} ({installed}) cannot use the GPU: k-means runs on the CPU "
                       f"(slow at k=10000 on ImageNet)",
            f"pip uninstall -y {installed} && pip install {wheel}  "
            f"(or with conda: conda install -c pytorch -c nvidia faiss-gpu)"))
    return info


def _distributed_info(torch_info: dict, problems: list[Problem]) -> dict[str, Any]:
    if torch_info.get("version") is None:
        return {}
    import torch
    import torch.distributed as dist

    info: dict[str, Any] = {"available": dist.is_available()}
    if dist.is_available():
        info["gloo"] = dist.is_gloo_available()
        info["nccl"] = dist.is_nccl_available()
        if info["nccl"] and torch.cuda.is_available():
            try:
                info["nccl_version"] = ".".join(map(str, torch.cuda.nccl.version()))
            except Exception:  # noqa: BLE001
                info["nccl_version"] = None
    if len(torch_info.get("devices", [])) > 1 and not info.get("nccl"):
        problems.append(Problem("warning", "several GPUs but no NCCL: torchrun jobs fall back to gloo (slow)",
                                "install a CUDA build of torch from https://download.pytorch.org/whl (it bundles NCCL)"))
    return info


def _folder_info(path: Path, what: str, problems: list[Problem]) -> dict[str, Any]:
    """Where ``what`` lives, whether it exists, and the free space on its disk."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    info: dict[str, Any] = {"path": str(path), "exists": path.exists()}
    try:
        usage = shutil.disk_usage(probe)
        info["free_gb"] = round(usage.free / 2**30, 1)
        info["writable"] = os.access(probe, os.W_OK)
    except OSError as exc:
        info["error"] = str(exc)
        return info
    env = "DCBENCH_CACHE" if what == "cache" else "DCBENCH_STORE"
    if not info["writable"]:
        problems.append(Problem("error", f"the {what} folder {probe} is not writable",
                                f"set {env} to a writable location"))
    elif info["free_gb"] < LOW_DISK_GB:
        problems.append(Problem("warning", f"only {info['free_gb']} GB free for the {what} ({probe})",
                                f"free space or set {env} to a larger disk"))
    return info


def _optional_packages(problems: list[Problem]) -> dict[str, str | None]:
    """Versions from the installed metadata (importing mmcv or detectron2 takes seconds)."""
    packages = {"timm": _version("timm"), "torchvision": _version("torchvision"), "numpy": _version("numpy"),
                "scikit-learn": _version("scikit-learn"), "mmsegmentation": _version("mmsegmentation"),
                "mmcv": _first_version("mmcv", "mmcv-lite"), "mmengine": _version("mmengine"),
                "detectron2": _version("detectron2")}
    if not packages["mmsegmentation"] or not packages["mmcv"]:
        problems.append(Problem("info", "mmsegmentation / mmcv not installed: the voc-seg protocol cannot run",
                                "pip install -e '.[seg]'"))
    if not packages["detectron2"]:
        problems.append(Problem("info", "detectron2 not installed: voc-det runs on its torchvision backend "
                                        "(--set backend=detectron2 is unavailable)",
                                "install detectron2 for your torch/CUDA: "
                                "https://detectron2.readthedocs.io/en/latest/tutorials/install.html"))
    return packages


def _data_info(problems: list[Problem]) -> dict[str, Any]:
    """What ``workers=auto`` means here, and which JPEG decoder reads the images: libjpeg-turbo
    through torchvision when it decodes a test image to PIL's pixels, else PIL (slower, same pixels)."""
    import io

    import numpy as np
    from PIL import Image

    from dcbench.data.datasets import decode_jpeg_bytes
    from dcbench.env import default_workers

    buffer = io.BytesIO()
    Image.fromarray(np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)).save(buffer, "JPEG")
    with Image.open(io.BytesIO(buffer.getvalue())) as reference:
        expected = np.asarray(reference.convert("RGB"))
    fast = decode_jpeg_bytes(buffer.getvalue())
    works = fast is not None and np.array_equal(np.asarray(fast), expected)
    if not works:
        problems.append(Problem("info", "torchvision.io cannot decode JPEGs here: images are decoded by PIL "
                                        "(the same pixels, slower for small images)",
                                f"pip install --force-reinstall torchvision=={_version('torchvision') or 'VERSION'} "
                                "(the build that matches your torch)"))
    return {"loader_workers_auto": default_workers(),
            "jpeg_decoder": "libjpeg-turbo (torchvision.io)" if works else "PIL"}


def diagnose() -> dict[str, Any]:
    """Everything ``dcbench doctor`` reports, as one JSON-serialisable dict."""
    from dcbench import __version__
    from dcbench.env import cache_root
    from dcbench.results import default_store_path

    problems: list[Problem] = []
    torch_info = _torch_info(problems)
    report: dict[str, Any] = {
        "dcbench": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_info(),
        "torch": torch_info,
        "faiss": _faiss_info(torch_info, problems),
        "packages": _optional_packages(problems),
        "autocast_bf16": _autocast_info(torch_info, problems),
        "distributed": _distributed_info(torch_info, problems),
        "data": _data_info(problems),
        "cache": _folder_info(cache_root(), "cache", problems),
        "store": _folder_info(default_store_path(), "store", problems),
    }
    report["problems"] = [asdict(p) for p in problems]
    return report


def report_lines(report: dict[str, Any]) -> list[str]:
    """The human-readable report: one line per item, then the problems with their fixes."""
    t, f, cpu = report["torch"], report["faiss"], report["cpu"]
    lines = [f"dcbench     {report['dcbench']} (python {report['python']}, {report['platform']})",
             f"torch       {t.get('version')}  CUDA {t.get('cuda') or '-'}  cuDNN {t.get('cudnn') or '-'}  "
             f"threads {t.get('threads', '-')}",
             f"faiss       {f.get('version')} ({f.get('distribution') or '?'})  GPU build: "
             f"{'yes' if f.get('gpu_build') else 'no'}  GPUs: {f.get('gpus', 0)}",
             "packages    " + "  ".join(f"{k} {v or '-'}" for k, v in report["packages"].items()),
             f"cpu         {cpu.get('cores_usable')} usable cores of {cpu.get('cores_total')}, "
             f"{cpu.get('memory_gb', '?')} GB memory ({cpu.get('memory_available_gb', '?')} GB available)"]
    for dev in t.get("devices", []):
        lines.append(f"cuda:{dev['index']}      {dev['name']} (capability {dev['capability']}), "
                     f"{dev['memory_gb']} GB ({dev['free_gb']} GB free)")
    if not t.get("devices"):
        lines.append("cuda        no CUDA device")
    amp = report["autocast_bf16"]
    lines.append(f"bf16 amp    cpu: {_yes_no(amp.get('cpu'))}  cuda: {_yes_no(amp.get('cuda'))}")
    data = report["data"]
    lines.append(f"data        workers=auto: {data['loader_workers_auto']} loader processes  "
                 f"JPEG decoder: {data['jpeg_decoder']}")
    d = report["distributed"]
    lines.append(f"distributed gloo: {_yes_no(d.get('gloo'))}  nccl: {_yes_no(d.get('nccl'))}"
                 + (f" ({d['nccl_version']})" if d.get("nccl_version") else ""))
    for what in ("cache", "store"):
        info = report[what]
        lines.append(f"{what:<11} {info['path']}  ({info.get('free_gb', '?')} GB free"
                     f"{'' if info.get('writable', True) else ', NOT WRITABLE'})")
    problems = report["problems"]
    lines.append("" if problems else "no problems found")
    for p in problems:
        lines.append(f"{p['severity']}: {p['problem']}\n    fix: {p['fix']}")
    return lines


def _yes_no(value: bool | None) -> str:
    return "n/a" if value is None else "yes" if value else "NO"


def exit_code(report: dict[str, Any]) -> int:
    """1 when a problem is an error (dcbench cannot run as installed), else 0."""
    return 1 if any(p["severity"] == "error" for p in report["problems"]) else 0
