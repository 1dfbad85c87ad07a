"""Leaderboard renderers: an analysed :class:`~dcbench.table.Table` as aligned terminal text,
Markdown, CSV, LaTeX (booktabs), HTML or JSON.

Every format shows the same things (:func:`dcbench.table.analyze`): n, mean +- std, the 95%
interval (html titles, csv/json fields), the best / tied marks, the paired difference to a
reference row with its significance mark, the deviation marks with their notes under the
table (LaTeX footnotes, Markdown/HTML/terminal notes, csv columns, json fields) and a one-line
legend.
"""
from __future__ import annotations

import csv
import html
import io
import json
import textwrap
import unicodedata
from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import numpy as np

from dcbench.results import csv_text
from dcbench.stats import Comparison
from dcbench.table import (BEST, DEVIATION_MARK, TIED, Analysis, Cell, Column, Deviations, Table, analyze,
                           column_known_label)

__all__ = ["FORMATS", "HTML_SCRIPT", "HTML_STYLE", "csv_text", "deviation_lines", "html_table", "legend", "one_line",
           "plot_text", "render", "render_terminal"]

FORMATS = ("md", "csv", "latex", "html", "json")
_DECIMALS = 1  # percentages are reported to one decimal, as in the papers
_MISSING = "-"
_PM = " ± "
_SIG = "†"
_TIED_MARK = "≈"


# ----------------------------------------------------------------------------------------
# text pieces shared by the renderers
# ----------------------------------------------------------------------------------------
def one_line(text: str) -> str:
    """``text`` with every control character (newline, CR, tab, ESC ...) and line/paragraph
    separator replaced by a space: a checkpoint or setting name can never break a table row,
    start a new Markdown/LaTeX line or send terminal escape sequences."""
    return "".join(" " if unicodedata.category(ch) in ("Cc", "Zl", "Zp") else ch for ch in str(text))


def plot_text(text: str) -> str:
    """``text`` as matplotlib shows it literally (legends, titles, tick labels): ``$`` escaped (a
    pair of them is parsed as mathtext, and a name like ``ck$pt_{$1`` makes drawing raise), on
    one line, and a leading ``_`` kept visible (matplotlib leaves such labels out of legends)."""
    text = one_line(text).replace("$", r"\$")
    return " " + text if text.startswith("_") else text


def _rounded(x: float) -> Decimal:
    """``x`` to :data:`_DECIMALS` places, half away from zero, from its shortest repr: what a reader
    rounding the csv/json value (``56.25``, ``0.15``) by hand or in a spreadsheet gets, where
    ``f"{x:.1f}"`` rounds the binary value half to even (56.25 -> 56.2, 68.75 -> 68.8, 0.15 -> 0.1).
    A zero is never negative."""
    d = Decimal(repr(float(x))).quantize(Decimal(1).scaleb(-_DECIMALS), rounding=ROUND_HALF_UP)
    return d.copy_abs() if d == 0 else d


def _num(x: float) -> str:
    return f"{_rounded(x):f}"


def _signed(x: float) -> str:
    return f"{_rounded(x):+f}"


def _value_text(cell: Cell, pm: str = _PM, with_n: bool = True) -> str:
    """``41.2 ± 0.3 n=3`` (std only when several trials); ``33.3 n=1``; n left out when the
    block's heading states it for every cell."""
    spread = f"{pm}{_num(cell.std)}" if cell.n > 1 and cell.std is not None else ""
    return f"{_num(cell.mean)}{spread}" + (f" n={cell.n}" if with_n else "")


def _diff_text(cmp: Comparison, alpha: float, sig: str = _SIG) -> str:
    """``+3.1 [+1.2, +5.0]†`` (interval when tested, † when significant)."""
    text = _signed(cmp.diff)
    if cmp.ci_low is not None and cmp.ci_high is not None:
        text += f" [{_signed(cmp.ci_low)}, {_signed(cmp.ci_high)}]"
    return text + (sig if cmp.significant(alpha) else "")


def legend(analysis: Analysis, best: str = "bold", tied: str = _TIED_MARK, sig: str = _SIG) -> str:
    """The one-line legend of every format."""
    pct = f"{100 * (1 - analysis.alpha):g}%"
    text = (f"mean{_PM}sample std over n trials (seeds); {best} = best, significantly better than every "
            f"other checkpoint in its column (p < {analysis.alpha:g}); {tied} = tied for best (not significantly "
            f"different from the top, or not testable)")
    if analysis.reference is not None:
        text += (f"; Δ = difference to {analysis.reference} [{pct} CI], {sig} = significant "
                 f"(paired bootstrap over images, else paired t over seeds; p Holm-adjusted over the "
                 f"{analysis.family_size} tested differences)")
    if analysis.deviations.user:
        text += f"; {DEVIATION_MARK}N = run with settings changed from the defaults (listed above)"
    return text


