"""Evaluation data path: feature extraction throughput against the forward pass alone (issue 17, item 3).

    python benchmarks/extract.py [--n 1024] [--sizes 64,224] [--batch 64] [--workers 2] [--repeats 2]
                                 [--arch alexnet] [--tap conv5] [--data DIR]

For each input size: ``dcbench.features.extract_rows`` (what every frozen-feature protocol runs:
JPEG decode, Resize + CenterCrop, the DataLoader with its workers, the forward, rows into a
float32 array) on an ImageFolder of JPEGs, then the same model's forward alone on the same
batches already in memory as tensors (collated before the clock starts). Best of ``--repeats``.
The overhead is (extract - forward) / forward; targets: <= 25% at 64 px, <= 10% at 224 px.

Images: scikit-learn digits upsampled to 1.25x the input size, as JPEG (benchmarks/epoch.py).
"""
from __future__ import annotations

import argparse
import os
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


def best_of(repeats: int, fn) -> float:
    """The smallest wall time of ``repeats`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(size: int, args: argparse.Namespace, work: Path) -> tuple[float, float, int]:
    """(extraction s, forward-only s, images) at ``size`` px."""
    root = write_digits_jpegs(work / f"digits{size}", args.n, round(size * 1.25))
    dataset = image_folder(root, transform=center_transform(size))
    model = build_backbone(args.arch, sobel=args.arch == "alexnet", input_size=size, seed=0).eval()
    taps = [args.tap]
    extract = best_of(args.repeats, lambda: extract_rows(model, dataset, taps, batch_size=args.batch,
                                                         workers=args.workers))
    batches = [images for images, *_ in make_loader(dataset, args.batch, args.workers)]

    def forward_only() -> None:
        with frozen(model):
            for images in batches:
                forward_pooled(model, images, taps, {})

    forward = best_of(args.repeats, forward_only)
    return extract, forward, len(dataset)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--sizes", default="64,224")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--arch", default="alexnet")
    parser.add_argument("--tap", default="conv5")
    parser.add_argument("--data", type=Path, help="Folder for the generated images (kept; default: a temp folder).")
    args = parser.parse_args()
    print(f"extraction benchmark: {args.n} JPEGs, {args.arch} tap {args.tap}, batch {args.batch}, "
          f"{args.workers} workers, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores, load "
          f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    with tempfile.TemporaryDirectory(prefix="dcbench-extract-") as tmp:
        work = args.data or Path(tmp)
        for size in (int(s) for s in args.sizes.split(",")):
            extract, forward, n = measure(size, args, work)
            print(f"  {size:>4} px: extract {n / extract:7.1f} img/s ({extract:.2f} s)  forward alone "
                  f"{n / forward:7.1f} img/s ({forward:.2f} s)  overhead {100 * (extract - forward) / forward:+.0f}%",
                  flush=True)


if __name__ == "__main__":
    main()
