"""Plots of a ``dcbench train`` run folder (the paper's Fig. 2 a/b and the run's health).

Reads ``RUN_DIR/metrics.jsonl`` (one JSON object per epoch) and the last epoch's cluster
assignments (``RUN_DIR/assignments/epoch_XXXX.npz``) and draws: NMI of the clusters with
the labels and with the previous epoch's clusters, the training loss, the k-means
objective, the number of empty clusters, the cluster sizes of the last epoch and the time
per phase. Each is written as its own PNG and all together as ``overview.png``.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.ticker import MaxNLocator

from dcbench.errors import DcbenchError
from dcbench.render import plot_text
from dcbench.viz import new_figure, save_figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

log = logging.getLogger("dcbench")

__all__ = ["RunData", "load_run", "overview_figure", "read_metrics", "save_training_plots",
           "training_figures"]

_PHASES = (("time_extract_s", "features"), ("time_cluster_s", "clustering"), ("time_train_s", "training"))


class RunData:
    """The per-epoch records of a run and its last epoch's cluster sizes (None if not saved)."""

    def __init__(self, path: Path, records: list[dict[str, Any]], sizes: np.ndarray | None) -> None:
        self.path, self.records, self.sizes = path, records, sizes

    @property
    def name(self) -> str:
        """The run folder's name."""
        return self.path.name

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(epochs, values) of ``key``, leaving out epochs where it is missing or null; a value that
        is not a number (a hand-edited line) is a DcbenchError naming the file, epoch and key."""
        pairs = []
        for r in self.records:
            value = r.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise DcbenchError(f"{self.path / 'metrics.jsonl'}: epoch {r['epoch']} has {key}={value!r}, not a "
                                   f"number; fix or delete that line")
            pairs.append((int(r["epoch"]), float(value)))
        return [e for e, _ in pairs], [v for _, v in pairs]


# ----------------------------------------------------------------------------- reading
def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The epoch records of ``RUN_DIR/metrics.jsonl``, one per epoch, in epoch order.

    A run being written may end in a half-written line: that last line is ignored. A bad
    line elsewhere, a missing folder or file, or a file without epochs is a DcbenchError.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise DcbenchError(f"run folder {run} does not exist; pass the --out folder of `dcbench train`")
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise DcbenchError(f"{run} has no metrics.jsonl; pass the --out folder of `dcbench train` "
                           f"(it is written after the first epoch)")
    lines = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    by_epoch: dict[int, dict[str, Any]] = {}
    for position, (n, line) in enumerate(lines):
        try:
            record = json.loads(line)
            epoch = int(record["epoch"])
            by_epoch[epoch] = {**record, "epoch": epoch}  # a resumed run's re-done epoch replaces the old one
        except (ValueError, KeyError, TypeError):
            if position == len(lines) - 1:
                log.warning("%s: ignoring the unfinished last line %d", path, n)
                continue
            raise DcbenchError(f"{path} line {n} is not an epoch record (JSON with 'epoch'); "
                               f"fix or delete that line") from None
    if not by_epoch:
        raise DcbenchError(f"{path} has no epochs yet; plot after the first epoch has finished")
    return [by_epoch[e] for e in sorted(by_epoch)]


def _last_sizes(run: Path, records: list[dict[str, Any]]) -> np.ndarray | None:
    """Cluster sizes (sorted, largest first, empty clusters included) of the latest saved epoch."""
    files = sorted((run / "assignments").glob("epoch_*.npz"))
    if not files:
        return None
    try:
        with np.load(files[-1]) as data:
            assignments = np.asarray(data["assignments"])
    except (OSError, ValueError, KeyError) as exc:
        log.warning("cannot read %s (%s); no cluster-size plot", files[-1], exc)
        return None
    if assignments.ndim == 2:  # DeepCluster-v2: heads x images; head 0 is what metrics.jsonl reports
        assignments = assignments[0]
    last = records[-1]
    try:
        n_clusters = int(last.get("n_clusters") or 0)
    except (TypeError, ValueError):  # a hand-edited record: the sizes alone still make the plot
        n_clusters = 0
    sizes = np.bincount(assignments[assignments >= 0], minlength=n_clusters)
    return np.sort(sizes)[::-1]


def load_run(run_dir: str | os.PathLike) -> RunData:
    """Read what the plots need from a run folder."""
    records = read_metrics(run_dir)
    return RunData(Path(run_dir), records, _last_sizes(Path(run_dir), records))


# ----------------------------------------------------------------------------- panels
def _no_data(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#777")


def _line(ax: Axes, run: RunData, key: str, label: str | None = None, **style: Any) -> bool:
    epochs, values = run.series(key)
    if not epochs:
        return False
    ax.plot(epochs, values, marker="o", markersize=3, label=label, **style)
    return True


def _epoch_axis(ax: Axes, run: RunData, title: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    # every panel spans the run's epochs, so a one-point series gets integer ticks, not 0.95..1.05
    first, last = run.records[0]["epoch"], run.records[-1]["epoch"]
    ax.set_xlim(first - 0.5, last + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_nmi_labels(ax: Axes, run: RunData) -> None:
    """Fig. 2a: NMI between the clusters and the dataset's labels."""
    _epoch_axis(ax, run, "NMI(clusters, labels)", "NMI")
    ax.set_ylim(0, 1)  # one scale for every run, so runs compare at a glance
    if not _line(ax, run, "nmi_labels", color="C0"):
        _no_data(ax, "no labels in the training data")


