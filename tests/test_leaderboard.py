"""Tests for leaderboard tables and their renderers."""
from __future__ import annotations

import csv
import io
import json
import math
from html.parser import HTMLParser

import numpy as np
import pytest
from scipy import stats

from dcbench.errors import UsageError
from dcbench.leaderboard import Cell, Table, analyze, build_table, filter_results, find_row, render, render_terminal
from dcbench.results import MetricRow, Result


def res(name: str, sha: str, values: dict, seed: int | None = 0, protocol: str = "linear",
        selection: str | None = "final", split: str | None = "val", settings: dict | None = None,
        fingerprint: str = "f", extra: dict | None = None) -> Result:
    """A result with one metric row per ``{(tap, metric): value}``."""
    rows = [MetricRow(metric, v, tap=tap, split=split, selection=selection, seed=seed)
            for (tap, metric), v in values.items()]
    return Result(protocol=protocol, protocol_version="1", settings={"seed": seed, **(settings or {})},
                  checkpoint={"name": name, "sha256": sha, "arch": "alexnet"},
                  data={"root": "/d", "fingerprint": fingerprint}, metrics=rows, extra=dict(extra or {}))


SHA_A, SHA_B, SHA_C = "a" * 64, "b" * 64, "c" * 64


@pytest.fixture
def results() -> list[Result]:
    """dc: 3 seeds on conv3, random: 1 seed; plus a kNN protocol with one checkpoint."""
    out = [res("dc", SHA_A, {("conv3", "top1"): v, ("conv5", "top1"): 30.0 + i}, seed=i)
           for i, v in enumerate([40.0, 41.0, 45.0])]
    out.append(res("random", SHA_B, {("conv3", "top1"): 12.0, ("conv5", "top1"): 8.0}))
    out.append(res("dc", SHA_A, {(None, "knn_top1@20"): 33.3}, protocol="knn"))
    return out


def test_three_seed_mean_sample_std_and_interval(results):
    t = build_table(results)
    assert t.rows == ["dc", "random"]
    assert t.columns == ["linear/conv3/top1", "linear/conv5/top1", "knn/knn_top1@20"]
    cell = t.cells[("dc", "linear/conv3/top1")]
    mean = (40.0 + 41.0 + 45.0) / 3  # 42.0
    std = math.sqrt(((40 - mean) ** 2 + (41 - mean) ** 2 + (45 - mean) ** 2) / 2)  # sqrt(7)
    assert cell.n == 3 and cell.values == {0: 40.0, 1: 41.0, 2: 45.0}
    assert cell.mean == pytest.approx(mean)
    assert cell.std == pytest.approx(std)
    half = 4.302652729911275 * std / math.sqrt(3)  # t(0.975, 2 df)
    assert (cell.ci_low, cell.ci_high) == pytest.approx((mean - half, mean + half))
    rnd = t.cells[("random", "linear/conv3/top1")]
    assert (rnd.mean, rnd.std, rnd.n, rnd.ci_low) == (12.0, None, 1, None)
    assert ("random", "knn/knn_top1@20") not in t.cells


def test_selection_filters_rows():
    rs = [res("m", SHA_A, {("conv3", "top1"): 40.0}, selection="final"),
          res("m", SHA_A, {("conv3", "top1"): 44.0}, selection="best", seed=1),
          res("m", SHA_A, {("conv4", "top1"): 50.0}, selection=None, seed=2)]
    final = build_table(rs)
    assert final.cells[("m", "linear/conv3/top1")].mean == 40.0
    assert final.cells[("m", "linear/conv4/top1")].mean == 50.0  # selection None always used
    assert build_table(rs, selection="best").cells[("m", "linear/conv3/top1")].mean == 44.0


def test_rerun_with_same_seed_uses_the_latest_and_counts_it():
    rs = [res("m", SHA_A, {("conv3", "top1"): 40.0}, seed=0),
          res("m", SHA_A, {("conv3", "top1"): 42.0}, seed=0)]
    cell = build_table(rs).cells[("m", "linear/conv3/top1")]
    assert (cell.mean, cell.n, cell.duplicates) == (42.0, 1, 1)
    item = json.loads(render(build_table(rs), "json"))[0]
    assert item["duplicates"] == 1 and item["n"] == 1


