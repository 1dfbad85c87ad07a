"""Leaderboards: results -> a checkpoint x (protocol/tap/metric) table -> md/csv/latex/html/json.

:func:`build_table` turns stored :class:`~dcbench.results.Result` records into a :class:`Table`
of :class:`Cell` (mean, sample std and count over seeds); :func:`render` writes it in one of
the export formats, marking the best value per column and, with a reference row, the delta
of every other row against it. :func:`render_terminal` is what ``dcbench compare`` prints.
"""
from __future__ import annotations

import csv
import html
import io
import json
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from dcbench.results import Result

__all__ = ["Cell", "Table", "build_table", "render", "render_terminal", "FORMATS"]

FORMATS = ("md", "csv", "latex", "html", "json")
_DECIMALS = 1  # percentages are reported to one decimal, as in the papers
_MISSING = "-"


@dataclass
class Cell:
    """Mean over seeds of one metric for one checkpoint; ``std`` is None when ``n == 1``."""

    mean: float
    std: float | None
    n: int


@dataclass
class Table:
    """Rows are checkpoints, columns ``protocol/tap/metric``; absent (row, column) = no result."""

    columns: list[str]
    rows: list[str]
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)
    reference: str | None = None
    higher_is_better: bool = True


# ----------------------------------------------------------------------------------------
# building
# ----------------------------------------------------------------------------------------
def build_table(results: list[Result], protocols: list[str] | None = None,
                checkpoints: list[str] | None = None, selection: str = "final") -> Table:
    """Aggregate ``results`` into a :class:`Table`.

    Rows are checkpoint names (``name@sha256[:8]`` when two checkpoints share a name), in
    the order of ``checkpoints`` when given (each entry a name, a row label or a sha256 or
    its prefix of 8+ characters), else of first appearance. Columns are
    ``protocol/tap/metric`` (tap omitted when None; `` (split)`` appended only when one
    column would otherwise mix several splits), grouped by protocol in the order of
    ``protocols`` when given. Only metric rows whose selection is ``selection`` or None are
    used. Each seed counts once: a later result with the same seed replaces an earlier one
    (a re-run), so the mean and sample std are over distinct seeds.
    """
    results = [r for r in results if protocols is None or r.protocol in protocols]
    labels = _row_labels(results)
    if checkpoints is not None:
        results, row_order = _filter_checkpoints(results, labels, checkpoints)
    else:
        row_order = _unique(labels[_ckpt_id(r)] for r in results)
    entries = list(_entries(results, selection))
    col_names = _column_names(entries)
    samples: dict[tuple[str, str], dict[Any, float]] = {}
    for result, row in entries:
        key = (labels[_ckpt_id(result)], col_names[_col_key(result, row)])
        # dict assignment: the latest result for a seed wins (store order = oldest first)
        samples.setdefault(key, {})[_seed(result, row)] = float(row.value)
    cells = {key: _cell(list(vals.values())) for key, vals in samples.items()}
    columns = _ordered_columns(entries, col_names, protocols)
    rows = [r for r in row_order if any((r, c) in cells for c in columns)]
    return Table(columns=columns, rows=rows, cells=cells)


def _ckpt_id(result: Result) -> tuple[str, str]:
    ck = result.checkpoint
    sha = str(ck.get("sha256") or "")
    return str(ck.get("name") or sha[:12] or "?"), sha


def _row_labels(results: list[Result]) -> dict[tuple[str, str], str]:
    """Checkpoint (name, sha) -> row label, disambiguating names shared by different weights."""
    shas_by_name: dict[str, set[str]] = {}
    for r in results:
        name, sha = _ckpt_id(r)
        shas_by_name.setdefault(name, set()).add(sha)
    return {(name, sha): (f"{name}@{sha[:8]}" if len(shas_by_name[name]) > 1 else name)
            for name, shas in shas_by_name.items() for sha in shas}


