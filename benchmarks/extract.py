"""Evaluation data path: feature extraction throughput against the forward pass alone (issue 17, item 3).

    python benchmarks/extract.py [--n 1024] [--sizes 64,224] [--batch 64] [--workers 2] [--repeats 2]
                                 [--arch alexnet] [--tap conv5] [--data DIR] [--amp] [--channels-last]

For each input size: ``dcbench.features.extract_rows`` (what every frozen-feature protocol runs:
JPEG decode, Resize + CenterCrop, the DataLoader with its workers, the forward, rows into a
float32 array) on an ImageFolder of JPEGs, then the same model's forward alone on the same
batches already in memory as tensors (collated before the clock starts). Best of ``--repeats``.
The overhead is (extract - forward) / forward; targets: <= 25% at 64 px, <= 10% at 224 px.
``--workers 0,2`` measures each worker count in turn (the forward alone is the same); ``--amp``
(bfloat16 autocast) and ``--channels-last`` apply to both measurements (opt-in, they change the
numbers); the CPU time of the process and its workers is printed next to the wall time, and the
time the extraction waited for images (``Extraction.waited_s``): the rest of the overhead is the
forward pass slowed by the loader's work on the same cores.

Images: scikit-learn digits upsampled to 1.25x the input size, as JPEG (benchmarks/epoch.py).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from epoch import write_digits_jpegs  # noqa: E402  (the same images as the epoch benchmark)

from dcbench.data import image_folder  # noqa: E402
from dcbench.data.transforms import center_transform  # noqa: E402
from dcbench.features import extract_rows, forward_pooled, frozen, make_loader  # noqa: E402
from dcbench.models import build_backbone  # noqa: E402


def cpu_s() -> float:
    """User + system seconds of this process and its finished children (loader workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def best_of(repeats: int, fn) -> tuple[float, float, object]:
    """(wall, cpu) seconds of the fastest of ``repeats`` calls of ``fn``, and what that call returned."""
    runs = []
    for _ in range(repeats):
        cpu, start = cpu_s(), time.perf_counter()
        result = fn()
        runs.append((time.perf_counter() - start, cpu_s() - cpu, result))
    return min(runs, key=lambda run: run[:2])


def measure(size: int, workers: list[int], args: argparse.Namespace, work: Path) -> tuple[dict, tuple, int]:
    """({workers: extraction (wall, cpu, Extraction)}, forward-only (wall, cpu), images) at ``size`` px."""
    root = write_digits_jpegs(work / f"digits{size}", args.n, round(size * 1.25))
    dataset = image_folder(root, transform=center_transform(size))
    model = build_backbone(args.arch, sobel=args.arch == "alexnet", input_size=size, seed=0).eval()
    taps = [args.tap]
    extract = {w: best_of(args.repeats, lambda w=w: extract_rows(
        model, dataset, taps, batch_size=args.batch, workers=w, amp=args.amp, channels_last=args.channels_last))
        for w in workers}
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    batches = [images.contiguous(memory_format=memory_format) for images, *_ in make_loader(dataset, args.batch, 0)]
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if args.amp else contextlib.nullcontext()

    def forward_only() -> None:
        with frozen(model), amp:
            for images in batches:
                forward_pooled(model, images, taps, {})

    forward = best_of(args.repeats, forward_only)[:2]
    return extract, forward, len(dataset)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--sizes", default="64,224")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", default="2", help="loader workers, or a comma list measured in turn")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--arch", default="alexnet")
    parser.add_argument("--tap", default="conv5")
    parser.add_argument("--data", type=Path, help="Folder for the generated images (kept; default: a temp folder).")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast on the CPU (changes the numbers)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last input (changes the numbers)")
    args = parser.parse_args()
    workers = [int(w) for w in str(args.workers).split(",")]
    print(f"extraction benchmark: {args.n} JPEGs, {args.arch} tap {args.tap}, batch {args.batch}, amp {args.amp}, "
          f"channels_last {args.channels_last}, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores, load "
          f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    with tempfile.TemporaryDirectory(prefix="dcbench-extract-") as tmp:
        work = args.data or Path(tmp)
        for size in (int(s) for s in args.sizes.split(",")):
            extract, (forward, forward_cpu), n = measure(size, workers, args, work)
            for w, (wall, cpu, out) in extract.items():
                print(f"  {size:>4} px, {w} workers: extract {n / wall:7.1f} img/s ({wall:.2f} s, cpu {cpu:.2f} s, "
                      f"waiting for images {out.waited_s:.2f} s)  forward alone {n / forward:7.1f} img/s "
                      f"({forward:.2f} s, cpu {forward_cpu:.2f} s)  overhead {100 * (wall - forward) / forward:+.0f}%  "
                      f"load {Path('/proc/loadavg').read_text().split()[0]}", flush=True)


if __name__ == "__main__":
    main()
