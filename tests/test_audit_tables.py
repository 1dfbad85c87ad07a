"""Audit of the results store, the tables and their statistics (stop 27): each test failed before
its fix. Statistics are checked against scipy on random and hand cases."""
from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import stats as sps

from dcbench.cli import main
from dcbench.leaderboard import analyze, build_table, render
from dcbench.results import CorruptRecordError, MetricRow, Result, ResultStore
from dcbench.stats import Trials, compare_trials, holm, paired_t, summarize, welch_t
from test_results import _v1_store  # a store as dcbench wrote it before schema version 2

SHA_A, SHA_B, SHA_C = "a" * 64, "b" * 64, "c" * 64
COL = "linear/conv3/top1"


def res(name: str, sha: str, value: float, seed: int | None = 0, settings: dict | None = None,
        protocol: str = "linear", extra: dict | None = None) -> Result:
    """One top1 row on conv3."""
    return Result(protocol=protocol, protocol_version="1", settings={"seed": seed, **(settings or {})},
                  checkpoint={"name": name, "sha256": sha, "arch": "alexnet"},
                  data={"root": "/d", "fingerprint": "f"},
                  metrics=[MetricRow("top1", value, tap="conv3", split="val", selection="final", seed=seed)],
                  extra=dict(extra or {}))


# -- "best" means better than every other cell ---------------------------------------------------
def test_best_needs_a_significant_win_over_every_other_cell_not_only_the_runner_up():
    rs = [res("top", SHA_A, v, seed=i) for i, v in enumerate([80.0, 80.1, 79.9])]
    rs += [res("second", SHA_B, v, seed=i) for i, v in enumerate([70.0, 70.1, 69.9])]
    # lower mean than the runner-up, but so spread that it cannot be told from the top
    rs += [res("wild", SHA_C, v, seed=i) for i, v in enumerate([40.0, 98.0, 69.0])]
    analysis = analyze(build_table(rs))
    t = build_table(rs)
    # the premise: the top beats the runner-up, not the third
    assert compare_trials(t.cells[("top", COL)].trials(), t.cells[("second", COL)].trials()).significant()
    assert not compare_trials(t.cells[("top", COL)].trials(), t.cells[("wild", COL)].trials()).significant()
    assert analysis.marks == {("top", COL): "tied", ("wild", COL): "tied"}
    assert "**" not in render(t, "md").split("\n\n")[1]  # nothing bold


def test_best_when_every_other_cell_is_beaten():
    rs = [res("top", SHA_A, v, seed=i) for i, v in enumerate([80.0, 80.5, 79.9])]
    rs += [res("second", SHA_B, v, seed=i) for i, v in enumerate([70.0, 70.1, 69.9])]
    rs += [res("third", SHA_C, v, seed=i) for i, v in enumerate([60.0, 61.0, 60.2])]
    assert analyze(build_table(rs)).marks == {("top", COL): "best"}


# -- incomparable setups never share a column ----------------------------------------------------
def test_setups_whose_labels_read_the_same_get_separate_columns():
    # lr 0.1 (a number) and "0.1" (a string, e.g. from a plugin) are two setups; epochs differs too,
    # so the label lists only epochs: both used to be "linear [epochs=2]" and merged into one cell
    rs = [res("m", SHA_A, 40.0, settings={"epochs": 2, "lr": 0.1}),
          res("m", SHA_A, 60.0, settings={"epochs": 2, "lr": "0.1"}),
          res("m", SHA_A, 50.0, settings={"epochs": 3, "lr": 0.1})]
    t = build_table(rs)
    assert len(t.columns) == 3 and len(set(t.columns)) == 3
    assert sorted(c.n for c in t.cells.values()) == [1, 1, 1]
    assert sorted(c.mean for c in t.cells.values()) == [40.0, 50.0, 60.0]


