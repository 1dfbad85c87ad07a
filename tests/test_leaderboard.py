"""Tests for leaderboard tables and their renderers."""
from __future__ import annotations

import csv
import io
import json
import math
from html.parser import HTMLParser

import pytest

from dcbench.leaderboard import Cell, Table, build_table, render, render_terminal
from dcbench.results import MetricRow, Result


def res(name: str, sha: str, values: dict, seed: int | None = 0, protocol: str = "linear",
        selection: str | None = "final", split: str | None = "val") -> Result:
    """A result with one metric row per ``{(tap, metric): value}``."""
    rows = [MetricRow(metric, v, tap=tap, split=split, selection=selection, seed=seed)
            for (tap, metric), v in values.items()]
    return Result(protocol=protocol, protocol_version="1", settings={"seed": seed},
                  checkpoint={"name": name, "sha256": sha, "arch": "alexnet"},
                  data={"root": "/d", "fingerprint": "f"}, metrics=rows)


SHA_A, SHA_B, SHA_C = "a" * 64, "b" * 64, "c" * 64


@pytest.fixture
def results() -> list[Result]:
    """dc: 3 seeds on conv3, random: 1 seed; plus a kNN protocol with one checkpoint."""
    out = [res("dc", SHA_A, {("conv3", "top1"): v, ("conv5", "top1"): 30.0 + i}, seed=i)
           for i, v in enumerate([40.0, 41.0, 45.0])]
    out.append(res("random", SHA_B, {("conv3", "top1"): 12.0, ("conv5", "top1"): 8.0}))
    out.append(res("dc", SHA_A, {(None, "knn_top1@20"): 33.3}, protocol="knn"))
    return out


def test_three_seed_mean_and_sample_std(results):
    t = build_table(results)
    assert t.rows == ["dc", "random"]
    assert t.columns == ["linear/conv3/top1", "linear/conv5/top1", "knn/knn_top1@20"]
    cell = t.cells[("dc", "linear/conv3/top1")]
    mean = (40.0 + 41.0 + 45.0) / 3  # 42.0
    std = math.sqrt(((40 - mean) ** 2 + (41 - mean) ** 2 + (45 - mean) ** 2) / 2)  # sqrt(7)
    assert cell.n == 3
    assert cell.mean == pytest.approx(mean)
    assert cell.std == pytest.approx(std)
    assert t.cells[("random", "linear/conv3/top1")] == Cell(12.0, None, 1)
    assert ("random", "knn/knn_top1@20") not in t.cells


def test_selection_filters_rows():
    rs = [res("m", SHA_A, {("conv3", "top1"): 40.0}, selection="final"),
          res("m", SHA_A, {("conv3", "top1"): 44.0}, selection="best", seed=1),
          res("m", SHA_A, {("conv4", "top1"): 50.0}, selection=None, seed=2)]
    final = build_table(rs)
    assert final.cells[("m", "linear/conv3/top1")].mean == 40.0
    assert final.cells[("m", "linear/conv4/top1")].mean == 50.0  # selection None always used
    assert build_table(rs, selection="best").cells[("m", "linear/conv3/top1")].mean == 44.0


def test_rerun_with_same_seed_replaces_not_averages():
    rs = [res("m", SHA_A, {("conv3", "top1"): 40.0}, seed=0),
          res("m", SHA_A, {("conv3", "top1"): 42.0}, seed=0)]
    assert build_table(rs).cells[("m", "linear/conv3/top1")] == Cell(42.0, None, 1)


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


def test_best_marking(results):
    t = build_table(results)
    md = render(t, "md")
    dc_line = next(line for line in md.splitlines() if line.startswith("| dc "))
    rnd_line = next(line for line in md.splitlines() if line.startswith("| random "))
    assert "**42.0 ± 2.6**" in dc_line and "**" not in rnd_line
    items = json.loads(render(t, "json"))
    best = {(i["checkpoint"], i["column"]) for i in items if i["best"]}
    assert best == {("dc", c) for c in t.columns}
    t.higher_is_better = False
    items = json.loads(render(t, "json"))
    assert {(i["checkpoint"], i["column"]) for i in items if i["best"]} == {
        ("random", "linear/conv3/top1"), ("random", "linear/conv5/top1"), ("dc", "knn/knn_top1@20")}


def test_ties_are_all_marked():
    t = Table(columns=["c"], rows=["x", "y"], cells={("x", "c"): Cell(5.0, None, 1),
                                                       ("y", "c"): Cell(5.0, None, 1)})
    assert all(i["best"] for i in json.loads(render(t, "json")))


def test_deltas_vs_reference(results):
    t = build_table(results)
    items = {(i["checkpoint"], i["column"]): i for i in json.loads(render(t, "json", reference="random"))}
    assert items[("dc", "linear/conv3/top1")]["delta"] == pytest.approx(30.0)
    assert items[("random", "linear/conv3/top1")]["delta"] == 0.0
    assert items[("dc", "knn/knn_top1@20")]["delta"] is None  # reference has no value there
    md = render(t, "md", reference="random")
    assert "(+30.0)" in md and "(+23.0)" in md
    rnd_line = next(line for line in md.splitlines() if line.startswith("| random "))
    assert "(+" not in rnd_line  # the reference row shows plain values
    t.reference = "dc"
    assert "(-30.0)" in render_terminal(t)
    assert json.loads(render(t, "json"))[-1]["delta"] is not None  # table.reference is the default


