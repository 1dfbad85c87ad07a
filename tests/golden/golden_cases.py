"""Golden-number cases: one tiny CPU evaluation per registered protocol (and a few variants).

Shared by ``make_golden.py`` (writes ``protocol_numbers.json`` from a known-good tree) and
``tests/test_protocol_numbers.py`` (re-runs every case and compares). On purpose this module
uses only interfaces meant to outlive refactors of the protocol modules:

- the runner path of the CLI, ``dcbench.evaluate.plan / load_for / run / context_for``, with
  protocol NAMES as strings (it never imports ``protocols`` or ``dcbench.protocols``);
- the fixture generators of ``dcbench.data.synthetic*`` and, for the file checkpoint,
  ``dcbench.models.build_backbone`` + ``dcbench.checkpoint.save_checkpoint``.

Every case runs on CPU with one torch thread, ``workers=0`` and its own empty feature cache
(``DCBENCH_CACHE``), so its numbers are bit-reproducible on a given machine + library set.
Across machines, most cases agree bit for bit, but a fine-tune of many steps (voc-det, voc-seg)
amplifies the last-bit differences between the kernels torch picks for each instruction set
into other numbers: those cases carry numbers per platform (:func:`platform_key`,
:func:`expected_rows`).
"""
from __future__ import annotations

import hashlib
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = 1
GOLDEN_JSON = Path(__file__).with_name("protocol_numbers.json")

VOC4 = ["aeroplane", "bicycle", "bird", "boat"]  # the first 4 VOC classes (what the VOC tests use)
RETRIEVAL_NAMES = ["roxford5k", "rparis6k", "oxford5k", "paris6k"]

# ----------------------------------------------------------------------------- fixtures
#: name -> (generator kind, keyword arguments). Generators are deterministic ("same
#: arguments, same bytes"); the golden file records a digest of every fixture's files so a
#: changed generator is reported as such, not as a protocol regression.
FIXTURES: dict[str, tuple[str, dict[str, Any]]] = {
    # tests/test_linear.py's folder: 4 classes x 12 images per split, 1 corrupt file per split
    "shapes4": ("image_folder", {"n_classes": 4, "per_class": 12, "image_size": 32, "corrupt": 1}),
    # the class counts imagenet-linear / places-linear insist on, 1 tiny image per class and split
    "shapes1000": ("image_folder", {"n_classes": 1000, "per_class": 1, "image_size": 16}),
    "shapes205": ("image_folder", {"n_classes": 205, "per_class": 1, "image_size": 16}),
    # tests/test_voc_cls.py / test_voc_det.py: VOC2007 with 12/12/16 train/val/test images
    "voc2007": ("voc", {"classes": VOC4, "year": "2007"}),
    # a smaller VOC2012 than tests/test_voc_seg.py's (32/12)
    "voc2012": ("voc", {"classes": VOC4, "year": "2012", "images_per_split": {"train": 16, "val": 8}}),
    # tests/test_retrieval.py: all four datasets (each is the others' whitening set), 96 px
    "retrieval": ("retrieval", {"names": RETRIEVAL_NAMES, "image_size": 96}),
    # a dcbench-format checkpoint file (a seeded random AlexNet at 64 px): the file-loading path,
    # and bn_recalibrate=auto staying off for a non-random checkpoint
    "alexnet64_file": ("checkpoint", {"arch": "alexnet", "input_size": 64, "seed": 5}),
}


def make_fixture(name: str, folder: Path) -> Path:
    """Write fixture ``name`` under ``folder``; returns the path a case uses (data root or file)."""
    kind, params = FIXTURES[name]
    folder = Path(folder)
    if kind == "image_folder":
        from dcbench.data.synthetic import make_image_folder
        return Path(make_image_folder(folder / "data", **params))
    if kind == "voc":
        from dcbench.data.synthetic_voc import make_voc
        return Path(make_voc(folder / "data", **params))
    if kind == "retrieval":
        from dcbench.data.synthetic_retrieval import make_retrieval_root
        params = dict(params)
        return Path(make_retrieval_root(folder / "data", names=tuple(params.pop("names")), **params))
    if kind == "checkpoint":
        from dcbench.checkpoint import save_checkpoint
        from dcbench.models import build_backbone
        params = dict(params)
        arch = params.pop("arch")
        folder.mkdir(parents=True, exist_ok=True)
        return Path(save_checkpoint(folder / "model.pth", build_backbone(arch, **params)))
    raise ValueError(f"unknown fixture kind {kind!r}")