def test_a_setting_absent_from_one_setup_is_not_read_as_null():
    rs = [res("m", SHA_A, 40.0, settings={"head_init": None}), res("m", SHA_A, 60.0)]
    t = build_table(rs)
    assert len(t.columns) == 2
    assert any("head_init=(unset)" in c for c in t.columns) and any("head_init=null" in c for c in t.columns)


# -- mixed seed dependence ------------------------------------------------------------------------
def test_seed_dependent_cell_against_a_fixed_one_uses_all_its_trials():
    # a random init (BatchNorm re-estimated per seed) against a checkpoint whose kNN run is seed-free
    varying = Trials({0: 60.0, 1: 40.0, 2: 50.0}, seed_dependent=True)
    fixed = Trials({None: 45.0}, seed_dependent=False)
    cmp = compare_trials(varying, fixed)
    assert cmp.diff == pytest.approx(5.0)  # the difference of the cells' means, not of the last seed
    ref = sps.ttest_1samp([60.0, 40.0, 50.0], 45.0)
    assert cmp.method == "paired-t" and cmp.n == 3 and cmp.p_value == pytest.approx(ref.pvalue)
    back = compare_trials(fixed, varying)
    assert back.diff == pytest.approx(-5.0) and back.p_value == pytest.approx(ref.pvalue)


def test_seed_dependent_cell_against_a_fixed_one_with_outcomes_resamples_the_seeds():
    rng = np.random.default_rng(3)
    outs = {s: (rng.random(200) < p).astype(float) for s, p in ((0, 0.9), (1, 0.2), (2, 0.55))}
    values = {s: 100 * o.mean() for s, o in outs.items()}
    fixed_out = (rng.random(200) < 0.5).astype(float)
    varying = Trials(values, outs, seed_dependent=True)
    fixed = Trials({None: 100 * fixed_out.mean()}, {None: fixed_out}, seed_dependent=False)
    cmp = compare_trials(varying, fixed)
    assert cmp.method == "paired-bootstrap" and cmp.n == 3
    assert cmp.diff == pytest.approx(np.mean(list(values.values())) - 100 * fixed_out.mean())
    # the seeds disagree wildly (90% vs 20%): no significant difference can be claimed
    assert not cmp.significant()


# -- statistics against scipy ----------------------------------------------------------------------
@pytest.mark.parametrize("trial", range(20))
def test_t_statistics_match_scipy_on_random_cases(trial):
    rng = np.random.default_rng(trial)
    n, m = int(rng.integers(2, 8)), int(rng.integers(2, 8))
    a, b = rng.normal(50, 5, n), rng.normal(52, 3, n)
    s = summarize(a)
    lo, hi = sps.t.interval(0.95, n - 1, loc=a.mean(), scale=sps.sem(a))
    assert (s.ci_low, s.ci_high, s.std) == pytest.approx((lo, hi, a.std(ddof=1)))
    p = paired_t(a, b)
    ref = sps.ttest_rel(a, b)
    assert p.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    ci = ref.confidence_interval(0.95)
    assert (p.ci_low, p.ci_high) == pytest.approx((ci.low, ci.high))
    c = rng.normal(49, 9, m)
    w = welch_t(a, c)
    ref = sps.ttest_ind(a, c, equal_var=False)
    assert w.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    ci = ref.confidence_interval(0.95)
    assert (w.ci_low, w.ci_high) == pytest.approx((ci.low, ci.high))


@pytest.mark.parametrize("trial", range(20))
def test_holm_matches_a_direct_implementation(trial):
    rng = np.random.default_rng(100 + trial)
    ps = list(rng.random(int(rng.integers(1, 12))) ** 3)
    order = np.argsort(ps, kind="stable")
    m, expected, running = len(ps), [0.0] * len(ps), 0.0
    for rank, i in enumerate(order):  # Holm 1979, step-down
        running = max(running, min(1.0, (m - rank) * ps[i]))
        expected[i] = running
    assert holm(ps) == pytest.approx(expected)
    assert holm(ps + [None]) [-1] is None and holm(ps + [None])[:-1] == pytest.approx(expected)