def plot_nmi_prev(ax: Axes, run: RunData) -> None:
    """Fig. 2b: NMI between the clusters of epoch t-1 and epoch t (reassignment stability)."""
    _epoch_axis(ax, run, "NMI(epoch t-1, epoch t)", "NMI")
    ax.set_ylim(0, 1)
    if not _line(ax, run, "nmi_prev", color="C1"):
        _no_data(ax, "needs two epochs")


def plot_loss(ax: Axes, run: RunData) -> None:
    """Training loss (cross-entropy on the pseudo-labels) per epoch."""
    _epoch_axis(ax, run, "training loss", "cross-entropy")
    if not _line(ax, run, "loss", color="C2"):
        _no_data(ax, "no loss recorded")


def plot_kmeans(ax: Axes, run: RunData) -> None:
    """The clustering objective per epoch."""
    _epoch_axis(ax, run, "k-means objective", "objective")
    if not _line(ax, run, "kmeans_objective", color="C3"):
        _no_data(ax, "no objective recorded (PIC run?)")


def plot_empty(ax: Axes, run: RunData) -> None:
    """Empty clusters per epoch (before they are re-seeded)."""
    _epoch_axis(ax, run, "empty clusters", "clusters")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if not _line(ax, run, "empty_clusters", color="C4"):
        _no_data(ax, "not recorded")
        return
    top = max(1.0, ax.get_ylim()[1])  # an all-zero run reads as 0, not as -0.04..0.04
    ax.set_ylim(-0.05 * top, top)


def plot_sizes(ax: Axes, run: RunData) -> None:
    """Cluster sizes of the last epoch, largest first (a flat line = balanced clusters)."""
    epoch = run.records[-1]["epoch"]
    ax.set_title(f"cluster sizes, epoch {epoch}", fontsize=10)
    ax.set_xlabel("cluster rank (largest first)")
    ax.set_ylabel("images")
    ax.grid(alpha=0.3)
    if run.sizes is None or not run.sizes.size:
        _no_data(ax, "no assignments saved")
        return
    ranks = np.arange(1, run.sizes.size + 1)
    ax.fill_between(ranks, run.sizes, step="mid", alpha=0.4, color="C5")
    ax.step(ranks, run.sizes, where="mid", color="C5")
    ax.axhline(run.sizes.mean(), color="#555", linestyle="--", linewidth=1, label="mean")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)