def _filter_checkpoints(results: list[Result], labels: dict[tuple[str, str], str],
                        wanted: list[str]) -> tuple[list[Result], list[str]]:
    def matches(entry: str, ident: tuple[str, str]) -> bool:
        name, sha = ident
        return entry in (name, sha, labels[ident]) or (len(entry) >= 8 and sha.startswith(entry))

    order = _unique(labels[ident] for entry in wanted for ident in labels if matches(entry, ident))
    keep = [r for r in results if labels[_ckpt_id(r)] in order]
    return keep, order


def _entries(results: list[Result], selection: str) -> Iterable[tuple[Result, Any]]:
    for result in results:
        for row in result.metrics:
            if row.selection is None or row.selection == selection:
                yield result, row


def _col_key(result: Result, row: Any) -> tuple[str, str | None, str, str | None]:
    return result.protocol, row.tap, row.metric, row.split


def _column_names(entries: list[tuple[Result, Any]]) -> dict[tuple, str]:
    splits: dict[tuple, set] = {}
    for result, row in entries:
        protocol, tap, metric, split = _col_key(result, row)
        splits.setdefault((protocol, tap, metric), set()).add(split)
    names = {}
    for (protocol, tap, metric), seen in splits.items():
        base = "/".join(p for p in (protocol, tap, metric) if p is not None)
        for split in seen:
            # val and test numbers must never be averaged together
            names[(protocol, tap, metric, split)] = (
                f"{base} ({split})" if len(seen) > 1 and split is not None else base)
    return names


def _ordered_columns(entries: list[tuple[Result, Any]], col_names: dict[tuple, str],
                     protocols: list[str] | None) -> list[str]:
    firsts = _unique(_col_key(r, row) for r, row in entries)
    proto_order = list(protocols) if protocols else _unique(k[0] for k in firsts)
    firsts.sort(key=lambda k: proto_order.index(k[0]))  # stable: keeps protocol's own order
    return _unique(col_names[k] for k in firsts)


def _seed(result: Result, row: Any) -> Any:
    return row.seed if row.seed is not None else result.settings.get("seed")


def _cell(values: list[float]) -> Cell:
    n = len(values)
    return Cell(mean=statistics.fmean(values), std=statistics.stdev(values) if n > 1 else None, n=n)


def _unique(items: Iterable) -> list:
    return list(dict.fromkeys(items))


# ----------------------------------------------------------------------------------------
# shared rendering helpers
# ----------------------------------------------------------------------------------------
@dataclass
class _View:
    """What every renderer needs: the table plus best flags and deltas."""

    table: Table
    reference: str | None
    best: set[tuple[str, str]]
    deltas: dict[tuple[str, str], float]


def _view(table: Table, reference: str | None) -> _View:
    ref = reference if reference is not None else table.reference
    if ref is not None and ref not in table.rows:
        available = ", ".join(table.rows) or "(none)"
        raise ValueError(f"unknown reference {ref!r}; available rows: {available}")
    return _View(table, ref, _best_cells(table), _deltas(table, ref))


def _best_cells(table: Table) -> set[tuple[str, str]]:
    best = set()
    pick = max if table.higher_is_better else min
    for col in table.columns:
        present = [(row, table.cells[(row, col)].mean) for row in table.rows
                   if (row, col) in table.cells]
        if present:
            top = pick(mean for _, mean in present)
            best.update((row, col) for row, mean in present if mean == top)  # ties: all marked
    return best


def _deltas(table: Table, ref: str | None) -> dict[tuple[str, str], float]:
    if ref is None:
        return {}
    out = {}
    for col in table.columns:
        ref_cell = table.cells.get((ref, col))
        if ref_cell is None:
            continue
        for row in table.rows:
            cell = table.cells.get((row, col))
            if cell is not None:
                out[(row, col)] = cell.mean - ref_cell.mean
    return out


def _num(x: float) -> str:
    return f"{x:.{_DECIMALS}f}"


