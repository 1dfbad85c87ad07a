"""Training-speed benchmark: DeepCluster-v2's time per epoch next to DeepCluster (v1) on the same data.

    python benchmarks/dcv2.py [--data IMAGEFOLDER] [--n 600] [--epochs 3] [--arch alexnet]
                              [--image-size 64] [--preset small-data] [--threads 1] [--set KEY=VALUE ...]

Without ``--data`` it writes a synthetic ImageFolder of ``--n`` images (10 classes) first. Each
method then trains for ``--epochs`` epochs in its own subprocess (one after the other, same
machine, ``--threads`` torch threads, no data-loader workers) with ``dcbench train --method M
--preset P``; ``--set`` adds settings to both. The table reads each run's metrics.jsonl:
per-phase seconds (v1: feature extraction, PCA + k-means, training; v2: the memory bank's first
fill (epoch 0 only), spherical k-means, training), the mean epoch after the first (steady state),
training crops per epoch and per second. v2 trains on 2 crops per image (more with small crops),
v1 on one per drawn image, so crops/s compares the per-crop cost and s/epoch the total.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

METHODS = ("deepcluster", "deepcluster-v2")


def run_method(method: str, data: Path, out: Path, args: argparse.Namespace) -> list[dict]:
    """Train ``method`` in a subprocess; return its metrics.jsonl records."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, "-m", "dcbench", "-q", "train", "--method", method, "--preset", args.preset,
           "--data", str(data), "--out", str(out), "--arch", args.arch, "--image-size", str(args.image_size),
           "--epochs", str(args.epochs), "--workers", "0", "--set", "snapshot_every=0"]
    for pair in args.set:
        cmd += ["--set", pair]
    subprocess.run(cmd, check=True, env=env)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def crops_per_epoch(method: str, out: Path, record: dict) -> int:
    """Training crops one epoch processed (from the run's resolved config)."""
    import yaml

    cfg = yaml.safe_load((out / "config.yaml").read_text())
    if method == "deepcluster":
        return int(cfg["reassign"] * record["n_images"])
    return record["iterations"] * cfg["batch_size"] * (cfg["large_crops"] + cfg["small_crops"])


def summarise(method: str, out: Path, records: list[dict]) -> dict:
    """Seconds per phase (first epoch, mean of the later ones) and crops per second of training."""
    def total(r: dict) -> float:
        return r["time_extract_s"] + r["time_cluster_s"] + r["time_train_s"]

    later = records[1:] or records
    crops = crops_per_epoch(method, out, records[-1])
    mean = {key: sum(r[key] for r in later) / len(later) for key in ("time_extract_s", "time_cluster_s",
                                                                     "time_train_s")}
    return {"method": method, "first_epoch_s": total(records[0]), "epoch_s": sum(mean.values()), **mean,
            "crops": crops, "crops_per_s": crops / max(mean["time_train_s"], 1e-9)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="ImageFolder to train on (default: synthetic)")
    parser.add_argument("--n", type=int, default=600, help="synthetic images (without --data)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--arch", default="alexnet")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--preset", default="small-data", choices=["paper", "small-data"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="setting for both methods")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dcbench-dcv2-bench-") as tmp:
        data = args.data
        if data is None:
            from dcbench.data.synthetic import make_image_folder

            data = make_image_folder(Path(tmp) / "data", n_classes=10, per_class=max(1, args.n // 10),
                                     image_size=args.image_size, splits=None)
        rows = [summarise(m, Path(tmp) / m, run_method(m, data, Path(tmp) / m, args)) for m in METHODS]
    print(f"\n{args.epochs} epochs of {args.arch} at {args.image_size} px, preset {args.preset}, "
          f"{args.threads} thread(s); seconds per epoch after the first (first epoch in brackets)")
    print(f"{'method':<16}{'epoch s':>14}{'extract/bank':>14}{'cluster':>9}{'train':>9}{'crops':>8}{'crops/s':>9}")
    for r in rows:
        print(f"{r['method']:<16}{r['epoch_s']:>7.1f} ({r['first_epoch_s']:>4.0f}){r['time_extract_s']:>14.1f}"
              f"{r['time_cluster_s']:>9.2f}{r['time_train_s']:>9.1f}{r['crops']:>8d}{r['crops_per_s']:>9.1f}")
    v1, v2 = rows
    print(f"v2 / v1 time per epoch: {v2['epoch_s'] / v1['epoch_s']:.2f}x; per training crop: "
          f"{v1['crops_per_s'] / v2['crops_per_s']:.2f}x")


if __name__ == "__main__":
    main()
