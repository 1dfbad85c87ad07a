"""Benchmark: all five AlexNet conv probes in ONE run vs five runs of one probe each.

The linear-probe protocols train every requested tap's head from one shared frozen forward
pass per batch (augmented mode) or one shared extraction (cached mode). This script measures
what that sharing buys on a synthetic ImageFolder: wall time of one run with taps conv1..conv5
against the sum of five runs with one tap each (same data, epochs, settings), in both modes,
and prints the ratios with the accuracies (which must agree: the heads are independent).

Targets: ratio <= 1/5 cached (one extraction instead of five), <= 1/3 augmented. 1/5 is a
floor rather than a reachable target: a one-tap run still pays the per-run work (BN
re-estimation of a random init, the frozen check, reading the images) and a forward pass that
stops at its tap, so five one-tap runs cost less than five five-tap runs. Times are best-of-N
with interleaved runs, because other processes on a shared machine add a lot of noise.

Usage: python benchmarks/probes.py [--per-class 50] [--classes 4] [--epochs 2] [--image-size 64]
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch

from dcbench.checkpoint import resolve_checkpoint
from dcbench.data.synthetic import make_image_folder
from dcbench.settings import apply_settings
from protocols import EvalContext, get_protocol

TAPS = ["conv1", "conv2", "conv3", "conv4", "conv5"]
TARGETS = {"cached": 1 / 5, "augmented": 1 / 3}


def timed_run(root: Path, taps: list[str], mode: str,
              args: argparse.Namespace) -> tuple[float, float, dict[str, float]]:
    """(wall s, CPU s, final top-1 per tap) of one protocol run; no feature cache, so every
    run does its own extraction, as separate evaluations would."""
    proto = get_protocol("linear")
    settings = apply_settings(proto.default_settings(), {
        "taps": taps, "cached": mode == "cached", "epochs": args.epochs, "image_size": args.image_size,
        "batch_size": args.batch_size, "workers": args.workers, "crops": args.crops,
        "bn_recalibrate": args.bn_recalibrate})
    ckpt = resolve_checkpoint(f"random:alexnet,size={args.image_size}")
    wall, cpu = time.perf_counter(), time.process_time()
    out = proto.run(ckpt, settings, root, EvalContext(cache_dir=None))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return wall, cpu, {r.tap: r.value for r in out.metrics if r.metric == "top1" and r.selection == "final"}


def measure(root: Path, mode: str, args: argparse.Namespace) -> dict:
    """Best-of-``repeats`` wall and CPU time of the joint run and of each single-tap run,
    interleaved so that load from other processes hits both sides alike."""
    best: dict[str, list[float]] = {}
    acc: dict[str, dict[str, float]] = {}
    for _ in range(args.repeats):
        for label, taps in [("joint", TAPS)] + [(t, [t]) for t in TAPS]:
            wall, cpu, top1 = timed_run(root, taps, mode, args)
            if args.verbose:
                print(f"  {mode} {','.join(taps)}: {wall:.2f} s wall, {cpu:.2f} s CPU", flush=True)
            old = best.get(label, [float("inf"), float("inf")])
            best[label] = [min(old[0], wall), min(old[1], cpu)]
            acc[label] = top1
    separate = [sum(best[t][i] for t in TAPS) for i in (0, 1)]
    return {"joint": best["joint"], "separate": separate, "joint_acc": acc["joint"],
            "separate_acc": {t: acc[t][t] for t in TAPS}}


def _accs(top1: dict[str, float]) -> str:
    return " ".join(f"{top1[t]:.1f}" for t in TAPS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--crops", default="tencrop", choices=["tencrop", "center"])
    parser.add_argument("--bn-recalibrate", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--repeats", type=int, default=3, help="best of N (other processes add noise)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: CPU time is not inflated by OpenMP spin-waits under load)")
    parser.add_argument("--verbose", action="store_true", help="print every run's times")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("dcbench").setLevel(logging.ERROR)

    with tempfile.TemporaryDirectory() as tmp:
        root = make_image_folder(Path(tmp) / "data", n_classes=args.classes, per_class=args.per_class,
                                 image_size=48)
        n = args.classes * args.per_class
        print(f"fixture: {n} train + {n} val images (48 px JPEGs), {args.classes} classes; random:alexnet at "
              f"{args.image_size}px, bn_recalibrate {args.bn_recalibrate}; {args.epochs} epochs, batch "
              f"{args.batch_size}, val crops {args.crops} (augmented) / center (cached); {args.threads} threads, "
              f"{args.workers} workers; best of {args.repeats}")
        timed_run(root, ["conv1"], "cached", args)  # warm-up (library init, page cache)
        print("\n| mode | 1 run x 5 taps: wall s (CPU s) | 5 runs x 1 tap: wall s (CPU s) | ratio wall (CPU) "
              "| target | top-1 conv1..5, 1 run | top-1 conv1..5, 5 runs |")
        print("|---|---|---|---|---|---|---|")
        for mode in ("cached", "augmented"):
            m = measure(root, mode, args)
            ratio = [m["joint"][i] / m["separate"][i] for i in (0, 1)]
            verdict = "met" if ratio[0] <= TARGETS[mode] else "missed"
            print(f"| {mode} | {m['joint'][0]:.1f} ({m['joint'][1]:.1f}) | {m['separate'][0]:.1f} "
                  f"({m['separate'][1]:.1f}) | {ratio[0]:.2f} ({ratio[1]:.2f}) | <= {TARGETS[mode]:.2f} {verdict} | "
                  f"{_accs(m['joint_acc'])} | {_accs(m['separate_acc'])} |", flush=True)


if __name__ == "__main__":
    main()
