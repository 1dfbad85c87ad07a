"""Clustering phase benchmark: dcbench vs the original DeepCluster path vs bare faiss k-means.

    python benchmarks/clustering.py [--n 100000] [--dim-in 4096] [--dim 256] [--k 1000] [--niter 20]

Generates N x dim_in float32 features (low-rank cluster structure + noise) into a temporary
.npy memmap, then runs each variant in its own subprocess (same machine, one after the other):

  dcbench   preprocess_features (chunked PCA-whitening + L2) on the memmap + run_kmeans
  original  DeepCluster's code path: features in memory, astype copy, faiss.PCAMatrix(eigen_power
            =-0.5) trained and applied on the full matrix, L2, faiss k-means (same parameters)
  bare      faiss k-means alone on the already-reduced features (dcbench's output)

Peak memory = the largest anonymous resident memory (RssAnon, sampled every 5 ms by the parent
from /proc/PID/status) during the timed phase minus its value just before it. Anonymous only, so
the memmap's page-cache pages (reclaimable) and the inputs loaded before the phase do not count.
The numpy column is tracemalloc's peak (numpy buffers only; not faiss/BLAS internals).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MiB = 2**20


# ----------------------------------------------------------------------------- data
def generate_features(path: Path, n: int, dim_in: int, k: int, seed: int, chunk: int = 8192) -> None:
    """Write N x dim_in float32 rows: k latent centres in a 256-d subspace (decaying spectrum) + noise."""
    rng = np.random.default_rng(seed)
    rank = min(256, dim_in)
    basis = rng.standard_normal((rank, dim_in)).astype(np.float32)
    basis *= (np.arange(1, rank + 1, dtype=np.float32) ** -0.5)[:, None] / np.sqrt(dim_in)
    centres = rng.standard_normal((k, rank)).astype(np.float32) * 2.0
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim_in))
    for start in range(0, n, chunk):
        rows = min(chunk, n - start)
        latent = centres[rng.integers(0, k, rows)] + rng.standard_normal((rows, rank), dtype=np.float32)
        block = latent @ basis
        block += 0.05 * rng.standard_normal((rows, dim_in), dtype=np.float32)
        out[start:start + rows] = block
    out.flush()
    del out


# ----------------------------------------------------------------------------- workers
def rss_anon_bytes(pid: int | str = "self") -> int:
    """Anonymous resident memory of a process (kB field of /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def faiss_kmeans(x: np.ndarray, k: int, niter: int, seed: int) -> tuple[np.ndarray, float]:
    """The original DeepCluster run_kmeans, CPU index."""
    import faiss

    clus = faiss.Clustering(x.shape[1], k)
    clus.seed, clus.niter, clus.max_points_per_centroid = seed, niter, 10**7
    index = faiss.IndexFlatL2(x.shape[1])
    clus.train(x, index)
    _, ids = index.search(x, 1)
    stats = clus.iteration_stats
    return ids.ravel(), float(stats.at(stats.size() - 1).obj)


def original_preprocess(npdata: np.ndarray, dim: int) -> np.ndarray:
    """DeepCluster's clustering.preprocess_features, verbatim in substance."""
    import faiss

    _, ndim = npdata.shape
    npdata = npdata.astype("float32")
    mat = faiss.PCAMatrix(ndim, dim, -0.5)  # eigen_power=-0.5 (positional in faiss >= 1.7)
    mat.train(npdata)
    assert mat.is_trained
    npdata = mat.apply_py(npdata)
    row_sums = np.linalg.norm(npdata, axis=1)
    return npdata / row_sums[:, np.newaxis]


def worker(args: argparse.Namespace) -> None:
    """Run one variant and print a JSON record on the last line of stdout."""
    import tracemalloc

    import faiss

    faiss.omp_set_num_threads(args.threads)
    from dcbench.cluster import preprocess_features, run_kmeans

    workdir = Path(args.workdir)
    if args.worker == "original":
        data = np.array(np.load(workdir / "features.npy", mmap_mode="r"))  # the original keeps features in RAM
    elif args.worker == "bare":
        data = np.load(workdir / "reduced.npy")
    else:
        data = np.load(workdir / "features.npy", mmap_mode="r")
    tracemalloc.start()
    base = rss_anon_bytes()
    cpu0 = os.times()
    t0 = time.time()
    parts: dict[str, float] = {}
    if args.worker == "dcbench":
        feats = preprocess_features(data, dim=args.dim, sample_size=args.sample_size or None)
        parts["pca"] = time.time() - t0
        res = run_kmeans(feats, args.k, n_iter=args.niter, seed=args.seed, use_gpu=False)
        parts["kmeans"] = time.time() - t0 - parts["pca"]
        obj = res.objective
    elif args.worker == "original":
        feats = original_preprocess(data, args.dim)
        parts["pca"] = time.time() - t0
        _, obj = faiss_kmeans(feats, args.k, args.niter, args.seed)
        parts["kmeans"] = time.time() - t0 - parts["pca"]
    else:
        _, obj = faiss_kmeans(data, args.k, args.niter, args.seed)
    t1 = time.time()
    cpu1 = os.times()
    numpy_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    if args.worker == "dcbench":
        np.save(workdir / "reduced.npy", feats)
    print(json.dumps({"t0": t0, "t1": t1, "seconds": t1 - t0,
                      "cpu": (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system), "base_anon": base, "parts": parts,
                      "numpy_peak": numpy_peak, "objective": obj}))


# ----------------------------------------------------------------------------- driver
def run_variant(variant: str, args: argparse.Namespace, workdir: Path) -> dict:
    """Start the worker subprocess, sample its RssAnon, return its record plus the peak growth."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, __file__, "--worker", variant, "--workdir", str(workdir)] + forwarded(args)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    samples: list[tuple[float, int]] = []
    while proc.poll() is None:
        try:
            samples.append((time.time(), rss_anon_bytes(proc.pid)))
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.005)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"variant {variant} failed:\n{err}")
    rec = json.loads(out.strip().splitlines()[-1])
    inside = [rss for t, rss in samples if rec["t0"] <= t <= rec["t1"]] or [rec["base_anon"]]
    rec["peak"] = max(max(inside) - rec["base_anon"], 0)
    return rec


def forwarded(args: argparse.Namespace) -> list[str]:
    return ["--n", str(args.n), "--dim-in", str(args.dim_in), "--dim", str(args.dim), "--k", str(args.k),
            "--niter", str(args.niter), "--seed", str(args.seed), "--threads", str(args.threads),
            "--sample-size", str(args.sample_size)]


LABELS = {"dcbench": "dcbench (chunked PCA-white+L2, kmeans)",
          "original": "original (PCAMatrix in RAM, kmeans)",
          "bare": "bare faiss kmeans (reduced input)"}


def print_table(recs: dict[str, dict], args: argparse.Namespace) -> None:
    ref = recs["dcbench"]["seconds"]
    print(f"\nN={args.n} dim_in={args.dim_in} -> dim={args.dim}, k={args.k}, niter={args.niter}, "
          f"threads={args.threads}, PCA sample_size={args.sample_size}, best of {args.repeat}")
    head = (f"{'variant':40s} {'seconds':>8s} {'vs dcbench':>10s} {'cpu s':>7s} {'peak MiB':>9s} "
            f"{'numpy MiB':>9s}  breakdown (wall)")
    print(head)
    print("-" * len(head))
    for name, rec in recs.items():
        parts = ", ".join(f"{k} {v:.1f}s" for k, v in rec["parts"].items())
        print(f"{LABELS[name]:40s} {rec['seconds']:8.1f} {rec['seconds'] / ref:9.2f}x {rec['cpu']:7.1f} "
              f"{rec['peak'] / MiB:9.0f} "
              f"{rec['numpy_peak'] / MiB:9.0f}  {parts}")
    print(f"(load average at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; 'cpu s' = process "
          f"CPU time, less sensitive than wall time to other processes sharing the CPUs)")
    print_targets(recs, args)


def print_targets(recs: dict[str, dict], args: argparse.Namespace) -> None:
    def verdict(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    dc = recs["dcbench"]
    budget = args.n * args.dim_in * 4 / 8
    print("\ntargets:")
    if "original" in recs:
        speedup = recs["original"]["seconds"] / dc["seconds"]
        print(f"  dcbench >= 3x faster than the original path : {speedup:5.2f}x   {verdict(speedup >= 3)}")
    if "bare" in recs:
        over = dc["seconds"] / recs["bare"]["seconds"]
        print(f"  dcbench within 1.2x of bare faiss k-means   : {over:5.2f}x   {verdict(over <= 1.2)}")
    print(f"  dcbench peak <= 1/8 of N*dim_in*4 ({budget / MiB:.0f} MiB) : {dc['peak'] / MiB:5.0f} MiB "
          f"{verdict(dc['peak'] <= budget)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim-in", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--niter", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="faiss.omp_set_num_threads and BLAS threads")
    parser.add_argument("--sample-size", type=int, default=0,
                        help="dcbench PCA fitting rows (0: every row, the trainer's default and the original's)")
    parser.add_argument("--variants", default="dcbench,original,bare")
    parser.add_argument("--repeat", type=int, default=1, help="runs per variant; the fastest is reported")
    parser.add_argument("--tmpdir", default=None, help="where the temporary memmap goes")
    parser.add_argument("--worker", choices=sorted(LABELS), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    variants = [v for v in args.variants.split(",") if v]
    if "dcbench" not in variants:
        parser.error("--variants must include dcbench (the reference; bare uses its output)")
    workdir = Path(tempfile.mkdtemp(prefix="dcbench-cluster-", dir=args.tmpdir))
    try:
        t = time.time()
        generate_features(workdir / "features.npy", args.n, args.dim_in, args.k, args.seed)
        print(f"generated {args.n} x {args.dim_in} features in {time.time() - t:.1f}s ({workdir})", flush=True)
        recs: dict[str, dict] = {}
        for rep in range(args.repeat):  # interleaved, so a burst of outside load hits all variants
            for v in ["dcbench"] + [v for v in ("original", "bare") if v in variants]:
                rec = run_variant(v, args, workdir)
                print(f"  [{rep + 1}/{args.repeat}] {v}: {rec['seconds']:.1f}s (cpu {rec['cpu']:.1f}s, "
                      f"load {os.getloadavg()[0]:.1f})", flush=True)
                if v not in recs or rec["seconds"] < recs[v]["seconds"]:
                    recs[v] = rec
        print_table(recs, args)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
