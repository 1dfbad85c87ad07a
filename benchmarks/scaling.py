"""Data-parallel evaluation benchmark: feature extraction + one cached-probe epoch, and one
augmented-probe epoch, at world size 1 and N.

    python benchmarks/scaling.py [--worlds 1,2] [--device cpu|cuda] [--arch alexnet] [--classes 10]
                                 [--per-class 60] [--image-size 64] [--batch-size 32]
                                 [--modes cached,augmented] [--out DIR]

Writes a synthetic labelled ImageFolder (train/ and val/) and a random-weights checkpoint, then for
each mode and world size W runs, in a fresh feature cache,

    torchrun --standalone --nproc-per-node W -m dcbench eval --protocol linear --set cached=true|false
             --set epochs=1 --set crops=center ...

(gloo on the CPU, NCCL with --device cuda: one GPU per process) and reads the stored record.
``cached``: ``extract_s`` (time in the run context's extraction: the sharded forward passes of both
splits and the gathers) -- the top-1 of every tap must agree across world sizes (the features are
the same bits; see dcbench/features.py, rank_batches). ``augmented``: the probe's wall time
(``probe_wall_s``: one epoch of augmented crops, each rank forwarding batch_size / W of every
global batch, then the val pass in blocks) -- the top-1 agrees within noise (each rank draws its
own crops; dcbench/probe.py). It prints the time ratios against world size 1 (the speed-up).

On a 2-core CPU no speed-up is expected (the ranks share the cores); the target on GPUs is a
speed-up of extraction of at least 0.8 x N at N GPUs.
"""
from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def prepare(folder: Path, arch: str, classes: int, per_class: int, image_size: int) -> tuple[Path, Path]:
    """The synthetic data root and a checkpoint of ``arch`` (random weights, seed 0)."""
    from dcbench.checkpoint import save_checkpoint
    from dcbench.data.synthetic import make_image_folder
    from dcbench.models import build_backbone

    data = make_image_folder(folder / "data", n_classes=classes, per_class=per_class, image_size=image_size)
    ckpt = folder / f"{arch}.pth"
    save_checkpoint(ckpt, build_backbone(arch, input_size=image_size, seed=0))
    return data, ckpt


def run_world(world: int, data: Path, ckpt: Path, folder: Path, args: argparse.Namespace,
              mode: str = "cached") -> dict:
    """One torchrun evaluation at ``world`` processes (``mode``: cached or augmented probe); its
    record plus the command's wall time."""
    store, cache = folder / f"{mode}-w{world}.db", folder / f"{mode}-cache{world}"
    env = {**os.environ, "DCBENCH_CACHE": str(cache), "DCBENCH_STORE": str(store),
           "OMP_NUM_THREADS": str(max(1, args.threads // world))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
           "-m", "dcbench", "-q", "eval", "--protocol", "linear", "--checkpoint", str(ckpt), "--data", str(data),
           "--device", args.device, "--set", f"cached={str(mode == 'cached').lower()}", "--set", "epochs=1", "--set", f"image_size={args.image_size}",
           "--set", f"batch_size={args.batch_size}", "--set", f"workers={args.workers}", "--set", "crops=center"]
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"world size {world} failed:\n{done.stderr[-3000:]}")
    with sqlite3.connect(store) as db:
        [(record,)] = db.execute("select record_json from results").fetchall()
    return {"command_s": time.perf_counter() - started, **json.loads(record)}


def top1(record: dict) -> dict[str, float]:
    return {m["tap"]: m["value"] for m in record["metrics"] if m["metric"] == "top1" and m["selection"] == "final"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", default="1,2", help="comma-separated world sizes (first = the baseline)")
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per process)")
    parser.add_argument("--arch", default="alexnet")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=60, help="images per class in each split")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers per process")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="CPU threads shared by the processes of one run (OMP_NUM_THREADS = threads / W)")
    parser.add_argument("--modes", default="cached,augmented", help="cached (extraction), augmented (probe epoch)")
    parser.add_argument("--out", help="folder for data, caches and stores (default: a temp folder)")
    args = parser.parse_args()
    worlds = [int(w) for w in args.worlds.split(",")]
    folder = Path(args.out or tempfile.mkdtemp(prefix="dcbench-scaling-"))
    folder.mkdir(parents=True, exist_ok=True)
    data, ckpt = prepare(folder, args.arch, args.classes, args.per_class, args.image_size)
    images = 2 * args.classes * args.per_class
    print(f"{args.arch} at {args.image_size}px, {images} images (train + val), batch {args.batch_size}, "
          f"device {args.device}, {args.threads} threads")
    for mode in args.modes.split(","):
        report(mode, {w: run_world(w, data, ckpt, folder, args, mode) for w in worlds}, worlds, images)


def report(mode: str, runs: dict[int, dict], worlds: list[int], images: int) -> None:
    """One table per mode: the timed part (extraction, or the augmented probe), speed-up, top-1 per tap."""
    key = "extract_s" if mode == "cached" else "probe_wall_s"
    base = runs[worlds[0]]
    print(f"\n{mode}: {key} = {'sharded extraction of both splits' if mode == 'cached' else 'one augmented epoch + val'}")
    print(f"{'world':>5} {key:>12} {'img/s':>8} {'speed-up':>9} {'protocol_s':>11} {'command_s':>10}  top-1 per tap")
    for w, r in runs.items():
        timed = r["extra"].get(key, float("nan"))
        speedup = base["extra"].get(key, float("nan")) / timed if timed else float("nan")
        taps = " ".join(f"{t} {v:.2f}" for t, v in top1(r).items())
        print(f"{w:>5} {timed:>12.2f} {images / timed:>8.1f} {speedup:>8.2f}x {r['wall_s']:>11.2f} "
              f"{r['command_s']:>10.2f}  {taps}")
    diffs = [abs(top1(r)[t] - v) for r in runs.values() for t, v in top1(base).items()]
    print(f"largest top-1 difference to world size {worlds[0]}: {max(diffs):.3f} points")


if __name__ == "__main__":
    main()
