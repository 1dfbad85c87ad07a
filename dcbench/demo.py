"""``dcbench demo``: the whole pipeline on scikit-learn's digits, on a CPU, in minutes.

Digits has 1,797 real 8x8 images. With the paper's settings (batch 256, k=10000, PCA-256)
that is 7 SGD steps per clustering and a network that learns nothing, so the demo uses
documented small-data settings (see ``DEMO_TRAINING``) and shows whatever the table says,
with the spread over seeds. It never tunes the table.
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from dcbench import evaluate
from dcbench.fileio import atomic_write_text
from dcbench.data import write_digits_imagefolder
from dcbench.leaderboard import Table, build_table, render, render_terminal
from dcbench.results import ResultStore
from dcbench.train import TrainConfig, train

log = logging.getLogger("dcbench")

IMAGE_SIZE = 64  # the smallest size DeepCluster's AlexNet accepts comfortably
BATCH_SIZE = 32
#: Small-data training settings, fixed before looking at any result: batch 32 (the paper's 256
#: would give 5 SGD steps per clustering), the paper's lr 0.05 scaled linearly with the batch
#: (0.05 * 32/256), reassign=3 (three passes per clustering: ~126 SGD steps, above the ~100
#: below which nothing is learned), PCA to 32 dims (256 clustered worse on small data), k=30
#: (mild over-clustering of ~1,350 images, as 10,000 over-clusters ImageNet's 1,000 classes).
DEMO_TRAINING = dict(arch="alexnet", sobel=True, image_size=IMAGE_SIZE, k=30, pca_dim=32, reassign=3.0,
                     batch_size=BATCH_SIZE, lr=0.05 * BATCH_SIZE / 256, top_lr=0.05 * BATCH_SIZE / 256,
                     epochs=5, workers=0, snapshot_every=0)
#: Probe settings: cached features (one extraction per checkpoint), few epochs, small batches.
DEMO_PROTOCOLS = {
    "linear": {"image_size": IMAGE_SIZE, "cached": True, "crops": "center", "epochs": 20, "batch_size": 64,
               "lr": 0.01, "workers": 0},
    "knn": {"image_size": IMAGE_SIZE, "ks": [10, 20], "workers": 0},
}
SEEDS = (0, 1, 2)
#: Columns of the printed table (the store keeps every metric).
SHOWN_METRICS = {"top1", "top1_k20"}


@dataclass
class DemoOutput:
    folder: Path
    table: Table
    notes: list[str]


def run_demo(out: str | Path = "demo_out", epochs: int | None = None,
             seeds: tuple[int, ...] | None = None) -> DemoOutput:
    """Train on digits, probe the trained net and a random init, write the leaderboard."""
    out = Path(out)
    seeds = SEEDS if seeds is None else seeds
    started = time.perf_counter()
    data = write_digits_imagefolder(out / "digits", image_size=IMAGE_SIZE)
    run_dir = out / "deepcluster-digits"  # also the checkpoint's row name in the table
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a demo always starts from scratch
    cfg = TrainConfig(data=str(data / "train"), out=str(run_dir), **{**DEMO_TRAINING, **(
        {"epochs": epochs} if epochs else {})})
    log.info("demo: training DeepCluster on %s (%d epochs)", cfg.data, cfg.epochs)
    train(cfg)
    store_path = out / "results.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{store_path}{suffix}").unlink(missing_ok=True)
    checkpoints = [str(run_dir / "checkpoint.pth"), f"random:alexnet,size={IMAGE_SIZE}"]
    with ResultStore(store_path) as store:
        results = _evaluate_all(store, checkpoints, data, seeds)
    shown = [replace(r, metrics=[m for m in r.metrics if m.metric in SHOWN_METRICS]) for r in results]
    table = build_table(shown, protocols=list(DEMO_PROTOCOLS), selection="final")
    reference = table.rows[-1]
    atomic_write_text(out / "leaderboard.md", render(table, "md", reference=reference))
    atomic_write_text(out / "leaderboard.html", render(table, "html", reference=reference))
    notes = spread_notes(table, table.rows[0], reference)
    log.info("demo finished in %.0f s", time.perf_counter() - started)
    return DemoOutput(out, table, notes)


def _evaluate_all(store: ResultStore, checkpoints: list[str], data: Path, seeds: tuple[int, ...]) -> list:
    plans = evaluate.expand_seeds([evaluate.plan(name, overrides, data) for name, overrides in DEMO_PROTOCOLS.items()],
                                  seeds)
    items = evaluate.sweep(plans, checkpoints, store, device="cpu", reuse=False,
                           on_item=lambda item: log.info("demo: %s on %s, seed %s done", item.plan.protocol.name,
                                                         item.checkpoint.name, item.plan.seed))
    return [item.result for item in items]


def spread_notes(table: Table, trained: str, random: str) -> list[str]:
    """Which trained-vs-random differences exceed the spread over seeds (|diff| > std_a + std_b)."""
    notes = []
    for col in table.columns:
        a, b = table.cells.get((trained, col)), table.cells.get((random, col))
        if a is None or b is None:
            continue
        spread = (a.std or 0.0) + (b.std or 0.0)
        diff = a.mean - b.mean
        verdict = "exceeds the spread" if abs(diff) > spread else "within the spread"
        notes.append(f"{col}: trained - random = {diff:+.1f} ({verdict} {spread:.1f})")
    return notes


def print_summary(result: DemoOutput, echo) -> None:
    echo(render_terminal(result.table))
    echo("")
    echo("Differences against the random init (spread = sum of the two std over seeds):")
    for note in result.notes:
        echo(f"  {note}")
    echo("")
    echo(f"wrote {result.folder / 'leaderboard.md'} and {result.folder / 'leaderboard.html'}")
