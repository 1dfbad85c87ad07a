"""One standalone HTML page: leaderboard, per-layer probe curves, training runs, filter grids.

Every picture is embedded as a base64 PNG and the leaderboard's sorting script is inline,
so the file can be mailed or archived and opened offline. Sections without data are left
out; a report with nothing at all to show is an error. The leaderboard and the curves come
from the same table (:mod:`dcbench.leaderboard`): one curve per checkpoint and setup (never
averaged across settings or data), with 95% confidence intervals as error bars.
"""
from __future__ import annotations

import base64
import html
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import dcbench
from dcbench.checkpoint import resolve_checkpoint
from dcbench.fileio import atomic_write_text
from dcbench.errors import DcbenchError, UsageError
from dcbench.leaderboard import HEADLINE, HTML_SCRIPT, HTML_STYLE, Analysis, Table, analyze, build_table, html_table
from dcbench.render import plot_text
from dcbench.results import Result, ResultStore, default_store_path
from dcbench.viz import figure_png_bytes, new_figure, png_bytes
from dcbench.viz.filters import filter_grid
from dcbench.viz.training import load_run, overview_figure

log = logging.getLogger("dcbench")

__all__ = ["ReportInputs", "build_report", "layer_curves", "load_results", "plot_text", "write_report"]


@dataclass
class ReportInputs:
    """What goes into a report."""

    results: list[Result] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)  # run folders
    checkpoints: list[str] = field(default_factory=list)  # extra checkpoints for filter grids
    metrics: list[str] = field(default_factory=lambda: [HEADLINE])  # table and curves (see build_table)
    taps: list[str] | None = None
    reference: str | None = None  # checkpoint row the table's differences are against
    selection: str = "final"
    title: str = "dcbench report"
    store: str | None = None  # shown in the page; its per-image outcomes feed the statistics


# ----------------------------------------------------------------------------- inputs
def load_results(store: str | os.PathLike | None) -> tuple[list[Result], str | None]:
    """All results of ``store`` (default store: none if it does not exist yet) and its path.

    A store passed explicitly must exist: reporting never creates an empty database.
    """
    if store is None:
        path = default_store_path()
        if not path.exists():
            return [], None
    else:
        path = Path(store)
        if not path.is_file():
            raise DcbenchError(f"results store {path} does not exist; check --store "
                               f"(or drop it to use {default_store_path()})")
    with ResultStore(path, readonly=True) as db:
        return db.results(), str(path)