def test_shared_name_is_disambiguated():
    rs = [res("model", SHA_A, {("conv3", "top1"): 1.0}), res("model", SHA_B, {("conv3", "top1"): 2.0})]
    t = build_table(rs)
    assert t.rows == ["model@aaaaaaaa", "model@bbbbbbbb"]


def test_protocol_and_checkpoint_filters(results):
    t = build_table(results, protocols=["knn", "linear"], checkpoints=["random", SHA_A[:10]])
    assert t.rows == ["random", "dc"]
    assert t.columns[0] == "knn/knn_top1@20"
    assert build_table(results, protocols=["knn"]).rows == ["dc"]


def test_splits_never_mixed():
    rs = [res("m", SHA_A, {("conv3", "top1"): 40.0}, split="val"),
          res("m", SHA_A, {("conv3", "top1"): 30.0}, split="test", seed=1)]
    t = build_table(rs)
    assert t.columns == ["linear/conv3/top1 (val)", "linear/conv3/top1 (test)"]


# -- identity: different keys never merge ---------------------------------------------------------
def test_other_settings_or_data_are_separate_labelled_columns():
    """Three seeds on one root, then one eval on another root with other epochs: two cells, never one."""
    rs = [res("dc", SHA_A, {("conv1", "top1"): v}, seed=i, settings={"epochs": 2}) for i, v in
          enumerate([90.0, 92.0, 93.1])]
    rs.append(res("dc", SHA_A, {("conv1", "top1"): 86.8}, seed=0, settings={"epochs": 5}, fingerprint="other"))
    rs.append(res("dc", SHA_A, {("conv1", "top1"): 88.0}, seed=0, settings={"epochs": 2}, fingerprint="zzz"))
    t = build_table(rs)
    assert t.columns == ["linear [epochs=2, data=f]/conv1/top1", "linear [epochs=5, data=other]/conv1/top1",
                         "linear [epochs=2, data=zzz]/conv1/top1"]
    assert [t.cells[("dc", c)].n for c in t.columns] == [3, 1, 1]
    assert t.cells[("dc", t.columns[0])].mean == pytest.approx(91.7)
    items = json.loads(render(t, "json"))
    assert len({i["key"] for i in items}) == 3 and {i["setup"] for i in items} == {
        "epochs=2, data=f", "epochs=5, data=other", "epochs=2, data=zzz"}
    assert {i["data_fingerprint"] for i in items} == {"f", "other", "zzz"}
    # --latest: per checkpoint and protocol, only the setup of the most recent result
    assert build_table(rs, latest=True).columns == ["linear/conv1/top1"]


def test_workers_and_cache_do_not_split_a_key_but_the_version_does():
    rs = [res("m", SHA_A, {("conv3", "top1"): 40.0}, seed=0, settings={"workers": 0, "cache": True}),
          res("m", SHA_A, {("conv3", "top1"): 42.0}, seed=1, settings={"workers": 4, "cache": False})]
    assert build_table(rs).cells[("m", "linear/conv3/top1")].n == 2
    rs[1].protocol_version = "2"
    assert build_table(rs).columns == ["linear [v1]/conv3/top1", "linear [v2]/conv3/top1"]


def test_seed_independent_protocol_has_one_trial():
    rs = [res("m", SHA_A, {("conv3", "top1_k20"): 33.3}, seed=s, protocol="knn", extra={"seed_dependent": False})
          for s in (0, 1, 2)]
    t = build_table(rs)
    cell = t.cells[("m", "knn/conv3/top1_k20")]
    assert (cell.n, cell.std, cell.duplicates, cell.seed_dependent) == (1, None, 2, False)
    text = render_terminal(t)
    assert "n=1 (seed-independent" in text and "±" not in text.split("\n\n")[0]
    # records without the flag ask the caller (the CLI asks the protocol registry)
    for r in rs:
        r.extra = {}
    assert build_table(rs, seed_dependent=lambda p: p != "knn").cells[("m", "knn/conv3/top1_k20")].n == 1
    assert build_table(rs).cells[("m", "knn/conv3/top1_k20")].n == 3


