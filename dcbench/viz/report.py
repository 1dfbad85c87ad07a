"""One standalone HTML page: leaderboard, per-layer probe curves, training runs, filter grids.

Every picture is embedded as a base64 PNG and the leaderboard's sorting script is inline,
so the file can be mailed or archived and opened offline. Sections without data are left
out; a report with nothing at all to show is an error.
"""
from __future__ import annotations

import base64
import html
import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import dcbench
from dcbench.checkpoint import resolve_checkpoint
from dcbench.fileio import atomic_write_text
from dcbench.errors import DcbenchError
from dcbench.leaderboard import build_table, render
from dcbench.results import Result, ResultStore, default_store_path
from dcbench.viz import figure_png_bytes, new_figure, png_bytes
from dcbench.viz.filters import filter_grid
from dcbench.viz.training import load_run, overview_figure

log = logging.getLogger("dcbench")

__all__ = ["ReportInputs", "build_report", "layer_curves", "load_results", "write_report"]


@dataclass
class ReportInputs:
    """What goes into a report."""

    results: list[Result] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)  # run folders
    checkpoints: list[str] = field(default_factory=list)  # extra checkpoints for filter grids
    metric: str = "top1"  # the metric of the per-layer curves
    selection: str = "final"
    title: str = "dcbench report"
    store: str | None = None  # shown in the page


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
    with ResultStore(path) as db:
        return db.results(), str(path)


# ----------------------------------------------------------------------------- per-layer curves
def _natural_key(name: str) -> list:
    """conv2 < conv10, conv1_2 < conv2_1, res2 < res5: numbers compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _labels(results: list[Result]) -> dict[str, str]:
    """sha256 -> display name (``name@sha[:8]`` when two checkpoints share a name)."""
    shas_by_name: dict[str, set[str]] = defaultdict(set)
    for r in results:
        shas_by_name[r.checkpoint.get("name") or r.checkpoint["sha256"][:8]].add(r.checkpoint["sha256"])
    labels = {}
    for name, shas in shas_by_name.items():
        for sha in shas:
            labels[sha] = name if len(shas) == 1 else f"{name}@{sha[:8]}"
    return labels


def layer_curves(results: list[Result], metric: str = "top1",
                 selection: str = "final") -> dict[str, dict[str, dict[str, float]]]:
    """``{"protocol (split)": {checkpoint: {tap: mean over seeds}}}`` for rows of ``metric`` with a tap.

    As in the leaderboard, rows with another selection are skipped and a later result for
    the same seed replaces an earlier one.
    """
    labels = _labels(results)
    samples: dict[tuple[str, str, str], dict] = defaultdict(dict)
    for r in results:
        for row in r.metrics:
            if row.metric != metric or row.tap is None or row.selection not in (selection, None):
                continue
            group = r.protocol + (f" ({row.split})" if row.split else "")
            samples[(group, labels[r.checkpoint["sha256"]], row.tap)][row.seed] = row.value
    curves: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for (group, label, tap), by_seed in samples.items():
        curves[group][label][tap] = float(np.mean(list(by_seed.values())))
    return {g: dict(c) for g, c in curves.items()}


def curve_png(group: str, curves: dict[str, dict[str, float]], metric: str) -> bytes:
    """One line per checkpoint over the layers (the paper's Table 1 read as a plot)."""
    taps = sorted({t for per_tap in curves.values() for t in per_tap}, key=_natural_key)
    fig = new_figure(6.4, 3.8)
    ax = fig.subplots()
    x = np.arange(len(taps))
    for i, (label, per_tap) in enumerate(sorted(curves.items())):
        y = np.array([per_tap.get(t, np.nan) for t in taps])  # NaN: a gap where a layer was not run
        ax.plot(x, y, marker="o", label=label, color=f"C{i % 10}")
    ax.set_xticks(x, taps)
    ax.set_xlabel("layer")
    ax.set_ylabel(metric)
    ax.set_title(f"{group}: {metric} by layer", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return figure_png_bytes(fig)


# ----------------------------------------------------------------------------- page parts
def _img(data: bytes, alt: str, css: str = "") -> str:
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    css_attr = f' class="{css}"' if css else ""
    return f'<img src="{uri}" alt="{html.escape(alt)}"{css_attr}>'


def _leaderboard_section(results: list[Result], selection: str) -> str:
    table = build_table(results, selection=selection)
    if not table.rows:
        return ""
    page = render(table, "html")
    # reuse the leaderboard's own table, style and sorting script from its standalone page
    parts = [re.search(pattern, page, re.S) for pattern in
             (r"<style>.*?</style>", r"<table id=\"leaderboard\">.*?</table>", r"<script>.*?</script>")]
    if not all(parts):
        return f"<h2>Leaderboard</h2><pre>{html.escape(render(table, 'md'))}</pre>"
    style, body, script = (p.group(0) for p in parts)
    style = re.sub(r"body\s*\{[^}]*\}", "", style)  # the report's own page style wins
    return f"<h2>Leaderboard</h2>{style}{body}{script}"


def _curves_section(results: list[Result], metric: str, selection: str) -> str:
    curves = layer_curves(results, metric, selection)
    if not curves:
        return ""
    images = "".join(_img(curve_png(g, c, metric), f"{metric} by layer, {g}") for g, c in sorted(curves.items()))
    return f"<h2>{html.escape(metric)} by layer</h2>{images}"


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
    sections = [_leaderboard_section(inputs.results, inputs.selection) if inputs.results else "",
                _curves_section(inputs.results, inputs.metric, inputs.selection),
                _runs_section(inputs.runs),
                _filters_section(_filter_specs(inputs))]
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