def plot_times(ax: Axes, run: RunData) -> None:
    """Seconds per phase per epoch, stacked."""
    _epoch_axis(ax, run, "time per phase", "seconds")
    epochs = np.array([r["epoch"] for r in run.records])
    bottom = np.zeros(len(epochs))
    drawn = False
    for i, (key, label) in enumerate(_PHASES):
        values = np.array([float(r.get(key) or 0.0) for r in run.records])
        if values.any():
            ax.bar(epochs, values, bottom=bottom, label=label, color=f"C{i}", width=0.8)
            bottom += values
            drawn = True
    if drawn:
        ax.set_ylim(0, 1.35 * bottom.max())  # headroom so the legend does not cover the bars
        ax.legend(fontsize=8, ncols=3, loc="upper center")
    else:
        _no_data(ax, "no timings recorded")


PANELS: dict[str, Callable[[Any, RunData], None]] = {
    "nmi_labels": plot_nmi_labels, "nmi_prev": plot_nmi_prev, "loss": plot_loss,
    "kmeans_objective": plot_kmeans, "empty_clusters": plot_empty, "cluster_sizes": plot_sizes,
    "time": plot_times,
}


# ----------------------------------------------------------------------------- figures
def nmi_figure(run: RunData) -> Figure:
    """The paper's Fig. 2 a and b side by side."""
    fig = new_figure(9.0, 3.4)
    left, right = fig.subplots(1, 2)
    plot_nmi_labels(left, run)
    plot_nmi_prev(right, run)
    fig.suptitle(f"{plot_text(run.name)}: clustering quality and stability")
    return fig


def _single(run: RunData, panel: Callable[[Any, RunData], None]) -> Figure:
    fig = new_figure(5.0, 3.4)
    panel(fig.subplots(), run)
    return fig


def overview_figure(run: RunData) -> Figure:
    """Every panel in one figure (what the report embeds)."""
    fig = new_figure(13.0, 6.4)
    axes = fig.subplots(2, 4).ravel()
    for ax, panel in zip(axes, PANELS.values()):
        panel(ax, run)
    axes[-1].axis("off")
    last = run.records[-1]
    axes[-1].text(0.0, 0.9, _summary(last, len(run.records)), va="top", family="monospace", fontsize=9,
                  transform=axes[-1].transAxes)
    fig.suptitle(f"training run: {plot_text(run.name)}")
    return fig


def _summary(last: dict[str, Any], n_epochs: int) -> str:
    rows = [("epochs", n_epochs), ("images", last.get("n_images")), ("clusters", last.get("n_clusters")),
            ("last loss", last.get("loss")), ("last NMI labels", last.get("nmi_labels")),
            ("last NMI t-1/t", last.get("nmi_prev"))]
    # plot_text: a hand-edited value such as "$\\foo$" is shown as typed, never parsed as mathtext
    return "\n".join(f"{k:<16}{v:.4g}" if isinstance(v, float) else f"{k:<16}{'-' if v is None else plot_text(str(v))}"
                     for k, v in rows)


def training_figures(run: RunData) -> dict[str, Figure]:
    """File stem -> figure, for every plot of the run."""
    figures = {"nmi": nmi_figure(run)}
    for key in ("loss", "kmeans_objective", "empty_clusters", "cluster_sizes", "time"):
        figures[key] = _single(run, PANELS[key])
    figures["overview"] = overview_figure(run)
    return figures


def save_training_plots(run_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """Write ``nmi.png``, ``loss.png``, ``kmeans_objective.png``, ``empty_clusters.png``,
    ``cluster_sizes.png``, ``time.png`` and ``overview.png`` to ``out_dir``."""
    run = load_run(run_dir)
    return [save_figure(fig, Path(out_dir) / f"{name}.png") for name, fig in training_figures(run).items()]