def test_hand_cases_identical_results_and_single_trials():
    same = Trials({0: 50.0, 1: 51.0, 2: 52.0})
    assert paired_t([50.0, 51.0, 52.0], [50.0, 51.0, 52.0]).p_value == 1.0
    assert not compare_trials(same, Trials(dict(same.values))).significant()
    # one trial each, no outcomes: no test, no claim
    one = compare_trials(Trials({0: 70.0}), Trials({0: 50.0}))
    assert one.method == "none" and one.p_value is None and not one.significant()
    # constant "trials" on both sides are one value each: not evidence
    flat = compare_trials(Trials({0: 70.0, 1: 70.0}), Trials({0: 50.0, 1: 50.0}))
    assert flat.method == "none" and not flat.significant()


# -- hand-edited or damaged records ---------------------------------------------------------------
def _store_with_edit(tmp_path, edit) -> str:
    path = tmp_path / "r.db"
    with ResultStore(path) as db:
        db.add(res("m", SHA_A, 40.0))
        db.add(res("m", SHA_B, 41.0))
    conn = sqlite3.connect(path)
    record = json.loads(conn.execute("SELECT record_json FROM results WHERE id=2").fetchone()[0])
    conn.execute("UPDATE results SET record_json=? WHERE id=2", (edit(record),))
    conn.commit()
    conn.close()
    return str(path)


def _value(v):
    def edit(record):
        record["metrics"][0]["value"] = v
        return json.dumps(record)
    return edit


@pytest.mark.parametrize("edit, problem", [
    (_value("abc"), "value must be a number"),
    (_value(float("nan")), "value must be finite"),
    (lambda r: json.dumps({**r, "checkpoint": "x"}), "checkpoint must be a JSON object"),
    (lambda r: json.dumps({**r, "settings": [1]}), "settings must be a JSON object"),
    (lambda r: json.dumps({**r, "metrics": [1]}), "every metric row must be an object"),
    (lambda r: "{not json", "Expecting property name"),
    (lambda r: "[]", "must be a JSON object"),
    (lambda r: json.dumps({**r, "started": 5}), "started must be a string or null"),
    (lambda r: json.dumps({**r, "wall_s": "slow"}), "wall_s must be a number or null"),
])
@pytest.mark.parametrize("command", [["results", "list"], ["leaderboard", "--format", "json"],
                                     ["results", "export", "--format", "csv"]])
def test_a_corrupt_record_is_one_line_naming_the_store_the_id_and_the_fix(tmp_path, edit, problem, command):
    path = _store_with_edit(tmp_path, edit)
    out = CliRunner().invoke(main, command + ["--store", path])
    assert out.exit_code == 1, out.output
    line = out.output.strip().splitlines()[-1]
    assert line.startswith(f"error: results store {path}: result 2 is corrupt (")
    assert problem in line and f"dcbench results rm 2 --store {path}" in line
    assert "internal error" not in out.output and "Traceback" not in out.output


def test_the_rm_the_corrupt_record_error_names_removes_it(tmp_path):
    """The corrupt-record error says `dcbench results rm 2`: that command must work on it."""
    path = _store_with_edit(tmp_path, _value("abc"))
    out = CliRunner().invoke(main, ["results", "rm", "2", "--yes", "--store", path])
    assert out.exit_code == 0, out.output
    assert "2  (corrupt record)" in out.output and "removed 1 result(s)" in out.output
    with ResultStore(path, readonly=True) as db:
        assert [r.id for r in db.results()] == [1]


def test_corrupt_record_error_carries_the_id(tmp_path):
    path = _store_with_edit(tmp_path, _value("abc"))
    with ResultStore(path, readonly=True) as db:
        assert db.get(1).metrics[0].value == 40.0
        with pytest.raises(CorruptRecordError) as info:
            db.get(2)
        assert info.value.result_id == 2
        assert db.remove([2]) == 1  # removing needs no reading
        assert [r.id for r in db.results()] == [1]


