"""Write (or check) tests/golden/protocol_numbers.json: the metric rows of every golden case.

Run it from a known-good tree, with that tree first on the path, on CPU with one thread::

    cd TREE && OMP_NUM_THREADS=1 PYTHONPATH=TREE python tests/golden/make_golden.py [--out FILE]
    ... make_golden.py --check FILE     # re-run and compare with FILE (reproducibility check)
    ... make_golden.py --only knn,voc-seg --out /tmp/part.json
    ... make_golden.py --add-platform       # this CPU's rows for the cases where they differ

A full run records the platform it ran on (``golden_cases.platform_key()``) as the main one and
drops every other platform's rows: after an intentional change of the numbers, run
``--add-platform`` again on each other platform you can reach (a platform without rows skips the
platform-dependent cases, see tests/test_protocol_numbers.py).

The committed file was made from the pristine tree of commit fc101b7 (``git archive`` into
/tmp/baseline), run as ``cd /tmp/baseline && PYTHONPATH=/tmp/baseline .venv/bin/python
tests/golden/make_golden.py`` (this script, with dcbench/protocols resolved to that tree), and
checked bit-identical by a second run with ``--check --reverse``.

The cases and the runner live in golden_cases.py (shared with tests/test_protocol_numbers.py);
they use only ``dcbench.evaluate`` and the ``dcbench.data`` fixture generators, never the
protocol modules directly, so the same script runs before and after a refactor of those.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import golden_cases as gc  # noqa: E402


def generate(cases: list[gc.Case], work: Path, log=print) -> dict:
    """Run ``cases`` (fixtures written once under ``work``); the JSON document."""
    import torch

    import dcbench

    torch.set_num_threads(1)
    log(f"dcbench from {Path(dcbench.__file__).parent}; torch {torch.__version__}, 1 thread")
    fixture_paths, digests = {}, {}
    t_start = time.perf_counter()
    for name in dict.fromkeys(n for c in cases for n in c.fixtures()):
        t0 = time.perf_counter()
        fixture_paths[name] = gc.make_fixture(name, work / "fixtures" / name)
        digests[name] = gc.fixture_digest(fixture_paths[name])
        log(f"fixture {name}: {digests[name]} ({time.perf_counter() - t0:.1f}s)")
    out_cases = []
    for case in cases:
        got = gc.run_case(case, fixture_paths, work / "cache" / case.id)
        log(f"case {case.id}: {len(got['metrics'])} rows, {got['wall_s']:.1f}s")
        out_cases.append({
            "id": case.id, "protocol": case.protocol, "checkpoint": case.checkpoint,
            "overrides": case.overrides, "fixture": case.fixture,
            "fixture_params": {n: {"kind": gc.FIXTURES[n][0], "params": gc.FIXTURES[n][1], "digest": digests[n]}
                               for n in case.fixtures()},
            "slow": case.slow, "note": case.note,
            "protocol_version": got["protocol_version"], "data_fingerprint": got["data_fingerprint"],
            "settings": got["settings"], "wall_s": got["wall_s"], "metrics": got["metrics"],
        })
    from dcbench.env import software_versions
    return {"schema": gc.SCHEMA,
            "generated_by": "tests/golden/make_golden.py",
            "platform": gc.platform_key(),
            "protocols": gc.registered_protocols(),
            "environment": {"versions": software_versions(), "torch_threads": 1, "device": "cpu",
                            "total_wall_s": round(time.perf_counter() - t_start, 1)},
            "cases": out_cases}


def compare(new: dict, old: dict, atol: float = 0.0) -> list[str]:
    """Differences between two documents' metric rows (empty when they agree within ``atol``)."""
    problems = []
    old_cases = {c["id"]: c for c in old["cases"]}
    for case in new["cases"]:
        ref = old_cases.get(case["id"])
        if ref is None:
            problems.append(f"{case['id']}: not in the reference")
            continue
        a = {gc.row_key(r): r["value"] for r in case["metrics"]}
        b = {gc.row_key(r): r["value"] for r in ref["metrics"]}
        if set(a) != set(b):
            problems.append(f"{case['id']}: rows differ: {sorted(set(a) ^ set(b), key=str)[:5]}")
        for key in sorted(set(a) & set(b), key=str):
            same = (math.isnan(a[key]) and math.isnan(b[key])) or abs(a[key] - b[key]) <= atol
            if not same:
                problems.append(f"{case['id']} {key}: {a[key]!r} != {b[key]!r} (diff {a[key] - b[key]:.3g})")
        if case["data_fingerprint"] != ref["data_fingerprint"]:
            problems.append(f"{case['id']}: data fingerprint {case['data_fingerprint']} != {ref['data_fingerprint']}")
    return problems