def fixture_digest(path: Path) -> str:
    """sha256 (16 hex) over the relative paths and bytes of the fixture's files.

    Checkpoint files are pickles whose bytes may legitimately change with library versions,
    so for ``checkpoint`` fixtures the digest covers the tensors instead (via torch.load)."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_file():
        import torch
        record = torch.load(path, map_location="cpu", weights_only=False)
        state = record.get("state_dict", record) if isinstance(record, dict) else record
        for key in sorted(k for k, v in state.items() if isinstance(v, torch.Tensor)):
            t = state[key].detach().contiguous().cpu()
            digest.update(f"{key}\0{tuple(t.shape)}\0{t.dtype}\n".encode())
            digest.update(t.numpy().tobytes())
        return digest.hexdigest()[:16]
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0{file.stat().st_size}\n".encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """One evaluation: ``protocol`` on ``fixture`` with ``checkpoint`` and ``overrides``.

    ``checkpoint`` is a spec string; ``{fixture:NAME}`` in it is replaced by that fixture's path.
    """

    id: str
    protocol: str
    fixture: str
    checkpoint: str
    overrides: dict[str, Any] = field(default_factory=dict)
    slow: bool = False  # marked @pytest.mark.slow in the test (still run in CI)
    note: str = ""

    def fixtures(self) -> list[str]:
        names = [self.fixture]
        for name in FIXTURES:
            if f"{{fixture:{name}}}" in self.checkpoint:
                names.append(name)
        return names


LIN = {"image_size": 64, "batch_size": 16, "workers": 0}  # tests/test_linear.py's FAST
KNN = {"image_size": 64, "batch_size": 32, "workers": 0}  # tests/test_knn.py's FAST
SVM = {"image_size": 64, "workers": 0, "jobs": 1, "costs": [0.1, 1.0, 10.0, 100.0]}
DET = {"iterations": 40, "batch_size": 2, "lr": 0.05, "lr_steps": [30], "min_size": [160], "test_size": 160,
       "max_size": 256, "anchor_sizes": [64, 128], "rois_per_image": 16, "proposals_train": 50,
       "proposals_test": 30, "workers": 0}
SEG = {"iterations": 40, "crop_size": 64, "batch_size": 4, "lr": 0.05, "workers": 0, "classes": VOC4}
RET = {"image_size": 96, "workers": 0}

CASES: list[Case] = [
    # --- linear probes (protocols/linear.py)
    Case("linear-cached", "linear", "shapes4", "random:alexnet,size=64",
         {**LIN, "cached": True, "epochs": 3},
         note="cached features, every conv tap, deepcluster preset, BN re-estimated (random init)"),
    Case("linear-augmented-tencrop", "linear", "shapes4", "random:alexnet,size=64",
         {**LIN, "epochs": 2, "taps": ["conv2", "conv5"]},
         note="augmented training, TenCrop val (the default crops)"),
    Case("linear-augmented-center", "linear", "shapes4", "random:alexnet,size=64",
         {**LIN, "epochs": 3, "lr": 0.1, "crops": "center", "taps": ["conv3"], "bn_recalibrate": "off"}),
    Case("linear-vissl-cached", "linear", "shapes4", "random:alexnet,size=64",
         {**LIN, "preset": "vissl", "cached": True, "epochs": 4},
         note="vissl preset: BN heads, lr steps, wd 5e-4"),
    Case("linear-vissl-augmented", "linear", "shapes4", "random:alexnet,size=64",
         {**LIN, "preset": "vissl", "epochs": 1, "taps": ["conv1", "conv4"]}),
    Case("linear-file-ckpt", "linear", "shapes4", "{fixture:alexnet64_file}",
         {**LIN, "cached": True, "epochs": 4, "lr": 0.1, "taps": ["conv4", "conv5"], "seed": 3},
         note="a checkpoint file (bn_recalibrate auto = off) and a non-zero seed"),
    Case("imagenet-linear", "imagenet-linear", "shapes1000", "random:alexnet,size=64",
         {**LIN, "batch_size": 250, "preset": "vissl", "cached": True, "epochs": 2, "taps": ["conv5"]}, slow=True,
         note="1000 classes x 1 image per split"),
    Case("places-linear", "places-linear", "shapes205", "random:alexnet,size=64",
         {**LIN, "batch_size": 64, "cached": True, "epochs": 2, "taps": ["conv3", "conv5"]}),
    # --- kNN (protocols/knn.py)
    Case("knn", "knn", "shapes4", "random:alexnet,size=64", dict(KNN),
         note="every conv tap, global pooling, ks 10/20/100/200 (capped at the bank)"),
    Case("knn-preset-pool-nocache", "knn", "shapes4", "random:alexnet,size=64",
         {**KNN, "pool": "preset", "ks": [1, 5], "taps": ["conv2", "conv5"], "temperature": 0.1, "cache": False}),
    Case("knn-file-ckpt", "knn", "shapes4", "{fixture:alexnet64_file}", {**KNN, "ks": [3, 10]}),
    # --- VOC07 classification (protocols/voc_cls.py)
    Case("voc07-cls-fc6-8", "voc07-cls", "voc2007", "random:alexnet,size=64",
         {"image_size": 64, "iterations": 3, "batch_size": 8, "workers": 0},
         note="fc6-8 fine-tune, random10 test crops"),
    Case("voc07-cls-all-tencrop", "voc07-cls", "voc2007", "random:alexnet,size=64",
         {"image_size": 64, "iterations": 2, "batch_size": 8, "workers": 0, "mode": "all",
          "train_bn_affine": True, "test_crops": "tencrop", "bn_recalibrate": "off", "lr_step": 1}),
    Case("voc07-svm", "voc07-svm", "voc2007", "random:alexnet,size=64",
         {**SVM, "taps": ["conv2", "conv3", "conv5"]}, note="vissl pooling, 3-fold CV over the C grid"),
    Case("voc07-svm-deepcluster-train", "voc07-svm", "voc2007", "random:alexnet,size=64",
         {**SVM, "taps": ["conv4"], "preset": "deepcluster", "train_split": "train", "cv_folds": 2}),
    Case("voc07-lowshot", "voc07-lowshot", "voc2007", "random:alexnet,size=64",
         {**SVM, "costs": [0.1, 1.0, 10.0], "ks": [1, 2], "samples": 2, "taps": ["conv3"]}),
    Case("voc07-lowshot-fixed-cost", "voc07-lowshot", "voc2007", "random:alexnet,size=64",
         {**SVM, "costs": [1.0], "cost": 1.0, "ks": [1, 4], "samples": 3, "taps": ["conv2"], "seed": 1}),
    # --- VOC detection (protocols/voc_det.py)
    Case("voc-det-all", "voc-det", "voc2007", "random:alexnet,size=96",
         {**DET, "mode": "all", "lr": 0.02}, slow=True,
         note="torchvision Faster R-CNN, deepcluster preset, ALL layers (lr 0.02: 0.05 diverges with Fast R-CNN's "
              "box-loss beta 1, voc-det version 2)"),
    Case("voc-det-fc6-8", "voc-det", "voc2007", "random:alexnet,size=96",
         {**DET, "iterations": 20, "lr_steps": [15], "mode": "fc6-8"}, slow=True),
    # --- VOC segmentation (protocols/voc_seg.py, mmseg)
    Case("voc-seg", "voc-seg", "voc2012", "random:alexnet,size=64,sobel=0", dict(SEG), slow=True,
         note="mmselfsup preset (mode all)"),
    Case("voc-seg-deepcluster-fc6-8", "voc-seg", "voc2012", "random:alexnet,size=64",
         {**SEG, "iterations": 20, "preset": "deepcluster"}, slow=True),
    # --- instance retrieval (protocols/retrieval.py)
    Case("roxford5k", "roxford5k", "retrieval", "random:alexnet", dict(RET)),
    Case("rparis6k", "rparis6k", "retrieval", "random:alexnet,sobel=0",
         {**RET, "scales": [1.0, 0.75], "bn_recalibrate": "off"}),
    Case("oxford5k", "oxford5k", "retrieval", "random:alexnet", dict(RET)),
    Case("paris6k", "paris6k", "retrieval", "random:alexnet",
         {**RET, "whitening": "none", "query_crop": "none", "levels": 2}),
]


def registered_protocols() -> list[str]:
    """Names of the registered protocols, as ``dcbench protocols`` lists them (the CLI, not the
    registry module, so it works whichever package holds the registry)."""
    from click.testing import CliRunner

    from dcbench.cli import main

    result = CliRunner().invoke(main, ["protocols"])
    if result.exit_code != 0:
        raise RuntimeError(f"dcbench protocols failed: {result.output}") from result.exception
    return sorted(line.split()[0] for line in result.output.splitlines() if line.strip())


def case_by_id(case_id: str) -> Case:
    for case in CASES:
        if case.id == case_id:
            return case
    raise KeyError(case_id)


def resolve_spec(case: Case, fixture_paths: dict[str, Path]) -> str:
    spec = case.checkpoint
    for name, path in fixture_paths.items():
        spec = spec.replace(f"{{fixture:{name}}}", str(path))
    return spec


# ----------------------------------------------------------------------------- running
def platform_key() -> str:
    """The platform numbers are recorded for: machine, CPU vendor (MKL and oneDNN choose their code
    paths by it), the SIMD level torch dispatches to, and ``AMX`` where the CPU has Intel's matrix
    units (oneDNN and MKL have kernels for them): e.g. ``x86_64 AuthenticAMD AVX2``. Coarse on
    purpose: a platform the golden file does not know only skips the CPU-dependent cases."""
    import torch

    vendor, flags = _cpu_info()
    amx = " AMX" if "amx_tile" in flags else ""
    return f"{platform.machine()} {vendor} {torch.backends.cpu.get_cpu_capability()}{amx}"


def _cpu_info() -> tuple[str, set[str]]:
    """(vendor, feature flags) of the first CPU in /proc/cpuinfo (Linux; elsewhere what
    :mod:`platform` says and no flags)."""
    vendor, flags = platform.processor() or "unknown-vendor", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "vendor_id":
                vendor = value.strip()
            elif key.strip() == "flags":
                return vendor, set(value.split())
    except OSError:
        pass
    return vendor, flags


def expected_rows(case: dict[str, Any], golden: dict[str, Any], here: str) -> list[dict[str, Any]] | None:
    """The metric rows ``case`` (an entry of the golden file ``golden``) must give on platform
    ``here``: its rows recorded for ``here`` where its numbers depend on the platform, else its
    main rows (measured on ``golden["platform"]``); None for a platform-dependent case that has
    no numbers for ``here`` (it cannot be checked on this machine)."""
    by_platform = case.get("platform_metrics", {})
    if here in by_platform:
        return by_platform[here]
    if by_platform and here != golden["platform"]:
        return None
    return case["metrics"]


def metric_rows(metrics: list) -> list[dict[str, Any]]:
    """The metric rows of a Result as plain dicts (value as a Python float)."""
    return [{"metric": r.metric, "tap": r.tap, "split": r.split, "selection": r.selection, "seed": r.seed,
             "value": float(r.value)} for r in metrics]


def row_key(row: dict[str, Any]) -> tuple:
    return (row["metric"], row["tap"], row["split"], row["selection"], row["seed"])


def run_case(case: Case, fixture_paths: dict[str, Path], cache_dir: Path, device: str = "cpu") -> dict[str, Any]:
    """Run ``case`` through the CLI's code path on ``device`` (CPU for the golden numbers; the GPU
    check, benchmarks/gpu_check.py, runs them on CUDA); the feature cache lives in ``cache_dir``.

    Returns {"metrics": rows, "data_fingerprint": ..., "protocol_version": ..., "wall_s": ...}.
    """
    import torch

    from dcbench import evaluate

    torch.set_num_threads(1)
    previous = os.environ.get("DCBENCH_CACHE")
    os.environ["DCBENCH_CACHE"] = str(cache_dir)
    t0 = time.perf_counter()
    try:
        p = evaluate.plan(case.protocol, dict(case.overrides), fixture_paths[case.fixture])
        ckpt = evaluate.load_for(p, resolve_spec(case, fixture_paths))
        result = evaluate.run(p, ckpt, evaluate.context_for(p, device))
    finally:
        if previous is None:
            os.environ.pop("DCBENCH_CACHE", None)
        else:
            os.environ["DCBENCH_CACHE"] = previous
    return {"metrics": metric_rows(result.metrics), "data_fingerprint": result.data["fingerprint"],
            "protocol_version": result.protocol_version, "settings": result.settings,
            "wall_s": round(time.perf_counter() - t0, 2)}
