"""GPU checks of the evaluation side (issue: CUDA paths no CPU test exercises).

Run by ``benchmarks/gpu_check.sh`` (which also checks training); on its own::

    python benchmarks/gpu_check.py --device cuda [--only knn,voc07-svm] [--work DIR]

1. Every golden case (tests/golden/golden_cases.py: every registered protocol on the tiny
   fixtures, a few iterations each) runs on ``--device`` through the CLI's code path, and its
   metric rows are compared with the committed CPU numbers (tests/golden/protocol_numbers.json).
   CUDA kernels are not bit-identical to the CPU's, so the check reports the largest difference
   per case and fails only on an error, a missing/extra row or a difference above ``--atol``
   points (default 5: a tiny-fixture number moves by whole points when one image flips). The
   cases whose numbers differ between CPUs already (``platform_metrics`` in the golden file:
   the fine-tunes) are checked for their rows and finite values only, their difference printed.
   On the CPU, each case is compared with the rows recorded for this CPU where there are some.
2. faiss k-means on the GPU index against the CPU index on the same whitened features:
   objective within 1% and NMI between the two assignments reported (skipped, and said so,
   when the installed faiss has no GPU support).

Prints one line per check (``PASS`` / ``FAIL`` / ``SKIP``) and exits 1 if any failed.
``--device cpu`` runs the same script on a machine without a GPU (a check of the script itself:
every difference is then 0).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "golden"))
import golden_cases as gc  # noqa: E402


def check_protocols(device: str, only: set[str] | None, work: Path, atol: float) -> list[bool]:
    golden = json.loads((ROOT / "tests" / "golden" / "protocol_numbers.json").read_text())
    # on the CPU, this CPU's rows where the file has them; None: the main CPU rows, compared loosely
    here = {c["id"]: gc.expected_rows(c, golden, gc.platform_key()) if device == "cpu" else None
            for c in golden["cases"]}
    reference = {c["id"]: {gc.row_key(r): r["value"] for r in here[c["id"]] or c["metrics"]} for c in golden["cases"]}
    loose_ids = {c["id"] for c in golden["cases"] if "platform_metrics" in c and here[c["id"]] is None}
    cases = [c for c in gc.CASES if only is None or c.protocol in only or c.id in only]
    paths: dict[str, Path] = {}
    ok = []
    for case in cases:
        for name in case.fixtures():
            if name not in paths:
                paths[name] = gc.make_fixture(name, work / "fixtures" / name)
        t0 = time.perf_counter()
        try:
            got = gc.run_case(case, paths, work / "cache" / case.id, device=device)
        except Exception as exc:  # noqa: BLE001 - a check reports every failure and goes on
            print(f"FAIL protocol {case.id}: {type(exc).__name__}: {exc}")
            traceback.print_exc(limit=3)
            ok.append(False)
            continue
        rows = {gc.row_key(r): r["value"] for r in got["metrics"]}
        ref = reference.get(case.id, {})
        if set(rows) != set(ref):
            print(f"FAIL protocol {case.id}: rows differ from the CPU golden numbers "
                  f"(missing {sorted(set(ref) - set(rows))[:3]}, extra {sorted(set(rows) - set(ref))[:3]})")
            ok.append(False)
            continue
        worst = max((abs(rows[k] - ref[k]) for k in rows), default=0.0)
        loose = case.id in loose_ids
        passed = all(math.isfinite(v) for v in rows.values()) if loose else worst <= atol
        print(f"{'PASS' if passed else 'FAIL'} protocol {case.id} on {device}: {len(rows)} rows, largest "
              f"|difference| to CPU {worst:.3f} points{' (differs between CPUs too: rows checked)' if loose else ''}, "
              f"{time.perf_counter() - t0:.1f}s")
        ok.append(passed)
    return ok


def check_faiss_gpu(device: str) -> list[bool]:
    import faiss
    import numpy as np

    from dcbench.cluster import preprocess_features, run_kmeans
    from dcbench.cluster.nmi import nmi

    if not device.startswith("cuda") or not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        print(f"SKIP faiss GPU k-means: device {device}, faiss {faiss.__version__} "
              f"{'has no GPU support (faiss-cpu)' if not hasattr(faiss, 'StandardGpuResources') else 'sees no GPU'}")
        return []
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((100, 512)).astype(np.float32) * 3
    x = centres[rng.integers(0, 100, 20_000)] + rng.standard_normal((20_000, 512)).astype(np.float32)
    feats = preprocess_features(x, dim=64)
    cpu = run_kmeans(feats, 100, seed=0, use_gpu=False)
    gpu = run_kmeans(feats, 100, seed=0, use_gpu=True)
    rel = abs(gpu.objective - cpu.objective) / abs(cpu.objective)
    agreement = nmi(cpu.assignments, gpu.assignments)
    passed = rel < 0.01
    print(f"{'PASS' if passed else 'FAIL'} faiss k-means GPU vs CPU: objective {gpu.objective:.1f} vs "
          f"{cpu.objective:.1f} ({100 * rel:.3f}% apart), NMI between assignments {agreement:.3f}")
    return [passed]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--only", default="", help="comma-separated protocols or case ids (default: all)")
    parser.add_argument("--work", default=None, help="folder for fixtures and caches (default: a temp folder)")
    parser.add_argument("--atol", type=float, default=5.0, help="largest accepted |GPU - CPU| in points")
    args = parser.parse_args()
    only = {x for x in args.only.split(",") if x} or None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        results = check_faiss_gpu(args.device) + check_protocols(args.device, only, work, args.atol)
    print(f"{sum(results)}/{len(results)} checks passed")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
