"""dcbench viz filters|maximize|top-images|training and dcbench report.

One small DeepCluster run (1 epoch, 64 px, k=4) is trained once per module; every command
runs on its checkpoint and run folder, and the pictures are checked for size, content
(not constant, grey for Sobel filters, activations that went up) and reproducibility.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from dcbench.checkpoint import resolve_checkpoint
from dcbench.cli import main
from dcbench.data.synthetic import make_image_folder, make_unlabelled_folder
from dcbench.errors import UsageError
from dcbench.results import MetricRow, Result, ResultStore
from dcbench.viz import choose_filters, image_grid
from dcbench.viz.cli import report_command, viz_group
from dcbench.viz.filters import effective_filters, first_conv
from dcbench.viz.maximize import AscentSettings, filter_activation, maximize_filters, starting_noise
from dcbench.viz.report import layer_curves
from dcbench.viz.top_images import TopK

# dcbench/cli.py registers these; until it does (or if it already did), make sure they are there once
if "viz" not in main.commands:
    main.add_command(viz_group, "viz")
if "report" not in main.commands:
    main.add_command(report_command, "report")

RGB_RANDOM = "random:alexnet,sobel=0,size=64"


# ----------------------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real `dcbench train` run: 1 epoch of AlexNet+Sobel at 64 px on 32 synthetic images."""
    from dcbench.train import TrainConfig, train

    root = tmp_path_factory.mktemp("viz")
    data = make_image_folder(root / "data", n_classes=4, per_class=8, image_size=64, splits=None)
    out = root / "run"
    train(TrainConfig(data=str(data), out=str(out), epochs=1, k=4, image_size=64, batch_size=16, workers=0,
                      pca_dim=8, snapshot_every=0))
    return out


@pytest.fixture(scope="module")
def ckpt(run_dir: Path) -> str:
    return str(run_dir / "checkpoint.pth")


@pytest.fixture(scope="module")
def data_dir(run_dir: Path) -> Path:
    return run_dir.parent / "data"


def invoke(*args: object):
    """Run the dcbench CLI in-process."""
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, code: int, *words: str) -> None:
    """Exit ``code`` with exactly one ``error:`` line naming ``words`` and no traceback."""
    assert result.exit_code == code, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.output
    for word in words:
        assert word in errors[0], errors[0]


def load_png(path: Path | bytes) -> np.ndarray:
    data = path if isinstance(path, bytes) else Path(path).read_bytes()
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG"
    return np.asarray(img.convert("RGB"))


def assert_not_blank(pixels: np.ndarray) -> None:
    assert pixels.std() > 5, "image is (nearly) constant"


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- filters
def test_filters_of_a_sobel_model_are_grey_13x13_grid(ckpt: str, tmp_path: Path) -> None:
    out = tmp_path / "f.png"
    result = invoke("viz", "filters", ckpt, "--out", out)
    assert result.exit_code == 0, result.output
    pixels = load_png(out)
    # 96 filters -> 10 x 10 grid of 13x13 kernels (11x11 through the 3x3 Sobel) at scale 4, pad 2
    assert pixels.shape == (10 * (13 * 4 + 2) + 2,) * 2 + (3,)
    assert_not_blank(pixels)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    again = tmp_path / "g.png"
    invoke("viz", "filters", ckpt, "--out", again)
    assert sha(out) == sha(again)


def test_filters_of_an_rgb_model_are_coloured(tmp_path: Path) -> None:
    out = tmp_path / "rgb.png"
    result = invoke("viz", "filters", RGB_RANDOM, "--layer", "conv1", "--scale", "2", "--columns", "12",
                    "--out", out)
    assert result.exit_code == 0, result.output
    pixels = load_png(out)
    assert pixels.shape == (8 * (11 * 2 + 1) + 1, 12 * (11 * 2 + 1) + 1, 3)
    assert np.abs(pixels[..., 0].astype(int) - pixels[..., 1]).max() > 50