def _listed(devs: Deviations) -> str:
    return "; ".join(f"{what} ({why})" for what, why in devs)


def deviation_lines(analysis: Analysis) -> list[tuple[str, str]]:
    """``(lead, text)`` per note under the table: each deviation mark with the settings it stands
    for, then each protocol card's known deviations (once per protocol and preset)."""
    notes = analysis.deviations
    lines = [(mark, f"settings changed from the defaults: {_listed(devs)}") for mark, devs in notes.user]
    lines += [("", f"known deviations of {label} from its sources: {_listed(devs)}")
              for label, devs in notes.known.items()]
    return lines


def _plain_notes(analysis: Analysis) -> list[str]:
    return [f"{lead} {text}" if lead else text for lead, text in deviation_lines(analysis)]


def _group_note(col: Column) -> str:
    return "" if col.seed_dependent else " — n=1 (seed-independent: one trial, no spread over seeds)"


def _groups(table: Table) -> list[tuple[str, list[str]]]:
    """(group heading, its column ids) in column order."""
    out: dict[str, list[str]] = {}
    for col in table.columns:
        info = table.column(col)
        out.setdefault(info.group + _group_note(info), []).append(col)
    return list(out.items())


def _cell_text(analysis: Analysis, row: str, col: str, best: Callable[[str], str],
               esc: Callable[[str], str] = lambda s: s, tied: str = _TIED_MARK, with_n: bool = True,
               deviation: Callable[[str], str] = lambda m: " " + m) -> str | None:
    """The cell's value text, escaped by ``esc``, the best cell wrapped by ``best``, its
    deviation mark (if any) written by ``deviation``."""
    cell = analysis.table.cells.get((row, col))
    if cell is None:
        return None
    text = esc(_value_text(cell, with_n=with_n))
    mark = analysis.marks.get((row, col))
    text = best(text) if mark == BEST else f"{text} {tied}" if mark == TIED else text
    dev = analysis.deviations.marks.get((row, col))
    return text + deviation(dev) if dev else text


def _ref_label(analysis: Analysis) -> str:
    return f"Δ vs {analysis.reference}"


# ----------------------------------------------------------------------------------------
# renderers
# ----------------------------------------------------------------------------------------
def render(table: Table, fmt: str, reference: str | None = None, analysis: Analysis | None = None) -> str:
    """Render ``table`` as ``md``, ``csv``, ``latex``, ``html`` or ``json`` with n, intervals,
    best/tied marks and, with ``reference`` (or ``table.reference``), every row's difference
    to that row. Raises ValueError for an unknown format or reference row."""
    renderers = {"md": _render_md, "csv": _render_csv, "latex": _render_latex,
                 "html": _render_html, "json": _render_json}
    if fmt not in renderers:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return renderers[fmt](analysis or analyze(table, reference))


def _blocks(analysis: Analysis, best: Callable[[str], str], esc: Callable[[str], str] = lambda s: s,
            indent: str = "  ") -> list[tuple[str, list[list[str]]]]:
    """Per group: heading and lines (header, rows, difference rows) of plain strings."""
    table = analysis.table
    out = []
    for heading, cols in _groups(table):
        ns = {cell.n for (_, c), cell in table.cells.items() if c in cols}
        uniform = len(ns) == 1
        if uniform and table.column(cols[0]).seed_dependent:
            heading += f" — n={ns.pop()} per cell"  # said once instead of in every cell
        lines = [["checkpoint"] + [esc(table.column(c).short) for c in cols]]
        for row in table.rows:
            if not any((row, c) in table.cells for c in cols):
                continue
            label = row + (" (reference)" if row == analysis.reference else "")
            lines.append([esc(label)] + [_cell_text(analysis, row, c, best, esc, with_n=not uniform) or _MISSING
                                         for c in cols])
            diffs = [analysis.diffs.get((row, c)) for c in cols]
            if any(d is not None for d in diffs):
                lines.append([indent + esc(_ref_label(analysis))]
                             + [esc(_diff_text(d, analysis.alpha)) if d else "" for d in diffs])
        out.append((esc(heading), lines))
    return out