def test_filter_results_by_setting_and_data():
    rs = [res("m", SHA_A, {("conv3", "top1"): 1.0}, settings={"epochs": 2}),
          res("m", SHA_A, {("conv3", "top1"): 2.0}, settings={"epochs": 5}, fingerprint="abc"),
          res("m", SHA_A, {("conv3", "top1_k20"): 3.0}, protocol="knn")]
    assert [r.metrics[0].value for r in filter_results(rs, {"epochs": 2})] == [1.0, 3.0]  # knn has no epochs
    assert [r.metrics[0].value for r in filter_results(rs, {"linear.epochs": 5})] == [2.0, 3.0]
    assert [r.metrics[0].value for r in filter_results(rs, {"data": "ab"})] == [2.0]
    with pytest.raises(UsageError, match="no result has a setting 'epoch'"):
        filter_results(rs, {"epoch": 2})


# -- readable tables ----------------------------------------------------------------------------
def test_headline_metric_and_tap_filters():
    rs = [res("m", SHA_A, {("conv3", "top1"): 1.0, ("conv3", "top5"): 2.0, ("conv5", "top1"): 3.0}),
          res("m", SHA_A, {("conv3", "top1_k10"): 4.0, ("conv3", "top1_k20"): 5.0, ("conv3", "top5_k20"): 6.0},
              protocol="knn"),
          res("m", SHA_A, {("fc6-8", "mAP"): 7.0, ("fc6-8", "AP_cat"): 8.0}, protocol="voc07-cls"),
          res("m", SHA_A, {("all", "AP50"): 9.0, ("all", "AP"): 10.0}, protocol="voc-det"),
          res("m", SHA_A, {("all", "mIoU"): 11.0, ("all", "aAcc"): 12.0}, protocol="voc-seg"),
          res("m", SHA_A, {("conv5", "mAP_easy"): 13.0, ("conv5", "mAP_medium"): 14.0}, protocol="roxford5k")]
    t = build_table(rs, metrics=["headline"])
    assert [t.column(c).metric for c in t.columns] == ["top1", "top1", "top1_k20", "mAP", "AP50", "mIoU",
                                                        "mAP_medium"]
    assert build_table(rs, metrics=["top5*"]).columns == ["linear/conv3/top5", "knn/conv3/top5_k20"]
    assert build_table(rs, metrics=["all"]).columns == build_table(rs).columns
    assert len(build_table(rs).columns) == 14
    assert build_table(rs, metrics=["top1"], taps=["conv5"]).columns == ["linear/conv5/top1"]


# -- statistics and marks -----------------------------------------------------------------------
def test_best_only_when_significantly_better_than_the_runner_up(results):
    t = build_table(results)
    marks = {(i["checkpoint"], i["column"]): i["mark"] for i in json.loads(render(t, "json"))}
    # dc's 3 seeds vs random's single seed: no paired seeds, no test -> both tied, none "best"
    assert marks[("dc", "linear/conv3/top1")] == marks[("random", "linear/conv3/top1")] == "tied"
    assert marks[("dc", "knn/knn_top1@20")] is None  # alone in its column: nothing to compare


def _pair(values_a: list[float], values_b: list[float]) -> Table:
    rs = [res("a", SHA_A, {("conv3", "top1"): v}, seed=i) for i, v in enumerate(values_a)]
    rs += [res("b", SHA_B, {("conv3", "top1"): v}, seed=i) for i, v in enumerate(values_b)]
    return build_table(rs)


def test_noise_is_not_best_but_a_clear_gap_is():
    noisy = analyze(_pair([97.1, 98.1, 97.6], [97.2, 97.8, 97.5]))  # 97.6 +- 0.5 vs 97.5 +- 0.3
    assert set(noisy.marks.values()) == {"tied"} and len(noisy.marks) == 2
    clear = analyze(_pair([60.0, 61.0, 62.0], [50.0, 50.5, 51.5]))
    assert clear.marks == {("a", "linear/conv3/top1"): "best"}
    md = render(clear.table, "md")
    assert "**linear · top1 (val) — n=3 per cell**" in md  # a uniform n is said once, in the heading
    assert "**61.0 ± 1.0**" in md and "≈" not in md.split("\n\n")[1]