def add_platform(doc: dict, golden: dict) -> list[str]:
    """Record in ``golden`` (in place) the rows of ``doc`` (a run of the same cases on another
    platform) for every case whose rows differ from the main ones, and drop this platform's rows
    where they agree again; the ids of the cases that differ. Refuses a run on the main platform,
    and one whose fixtures or row sets differ (then the tree or the fixtures changed, not the CPU)."""
    here = doc["platform"]
    if here == golden["platform"]:
        raise SystemExit(f"this machine ({here}) is the file's main platform: regenerate the file instead")
    cases = {c["id"]: c for c in golden["cases"]}
    differing = []
    for case in doc["cases"]:
        recorded = cases[case["id"]]
        if case["data_fingerprint"] != recorded["data_fingerprint"] or \
                sorted(map(gc.row_key, case["metrics"]), key=str) != sorted(map(gc.row_key, recorded["metrics"]), key=str):
            raise SystemExit(f"{case['id']}: other rows or data than the file's: not a platform difference")
        by_platform = recorded.setdefault("platform_metrics", {})
        if compare({"cases": [case]}, {"cases": [recorded]}):
            by_platform[here] = case["metrics"]
            differing.append(case["id"])
        else:
            by_platform.pop(here, None)
        if not by_platform:
            del recorded["platform_metrics"]
    return differing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help=f"output JSON (default: {gc.GOLDEN_JSON})")
    parser.add_argument("--check", type=Path, default=None, help="compare with this JSON instead of writing one")
    parser.add_argument("--only", default="", help="comma-separated case ids")
    parser.add_argument("--reverse", action="store_true",
                        help="run the cases in reverse order after disturbing the global RNGs (with --check: "
                             "shows the numbers do not depend on what ran before in the process)")
    parser.add_argument("--work", type=Path, default=None, help="folder for fixtures and caches (default: temp)")
    parser.add_argument("--add-platform", action="store_true",
                        help="add this CPU's rows to the golden file for the cases where they differ from the "
                             "main platform's (run from the tree the file was made from)")
    args = parser.parse_args(argv)
    cases = [gc.case_by_id(i) for i in args.only.split(",")] if args.only else list(gc.CASES)
    if args.reverse:
        import random

        import numpy as np
        import torch
        cases.reverse()
        torch.manual_seed(987654321)
        np.random.seed(4321)
        random.seed(1234)
        torch.rand(17), np.random.rand(5), random.random()
    with tempfile.TemporaryDirectory(prefix="dcbench-golden-") as tmp:
        doc = generate(cases, args.work or Path(tmp))
    if args.add_platform:
        out = args.out or gc.GOLDEN_JSON
        golden = json.loads(gc.GOLDEN_JSON.read_text())
        differing = add_platform(doc, golden)
        out.write_text(json.dumps(golden, indent=1) + "\n")
        print(f"wrote {out}: {doc['platform']} differs from {golden['platform']} in "
              f"{len(differing)} of {len(doc['cases'])} cases: {', '.join(differing) or 'none'}")
        return 0
    if args.check:
        problems = compare(doc, json.loads(args.check.read_text()))
        for line in problems:
            print("DIFF", line)
        print(f"{len(doc['cases'])} cases compared with {args.check}: "
              f"{'bit-identical' if not problems else f'{len(problems)} differences'}")
        if args.out:
            args.out.write_text(json.dumps(doc, indent=1) + "\n")
        return 1 if problems else 0
    out = args.out or gc.GOLDEN_JSON
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out}: {len(doc['cases'])} cases, {sum(len(c['metrics']) for c in doc['cases'])} rows, "
          f"{doc['environment']['total_wall_s']}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
