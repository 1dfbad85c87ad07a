"""Golden numbers: every protocol, run tiny on CPU, gives exactly the numbers recorded from a
known-good tree (tests/golden/protocol_numbers.json, written by tests/golden/make_golden.py).

A guard for refactors of the protocol code: a change that moves any metric of any case fails
here, naming the case and the row. The cases and the runner are in tests/golden/golden_cases.py;
they go through the CLI's code path (``dcbench.evaluate.plan / load_for / run / context_for``)
with protocol names as strings, on fixtures from ``dcbench.data.synthetic*``.

Tolerance: 1e-6 absolute. The golden file was generated twice on the baseline tree (second run
in reverse case order, with the global RNGs disturbed first) and every value was bit-identical,
so the tolerance only absorbs printing/rounding noise, not real nondeterminism. The numbers are
tied to the library versions recorded in the file (torch, torchvision, scikit-learn, mmseg...):
after an intentional change of the numbers or of those libraries, regenerate the file with
``python tests/golden/make_golden.py`` from a tree whose numbers you trust.

Platforms: the file's main numbers were measured on ``GOLDEN["platform"]``. Cases whose numbers
differ on another CPU (the fine-tunes: the kernels for another instruction set round the last
bits differently, and many steps amplify that) also carry that platform's rows
(``platform_metrics``, added with ``make_golden.py --add-platform`` from the same tree). On a
platform the file does not know, those cases are skipped (saying how to record them) and every
other case is still checked against the main numbers.
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
ATOL = 1e-6  # see the module docstring: the baseline was bit-reproducible run to run


def _load_cases_module():
    name = "dcbench_golden_cases"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, GOLDEN_DIR / "golden_cases.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


gc = _load_cases_module()
GOLDEN = json.loads(gc.GOLDEN_JSON.read_text())
GOLDEN_CASES = {c["id"]: c for c in GOLDEN["cases"]}


def _params():
    slow = {c.id: c.slow for c in gc.CASES}
    for case in GOLDEN["cases"]:
        marks = [pytest.mark.slow] if slow.get(case["id"], case["slow"]) else []
        yield pytest.param(case["id"], id=case["id"], marks=marks)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """Fixture name -> generated path, each generated once per module, on first use."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = gc.make_fixture(name, tmp_path_factory.mktemp(f"golden-{name}"))
        return made[name]

    return get


def test_golden_file_matches_the_case_definitions():
    """Every case of golden_cases.py has golden numbers with the same definition (else rerun make_golden.py)."""
    assert GOLDEN["schema"] == gc.SCHEMA
    assert [c.id for c in gc.CASES] == list(GOLDEN_CASES), "cases added/removed: regenerate protocol_numbers.json"
    for case in gc.CASES:
        recorded = GOLDEN_CASES[case.id]
        assert (recorded["protocol"], recorded["checkpoint"], recorded["fixture"], recorded["overrides"]) == \
            (case.protocol, case.checkpoint, case.fixture, case.overrides), case.id
        for name in case.fixtures():
            kind, params = gc.FIXTURES[name]
            assert recorded["fixture_params"][name]["kind"] == kind, (case.id, name)
            assert recorded["fixture_params"][name]["params"] == json.loads(json.dumps(params)), (case.id, name)


def _platforms(case: dict) -> list[str]:
    return [GOLDEN["platform"], *case.get("platform_metrics", {})]


def test_platform_numbers_have_the_main_rows():
    """A platform's rows of a case are the same rows (metric, tap, split, selection, seed) as the
    main ones, differing in value only, and never recorded for the main platform itself."""
    for case in GOLDEN["cases"]:
        main_keys = sorted(map(gc.row_key, case["metrics"]), key=str)
        for name, rows in case.get("platform_metrics", {}).items():
            assert name != GOLDEN["platform"], case["id"]
            assert sorted(map(gc.row_key, rows), key=str) == main_keys, (case["id"], name)
            assert rows != case["metrics"], f"{case['id']}: {name}'s rows equal the main ones (drop them)"


def test_expected_rows_pick_the_platform():
    main = {"id": "c", "metrics": [{"value": 1.0}]}
    sensitive = {**main, "platform_metrics": {"B": [{"value": 2.0}]}}
    golden = {"platform": "A"}
    assert gc.expected_rows(main, golden, "A") == gc.expected_rows(main, golden, "Z") == [{"value": 1.0}]
    assert gc.expected_rows(sensitive, golden, "A") == [{"value": 1.0}]
    assert gc.expected_rows(sensitive, golden, "B") == [{"value": 2.0}]
    assert gc.expected_rows(sensitive, golden, "Z") is None  # platform-dependent, unknown here: skipped


def test_every_recorded_protocol_is_still_registered_and_covered():
    """No protocol registered when the numbers were recorded went missing, and each has a case.
    (Protocols added since, e.g. plugins installed in the environment, are not required here.)"""
    registered = set(gc.registered_protocols())
    missing = sorted(set(GOLDEN["protocols"]) - registered)
    assert not missing, f"protocols no longer registered: {missing}"
    covered = {c["protocol"] for c in GOLDEN["cases"]}
    assert set(GOLDEN["protocols"]) <= covered, f"without golden numbers: {sorted(set(GOLDEN['protocols']) - covered)}"


@pytest.mark.parametrize("case_id", list(_params()))
def test_protocol_numbers_unchanged(case_id, fixtures, tmp_path):
    golden = GOLDEN_CASES[case_id]
    if golden["protocol"] == "voc-seg" and importlib.util.find_spec("mmseg") is None:
        pytest.skip("voc-seg needs mmsegmentation (pip install -e .[seg])")
    here = gc.platform_key()
    rows = gc.expected_rows(golden, GOLDEN, here)
    if rows is None:
        pytest.skip(f"{case_id}'s numbers depend on the CPU (recorded for {_platforms(golden)}); this machine is "
                    f"{here}: record them with python tests/golden/make_golden.py --add-platform")
    case = gc.Case(case_id, golden["protocol"], golden["fixture"], golden["checkpoint"], golden["overrides"])
    paths = {}
    for name, recorded in golden["fixture_params"].items():
        paths[name] = fixtures(name)
        # a different fixture makes different numbers: say so instead of blaming the protocol
        assert gc.fixture_digest(paths[name]) == recorded["digest"], \
            f"fixture {name} is not what the golden numbers were measured on (dcbench.data generator changed?)"

    got = gc.run_case(case, paths, tmp_path / "cache")

    want = {gc.row_key(r): r["value"] for r in rows}
    have = {gc.row_key(r): r["value"] for r in got["metrics"]}
    assert len(have) == len(got["metrics"]), "duplicate metric rows"
    assert set(have) == set(want), (f"metric rows differ: missing {sorted(set(want) - set(have), key=str)}, "
                                    f"new {sorted(set(have) - set(want), key=str)}")
    moved = [f"{key}: {have[key]!r} != golden {want[key]!r}" for key in sorted(want, key=str)
             if not (math.isclose(have[key], want[key], rel_tol=0.0, abs_tol=ATOL)
                     or (math.isnan(have[key]) and math.isnan(want[key])))]
    unknown = "" if here in _platforms(golden) else (
        f"\n(numbers recorded on {GOLDEN['platform']}; this machine is {here}: if no protocol code changed, this "
        f"case depends on the CPU: record its numbers here with python tests/golden/make_golden.py --add-platform)")
    assert not moved, f"{case_id}: {len(moved)} of {len(want)} numbers moved:\n" + "\n".join(moved) + unknown
    assert got["data_fingerprint"] == golden["data_fingerprint"], "the data fingerprint of the result changed"