def test_unknown_reference_names_rows(results):
    with pytest.raises(ValueError, match="dc, random"):
        render(build_table(results), "md", reference="nope")


def test_unknown_format(results):
    with pytest.raises(ValueError, match="md, csv, latex, html, json"):
        render(build_table(results), "xlsx")


def test_csv_parses(results):
    text = render(build_table(results), "csv", reference="random")
    rows = list(csv.reader(io.StringIO(text)))
    header = rows[0]
    assert header[:6] == ["checkpoint", "linear/conv3/top1 mean", "linear/conv3/top1 std",
                          "linear/conv3/top1 n", "linear/conv3/top1 best", "linear/conv3/top1 delta"]
    assert len(rows) == 3 and all(len(r) == len(header) for r in rows)
    dc = dict(zip(header, rows[1]))
    assert float(dc["linear/conv3/top1 mean"]) == pytest.approx(42.0)
    assert float(dc["linear/conv3/top1 std"]) == pytest.approx(math.sqrt(7))
    assert dc["linear/conv3/top1 n"] == "3" and dc["linear/conv3/top1 best"] == "true"
    assert float(dc["linear/conv3/top1 delta"]) == pytest.approx(30.0)
    rnd = dict(zip(header, rows[2]))
    assert rnd["linear/conv3/top1 std"] == "" and rnd["knn/knn_top1@20 mean"] == ""


def test_json_parses(results):
    items = json.loads(render(build_table(results), "json"))
    assert all(set(i) == {"checkpoint", "column", "mean", "std", "n", "best", "delta"} for i in items)
    assert len(items) == 5
    assert items[0]["n"] == 3 and items[0]["std"] == pytest.approx(math.sqrt(7))


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


def test_html_well_formed_and_contains_values(results):
    text = render(build_table(results), "html", reference="random")
    p = parse_html(text)
    assert p.decl.lower() == "doctype html"
    assert p.errors == [] and p.stack == []
    visible = "".join(p.text)
    assert "42.0 ± 2.6" in visible and "(+30.0)" in visible and "33.3" in visible
    assert "<style>" in text and "<script>" in text and "addEventListener" in text
    assert "<strong>42.0 ± 2.6</strong>" in text


def test_latex_booktabs(results):
    text = render(build_table(results), "latex")
    for token in (r"\begin{tabular}", r"\toprule", r"\midrule", r"\bottomrule", r"\end{tabular}"):
        assert token in text
    assert r"\textbf{42.0 $\pm$ 2.6}" in text
    assert r"knn\_top1@20" in text
    body = text.split(r"\midrule")[1].split(r"\bottomrule")[0].strip().splitlines()
    assert len(body) == 2 and all(line.endswith(r"\\") and line.count(" & ") == 3 for line in body)


NASTY = "a_b & <c> 50%"


@pytest.fixture
def nasty_table() -> Table:
    return build_table([res(NASTY, SHA_A, {("conv_3", "top1"): 1.0}),
                        res("plain", SHA_B, {("conv_3", "top1"): 2.0})])


def test_escaping_latex(nasty_table):
    text = render(nasty_table, "latex")
    assert r"a\_b \& \textless{}c\textgreater{} 50\%" in text
    assert r"linear/conv\_3/top1" in text
    assert NASTY not in text


def test_escaping_html(nasty_table):
    text = render(nasty_table, "html", reference=NASTY)
    assert "a_b &amp; &lt;c&gt; 50%" in text and NASTY not in text
    p = parse_html(text)
    assert p.errors == [] and p.stack == []
    assert NASTY in "".join(p.text)  # round-trips through a parser


def test_escaping_md(nasty_table):
    text = render(nasty_table, "md")
    assert r"a\_b & \<c\> 50%" in text
    assert all(line.count(" | ") == 1 for line in text.splitlines())  # 2 cells; names split none


def test_escaping_csv_json(nasty_table):
    rows = list(csv.reader(io.StringIO(render(nasty_table, "csv"))))
    assert rows[1][0] == NASTY
    assert json.loads(render(nasty_table, "json"))[0]["checkpoint"] == NASTY


def test_pipe_in_md_name_escaped():
    t = build_table([res("x|y", SHA_A, {("conv3", "top1"): 1.0})])
    assert r"x\|y" in render(t, "md")


def test_terminal_alignment(results):
    text = render_terminal(build_table(results))
    lines = text.splitlines()
    assert lines[0].startswith("checkpoint") and "linear/conv3/top1" in lines[0]
    assert set(lines[1]) <= {"-", " "}
    assert "42.0 ± 2.6 *" in text and "12.0" in text
    # numeric columns are right-aligned: every table line ends at the same column
    table_lines = [ln for ln in lines[:4]]
    assert len({len(ln) for ln in table_lines}) == 1
    assert render_terminal(build_table([])) == "no results"


def test_empty_table_renders_everywhere():
    t = build_table([])
    for fmt in ("md", "csv", "latex", "html", "json"):
        assert render(t, fmt)
    assert json.loads(render(t, "json")) == []
