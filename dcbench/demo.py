"""``dcbench demo``: the whole pipeline on scikit-learn's digits, on a CPU, in minutes.

Digits has 1,797 real 8x8 images. With the paper's settings (batch 256, k=10000, PCA-256)
that is 7 SGD steps per clustering and a network that learns nothing, so the demo trains
DeepCluster-v2 with ``--preset small-data`` (see ``DEMO_TRAINING``) and shows whatever the table says.
Its claims are those of the paired tests of :mod:`dcbench.stats` (the same as
``dcbench leaderboard --reference``): a difference is called significant only when its 95%
interval excludes zero (p < 0.05). It never tunes the table.
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from dcbench import evaluate
from dcbench.errors import UsageError
from dcbench.fileio import atomic_write_text
from dcbench.data import write_digits_imagefolder
from dcbench.progress import format_duration
from dcbench.leaderboard import Analysis, Table, analyze, build_table, render, render_terminal
from dcbench.results import ResultStore
from dcbench.train import DCv2Config, train
from dcbench.train.presets import small_data_settings

log = logging.getLogger("dcbench")

IMAGE_SIZE = 64  # the smallest size DeepCluster's AlexNet accepts comfortably
#: the digits' training split (1,797 images, 25% held out for validation, stratified)
DIGITS_TRAIN_IMAGES = 1347
#: training crops the demo affords (~1 minute of AlexNet at 64 px on 2 cores); the preset's own
#: budget is 120,000 (README, Training), which would take ~6 minutes here
DEMO_CROP_BUDGET = 20_000
#: DeepCluster-v2 with ``--preset small-data``: the method and preset that beat a random init at
#: every conv layer and on kNN on held-out real images (animal-mnist, README "Measured"; v1 did
#: not on kNN); chosen from that evidence, not from this demo's table. Only the epochs are capped,
#: to the demo's crop budget (batch 16, plain SGD lr 0.003125, 3 x 81 prototypes, 7 of the
#: preset's 45 epochs).
_PRESET = small_data_settings("deepcluster-v2", DIGITS_TRAIN_IMAGES, arch="alexnet")
DEMO_TRAINING = dict(arch="alexnet", **_PRESET, workers=0, snapshot_every=0)
DEMO_TRAINING["epochs"] = min(_PRESET["epochs"],
                              max(1, round(DEMO_CROP_BUDGET / (_PRESET["large_crops"] * DIGITS_TRAIN_IMAGES))))
#: Probe settings: cached features (one extraction per checkpoint), few epochs, small batches.
DEMO_PROTOCOLS = {
    "linear": {"image_size": IMAGE_SIZE, "cached": True, "crops": "center", "epochs": 20, "batch_size": 64,
               "lr": 0.01, "workers": 0},
    "knn": {"image_size": IMAGE_SIZE, "ks": [10, 20], "workers": 0},
}
SEEDS = (0, 1, 2)
#: what the demo writes in its folder: a folder holding anything else is not the demo's, and the
#: demo deletes its own run, cache and results store before it starts (see :func:`check_out`)
DEMO_ENTRIES = ("digits", "deepcluster-digits", "cache", "results.db", "results.db-wal", "results.db-shm",
                "leaderboard.md", "leaderboard.html")
#: Columns of the printed table (the store keeps every metric).
SHOWN_METRICS = {"top1", "top1_k20"}


@dataclass
class DemoOutput:
    folder: Path
    table: Table
    notes: list[str]
    analysis: Analysis | None = None
    wall_s: float = 0.0  # the whole demo: data, training, evaluations, tables


def run_demo(out: str | Path = "demo_out", epochs: int | None = None,
             seeds: tuple[int, ...] | None = None) -> DemoOutput:
    """Train on digits, probe the trained net and a random init, write the leaderboard.

    Everything stays in ``out``: the data, the run, the results store and the feature cache
    (``out/cache``: ~200 MB per checkpoint would otherwise land in the global cache)."""
    out = Path(out)
    if epochs is not None and epochs < 1:
        raise UsageError(f"--epochs must be at least 1, got {epochs}")
    check_out(out)
    seeds = SEEDS if seeds is None else seeds
    started = time.perf_counter()
    data = write_digits_imagefolder(out / "digits", image_size=IMAGE_SIZE)
    run_dir = out / "deepcluster-digits"  # also the checkpoint's row name in the table
    for stale in (run_dir, out / "cache"):  # a demo always starts from scratch (and its cache never grows)
        if stale.exists():
            shutil.rmtree(stale)
    cfg = DCv2Config(data=str(data / "train"), out=str(run_dir), **{**DEMO_TRAINING, **(
        {"epochs": epochs} if epochs is not None else {})})
    log.info("demo: training DeepCluster-v2 on %s (%d epochs)", cfg.data, cfg.epochs)
    train(cfg)
    store_path = out / "results.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{store_path}{suffix}").unlink(missing_ok=True)
    checkpoints = [str(run_dir / "checkpoint.pth"), f"random:alexnet,size={IMAGE_SIZE}"]
    log.info("results store: %s", store_path)
    with ResultStore(store_path) as store:
        results = _evaluate_all(store, checkpoints, data, seeds, out / "cache")
        shown = [replace(r, metrics=[m for m in r.metrics if m.metric in SHOWN_METRICS]) for r in results]
        table = build_table(shown, protocols=list(DEMO_PROTOCOLS), selection="final", outcomes=store.outcomes)
        analysis = analyze(table, reference=table.rows[-1])  # the random init
    atomic_write_text(out / "leaderboard.md", render(table, "md", analysis=analysis))
    atomic_write_text(out / "leaderboard.html", render(table, "html", analysis=analysis))
    notes = paired_notes(analysis, table.rows[0])
    return DemoOutput(out, table, notes, analysis, wall_s=time.perf_counter() - started)


def check_out(out: Path) -> None:
    """UsageError unless ``out`` is new, empty, or a previous demo's folder: the demo deletes the
    run, cache and results store it finds there, so a folder of other files (a dataset, a home
    folder, ~/.dcbench with the user's own results.db) must never be taken for one."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a new folder (or a previous demo's folder)")
    if not out.is_dir():
        return
    # atomic writes leave hidden temporaries named after their target (".leaderboard.md.x.tmp")
    foreign = sorted(p.name for p in out.iterdir()
                     if not any(p.name.lstrip(".").startswith(entry) for entry in DEMO_ENTRIES))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f", ... (+{len(foreign) - 3})" if len(foreign) > 3 else "")
        raise UsageError(f"--out {out} holds files the demo did not write ({shown}); give a new or empty "
                         f"folder (the demo replaces its run, cache and results store in --out)")