# -- exports ---------------------------------------------------------------------------------------
def test_results_export_csv_neutralises_formulas_like_the_leaderboard():
    import csv
    import io

    from dcbench.results import export_results

    r = res("=HYPERLINK(\"http://x\")", SHA_A, 40.0)
    r.data["root"] = "@evil"
    r.id = 1
    rows = list(csv.DictReader(io.StringIO(export_results([r], "csv"))))
    assert rows[0]["checkpoint_name"] == "'=HYPERLINK(\"http://x\")" and rows[0]["data_root"] == "'@evil"
    assert rows[0]["value"] == "40.0" and rows[0]["metric"] == "top1"
    lb = list(csv.DictReader(io.StringIO(render(build_table([r]), "csv"))))
    assert lb[0]["checkpoint"] == rows[0]["checkpoint_name"]


def test_a_damaged_record_in_a_version_1_store_does_not_block_the_migration(tmp_path):
    path = tmp_path / "old.db"
    good = res("m", SHA_A, 40.0)
    _v1_store(path, [good])  # a store as dcbench wrote it before schema version 2
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO results(protocol, protocol_version, checkpoint_sha256, settings_key, record_json) "
                 "VALUES ('linear', '1', ?, '{}', '{broken')", (SHA_A,))
    conn.commit()
    conn.close()
    with ResultStore(path, readonly=True) as db:  # migrated in place, once
        assert db.schema_version() == 2 and db.get(1) == good
        with pytest.raises(CorruptRecordError, match="result 2 is corrupt"):
            db.results()
        assert db.remove([2]) == 1 and db.results() == [good]


# -- the bootstrap against scipy ------------------------------------------------------------------
@pytest.mark.parametrize("trial", range(3))
def test_bootstrap_intervals_match_scipy_percentile_bootstrap(trial):
    from dcbench.stats import bootstrap_interval, paired_bootstrap

    rng = np.random.default_rng(trial)
    n = int(rng.integers(80, 500))
    x = (rng.random(n) < rng.uniform(0.2, 0.9)).astype(float)
    y = np.where(rng.random(n) < 0.12, 1.0 - x, x)  # the other checkpoint flips 12% of the images
    lo, hi = bootstrap_interval([x], resamples=4000)
    ref = sps.bootstrap((100 * x,), np.mean, n_resamples=20000, method="percentile", random_state=1).confidence_interval
    assert (lo, hi) == pytest.approx((ref.low, ref.high), abs=1.5)
    cmp = paired_bootstrap([x], [y], resamples=4000)
    ref = sps.bootstrap((100 * x, 100 * y), lambda a, b, axis=-1: a.mean(axis=axis) - b.mean(axis=axis), paired=True,
                        n_resamples=20000, method="percentile", random_state=1).confidence_interval
    assert cmp.diff == pytest.approx(100 * (x.mean() - y.mean()))
    assert (cmp.ci_low, cmp.ci_high) == pytest.approx((ref.low, ref.high), abs=1.5)
    # the significance call agrees with McNemar's exact test on the discordant images, away from the edge
    b, c = int(((x == 1) & (y == 0)).sum()), int(((x == 0) & (y == 1)).sum())
    exact = sps.binomtest(b, b + c).pvalue
    if exact < 0.01 or exact > 0.1:
        assert cmp.significant() == (exact < 0.05)


def test_identical_outcomes_are_never_significant():
    from dcbench.stats import paired_bootstrap

    x = (np.random.default_rng(0).random(300) < 0.6).astype(float)
    cmp = paired_bootstrap([x, x], [x.copy(), x.copy()])
    assert cmp.diff == 0.0 and cmp.p_value == 1.0 and (cmp.ci_low, cmp.ci_high) == (0.0, 0.0)