def render_terminal(table: Table, reference: str | None = None, analysis: Analysis | None = None) -> str:
    """Aligned text, one block per protocol and metric (taps as columns), as ``dcbench compare``
    prints it; ``*`` marks the best cell, ``≈`` cells tied for best, ``‡N`` a run with settings
    away from its preset (noted under the tables)."""
    if not table.rows:
        return "no results"
    analysis = analysis or analyze(table, reference)
    parts = []
    for heading, lines in _blocks(analysis, lambda s: s + " *", one_line):
        widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]

        def fmt(line: list[str]) -> str:
            return "  ".join([line[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(line[1:], widths[1:])]).rstrip()

        parts.append("\n".join([heading, fmt(lines[0]), "  ".join("-" * w for w in widths)]
                               + [fmt(line) for line in lines[1:]]))
    notes = [textwrap.fill(one_line(line), 110, subsequent_indent="  ") for line in _plain_notes(analysis)]
    if notes:
        parts.append("\n".join(notes))
    return "\n\n".join(parts + [textwrap.fill(legend(analysis, best="*"), 110)])


#: backslash-escaped in Markdown: emphasis, code, links, html, entities (``&lt;`` would show as
#: ``<``), table cells (|), strikethrough (~) and GitHub's math ($...$)
_MD_SPECIAL = "\\`*_[]<>|~$&"


def _md_escape(text: str) -> str:
    """Markdown-safe, on one line: a name can neither split a table row nor format text."""
    return "".join("\\" + ch if ch in _MD_SPECIAL else ch for ch in one_line(text))


def _render_md(analysis: Analysis) -> str:
    parts = []
    for heading, lines in _blocks(analysis, lambda s: f"**{s}**", _md_escape, indent="↳ "):
        body = ["| " + " | ".join(lines[0]) + " |", "|" + "|".join([" --- "] + [" ---: "] * (len(lines[0]) - 1)) + "|"]
        body += ["| " + " | ".join(line) + " |" for line in lines[1:]]
        parts.append(f"**{heading}**\n\n" + "\n".join(body))
    notes = deviation_lines(analysis)
    if notes:
        parts.append("\n".join(f"- {lead + ' ' if lead else ''}{_md_escape(text)}" for lead, text in notes))
    parts.append(_md_escape(legend(analysis)))
    return "\n\n".join(parts) + "\n"


def _records(analysis: Analysis) -> list[dict[str, Any]]:
    """One plain dict per cell: what csv and json export."""
    table = analysis.table
    items = []
    for row in table.rows:
        for col in table.columns:
            cell = table.cells.get((row, col))
            if cell is None:
                continue
            info, s = table.column(col), analysis.summaries[(row, col)]
            item = {"checkpoint": row, "column": col, "protocol": info.protocol, "setup": info.variant,
                    "tap": info.tap, "metric": info.metric, "split": info.split, "n": cell.n,
                    "seeds": [k for k in cell.values if k is not None], "mean": cell.mean, "std": cell.std,
                    "ci_low": s.ci_low, "ci_high": s.ci_high, "ci_method": s.method,
                    "seed_dependent": cell.seed_dependent, "duplicates": cell.duplicates,
                    "mark": analysis.marks.get((row, col)), "best": analysis.marks.get((row, col)) == BEST,
                    "unverified": row in table.unverified, "key": cell.key, "setup_key": info.setup,
                    "protocol_version": info.version, "settings": info.settings,
                    "data_fingerprint": info.data_fingerprint, **_deviation_fields(analysis, row, col)}
            if analysis.reference is not None:
                item.update(_diff_fields(analysis, row, col))
            items.append(item)
    return items


def _deviation_fields(analysis: Analysis, row: str, col: str) -> dict[str, Any]:
    """The cell's user deviations and mark, and its protocol card's known deviations."""
    cell = analysis.table.cells[(row, col)]
    known = analysis.deviations.known.get(column_known_label(analysis.table, col), ())
    return {"deviation_mark": analysis.deviations.marks.get((row, col)),
            "deviations": [{"what": what, "why": why, "source": "user"} for what, why in cell.deviations],
            "known_deviations": [{"what": what, "why": why, "source": "card"} for what, why in known]}


def _diff_fields(analysis: Analysis, row: str, col: str) -> dict[str, Any]:
    cmp = analysis.diffs.get((row, col))
    if cmp is None:
        return {"reference": analysis.reference, "diff": 0.0 if row == analysis.reference else None,
                "diff_ci_low": None, "diff_ci_high": None, "p_value": None, "p_adjusted": None, "significant": None,
                "test": None}
    p = None if cmp.p_value is None or np.isnan(cmp.p_value) else cmp.p_value
    adjusted = None if cmp.p_adjusted is None or np.isnan(cmp.p_adjusted) else cmp.p_adjusted
    return {"reference": analysis.reference, "diff": cmp.diff, "diff_ci_low": cmp.ci_low,
            "diff_ci_high": cmp.ci_high, "p_value": p, "p_adjusted": adjusted,
            "significant": cmp.significant(analysis.alpha) if cmp.tested else None, "test": cmp.method}


_CSV_FIELDS = ["checkpoint", "column", "protocol", "setup", "tap", "metric", "split", "n", "mean", "std", "ci_low",
               "ci_high", "ci_method", "mark", "seed_dependent", "duplicates", "unverified", "key",
               "protocol_version", "data_fingerprint", "settings", "deviation_mark", "deviations", "known_deviations"]
_CSV_DIFF = ["reference", "diff", "diff_ci_low", "diff_ci_high", "p_value", "p_adjusted", "significant", "test"]


def _render_csv(analysis: Analysis) -> str:
    """Tidy: one line per cell, every statistic a column."""
    fields = _CSV_FIELDS + (_CSV_DIFF if analysis.reference is not None else [])
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(fields)
    for item in _records(analysis):
        writer.writerow([_csv_value(item.get(f)) for f in fields])
    return buf.getvalue()


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # numbers stay numbers, negative differences included
    if isinstance(value, (dict, list)):
        return csv_text(json.dumps(value, sort_keys=True, separators=(",", ":")))
    return csv_text(value) if isinstance(value, str) else value


def _render_json(analysis: Analysis) -> str:
    return json.dumps(_records(analysis), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


# [ and ] are braced: a row starting with "[" after the previous row's \\ would be read as
# \\[<length>]; | is an em dash in LaTeX's default (OT1) font encoding
_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "[": "{[}", "]": "{]}", "%": r"\%", "$": r"\$",
                  "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}", "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}",
                  "±": r"$\pm$", "≈": r"$\approx$", "†": r"\dag{}", "‡": r"\ddag{}", "Δ": r"$\Delta$",
                  "·": r"$\cdot$", "—": "---"}


def _latex_escape(text: str) -> str:
    """LaTeX-safe, on one line: every special character as its text command."""
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in one_line(text))