def _value_text(cell: Cell, pm: str) -> str:
    """``41.2`` or ``41.2 ± 0.3`` (std shown only when several seeds)."""
    if cell.n > 1 and cell.std is not None:
        return f"{_num(cell.mean)}{pm}{_num(cell.std)}"
    return _num(cell.mean)


def _delta_text(view: _View, row: str, col: str) -> str:
    """`` (+3.1)`` for non-reference rows with a reference value, else ``""``."""
    if row == view.reference or (row, col) not in view.deltas:
        return ""
    return f" ({view.deltas[(row, col)]:+.{_DECIMALS}f})"


def _text_cells(view: _View, pm: str, bold: Callable[[str], str],
                esc: Callable[[str], str] = lambda s: s,
                missing: str = _MISSING) -> list[list[str]]:
    """Row label + one formatted string per column, for the grid formats."""
    table = view.table
    out = []
    for row in table.rows:
        line = [esc(row)]
        for col in table.columns:
            cell = table.cells.get((row, col))
            if cell is None:
                line.append(missing)
                continue
            value = esc(_value_text(cell, pm))
            if (row, col) in view.best:
                value = bold(value)
            line.append(value + esc(_delta_text(view, row, col)))
        out.append(line)
    return out


# ----------------------------------------------------------------------------------------
# renderers
# ----------------------------------------------------------------------------------------
def render(table: Table, fmt: str, reference: str | None = None) -> str:
    """Render ``table`` as ``md``, ``csv``, ``latex``, ``html`` or ``json``.

    The best value of each column is marked; mean ± std is shown when a cell has several
    seeds; with ``reference`` (or ``table.reference``), every row shows its delta against
    that row. Raises ValueError for an unknown format or reference row.
    """
    renderers = {"md": _render_md, "csv": _render_csv, "latex": _render_latex,
                 "html": _render_html, "json": _render_json}
    if fmt not in renderers:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return renderers[fmt](_view(table, reference))


def render_terminal(table: Table) -> str:
    """Plain aligned text (best per column marked ``*``), as ``dcbench compare`` prints it."""
    view = _view(table, None)
    if not table.rows:
        return "no results"
    header = ["checkpoint"] + table.columns
    body = _text_cells(view, " ± ", lambda s: s + " *")
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]

    def fmt(line: list[str]) -> str:
        first = line[0].ljust(widths[0])
        rest = [v.rjust(w) for v, w in zip(line[1:], widths[1:])]
        return "  ".join([first] + rest).rstrip()

    rule = "  ".join("-" * w for w in widths)
    notes = ["* best in column"]
    if view.reference is not None:
        notes.append(f"(±x.x) = difference to {view.reference}")
    return "\n".join([fmt(header), rule] + [fmt(line) for line in body] + ["", "; ".join(notes)])


_MD_SPECIAL = "\\`*_[]<>|"


def _md_escape(text: str) -> str:
    return "".join("\\" + ch if ch in _MD_SPECIAL else ch for ch in text)


def _render_md(view: _View) -> str:
    table = view.table
    header = ["checkpoint"] + [_md_escape(c) for c in table.columns]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join([" --- "] + [" ---: "] * len(table.columns)) + "|"]
    for line in _text_cells(view, " ± ", lambda s: f"**{s}**", _md_escape):
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines) + "\n"


def _render_csv(view: _View) -> str:
    table = view.table
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    fields = ["mean", "std", "n", "best"] + (["delta"] if view.reference else [])
    writer.writerow(["checkpoint"] + [f"{col} {f}" for col in table.columns for f in fields])
    for row in table.rows:
        line: list[Any] = [row]
        for col in table.columns:
            line.extend(_csv_fields(view, row, col, len(fields)))
        writer.writerow(line)
    return buf.getvalue()


def _csv_fields(view: _View, row: str, col: str, width: int) -> list[Any]:
    cell = view.table.cells.get((row, col))
    if cell is None:
        return [""] * width
    out: list[Any] = [repr(cell.mean), "" if cell.std is None else repr(cell.std), cell.n,
                      "true" if (row, col) in view.best else "false"]
    if view.reference:
        delta = view.deltas.get((row, col))
        out.append("" if delta is None else repr(delta))
    return out