def test_ties_are_all_marked():
    t = Table(columns=["c"], rows=["x", "y"], cells={("x", "c"): Cell(5.0, None, 1),
                                                       ("y", "c"): Cell(5.0, None, 1)})
    assert all(i["mark"] == "tied" and not i["best"] for i in json.loads(render(t, "json")))


def test_paired_differences_vs_reference():
    t = _pair([60.0, 61.0, 62.0], [50.0, 50.5, 51.5])
    items = {i["checkpoint"]: i for i in json.loads(render(t, "json", reference="b"))}
    a = items["a"]
    d = np.array([10.0, 10.5, 10.5])
    ref = stats.ttest_rel([60.0, 61.0, 62.0], [50.0, 50.5, 51.5])
    ci = ref.confidence_interval(0.95)
    assert a["diff"] == pytest.approx(d.mean()) and a["test"] == "paired-t" and a["significant"] is True
    assert (a["diff_ci_low"], a["diff_ci_high"]) == pytest.approx((ci.low, ci.high))
    assert a["p_value"] == pytest.approx(ref.pvalue)
    assert items["b"]["diff"] == 0.0 and items["b"]["p_value"] is None
    text = render_terminal(t, reference="b")
    assert "Δ vs b" in text and f"+{d.mean():.1f} [" in text and "†" in text
    assert render_terminal(t, reference=SHA_B[:8]) == text  # a sha256 prefix names the row too
    t.reference = "b"
    assert json.loads(render(t, "json"))[0]["diff"] is not None  # table.reference is the default


def test_bootstrap_over_stored_outcomes():
    rng = np.random.default_rng(0)
    ob = (rng.random(400) < 0.5).astype(np.uint8)
    oa = ob.copy()
    oa[np.flatnonzero(ob == 0)[:40]] = 1  # a is right on 40 more images: +10 points
    outcomes = {1: {"top1_k20/conv3": oa}, 2: {"top1_k20/conv3": ob}}
    rs = [res("a", SHA_A, {("conv3", "top1_k20"): 100 * oa.mean()}, protocol="knn", selection=None,
              extra={"seed_dependent": False}),
          res("b", SHA_B, {("conv3", "top1_k20"): 100 * ob.mean()}, protocol="knn", selection=None,
              extra={"seed_dependent": False})]
    rs[0].id, rs[1].id = 1, 2
    t = build_table(rs, outcomes=outcomes.get)
    an = analyze(t, reference="b")
    cmp = an.diffs[("a", "knn/conv3/top1_k20")]
    assert cmp.method == "paired-bootstrap" and cmp.significant() and cmp.diff == pytest.approx(10.0)
    assert an.marks[("a", "knn/conv3/top1_k20")] == "best"
    assert an.summaries[("a", "knn/conv3/top1_k20")].method == "bootstrap"


def test_unknown_reference_names_rows(results):
    with pytest.raises(ValueError, match="dc, random"):
        render(build_table(results), "md", reference="nope")


def test_unknown_format(results):
    with pytest.raises(ValueError, match="md, csv, latex, html, json"):
        render(build_table(results), "xlsx")


def test_unverified_rows_are_labelled():
    rs = [res("pretrained:x", SHA_A, {("conv3", "top1"): 1.0}, extra={"checkpoint_unverified": True})]
    t = build_table(rs)
    assert t.rows == ["pretrained:x [unverified]"]
    assert json.loads(render(t, "json"))[0]["unverified"] is True
    assert find_row(t, "pretrained:x") == "pretrained:x [unverified]"


# -- formats ------------------------------------------------------------------------------------
def test_csv_is_tidy(results):
    text = render(build_table(results), "csv", reference="random")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 5
    dc = next(r for r in rows if r["checkpoint"] == "dc" and r["column"] == "linear/conv3/top1")
    assert float(dc["mean"]) == pytest.approx(42.0) and float(dc["std"]) == pytest.approx(math.sqrt(7))
    assert dc["n"] == "3" and dc["mark"] == "tied" and float(dc["ci_low"]) < 42.0 < float(dc["ci_high"])
    assert float(dc["diff"]) == pytest.approx(30.0) and dc["test"] == "none" and dc["significant"] == ""
    assert json.loads(dc["settings"]) == {} and dc["data_fingerprint"] == "f" and len(dc["key"]) == 64
    rnd = next(r for r in rows if r["checkpoint"] == "random" and r["column"] == "linear/conv3/top1")
    assert rnd["std"] == "" and rnd["ci_low"] == ""