# ----------------------------------------------------------------------------- per-layer curves
def _natural_key(name: str) -> list:
    """conv2 < conv10, conv1_2 < conv2_1, res2 < res5: numbers compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def layer_curves(results: list[Result], metric: str = "top1",
                 selection: str = "final") -> dict[str, dict[str, dict[str, float]]]:
    """``{"protocol[ [setup]] (split)": {checkpoint: {tap: mean over seeds}}}`` for rows of
    ``metric`` with a tap (the leaderboard's cells: other selections skipped, the latest
    re-run of a seed used, setups never merged); empty when no result has ``metric``."""
    try:
        table = build_table(results, metrics=[metric], selection=selection)
    except UsageError:  # no row of that metric and selection: no curves (the table says which it has)
        return {}
    return {group: {row: {tap: mean for tap, (mean, _, _) in taps.items()} for row, taps in rows.items()}
            for (group, _), rows in curve_points(table, analyze(table)).items()}


def _curve_group(table: Table, col: str) -> str:
    info = table.column(col)
    variant = f" [{info.variant}]" if info.variant else ""
    return f"{info.protocol}{variant}" + (f" ({info.split})" if info.split else "")


def curve_points(table: Table, analysis: Analysis
                 ) -> dict[tuple[str, str], dict[str, dict[str, tuple[float, float | None, float | None]]]]:
    """``{(group, metric): {checkpoint: {tap: (mean, ci_low, ci_high)}}}`` of the table's tap
    columns, one group per protocol setup, split and metric (the group names the metric when
    a setup has several)."""
    metrics_per_group: dict[str, set[str]] = {}
    for col in table.columns:
        metrics_per_group.setdefault(_curve_group(table, col), set()).add(table.column(col).metric)
    out: dict[tuple[str, str], dict[str, dict[str, tuple]]] = {}
    for col in table.columns:
        info = table.column(col)
        if info.tap is None:
            continue
        group = _curve_group(table, col)
        if len(metrics_per_group[group]) > 1:
            group += f" {info.metric}"
        for row in table.rows:
            if (row, col) in table.cells:
                s = analysis.summaries[(row, col)]
                out.setdefault((group, info.metric), {}).setdefault(row, {})[info.tap] = (s.mean, s.ci_low, s.ci_high)
    return out


def curve_png(group: str, curves: dict[str, dict[str, float | tuple]], metric: str) -> bytes:
    """One line per checkpoint over the layers (the paper's Table 1 read as a plot); values
    given as ``(mean, ci_low, ci_high)`` get the interval as error bars."""
    taps = sorted({t for per_tap in curves.values() for t in per_tap}, key=_natural_key)
    fig = new_figure(6.4, 3.8)
    ax = fig.subplots()
    x = np.arange(len(taps))
    for i, (label, per_tap) in enumerate(sorted(curves.items())):
        points = [_point(per_tap.get(t)) for t in taps]  # NaN: a gap where a layer was not run
        y = np.array([p[0] for p in points])
        err = np.array([[p[0] - p[1], p[2] - p[0]] for p in points]).T
        dodge = 0.06 * (i - (len(curves) - 1) / 2)  # overlapping error bars stay apart
        ax.errorbar(x + dodge, y, yerr=np.nan_to_num(err), marker="o", capsize=3, label=plot_text(label),
                    color=f"C{i % 10}")
    ax.set_xticks(x, [plot_text(t) for t in taps])
    ax.set_xlabel("layer")
    ax.set_ylabel(plot_text(metric))
    ax.set_title(plot_text(f"{group}: {metric} by layer (95% CI)"), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return figure_png_bytes(fig)


def _point(value: float | tuple | None) -> tuple[float, float, float]:
    """(mean, low, high); NaN for a missing layer, the mean for a missing interval."""
    if value is None:
        return (np.nan, np.nan, np.nan)
    if not isinstance(value, tuple):
        return (float(value), float(value), float(value))
    mean, low, high = value
    return (mean, mean if low is None else low, mean if high is None else high)


# ----------------------------------------------------------------------------- page parts
def _img(data: bytes, alt: str, css: str = "") -> str:
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    css_attr = f' class="{css}"' if css else ""
    return f'<img src="{uri}" alt="{html.escape(alt)}"{css_attr}>'


def _leaderboard_section(analysis: Analysis) -> str:
    if not analysis.table.rows:
        return ""
    return f"<h2>Leaderboard</h2><style>{HTML_STYLE}</style>{html_table(analysis)}<script>{HTML_SCRIPT}</script>"


def _curves_section(table: Table, analysis: Analysis) -> str:
    images = []
    for (group, metric), curves in sorted(curve_points(table, analysis).items()):
        if len({t for per_tap in curves.values() for t in per_tap}) > 1:  # a curve needs two layers
            images.append(_img(curve_png(group, curves, metric), f"{metric} by layer, {group}"))
    return f"<h2>By layer</h2>{''.join(images)}" if images else ""


def _tables(inputs: ReportInputs, outcomes: Callable | None) -> tuple[Table, Analysis]:
    table = build_table(inputs.results, selection=inputs.selection, metrics=inputs.metrics, taps=inputs.taps,
                        outcomes=outcomes)
    try:
        return table, analyze(table, inputs.reference)
    except ValueError as exc:  # a --reference naming no row: a usage error (exit 2), as in `leaderboard`
        raise UsageError(f"--reference: {exc}") from None


def _runs_section(runs: list[str]) -> str:
    if not runs:
        return ""
    blocks = []
    for run_dir in runs:
        run = load_run(run_dir)
        blocks.append(f"<h3>{html.escape(run.name)}</h3><p class=\"path\">{html.escape(str(run.path))}</p>"
                      + _img(figure_png_bytes(overview_figure(run)), f"training plots of {run.name}", "wide"))
    return "<h2>Training runs</h2>" + "".join(blocks)


def _filter_specs(inputs: ReportInputs) -> list[str]:
    specs = [str(Path(r) / "checkpoint.pth") for r in inputs.runs if (Path(r) / "checkpoint.pth").is_file()]
    return list(dict.fromkeys(specs + list(inputs.checkpoints)))


def _filters_section(specs: list[str]) -> str:
    if not specs:
        return ""
    blocks = []
    for spec in specs:
        loaded = resolve_checkpoint(spec)
        kind = "through the Sobel front end" if loaded.backbone.has_sobel else "RGB"
        caption = f"{loaded.name}: first-layer filters ({kind})"
        blocks.append(f"<figure>{_img(png_bytes(filter_grid(loaded.backbone, scale=3)), caption)}"
                      f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    return "<h2>First-layer filters</h2>" + "".join(blocks)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
img { max-width: 100%; margin: 0.5em 1em 0.5em 0; vertical-align: top; }
img.wide { width: 100%; }
figure { display: inline-block; margin: 0 2em 1em 0; }
figcaption, .path, .meta { color: #666; font-size: 0.9em; }
"""


# ----------------------------------------------------------------------------- the page
def build_report(inputs: ReportInputs) -> str:
    """The report as one HTML string (raises DcbenchError when there is nothing to show)."""
    sections = []
    if inputs.results:
        if inputs.store and Path(inputs.store).is_file():
            with ResultStore(inputs.store, readonly=True) as db:
                table, analysis = _tables(inputs, db.outcomes)
        else:
            table, analysis = _tables(inputs, None)
        sections += [_leaderboard_section(analysis), _curves_section(table, analysis)]
    sections += [_runs_section(inputs.runs), _filters_section(_filter_specs(inputs))]
    if not any(sections):
        where = f"the store {inputs.store} has no results" if inputs.store else "there is no results store"
        raise DcbenchError(f"nothing to report: {where} and no --run or --checkpoint was given; "
                           f"run `dcbench eval` first, or pass --run RUN_DIR")
    esc = html.escape
    meta = (f"dcbench {esc(dcbench.__version__)}; {len(inputs.results)} result(s)"
            + (f" from {esc(inputs.store)}" if inputs.store else ""))
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{esc(inputs.title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
            f"<h1>{esc(inputs.title)}</h1>\n<p class=\"meta\">{meta}</p>\n"
            + "\n".join(s for s in sections if s) + "\n</body>\n</html>\n")


def write_report(inputs: ReportInputs, out: str | os.PathLike) -> Path:
    """Build the report and write it to ``out`` atomically."""
    text = build_report(inputs)
    try:
        return atomic_write_text(out, text)
    except OSError as exc:
        raise DcbenchError(f"cannot write {out} ({exc.strerror or exc}); choose a writable --out") from None