def _render_latex(analysis: Analysis) -> str:
    table = analysis.table
    groups = _groups(table)
    ncols = 1 + len(table.columns)
    lines = [r"% requires \usepackage{booktabs}", r"\begin{tabular}{l" + "r" * len(table.columns) + "}", r"\toprule"]
    spans, rules, start = [""], [], 2
    for heading, cols in groups:
        spans.append(rf"\multicolumn{{{len(cols)}}}{{c}}{{{_latex_escape(heading)}}}")
        rules.append(rf"\cmidrule(lr){{{start}-{start + len(cols) - 1}}}")
        start += len(cols)
    lines += [" & ".join(spans) + r" \\", " ".join(rules),
              " & ".join(["Checkpoint"] + [_latex_escape(table.column(c).short) for c in table.columns]) + r" \\",
              r"\midrule"]
    for row in table.rows:
        cells = [_latex_escape(row)]
        for col in table.columns:
            text = _cell_text(analysis, row, col, lambda s: r"\textbf{" + s + "}", _latex_escape,
                              _latex_escape(_TIED_MARK), deviation=_latex_mark)
            if text is None:
                cells.append("--")
                continue
            cmp = analysis.diffs.get((row, col))
            cells.append(text + (f" ({_latex_escape(_diff_text(cmp, analysis.alpha))})" if cmp else ""))
        lines.append(" & ".join(cells) + r" \\")
    lines.append(r"\bottomrule")
    # the table's footnotes: deviation marks, the cards' known deviations, the legend
    notes = [(_latex_mark(lead) + " " if lead else "") + _latex_escape(text)
             for lead, text in deviation_lines(analysis)]
    lines += [rf"\multicolumn{{{ncols}}}{{l}}{{\footnotesize {note}}} \\"
              for note in notes + [_latex_escape(legend(analysis))]]
    lines.append(r"\end{tabular}")
    return "\n".join(lines) + "\n"


def _latex_mark(mark: str) -> str:
    return r"\textsuperscript{" + _latex_escape(mark) + "}"