def test_json_fields(results):
    items = json.loads(render(build_table(results), "json"))
    assert len(items) == 5
    assert {"n", "mean", "std", "ci_low", "ci_high", "mark", "best", "key", "settings", "data_fingerprint",
            "seed_dependent", "duplicates"} <= set(items[0])
    assert items[0]["n"] == 3 and items[0]["std"] == pytest.approx(math.sqrt(7)) and items[0]["seeds"] == [0, 1, 2]
    assert "diff" not in items[0]


VOID = {"meta", "br", "hr", "img", "input", "link"}


class BalanceChecker(HTMLParser):
    """Records tag nesting errors and the visible text."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.text: list[str] = []
        self.decl = ""

    def handle_decl(self, decl: str) -> None:
        self.decl = decl

    def handle_starttag(self, tag, attrs) -> None:
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag) -> None:
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)

    def handle_data(self, data) -> None:
        self.text.append(data)


def parse_html(text: str) -> BalanceChecker:
    p = BalanceChecker()
    p.feed(text)
    p.close()
    return p


def test_html_grouped_scrolling_and_well_formed(results):
    text = render(build_table(results), "html", reference="random")
    p = parse_html(text)
    assert p.decl.lower() == "doctype html"
    assert p.errors == [] and p.stack == []
    visible = "".join(p.text)
    assert "42.0 ± 2.6" in visible and "+30.0" in visible and "33.3" in visible and "n=3" in visible
    assert '<div class="dcb-scroll">' in text and "overflow-x: auto" in text  # scrolls inside, not the page
    assert 'colspan="2">linear · top1 (val)</th>' in text  # protocol > tap headers
    assert "<style>" in text and "<script>" in text and "addEventListener" in text
    assert "tied for best" in visible  # the legend


def test_latex_booktabs_grouped(results):
    text = render(build_table(results), "latex")
    for token in (r"\begin{tabular}", r"\toprule", r"\midrule", r"\bottomrule", r"\end{tabular}",
                  r"\multicolumn{2}{c}{linear $\cdot$ top1 (val)}", r"\cmidrule(lr){2-3}"):
        assert token in text
    assert r"42.0 $\pm$ 2.6 n=3 $\approx$" in text
    assert r"knn\_top1@20" in text
    body = text.split(r"\midrule")[1].split(r"\bottomrule")[0].strip().splitlines()
    assert len(body) == 2 and all(line.endswith(r"\\") and line.count(" & ") == 3 for line in body)
    assert "tied for best" in text.split(r"\bottomrule")[1]


NASTY = "a_b & <c> 50%"


@pytest.fixture
def nasty_table() -> Table:
    return build_table([res(NASTY, SHA_A, {("conv_3", "top1"): 1.0}),
                        res("plain", SHA_B, {("conv_3", "top1"): 2.0})])


def test_escaping_latex(nasty_table):
    text = render(nasty_table, "latex")
    assert r"a\_b \& \textless{}c\textgreater{} 50\%" in text
    assert r"conv\_3" in text
    assert NASTY not in text


def test_escaping_html(nasty_table):
    text = render(nasty_table, "html", reference=NASTY)
    assert "a_b &amp; &lt;c&gt; 50%" in text and NASTY not in text
    p = parse_html(text)
    assert p.errors == [] and p.stack == []
    assert NASTY in "".join(p.text)  # round-trips through a parser


def test_escaping_md(nasty_table):
    text = render(nasty_table, "md")
    assert r"a\_b \& \<c\> 50%" in text
    table_lines = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table_lines) == 4 and all(line.count(" | ") == 1 for line in table_lines)  # names split none


def test_escaping_csv_json(nasty_table):
    rows = list(csv.reader(io.StringIO(render(nasty_table, "csv"))))
    assert rows[1][0] == NASTY
    assert json.loads(render(nasty_table, "json"))[0]["checkpoint"] == NASTY


def test_pipe_in_md_name_escaped():
    t = build_table([res("x|y", SHA_A, {("conv3", "top1"): 1.0})])
    assert r"x\|y" in render(t, "md")


def test_terminal_blocks_aligned_and_narrow(results):
    text = render_terminal(build_table(results))
    blocks = text.split("\n\n")
    assert blocks[0].splitlines()[0] == "linear · top1 (val)"
    lines = blocks[0].splitlines()
    assert lines[1].split() == ["checkpoint", "conv3", "conv5"] and set(lines[2]) <= {"-", " "}
    assert "42.0 ± 2.6 n=3 ≈" in text and "12.0 n=1" in text
    assert len({len(ln) for ln in lines[1:]}) == 1  # right-aligned: every line ends at one column
    assert max(len(ln) for block in blocks for ln in block.splitlines()) <= 110
    assert blocks[-1].startswith("mean ± sample std")  # the legend
    assert render_terminal(build_table([])) == "no results"


def test_empty_table_renders_everywhere():
    t = build_table([])
    for fmt in ("md", "csv", "latex", "html", "json"):
        assert render(t, fmt)
    assert json.loads(render(t, "json")) == []


def test_where_values_match_as_typed_or_parsed():
    rs = [res("m", SHA_A, {("conv3", "top1"): 1.0}, settings={"taps": ["conv1", "conv2"], "lr": 0.01}, fingerprint="0012ab"),
          res("m", SHA_A, {("conv3", "top1"): 2.0}, settings={"taps": ["conv3"], "lr": 0.1}, fingerprint="0099")]
    assert [r.metrics[0].value for r in filter_results(rs, {"taps": "[conv1,conv2]"})] == [1.0]
    assert [r.metrics[0].value for r in filter_results(rs, {"lr": "0.1"})] == [2.0]
    assert [r.metrics[0].value for r in filter_results(rs, {"data": "0012"})] == [1.0]  # not YAML's octal 10


# -- deviations (issue 13) ----------------------------------------------------------------------
def _dev(what: str, source: str = "user", why: str = "set by the user") -> dict:
    return {"what": what, "why": why, "source": source}


@pytest.fixture
def deviating() -> list[Result]:
    """a: crops=center (user) on conv3; b: the preset; c: epochs=1 (user); a card deviation on every linear run,
    and a kNN run with its own card deviation."""
    card = _dev("heads N(0, 0.01)", "card", "DeepCluster's choice")
    return [res("a", SHA_A, {("conv3", "top1"): 40.0}, settings={"preset": "deepcluster", "crops": "center"},
                extra={"deviations": [card, _dev("crops=center")]}),
            res("b", SHA_B, {("conv3", "top1"): 41.0}, settings={"preset": "deepcluster", "crops": "center"},
                extra={"deviations": [card, _dev("crops=center")]}),
            res("c", SHA_C, {("conv3", "top1"): 42.0}, settings={"preset": "deepcluster", "crops": "tencrop"},
                extra={"deviations": [card]}),
            res("a", SHA_A, {("conv3", "top1_k20"): 30.0}, protocol="knn", selection=None,
                extra={"deviations": [_dev("bicubic resize", "card", "DINO"), _dev("ks=[20]")]})]


def test_user_deviations_are_marked_and_card_deviations_listed_once_per_protocol(deviating):
    t = build_table(deviating)
    an = analyze(t)
    lin = [c for c in t.columns if c.startswith("linear")]
    assert {(r, c): m for (r, c), m in an.deviations.marks.items()} == {
        ("a", lin[0]): "‡1", ("b", lin[0]): "‡1", ("a", "knn/conv3/top1_k20"): "‡2"}
    assert an.deviations.user == [("‡1", (("crops=center", "set by the user"),)),
                                  ("‡2", (("ks=[20]", "set by the user"),))]
    assert an.deviations.known == {"linear (preset deepcluster)": (("heads N(0, 0.01)", "DeepCluster's choice"),),
                                   "knn": (("bicubic resize", "DINO"),)}
    md = render(t, "md")
    assert "| a | 40.0 ≈ ‡1 |" in md and "| c | 42.0 |" in md  # c ran the preset's crops: its own column, no mark
    assert md.count("heads N(0, 0.01)") == 1 and "known deviations of linear (preset deepcluster)" in md
    assert "- ‡1 settings changed from the defaults: crops=center (set by the user)" in md
    latex = render(t, "latex")
    assert r"\textsuperscript{\ddag{}2}" in latex and latex.count("heads N(0, 0.01)") == 1
    footnotes = latex.split(r"\bottomrule")[1]
    assert r"\textsuperscript{\ddag{}1} settings changed" in footnotes and "known deviations of knn" in footnotes
    page = render(t, "html")
    p = parse_html(page)
    assert p.errors == [] and p.stack == []
    assert page.count('<sup class="dev">‡1</sup>') == 3  # two cells and the note
    assert "known deviations of knn from its sources: bicubic resize (DINO)" in "".join(p.text)
    terminal = render_terminal(t)
    blocks = terminal.split("\n\n")
    assert blocks[-2].startswith("‡1 settings changed") and blocks[-1].startswith("mean ± sample std")


def test_deviations_in_csv_and_json(deviating):
    t = build_table(deviating)
    items = {(i["checkpoint"], i["protocol"]): i for i in json.loads(render(t, "json"))}
    a = items[("a", "linear")]
    assert a["deviation_mark"] == "‡1" and a["deviations"] == [_dev("crops=center")]
    assert a["known_deviations"] == [_dev("heads N(0, 0.01)", "card", "DeepCluster's choice")]
    assert items[("c", "linear")]["deviation_mark"] is None and items[("c", "linear")]["deviations"] == []
    rows = {(r["checkpoint"], r["protocol"]): r for r in csv.DictReader(io.StringIO(render(t, "csv")))}
    assert rows[("a", "knn")]["deviation_mark"] == "‡2"
    assert json.loads(rows[("a", "knn")]["deviations"]) == [_dev("ks=[20]")]
    assert json.loads(rows[("c", "linear")]["known_deviations"])[0]["what"] == "heads N(0, 0.01)"


def test_no_deviations_no_notes(results):
    t = build_table(results)
    for fmt in ("md", "latex", "html"):
        assert "‡" not in render(t, fmt) and "ddag" not in render(t, fmt)


def test_a_protocol_declares_its_headline_metrics():
    rs = [res("m", SHA_A, {("conv3", "top1"): 1.0, ("conv3", "top5"): 2.0}, protocol="linear"),
          res("m", SHA_A, {("conv5", "mAP_medium"): 3.0, ("conv5", "mAP_hard"): 4.0, ("conv5", "mAP_easy"): 5.0},
              protocol="roxford5k"),
          res("m", SHA_A, {(None, "score"): 6.0, (None, "other"): 7.0}, protocol="not-installed")]
    t = build_table(rs, metrics=["headline"])
    # roxford5k declares Medium and Hard (its ClassVar); an unknown protocol: the table, else its first metric
    assert [t.column(c).metric for c in t.columns] == ["top1", "mAP_medium", "mAP_hard", "score"]
    t = build_table(rs, metrics=["headline"], headlines=lambda p: ("top5",) if p == "linear" else None)
    assert [t.column(c).metric for c in t.columns] == ["top5", "mAP_medium", "score"]


def test_seed_dependence_is_per_cell():
    """kNN of a trained checkpoint: seed-independent; of a random init with BN re-estimation: seeded trials."""
    rs = [res("trained", SHA_A, {("conv3", "top1_k20"): 50.0}, seed=s, protocol="knn", selection=None,
              extra={"seed_dependent": False}) for s in (0, 1)]
    rs += [res("random", SHA_B, {("conv3", "top1_k20"): v}, seed=s, protocol="knn", selection=None,
               extra={"seed_dependent": True}) for s, v in ((0, 10.0), (1, 12.0))]
    t = build_table(rs)
    trained, random = t.cells[("trained", "knn/conv3/top1_k20")], t.cells[("random", "knn/conv3/top1_k20")]
    assert (trained.n, trained.seed_dependent, trained.duplicates) == (1, False, 1)
    assert (random.n, random.seed_dependent, random.mean) == (2, True, 11.0)
    assert t.column("knn/conv3/top1_k20").seed_dependent
