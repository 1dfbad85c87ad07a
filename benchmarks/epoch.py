"""One DeepCluster epoch: dcbench (``dcbench train --epochs 1`` as a whole process) against an
original-style loop written here from the structure of the original code (issue 17, item 1).

    python benchmarks/epoch.py [--n 3000] [--image-px 128] [--crop 64] [--k 100] [--batch 64]
                               [--workers 2] [--repeats 2] [--data DIR]
                               [--variant amp=--set=amp=true] [--variant cl=--set=channels_last=true ...]
                               [--floor]

The original-style side follows github.com/facebookresearch/deepcluster main.py, clustering.py
and util.py: torchvision ``datasets.ImageFolder`` (PIL decode) with Resize(crop*256/224) +
CenterCrop for extraction, every feature of the set in one float32 array in RAM,
``faiss.PCAMatrix(eigen_power=-0.5)`` trained and applied on it, L2 rows, ``faiss.Clustering`` +
``IndexFlatL2`` k-means (20 iterations, max_points_per_centroid=10^7), ``ReassignedDataset`` (PIL
decode again, RandomResizedCrop + flip) sampled by ``UnifLabelSampler``, SGD on the backbone and a
fresh top layer (lr 0.05, momentum 0.9 / none, weight decay 1e-5), a checkpoint at the end.
Both sides use the same image folder, the same model (dcbench's AlexNet with Sobel: its forward
is the code under test on neither side), batch size and workers, on the CPU.

Data: scikit-learn's 1,797 digits upsampled (bilinear) to ``image_px``, as JPEG (quality 90) in
an ImageFolder (digit = class), mirrored copies after the first 1,797 (real strokes, not noise).
Runs alternate (dcbench, original, dcbench, ...), each a fresh process; the best of
``--repeats`` per side is reported with its phase times, its CPU time (user + system of the
process and its loader workers: less sensitive than wall time to other load on a shared machine)
and the ratio dcbench / original; dcbench's runs also print how long its feature and training
passes waited for images (metrics.jsonl ``time_*_wait_s``). Each ``--variant NAME=ARG[,ARG...]``
adds a dcbench side with those extra ``dcbench train`` arguments (e.g. ``amp=--set=amp=true``: opt-in settings that change
the numbers), run in the same alternation and reported against the same original-style best.
``--floor`` adds the compute floor: the epoch's forward passes (extraction) and training steps
alone, on random inputs already in memory, as a whole process (interpreter and torch start-up
included); with dcbench's clustering time added it bounds what any implementation of this epoch
on this machine can reach in float32.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- data
def write_digits_jpegs(out: Path, n: int, image_px: int) -> Path:
    """``out/train/<digit>/<i>.jpg``: n upsampled digits (reused when already there)."""
    root = out / "train"
    marker = out / f".complete-{n}-{image_px}"
    if marker.exists():
        return root
    import shutil

    shutil.rmtree(root, ignore_errors=True)  # another --n or size was written there: start afresh
    for old in out.glob(".complete-*"):
        old.unlink()
    import numpy as np
    from PIL import Image, ImageOps
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    for i in range(n):
        j = i % len(pixels)
        img = Image.fromarray(pixels[j]).resize((image_px, image_px), Image.Resampling.BILINEAR).convert("RGB")
        if (i // len(pixels)) % 2:
            img = ImageOps.mirror(img)
        folder = root / str(int(digits.target[j]))
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{i:05d}.jpg", quality=90)
    marker.touch()
    return root


# ----------------------------------------------------------------------------- dcbench side
def children_cpu_s() -> float:
    """User + system seconds of every finished child process so far (loader workers included)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_dcbench(args: argparse.Namespace, data: Path, work: Path, extra: tuple[str, ...] = ()) -> dict:
    """``dcbench train --epochs 1`` as a whole process; phase times from its metrics.jsonl."""
    out = Path(tempfile.mkdtemp(dir=work, prefix="dcbench-"))
    cmd = [sys.executable, "-m", "dcbench", "-q", "train", "--data", str(data), "--epochs", "1", "--k", str(args.k),
           "--batch-size", str(args.batch), "--workers", str(args.workers), "--image-size", str(args.crop),
           "--arch", "alexnet", "--device", "cpu", "--out", str(out / "run"), *args.dcbench_args, *extra]
    cpu, start = children_cpu_s(), time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall, cpu = time.perf_counter() - start, children_cpu_s() - cpu
    if proc.returncode:
        sys.exit(f"dcbench train failed:\n{proc.stderr[-3000:]}")
    record = json.loads((out / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    return {"total": wall, "cpu": cpu, "extract": record["time_extract_s"], "cluster": record["time_cluster_s"],
            "train": record["time_train_s"], "loss": record["loss"],
            "waits": (record["time_extract_wait_s"], record["time_train_wait_s"])}


# ----------------------------------------------------------------------------- original side
ORIGINAL = r'''
import json, os, sys, time
T0 = time.perf_counter()
import faiss
import numpy as np
import torch
import torch.nn as nn
import torch.utils.data as data
import torchvision.datasets as datasets
import torchvision.transforms as transforms
from PIL import Image
from dcbench.models import CLUSTER_TAP, LOGITS_TAP, build_backbone

root, out, k, batch, workers, crop = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), \
    int(sys.argv[5]), int(sys.argv[6])
torch.manual_seed(31); np.random.seed(31)
normalize = transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])


def pil_loader(path):  # deepcluster/clustering.py
    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


class ReassignedDataset(data.Dataset):  # deepcluster/clustering.py
    def __init__(self, image_indexes, pseudolabels, dataset, transform=None):
        self.imgs = self.make_dataset(image_indexes, pseudolabels, dataset)
        self.transform = transform

    def make_dataset(self, image_indexes, pseudolabels, dataset):
        label_to_idx = {label: idx for idx, label in enumerate(set(pseudolabels))}
        images = []
        for j, idx in enumerate(image_indexes):
            path = dataset[idx][0]
            pseudolabel = label_to_idx[pseudolabels[j]]
            images.append((path, pseudolabel))
        return images

    def __getitem__(self, index):
        path, pseudolabel = self.imgs[index]
        img = pil_loader(path)
        if self.transform is not None:
            img = self.transform(img)
        return img, pseudolabel

    def __len__(self):
        return len(self.imgs)


class UnifLabelSampler(data.Sampler):  # deepcluster/util.py
    def __init__(self, N, images_lists):
        self.N = N
        self.images_lists = images_lists
        self.indexes = self.generate_indexes_epoch()

    def generate_indexes_epoch(self):
        nmb_non_empty_clusters = sum(1 for lst in self.images_lists if len(lst) != 0)
        size_per_pseudolabel = int(self.N / nmb_non_empty_clusters) + 1
        res = np.array([])
        for lst in self.images_lists:
            if len(lst) == 0:
                continue
            indexes = np.random.choice(lst, size_per_pseudolabel, replace=(len(lst) <= size_per_pseudolabel))
            res = np.concatenate((res, indexes))
        np.random.shuffle(res)
        res = list(res.astype("int"))
        if len(res) >= self.N:
            return res[:self.N]
        res += res[: (self.N - len(res))]
        return res

    def __iter__(self):
        return iter(self.indexes)

    def __len__(self):
        return len(self.indexes)


def compute_features(dataloader, model, N):  # deepcluster/main.py
    model.eval()
    features = None
    for i, (input_tensor, _) in enumerate(dataloader):
        with torch.no_grad():
            aux = model(input_tensor, taps=[CLUSTER_TAP])[CLUSTER_TAP].data.cpu().numpy()
        if i == 0:
            features = np.zeros((N, aux.shape[1]), dtype="float32")
        aux = aux.astype("float32")
        if i < len(dataloader) - 1:
            features[i * batch: (i + 1) * batch] = aux
        else:
            features[i * batch:] = aux
    return features


def preprocess_features(npdata, pca=256):  # deepcluster/clustering.py
    _, ndim = npdata.shape
    npdata = npdata.astype("float32")
    mat = faiss.PCAMatrix(ndim, pca, -0.5)  # eigen_power=-0.5 (positional in faiss >= 1.8)
    mat.train(npdata)
    assert mat.is_trained
    npdata = mat.apply_py(npdata)
    row_sums = np.linalg.norm(npdata, axis=1)
    npdata = npdata / row_sums[:, np.newaxis]
    return npdata


def run_kmeans(x, nmb_clusters):  # deepcluster/clustering.py (IndexFlatL2: CPU)
    n_data, d = x.shape
    clus = faiss.Clustering(d, nmb_clusters)
    clus.seed = np.random.randint(1234)
    clus.niter = 20
    clus.max_points_per_centroid = 10000000
    index = faiss.IndexFlatL2(d)
    clus.train(x, index)
    _, I = index.search(x, 1)
    return [int(n[0]) for n in I]


model = build_backbone("alexnet", sobel=True, input_size=crop, seed=31)
fd = model.feature_dim
optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9,
                            weight_decay=10 ** -5)
criterion = nn.CrossEntropyLoss()
tra = [transforms.Resize(round(crop * 256 / 224)), transforms.CenterCrop(crop), transforms.ToTensor(), normalize]
dataset = datasets.ImageFolder(root, transform=transforms.Compose(tra))
dataloader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers)  # pin_memory: CUDA only
times = {}

t = time.perf_counter()
model.top_layer = None
features = compute_features(dataloader, model, len(dataset))
times["extract"] = time.perf_counter() - t

t = time.perf_counter()
xb = preprocess_features(features)
I = run_kmeans(xb, k)
images_lists = [[] for _ in range(k)]
for i in range(len(dataset)):
    images_lists[I[i]].append(i)
pseudolabels, image_indexes = [], []
for cluster, images in enumerate(images_lists):
    image_indexes.extend(images)
    pseudolabels.extend([cluster] * len(images))
t_train = transforms.Compose([transforms.RandomResizedCrop(crop), transforms.RandomHorizontalFlip(),
                              transforms.ToTensor(), normalize])
train_dataset = ReassignedDataset(image_indexes, pseudolabels, dataset.imgs, t_train)
sampler = UnifLabelSampler(int(1 * len(train_dataset)), images_lists)
train_dataloader = torch.utils.data.DataLoader(train_dataset, batch_size=batch, num_workers=workers,
                                               sampler=sampler)
model.set_top_layer(len(images_lists))
times["cluster"] = time.perf_counter() - t

t = time.perf_counter()
optimizer_tl = torch.optim.SGD(model.top_layer.parameters(), lr=0.05, weight_decay=10 ** -5)
model.train()
losses = []
for input_tensor, target in train_dataloader:
    output = model(input_tensor, taps=[LOGITS_TAP])[LOGITS_TAP]
    loss = criterion(output, target)
    losses.append(loss.item())
    optimizer.zero_grad()
    optimizer_tl.zero_grad()
    loss.backward()
    optimizer.step()
    optimizer_tl.step()
torch.save({"epoch": 1, "state_dict": model.state_dict(), "optimizer": optimizer.state_dict()},
           os.path.join(out, "checkpoint.pth.tar"))
times["train"] = time.perf_counter() - t
times["loss"] = float(np.mean(losses))
print(json.dumps(times))
'''


def run_original(args: argparse.Namespace, data: Path, work: Path) -> dict:
    """The original-style epoch as a whole process (its phase times printed as JSON)."""
    out = Path(tempfile.mkdtemp(dir=work, prefix="original-"))
    return run_script("original-style epoch", ORIGINAL, data, out, args.k, args.batch, args.workers, args.crop)


def run_script(what: str, script: str, *argv: object) -> dict:
    """``python -c script argv...`` as a whole process: its wall and CPU time, and the phase times
    it prints as JSON on its last line."""
    cpu, start = children_cpu_s(), time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", script, *map(str, argv)], cwd=REPO, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - start, children_cpu_s() - cpu
    if proc.returncode:
        sys.exit(f"{what} failed:\n{proc.stderr[-3000:]}")
    return {"total": wall, "cpu": cpu, **json.loads(proc.stdout.strip().splitlines()[-1])}


# ----------------------------------------------------------------------------- compute floor
FLOOR = r'''
import json, sys, time
import torch
import torch.nn as nn
from dcbench.models import CLUSTER_TAP, LOGITS_TAP, build_backbone

n, k, batch, crop = (int(a) for a in sys.argv[1:5])
torch.manual_seed(31)
model = build_backbone("alexnet", sobel=True, input_size=crop, seed=31)
sizes = [min(batch, n - i) for i in range(0, n, batch)]
inputs = {b: torch.randn(b, 3, crop, crop) for b in set(sizes)}  # in memory before the clock starts
targets = {b: torch.randint(0, k, (b,)) for b in set(sizes)}
times = {}
t = time.perf_counter()
model.eval()
with torch.no_grad():
    for b in sizes:
        model(inputs[b], taps=[CLUSTER_TAP])
times["extract"] = time.perf_counter() - t
times["cluster"] = 0.0
t = time.perf_counter()
model.set_top_layer(k)
# the fastest SGD on the CPU (one fused kernel, the same update as dcbench's)
optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9,
                            weight_decay=1e-5, fused=True)
criterion = nn.CrossEntropyLoss()
model.train()
losses = []
for b in sizes:
    loss = criterion(model(inputs[b], taps=[LOGITS_TAP])[LOGITS_TAP], targets[b])
    losses.append(loss.item())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
times["train"] = time.perf_counter() - t
times["loss"] = sum(losses) / len(losses)
print(json.dumps(times))
'''


def run_floor(args: argparse.Namespace, data: Path, work: Path) -> dict:
    """The compute floor as a whole process: interpreter + torch start-up, the extraction forward
    passes and the training steps (forward, backward, SGD) of one epoch on random inputs already in
    memory; no images, no clustering, no checkpoint. Neither side can be faster than this plus its
    clustering."""
    del data, work
    return run_script("compute-floor run", FLOOR, args.n, args.k, args.batch, args.crop)


# ----------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--image-px", type=int, default=128)
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data", type=Path, help="Folder for the generated images (kept; default: a temp folder).")
    parser.add_argument("--only", choices=["dcbench", "original"], help="Run one side only.")
    parser.add_argument("--dcbench-arg", dest="dcbench_args", action="append", default=[],
                        help="Extra argument for dcbench train (repeatable), e.g. --dcbench-arg=--set=amp=true.")
    parser.add_argument("--floor", action="store_true",
                        help="Also run the compute floor: the epoch's forward/backward passes alone on inputs "
                             "in memory (interpreter and torch start-up included), reported like a side.")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=ARG[,ARG...]",
                        help="Another dcbench side with extra train arguments (repeatable), e.g. "
                             "amp=--set=amp=true or amp+cl=--set=amp=true,--set=channels_last=true.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dcbench-epoch-") as tmp:
        work = Path(tmp)
        data = write_digits_jpegs(args.data or work / "data", args.n, args.image_px)
        print(f"epoch benchmark: {args.n} JPEGs {args.image_px} px, crops {args.crop} px, k={args.k}, "
              f"batch {args.batch}, {args.workers} workers, {os.cpu_count()} cores, load "
              f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
        sides = {"dcbench": run_dcbench, "original": run_original}
        if args.only:
            sides = {args.only: sides[args.only]}
        if args.only != "original":
            sides.update(variant_sides(args.variant))
        if args.floor:
            sides["floor"] = run_floor
        runs: dict[str, list[dict]] = {name: [] for name in sides}
        for r in range(args.repeats):
            for name, fn in sides.items():
                result = fn(args, data, work)
                runs[name].append(result)
                print(f"  run {r + 1} {name:<12} total {result['total']:6.1f}s  cpu {result['cpu']:6.1f}s  extract "
                      f"{result['extract']:5.1f}  cluster {result['cluster']:5.1f}  train {result['train']:5.1f}  "
                      f"loss {result['loss']:.3f}  load {Path('/proc/loadavg').read_text().split()[0]}"
                      + ("  waiting for images {:.1f}/{:.1f}".format(*result["waits"]) if "waits" in result else ""),
                      flush=True)
    best = {name: min(rs, key=lambda x: x["total"]) for name, rs in runs.items()}
    print(f"best of {args.repeats} (seconds):")
    print(f"  {'':<13}{'total':>8}{'cpu':>8}{'extract':>9}{'cluster':>9}{'train':>8}  other (start-up, data, "
          f"checkpoints)")
    for name, b in best.items():
        other = b["total"] - b["extract"] - b["cluster"] - b["train"]
        print(f"  {name:<13}{b['total']:8.1f}{b['cpu']:8.1f}{b['extract']:9.1f}{b['cluster']:9.1f}{b['train']:8.1f}"
              f"  {other:.1f}")
    if "original" in best:
        o = best["original"]
        for name, d in best.items():
            if name != "original":
                print("ratio {} / original: total {:.2f}x  cpu {:.2f}x  extract {:.2f}x  cluster {:.2f}x  "
                      "train {:.2f}x".format(name, *(d[p] / o[p] for p in ("total", "cpu", "extract", "cluster",
                                                                            "train"))))
        if "floor" in best and "dcbench" in best:
            bound = best["floor"]["total"] + best["dcbench"]["cluster"]
            print(f"bound: compute floor + dcbench's clustering = {bound:.1f}s = {bound / o['total']:.2f}x original; "
                  f"dcbench spends {best['dcbench']['total'] - bound:.1f}s beyond it (images, start-up, checkpoints)")


def variant_sides(specs: list[str]) -> dict:
    """``{"dcbench[NAME]": runner}`` for each ``NAME=ARG[,ARG...]`` of ``--variant``."""
    sides = {}
    for spec in specs:
        name, _, extra = spec.partition("=")
        if not name or not extra:
            sys.exit(f"--variant {spec!r}: write NAME=ARG[,ARG...], e.g. amp=--set=amp=true")
        words = tuple(extra.split(","))  # click reads --set=amp=true as --set amp=true
        sides[f"dcbench[{name}]"] = (lambda w: lambda a, d, k: run_dcbench(a, d, k, w))(words)
    return sides


if __name__ == "__main__":
    main()