def test_sobel_filters_equal_the_composed_front_end(ckpt: str) -> None:
    bb = resolve_checkpoint(ckpt).backbone.eval()
    kernels = effective_filters(bb)
    assert kernels.shape == (96, 3, 13, 13)
    x = torch.randn(1, 3, 45, 45)
    with torch.no_grad():
        # Sobel pads by 1: its output pixel (i, j) is centred on input pixel (i, j)
        through = torch.nn.functional.conv2d(bb.sobel(x)[:, :, 1:, 1:], first_conv(bb).weight, stride=4)
        direct = torch.nn.functional.conv2d(x, kernels, stride=4)
    n = min(through.shape[-1], direct.shape[-1])
    assert torch.allclose(through[..., :n, :n], direct[..., :n, :n], atol=1e-4)


def test_filters_errors(ckpt: str, tmp_path: Path) -> None:
    out = tmp_path / "x.png"
    assert_one_line_error(invoke("viz", "filters", ckpt, "--layer", "conv3", "--out", out), 2, "first layer")
    assert_one_line_error(invoke("viz", "filters", ckpt, "--layer", "conv9", "--out", out), 2, "conv9", "conv1")
    assert_one_line_error(invoke("viz", "filters", tmp_path / "missing.pth", "--out", out), 1, "missing.pth")
    assert not out.exists()


# ----------------------------------------------------------------------------- maximize
def test_maximize_raises_the_filter_activation(ckpt: str) -> None:
    bb = resolve_checkpoint(ckpt).backbone
    settings = AscentSettings(iterations=12, image_size=64, seed=3)
    result = maximize_filters(bb, "conv5", [0, 7, 200], settings)
    noise = starting_noise(3, 64, 3)
    start = filter_activation(bb, "conv5", noise, [0, 7, 200])
    final = filter_activation(bb, "conv5", result.images, [0, 7, 200])
    assert torch.allclose(start, torch.tensor(result.start_activation))
    assert (final > start).all(), (start, final)
    assert (final > 2 * start + 1e-3).all()  # clearly higher, not a rounding difference
    assert torch.equal(maximize_filters(bb, "conv5", [0, 7, 200], settings).images, result.images)
    # batching filters together does not change the result of each
    split = maximize_filters(bb, "conv5", [0, 7, 200], AscentSettings(iterations=12, image_size=64, seed=3,
                                                                      batch_size=2))
    assert torch.allclose(split.images, result.images, atol=1e-3)