def _evaluate_all(store: ResultStore, checkpoints: list[str], data: Path, seeds: tuple[int, ...],
                  cache_dir: Path) -> list:
    plans = evaluate.expand_seeds([evaluate.plan(name, overrides, data) for name, overrides in DEMO_PROTOCOLS.items()],
                                  seeds)
    # progress: one line per evaluation with the ETA, and per-phase lines when stderr is not a terminal
    items = evaluate.sweep(plans, checkpoints, store, device="cpu", reuse=False, progress=True, cache_dir=cache_dir,
                           desc="demo evaluations",
                           on_item=lambda item: log.info("demo: %s on %s, seed %s done", item.plan.protocol.name,
                                                         item.checkpoint.name, item.plan.seed))
    return [item.result for item in items]


def paired_notes(analysis: Analysis, trained: str) -> list[str]:
    """Per column, the trained-vs-reference difference as the paired test states it."""
    notes = []
    for col in analysis.table.columns:
        cmp = analysis.diffs.get((trained, col))
        if cmp is None:
            continue
        diff = f"{cmp.diff:+.1f}"
        if not cmp.tested:
            notes.append(f"{col}: trained - random = {diff} (not testable: fewer than 2 paired seeds and no "
                         f"per-image outcomes stored)")
            continue
        verdict = "significant" if cmp.significant(analysis.alpha) else "not significant"
        p = "" if cmp.p_value is None else f", p = {cmp.p_value:.3g}"
        if cmp.p_adjusted is not None:
            p += f" (Holm-adjusted over {analysis.family_size}: {cmp.p_adjusted:.3g})"
        notes.append(f"{col}: trained - random = {diff}, 95% CI [{cmp.ci_low:+.1f}, {cmp.ci_high:+.1f}]{p}, "
                     f"{cmp.method} over n={cmp.n}: {verdict}")
    return notes


def print_summary(result: DemoOutput, echo) -> None:
    echo(render_terminal(result.table, analysis=result.analysis))
    echo("")
    echo("Differences against the random init (paired tests, 95% CI):")
    for note in result.notes:
        echo(f"  {note}")
    echo("")
    echo(f"wrote {result.folder / 'leaderboard.md'} and {result.folder / 'leaderboard.html'}")
    echo(f"demo wall time: {format_duration(result.wall_s)} ({result.wall_s:.0f} s)")