def test_a_spread_metric_column_gets_no_best_mark():
    # voc07-lowshot reports the std of the mAP over its samples beside the mean: more spread is not better
    rs = []
    for name, sha, (mean, std) in (("a", SHA_A, (60.0, 9.0)), ("b", SHA_B, (50.0, 1.0))):
        for seed in range(3):
            rows = [MetricRow(f"mAP_k1_{stat}", v + 0.1 * seed, "conv3", "test", None, seed)
                    for stat, v in (("mean", mean), ("std", std))]
            rs.append(Result("voc07-lowshot", "1", {"name": name, "sha256": sha}, {"seed": seed},
                             {"fingerprint": "f"}, rows))
    analysis = analyze(build_table(rs, metrics=["all"]))
    assert analysis.marks == {("a", "voc07-lowshot/conv3/mAP_k1_mean"): "best"}


# -- training plots of a hand-edited metrics.jsonl ------------------------------------------------
def test_a_non_numeric_value_in_metrics_jsonl_is_one_line_naming_the_file_epoch_and_key(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"epoch": 0, "loss": 2.0}\n{"epoch": 1, "loss": "abc"}\n'
                                       '{"epoch": 2, "loss": 1.0}\n')
    out = CliRunner().invoke(main, ["viz", "training", str(run), "--out", str(tmp_path / "plots")])
    assert out.exit_code == 1, out.output
    assert out.output.strip().splitlines()[-1] == (f"error: {run / 'metrics.jsonl'}: epoch 1 has loss='abc', not a "
                                                   f"number; fix or delete that line")


def test_epochs_written_as_strings_and_dollar_values_still_plot(tmp_path):
    from dcbench.viz.training import load_run, overview_figure

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"epoch": "0", "loss": 2.0, "n_images": "$\\\\foo$"}\n'
                                       '{"epoch": "1", "loss": 1.5, "n_images": "$\\\\foo$", "n_clusters": "x"}\n')
    data = load_run(run)
    assert [r["epoch"] for r in data.records] == [0, 1] and data.series("loss") == ([0, 1], [2.0, 1.5])
    fig = overview_figure(data)
    fig.canvas.draw()  # a "$\foo$" value would be parsed as mathtext and raise here


# -- a filter that selects nothing -------------------------------------------------------------------
@pytest.mark.parametrize("args, asked", [
    (["--metric", "top1x"], "--metric top1x"), (["--tap", "conv9"], "--tap conv9"),
    (["--metric", "top1", "--selection", "best"], "--metric top1 and --selection best")])
def test_a_filter_that_matches_nothing_is_a_usage_error_naming_what_there_is(tmp_path, args, asked):
    path = str(tmp_path / "r.db")
    with ResultStore(path) as db:
        db.add(res("m", SHA_A, 40.0))
    for command in (["leaderboard", "--format", "latex"], ["report", "--out", str(tmp_path / "r.html")]):
        out = CliRunner().invoke(main, command + ["--store", path] + args)
        assert out.exit_code == 2, out.output
        assert out.output.strip().splitlines()[-1] == (f"error: no result matches {asked}; the results have metrics "
                                                       f"top1; taps conv3; selections final")
    assert not (tmp_path / "r.html").exists()


def test_report_with_an_unknown_reference_is_a_usage_error_like_the_leaderboard(tmp_path):
    path = str(tmp_path / "r.db")
    with ResultStore(path) as db:
        db.add(res("m", SHA_A, 40.0))
    for command in (["leaderboard"], ["report", "--out", str(tmp_path / "r.html")]):
        out = CliRunner().invoke(main, command + ["--store", path, "--reference", "nope"])
        assert out.exit_code == 2, out.output
        assert "unknown reference 'nope'; available rows: m" in out.output.strip().splitlines()[-1]