def test_maximize_cli_writes_one_png_per_filter_and_a_grid(ckpt: str, tmp_path: Path) -> None:
    out = tmp_path / "max"
    result = invoke("viz", "maximize", ckpt, "--layer", "conv3", "--filters", "2,5", "--iterations", 8,
                    "--blur-every", 3, "--out", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["conv3-filter0002.png", "conv3-filter0005.png", "conv3-grid.png"]
    for name in ("conv3-filter0002.png", "conv3-filter0005.png"):
        pixels = load_png(out / name)
        assert pixels.shape == (64, 64, 3)
        assert_not_blank(pixels)
    assert load_png(out / "conv3-grid.png").shape == (64 + 8, 2 * 64 + 12, 3)
    first = sha(out / "conv3-filter0002.png")
    invoke("viz", "maximize", ckpt, "--layer", "conv3", "--filters", "2,5", "--iterations", 8,
           "--blur-every", 3, "--out", out)
    assert sha(out / "conv3-filter0002.png") == first


def test_maximize_errors(ckpt: str, tmp_path: Path) -> None:
    out = tmp_path / "m"
    assert_one_line_error(invoke("viz", "maximize", ckpt, "--layer", "conv5", "--filters", "3,256", "--out", out),
                          2, "256", "0..255")
    assert_one_line_error(invoke("viz", "maximize", ckpt, "--filters", "1", "--count", "2", "--out", out), 2,
                          "--filters", "--count")
    assert_one_line_error(invoke("viz", "maximize", ckpt, "--layer", "pool9", "--out", out), 2, "pool9")
    assert_one_line_error(invoke("viz", "maximize", ckpt, "--iterations", "0", "--out", out), 2, "--iterations")
    assert not out.exists()


def test_choose_filters() -> None:
    assert choose_filters("0,5,9,5", None, 10, "conv1") == [0, 5, 9]
    assert choose_filters(None, 3, 10, "conv1") == [0, 1, 2]
    assert choose_filters(None, None, 10, "conv1") == list(range(10))
    for bad in [("x", None), ("", None), ("-1", None), (None, 0), (None, 11)]:
        with pytest.raises(UsageError):
            choose_filters(*bad, 10, "conv1")


# ----------------------------------------------------------------------------- top images
def _all_scores(bb, folder: Path, layer: str) -> tuple[list[str], torch.Tensor]:
    """Brute force: every image's mean activation per channel."""
    from dcbench.data import eval_transform, unlabelled_images

    ds = unlabelled_images(folder, transform=eval_transform(64))
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        out = bb.eval()(images, taps=[layer])[layer]
    return ds.paths, out.flatten(2).mean(2)


def test_top_images_cli_matches_brute_force(ckpt: str, data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "top"
    result = invoke("viz", "top-images", ckpt, "--data", data_dir, "--layer", "conv3", "--filters", "1,4",
                    "--k", 4, "--batch-size", 5, "--workers", 0, "--out", out)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "top_images.json").read_text())
    paths, scores = _all_scores(resolve_checkpoint(ckpt).backbone, data_dir, "conv3")
    for f in (1, 4):
        kept = record["filters"][str(f)]
        expected = torch.argsort(scores[:, f], descending=True, stable=True)[:4]
        assert [e["path"] for e in kept] == [paths[i] for i in expected]
        assert np.allclose([e["score"] for e in kept], scores[expected, f].numpy(), atol=1e-4)
        pixels = load_png(out / f"conv3-filter{f:04d}.png")
        assert pixels.shape == (2 * 64 + 6, 2 * 64 + 6, 3)  # 4 images: 2 x 2, pad 2
        assert_not_blank(pixels)
    page = (out / "index.html").read_text()
    assert "conv3-filter0001.png" in page and "conv3-filter0004.png" in page


def test_top_images_on_hundreds_of_images_keeps_k_per_filter(ckpt: str, tmp_path: Path, monkeypatch) -> None:
    import dcbench.viz.top_images as top

    folder = make_unlabelled_folder(tmp_path / "many", n=300, image_size=40, seed=1)
    sizes: list[int] = []

    class Spy(TopK):
        def update(self, scores, indices):
            super().update(scores, indices)
            sizes.append(self.scores.numel() + self.indices.numel())

    monkeypatch.setattr(top, "TopK", Spy)
    out = tmp_path / "top"
    result = invoke("viz", "top-images", ckpt, "--data", folder, "--count", 8, "--batch-size", 50,
                    "--workers", 0, "--out", out)
    assert result.exit_code == 0, result.output
    assert len(sizes) == 6 and set(sizes) == {2 * 8 * 9}  # 8 filters x k=9, whatever was seen
    record = json.loads((out / "top_images.json").read_text())
    assert record["images"] == 300 and record["layer"] == "conv5"
    assert all(len(v) == 9 for v in record["filters"].values())
    assert load_png(out / "conv5-filter0007.png").shape == (3 * 64 + 8, 3 * 64 + 8, 3)


def test_topk_is_exact_and_deterministic_on_ties() -> None:
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (103, 6), generator=gen).float()  # many ties
    tracker = TopK(6, 7)
    for lo in range(0, 103, 10):
        tracker.update(scores[lo:lo + 10], torch.arange(lo, min(lo + 10, 103)))
        assert tracker.scores.shape == (6, 7)
    for f in range(6):
        expected = torch.argsort(scores[:, f], descending=True, stable=True)[:7].tolist()
        assert [i for i, _ in tracker.best(f)] == expected
    few = TopK(2, 5)
    few.update(torch.ones(3, 2), torch.arange(3))
    assert len(few.best(0)) == 3