def _render_json(view: _View) -> str:
    table = view.table
    items = []
    for row in table.rows:
        for col in table.columns:
            cell = table.cells.get((row, col))
            if cell is None:
                continue
            items.append({"checkpoint": row, "column": col, "mean": cell.mean, "std": cell.std,
                          "n": cell.n, "best": (row, col) in view.best,
                          "delta": view.deltas.get((row, col))})
    return json.dumps(items, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}", "<": r"\textless{}", ">": r"\textgreater{}",
                  "±": r"$\pm$"}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in text)


def _render_latex(view: _View) -> str:
    table = view.table
    lines = [r"% requires \usepackage{booktabs}",
             r"\begin{tabular}{l" + "r" * len(table.columns) + "}",
             r"\toprule",
             " & ".join(["Checkpoint"] + [_latex_escape(c) for c in table.columns]) + r" \\",
             r"\midrule"]
    for line in _text_cells(view, " ± ", lambda s: r"\textbf{" + s + "}", _latex_escape, "--"):
        lines.append(" & ".join(line) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


_HTML_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; }
th, td { padding: 0.35em 0.8em; border-bottom: 1px solid #ddd; }
th { cursor: pointer; background: #f4f4f4; user-select: none; }
th.asc::after { content: " \\25B2"; } th.desc::after { content: " \\25BC"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.ref { font-style: italic; }
.delta { color: #666; font-size: 0.9em; }
"""

# Sorts by the clicked header; numeric columns use data-value, missing values sort last.
_HTML_SCRIPT = """
(function () {
  var table = document.getElementById("leaderboard");
  var heads = table.tHead.rows[0].cells;
  Array.prototype.forEach.call(heads, function (th, i) {
    th.addEventListener("click", function () {
      var asc = !th.classList.contains("asc");
      Array.prototype.forEach.call(heads, function (h) { h.classList.remove("asc", "desc"); });
      th.classList.add(asc ? "asc" : "desc");
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[i].getAttribute("data-value"), y = b.cells[i].getAttribute("data-value");
        if (i === 0) { return (asc ? 1 : -1) * x.localeCompare(y); }
        if (x === "" || y === "") { return (x === "") - (y === ""); }
        return (asc ? 1 : -1) * (parseFloat(x) - parseFloat(y));
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
})();
"""


def _render_html(view: _View) -> str:
    table = view.table
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in ["checkpoint"] + table.columns)
    body = "\n".join(_html_row(view, row) for row in table.rows)
    caption = "Best value per column in bold; mean ± sample std over seeds where n &gt; 1"
    if view.reference is not None:
        caption += f"; (±x) = difference to {esc(view.reference)}"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<title>dcbench leaderboard</title>\n"
        f"<style>{_HTML_STYLE}</style>\n</head>\n<body>\n<h1>dcbench leaderboard</h1>\n"
        f"<table id=\"leaderboard\">\n<caption>{caption}</caption>\n"
        f"<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>\n"
        f"<script>{_HTML_SCRIPT}</script>\n</body>\n</html>\n")


def _html_row(view: _View, row: str) -> str:
    esc = html.escape
    cls = ' class="ref"' if row == view.reference else ""
    parts = [f'<td data-value="{esc(row)}"{cls}>{esc(row)}</td>']
    for col in view.table.columns:
        cell = view.table.cells.get((row, col))
        if cell is None:
            parts.append(f'<td class="num" data-value="">{_MISSING}</td>')
            continue
        value = esc(_value_text(cell, " ± "))
        if (row, col) in view.best:
            value = f"<strong>{value}</strong>"
        delta = _delta_text(view, row, col)
        if delta:
            value += f'<span class="delta">{esc(delta)}</span>'
        parts.append(f'<td class="num" data-value="{cell.mean!r}">{value}</td>')
    return "<tr>" + "".join(parts) + "</tr>"