# -- rounding ------------------------------------------------------------------------------------------
def test_every_format_rounds_half_up_like_a_reader_of_the_csv():
    import csv
    import io

    # 16 val images: accuracies are multiples of 6.25, so exact halves are common
    rs = [res("a", SHA_A, 56.25), res("b", SHA_B, 68.75), res("c", SHA_C, 0.15)]
    t = build_table(rs)
    for fmt in ("md", "latex", "html"):
        text = render(t, fmt, reference="a")
        shown = text.replace('data-value="', "")  # html keeps the exact value for its sorting script
        assert "56.3" in shown and "68.8" in shown and "0.2" in shown and ">56.2" not in text, fmt
        assert " 56.2" not in text and "{56.2" not in text and "56.2 " not in shown, fmt
    assert "+12.5" in render(t, "md", reference="a")  # 68.75 - 56.25
    assert "-56.1" in render(t, "md", reference="a")  # 0.15 - 56.25 = -56.1
    values = {r["checkpoint"]: r["mean"] for r in csv.DictReader(io.StringIO(render(t, "csv")))}
    assert values == {"a": "56.25", "b": "68.75", "c": "0.15"}  # exact in csv / json


def test_a_difference_that_rounds_to_zero_is_never_minus_zero():
    from dcbench.render import _num, _signed

    assert (_signed(-0.04), _num(-0.04), _signed(0.04)) == ("+0.0", "0.0", "+0.0")


# -- card deviations of several protocol versions ------------------------------------------------------
def test_card_deviations_are_attributed_to_the_version_that_has_them():
    card = {"deviations": [{"what": "heads N(0, 0.01)", "why": "DeepCluster's choice", "source": "card"}]}
    old = res("m", SHA_A, 40.0, settings={"preset": "deepcluster"}, extra=card)
    new = res("m", SHA_A, 41.0, settings={"preset": "deepcluster"})
    new.protocol_version = "2"  # v2 fixed the deviation
    t = build_table([old, new])
    assert t.known_deviations == {"linear v1 (preset deepcluster)": (("heads N(0, 0.01)", "DeepCluster's choice"),)}
    items = {i["protocol_version"]: i for i in json.loads(render(t, "json"))}
    assert items["1"]["known_deviations"] and items["2"]["known_deviations"] == []
    assert "known deviations of linear v1 (preset deepcluster) from its sources" in render(t, "md")
    # one version: the label stays as before
    assert build_table([old]).known_deviations == {"linear (preset deepcluster)": (("heads N(0, 0.01)",
                                                                                     "DeepCluster's choice"),)}


def test_an_unknown_checkpoint_filter_is_a_usage_error_not_an_empty_table(tmp_path):
    path = str(tmp_path / "r.db")
    with ResultStore(path) as db:
        db.add(res("m", SHA_A, 40.0))
        db.add(res("n", SHA_B, 41.0))
    for extra in (["--checkpoint", "nope"], ["--checkpoint", "m", "--checkpoint", "typo"]):
        out = CliRunner().invoke(main, ["leaderboard", "--store", path, "--format", "latex"] + extra)
        assert out.exit_code == 2, out.output
        assert out.output.strip().splitlines()[-1] == (
            f"error: --checkpoint {extra[-1]}: no result of that checkpoint (name, row label or sha256 prefix of 8+) "
            f"among the results selected; checkpoints with results: m, n")
    ok = CliRunner().invoke(main, ["leaderboard", "--store", path, "--checkpoint", "n", "--checkpoint", SHA_A[:8]])
    assert ok.exit_code == 0 and ok.output.index("| n |") < ok.output.index("| m |")


def test_a_constant_seed_dependent_cell_against_a_fixed_one_is_not_evidence():
    # a random init whose three seeds all score 50.0 on a tiny val set, against a seed-free run: one
    # value against one value, no test (a t-test on the zero-variance differences would give p = 0)
    cmp = compare_trials(Trials({0: 50.0, 1: 50.0, 2: 50.0}), Trials({None: 43.75}, seed_dependent=False))
    assert cmp.method == "none" and not cmp.significant() and cmp.diff == pytest.approx(6.25)