HTML_STYLE = """
.dcb-scroll { overflow-x: auto; max-width: 100%; }
table.dcb { border-collapse: collapse; }
table.dcb th, table.dcb td { padding: 0.3em 0.7em; border-bottom: 1px solid #ddd; white-space: nowrap; }
table.dcb th { background: #f4f4f4; }
table.dcb th.group { text-align: center; border-left: 2px solid #fff; }
table.dcb th.sort { cursor: pointer; user-select: none; }
table.dcb th.asc::after { content: " \\25B2"; } table.dcb th.desc::after { content: " \\25BC"; }
table.dcb td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.dcb td.ref { font-style: italic; }
table.dcb .delta { display: block; color: #666; font-size: 0.85em; }
table.dcb .n { color: #888; font-size: 0.85em; }
table.dcb sup.dev, ul.dcb-notes sup.dev { color: #a40; }
p.legend, ul.dcb-notes { color: #555; font-size: 0.9em; }
"""

# Sorts by the clicked header (th.sort with data-col); numbers use data-value, missing sort last.
HTML_SCRIPT = """
(function () {
  var table = document.getElementById("leaderboard");
  if (!table) { return; }
  var heads = table.querySelectorAll("th.sort");
  Array.prototype.forEach.call(heads, function (th) {
    th.addEventListener("click", function () {
      var i = parseInt(th.getAttribute("data-col"), 10), asc = !th.classList.contains("asc");
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


def html_table(analysis: Analysis) -> str:
    """The leaderboard as an html fragment: a scrolling container with the grouped table, its
    deviation notes and legend (the page of :func:`render` and the report embed it)."""
    table, esc = analysis.table, _html_escape
    groups = _groups(table)
    top = ['<th class="sort" rowspan="2" data-col="0">checkpoint</th>'] + [
        f'<th class="group" colspan="{len(cols)}">{esc(heading)}</th>' for heading, cols in groups]
    taps = [f'<th class="sort" data-col="{i + 1}">{esc(table.column(c).short)}</th>'
            for i, c in enumerate(table.columns)]
    body = "\n".join(_html_row(analysis, row) for row in table.rows)
    return (f'<div class="dcb-scroll">\n<table class="dcb" id="leaderboard">\n'
            f"<thead><tr>{''.join(top)}</tr><tr>{''.join(taps)}</tr></thead>\n<tbody>\n{body}\n</tbody>\n"
            f'</table>\n</div>\n{_html_notes(analysis)}<p class="legend">{esc(legend(analysis))}</p>\n')


def _html_escape(text: str) -> str:
    """HTML entities for ``& < > " '``, on one line (no control characters)."""
    return html.escape(one_line(text))


def _html_mark(mark: str) -> str:
    return f'<sup class="dev">{_html_escape(mark)}</sup>'


def _html_notes(analysis: Analysis) -> str:
    """The deviation notes as a list under the table ("" without any)."""
    items = [f"<li>{_html_mark(lead) + ' ' if lead else ''}{_html_escape(text)}</li>"
             for lead, text in deviation_lines(analysis)]
    return f'<ul class="dcb-notes">{"".join(items)}</ul>\n' if items else ""


def _render_html(analysis: Analysis) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<title>dcbench leaderboard</title>\n"
            "<style>body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }"
            f"{HTML_STYLE}</style>\n</head>\n<body>\n<h1>dcbench leaderboard</h1>\n"
            f"{html_table(analysis)}<script>{HTML_SCRIPT}</script>\n</body>\n</html>\n")


def _html_row(analysis: Analysis, row: str) -> str:
    esc, table = _html_escape, analysis.table
    cls = ' class="ref"' if row == analysis.reference else ""
    parts = [f'<td data-value="{esc(row)}"{cls}>{esc(row)}</td>']
    for col in table.columns:
        cell = table.cells.get((row, col))
        if cell is None:
            parts.append(f'<td class="num" data-value="">{_MISSING}</td>')
            continue
        spread = f"{_PM}{_num(cell.std)}" if cell.n > 1 and cell.std is not None else ""
        value = esc(_num(cell.mean) + spread)
        mark = analysis.marks.get((row, col))
        value = f"<strong>{value}</strong>" if mark == BEST else value + f" {_TIED_MARK}" if mark == TIED else value
        s = analysis.summaries[(row, col)]
        title = f' title="95% CI {_num(s.ci_low)}..{_num(s.ci_high)} ({s.method})"' if s.ci_low is not None else ""
        value += f' <span class="n">n={cell.n}</span>'
        dev = analysis.deviations.marks.get((row, col))
        if dev:
            value += _html_mark(dev)
        cmp = analysis.diffs.get((row, col))
        if cmp is not None:
            value += f'<span class="delta">Δ {esc(_diff_text(cmp, analysis.alpha))}</span>'
        parts.append(f'<td class="num" data-value="{cell.mean!r}"{title}>{value}</td>')
    return "<tr>" + "".join(parts) + "</tr>"