def test_top_images_errors(ckpt: str, data_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    out = tmp_path / "o"
    assert_one_line_error(invoke("viz", "top-images", ckpt, "--data", tmp_path / "empty", "--workers", 0,
                                 "--out", out), 1, "no images")
    assert_one_line_error(invoke("viz", "top-images", ckpt, "--data", tmp_path / "nope", "--out", out), 1, "nope")
    assert_one_line_error(invoke("viz", "top-images", ckpt, "--data", data_dir, "--layer", "conv1",
                                 "--filters", "96", "--out", out), 2, "96")


# ----------------------------------------------------------------------------- training plots
PLOTS = ["cluster_sizes.png", "empty_clusters.png", "kmeans_objective.png", "loss.png", "nmi.png",
         "overview.png", "time.png"]


def test_training_plots_of_a_real_run(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "plots"
    result = invoke("viz", "training", run_dir, "--out", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == PLOTS
    for name in PLOTS:
        pixels = load_png(out / name)
        assert min(pixels.shape[:2]) >= 300
        assert_not_blank(pixels)
    before = {name: sha(out / name) for name in PLOTS}
    invoke("viz", "training", run_dir, "--out", out)
    assert {name: sha(out / name) for name in PLOTS} == before


def _fake_run(folder: Path, epochs: int, labels: bool = True) -> Path:
    """A run folder with ``epochs`` plausible records (and an unfinished last line)."""
    (folder / "assignments").mkdir(parents=True)
    lines = []
    for e in range(epochs):
        lines.append(json.dumps({
            "epoch": e, "nmi_prev": None if e == 0 else 0.5 + 0.04 * e, "nmi_labels": 0.1 * e if labels else None,
            "kmeans_objective": 50.0 - e, "empty_clusters": e % 3, "n_clusters": 10, "cluster_size_min": 1,
            "cluster_size_max": 30, "loss": 2.0 / (e + 1), "time_extract_s": 1.0, "time_cluster_s": 2.0,
            "time_train_s": 3.0}))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + '\n{"epoch": 9, "nmi_pr')
    assignments = np.repeat(np.arange(8), np.arange(1, 9)).astype(np.int32)  # 2 of 10 clusters empty
    np.savez_compressed(folder / "assignments" / f"epoch_{epochs - 1:04d}.npz",
                        assignments=np.concatenate([assignments, [-1, -1]]))
    return folder


def test_training_plots_of_a_longer_unlabelled_run(tmp_path: Path) -> None:
    from dcbench.viz.training import load_run

    run = load_run(_fake_run(tmp_path / "run", 6, labels=False))
    assert [r["epoch"] for r in run.records] == list(range(6))
    assert run.sizes.tolist() == [8, 7, 6, 5, 4, 3, 2, 1, 0, 0]
    result = invoke("viz", "training", tmp_path / "run", "--out", tmp_path / "plots")
    assert result.exit_code == 0, result.output
    assert_not_blank(load_png(tmp_path / "plots" / "nmi.png"))


def test_a_v2_runs_cluster_sizes_are_its_first_heads(tmp_path: Path) -> None:
    """DeepCluster-v2 saves heads x images: the plot shows head 0 (what metrics.jsonl reports),
    not every head's assignments counted together."""
    from dcbench.viz.training import load_run

    folder = _fake_run(tmp_path / "run", 2)
    head0 = np.repeat(np.arange(8), np.arange(1, 9)).astype(np.int32)
    np.savez_compressed(folder / "assignments" / "epoch_0001.npz",
                        assignments=np.stack([head0, np.zeros_like(head0), np.ones_like(head0)]))
    assert load_run(folder).sizes.tolist() == [8, 7, 6, 5, 4, 3, 2, 1, 0, 0]


def test_training_errors(tmp_path: Path) -> None:
    out = tmp_path / "plots"
    assert_one_line_error(invoke("viz", "training", tmp_path / "nope", "--out", out), 1, "does not exist")
    (tmp_path / "run").mkdir()
    assert_one_line_error(invoke("viz", "training", tmp_path / "run", "--out", out), 1, "metrics.jsonl")
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    assert_one_line_error(invoke("viz", "training", tmp_path / "run", "--out", out), 1, "no epochs")
    (tmp_path / "run" / "metrics.jsonl").write_text('{"epoch": 0}\nnot json\n{"epoch": 1}\n')
    assert_one_line_error(invoke("viz", "training", tmp_path / "run", "--out", out), 1, "line 2")
    assert not out.exists()


# ----------------------------------------------------------------------------- report
def _store(path: Path) -> Path:
    """Linear-probe results for two checkpoints over conv1..conv5, two seeds each, and one kNN result."""
    with ResultStore(path) as db:
        for name, sha256, base in [("deepcluster", "a" * 64, 20.0), ("random", "b" * 64, 10.0)]:
            for seed in (0, 1):
                rows = [MetricRow("top1", base + 3 * i + seed, f"conv{i + 1}", "val", "final", seed) for i in range(5)]
                rows.append(MetricRow("top1", 99.0, "conv2", "val", "best", seed))  # other selection: ignored
                db.add(Result("linear", "1", {"name": name, "sha256": sha256, "arch": "alexnet"}, {"seed": seed},
                              {"root": "d", "fingerprint": "f"}, rows))
        db.add(Result("knn", "1", {"name": "deepcluster", "sha256": "a" * 64, "arch": "alexnet"}, {},
                      {"root": "d", "fingerprint": "f"}, [MetricRow("top1_k20", 33.0, "fc7", "val", None, 0)]))
    return path


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []
        self.links: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if tag == "img":
            self.srcs.append(attrs["src"])
        self.links += [v for k, v in attrs.items() if k in ("href", "src") and v and "://" in v]


def test_report_is_one_standalone_html_page(run_dir: Path, tmp_path: Path) -> None:
    store = _store(tmp_path / "results.db")
    out = tmp_path / "report.html"
    result = invoke("report", "--store", store, "--run", run_dir, "--checkpoint", RGB_RANDOM, "--out", out)
    assert result.exit_code == 0, result.output
    # "home" is conftest's isolated HOME: matplotlib builds its font cache there when this test is the
    # first of the process to import it (run alone), which is not the report writing beside its file
    written = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("results.db") and p.name != "home")
    assert written == ["report.html"]
    text = out.read_text()
    parser = _Images()
    parser.feed(text)
    parser.close()
    assert parser.links == []  # nothing fetched from the network
    assert "table" in parser.tags and 'id="leaderboard"' in text and "deepcluster" in text
    # curves + run overview + 2 filter grids (the run's checkpoint and the extra one)
    assert len(parser.srcs) == 4
    for src in parser.srcs:
        assert src.startswith("data:image/png;base64,")
        assert_not_blank(load_png(base64.b64decode(src.split(",", 1)[1])))
    assert "top1 by layer" in text and "training plots of run" in text


def test_layer_curves_average_seeds_and_skip_other_selections() -> None:
    results = []
    for seed in (0, 1):
        rows = [MetricRow("top1", 10.0 * i + seed, f"conv{i}", "val", "final", seed) for i in (10, 2, 1)]
        rows.append(MetricRow("top1", 99.0, "conv2", "val", "best", seed))
        results.append(Result("linear", "1", {"name": "m", "sha256": "c" * 64}, {}, {}, rows))
    curves = layer_curves(results)
    assert curves == {"linear (val)": {"m": {"conv1": 10.5, "conv2": 20.5, "conv10": 100.5}}}


def test_report_errors(tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    assert_one_line_error(invoke("report", "--store", tmp_path / "none.db", "--out", out), 1, "none.db")
    assert not (tmp_path / "none.db").exists()
    assert_one_line_error(invoke("report", "--out", out), 1, "nothing to report")
    assert_one_line_error(invoke("report", "--run", tmp_path / "norun", "--out", out), 1, "norun")
    assert not out.exists()


def test_image_grid_layout() -> None:
    tiles = [np.full((3, 4, 3), v, np.uint8) for v in (10, 20, 30)]
    grid = image_grid(tiles, cols=2, pad=1, background=0, scale=2)
    assert grid.shape == (2 * 7 + 1, 2 * 9 + 1, 3)
    assert grid[1, 1, 0] == 10 and grid[1, 10, 0] == 20 and grid[8, 1, 0] == 30 and grid[8, 10, 0] == 0
