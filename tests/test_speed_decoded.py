"""Issue 17 speed paths: the decoded-image cache (same tensors, shared with loader workers, budget
fallback), bfloat16 autocast on the CPU (opt-in), and the trainer's per-image seeding."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dcbench.data import image_folder
from dcbench.data.decoded import DecodedImages, header_sizes, open_decoded_cache
from dcbench.data.synthetic import make_image_folder
from dcbench.data.transforms import eval_transform, train_transform
from dcbench.features import extract_rows, numerics_id
from dcbench.models import build_backbone
from dcbench.data.seeded import read_seeded
from dcbench.train.common import autocast, load_sgd_state, sgd


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoded") / "shapes"
    return make_image_folder(root, n_classes=3, per_class=6, image_size=40, splits=None, corrupt=1)


def _views(ds, seeds):
    return [read_seeded(ds, i, s) for i, s in zip(range(len(ds)), seeds)]


def test_cached_pixels_give_bit_identical_tensors_for_both_passes(folder):
    plain = image_folder(folder, transform=train_transform(32))
    cached = image_folder(folder, transform=train_transform(32))
    assert cached.cache_decoded(1.0)
    seeds = list(range(100, 100 + len(plain)))
    expected = _views(plain, seeds)
    for _ in range(2):  # first read decodes and stores, the second reads the stored pixels
        got = _views(cached, seeds)
        for e, g in zip(expected, got):
            assert (e is None) == (g is None)
            if e is not None:
                assert torch.equal(e[0], g[0]) and e[1:] == g[1:]
    assert cached.decoded.n_filled() == len(plain) - 1  # the corrupt file is never stored
    cached.transform = eval_transform(32)
    plain.transform = eval_transform(32)
    for i in range(len(plain)):
        e, g = plain[i], cached[i]
        assert (e is None and g is None) or torch.equal(e[0], g[0])


def test_training_crops_read_as_uint8_are_the_normalised_crops_bit_for_bit(folder):
    """The trainer's crops travel as uint8 and are scaled per batch (uint8_batches): the same random
    draws (ToTensor and PILToTensor draw nothing), the same inputs as per-image ToTensor + Normalize."""
    from dcbench.data import skip_collate, uint8_batches

    crops = image_folder(folder, transform=train_transform(32))
    pixels, finish = uint8_batches(crops)
    seeds = list(range(100, 100 + len(crops)))
    expected = skip_collate(_views(crops, seeds))[0]
    batch = skip_collate(_views(pixels, seeds))[0]
    assert batch.dtype == torch.uint8 and torch.equal(finish(batch), expected)


def test_one_budget_is_shared_by_the_datasets_in_order(folder, monkeypatch):
    """cache_decoded_images: the first dataset takes what it needs, the next one what is left;
    datasets without a decoded-image cache are skipped."""
    import dcbench.data.datasets as datasets
    from dcbench.data import cache_decoded_images, decoded_in_memory

    monkeypatch.setattr(datasets, "cache_budget_bytes", lambda gb: int(gb * 1e9))  # no memory cap
    first, second = image_folder(folder), image_folder(folder)
    need = open_decoded_cache(first.paths, 1.0).nbytes / 1e9
    assert cache_decoded_images([first, second, [1, 2]], 1.5 * need) == [True, False, False]
    assert decoded_in_memory(first) == 0 and decoded_in_memory(second) is None
    assert cache_decoded_images([image_folder(folder), image_folder(folder)], 2.5 * need) == [True, True]


def test_loader_workers_fill_the_shared_cache_and_extraction_is_unchanged(folder):
    model = build_backbone("alexnet", sobel=True, input_size=64, seed=0)
    plain = image_folder(folder, transform=eval_transform(64))
    cached = image_folder(folder, transform=eval_transform(64))
    assert cached.cache_decoded(1.0)
    want = extract_rows(model, plain, ["conv2"], batch_size=4, workers=0).taps["conv2"]
    got = extract_rows(model, cached, ["conv2"], batch_size=4, workers=2).taps["conv2"]
    assert np.array_equal(want.rows, got.rows) and np.array_equal(want.owner, got.owner)
    assert cached.decoded.n_filled() == len(cached) - 1  # written by the forked workers, seen here
    again = extract_rows(model, cached, ["conv2"], batch_size=4, workers=0).taps["conv2"]
    assert np.array_equal(want.rows, again.rows)
    nhwc = extract_rows(model, cached, ["conv2"], batch_size=4, channels_last=True).taps["conv2"]
    assert np.allclose(want.rows, nhwc.rows, rtol=1e-4, atol=1e-4)  # other kernels, same function
    with pytest.raises(ValueError, match="channels_last"):
        extract_rows(model, cached, ["conv2"], cache_dir="unused", ckpt_sha="x", channels_last=True)


def test_budget_too_small_falls_back_to_decoding(folder):
    ds = image_folder(folder, transform=eval_transform(32))
    assert header_sizes(ds.paths, budget_bytes=40 * 40 * 3 * 2) is None
    assert not ds.cache_decoded(1e-6) and ds.decoded is None
    assert ds[0] is not None
    assert open_decoded_cache([], 1.0) is None and open_decoded_cache(ds.paths, 0.0) is None


def test_budget_is_capped_at_half_the_available_memory_per_local_process(monkeypatch):
    from dcbench.data import decoded

    monkeypatch.setattr(decoded, "available_memory_bytes", lambda: 10_000_000_000)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert decoded.cache_budget_bytes(4.0) == 4_000_000_000
    assert decoded.cache_budget_bytes(8.0) == 5_000_000_000
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert decoded.cache_budget_bytes(4.0) == 2_500_000_000


def test_pickled_cache_is_inert_and_wrong_sizes_are_not_stored(folder):
    import pickle

    from PIL import Image

    cache = DecodedImages([(4, 2), (3, 3)])
    img = Image.new("RGB", (4, 2), (1, 2, 3))
    cache.put(0, img)
    cache.put(1, img)  # not the header's size: ignored
    assert cache.get(1) is None and np.array_equal(np.asarray(cache.get(0)), np.asarray(img))
    copy = pickle.loads(pickle.dumps(cache))
    assert copy.get(0) is None and copy.n_filled() == 0
    copy.put(0, img)  # a no-op, no error


def test_amp_is_bfloat16_autocast_on_the_cpu_and_in_the_cache_key():
    conv = torch.nn.Conv2d(3, 4, 3)
    x = torch.randn(2, 3, 8, 8)
    with autocast(torch.device("cpu"), True):
        assert conv(x).dtype == torch.bfloat16
    with autocast(torch.device("cpu"), False):
        assert conv(x).dtype == torch.float32
    assert numerics_id("cpu", amp=True)["autocast"] == "bfloat16"
    assert numerics_id("cpu", amp=False)["autocast"] == "off"


def test_read_seeded_draws_from_the_cpu_generator_only(folder):
    ds = image_folder(folder, transform=train_transform(32))
    a, b = read_seeded(ds, 0, 7), read_seeded(ds, 0, 7)
    torch.manual_seed(7)
    c = ds[0]
    assert torch.equal(a[0], b[0]) and torch.equal(a[0], c[0])
    state = torch.get_rng_state()
    read_seeded(ds, 1, 8)
    assert torch.equal(state, torch.get_rng_state())  # the caller's stream is untouched
    queued = getattr(torch.cuda, "_queued_calls", [])
    n = len(queued)
    read_seeded(ds, 1, 9)
    assert len(queued) == n  # no lazy CUDA seeding queued per image


def _train(data, out, *extra, epochs=2):
    args = ["--image-size", "64", "--batch-size", "8", "--k", "3", "--workers", "2", "--set", "pca_dim=4",
            "--epochs", str(epochs), "--arch", "alexnet", "--device", "cpu"]
    proc = subprocess.run([sys.executable, "-m", "dcbench", "-q", "train", "--data", str(data), "--out", str(out),
                           *args, *extra], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=False)


def test_training_with_and_without_the_cache_gives_the_same_weights(folder, tmp_path):
    on = _train(folder, tmp_path / "on")
    off = _train(folder, tmp_path / "off", "--set", "decode_cache_gb=0")
    for name, value in on["state_dict"].items():
        assert torch.equal(value, off["state_dict"][name]), name
    metrics = [json.loads(line) for line in (tmp_path / "on" / "metrics.jsonl").read_text().splitlines()]
    assert [m["decoded_in_memory"] for m in metrics] == [18, 18]  # 19 files, one corrupt: filled by the workers
    off_metrics = (tmp_path / "off" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(off_metrics[-1])["decoded_in_memory"] is None


@pytest.mark.parametrize("momentum", [0.9, 0.0])  # the backbone's and the top layer's optimisers
def test_fused_cpu_sgd_is_bit_identical_to_torchs_default(momentum):
    def run(make):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(300, 70)), torch.nn.Parameter(torch.randn(70))]
        optimizer = make(params)
        grads = torch.Generator().manual_seed(1)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=grads)
            optimizer.step()
        return params, optimizer

    options = {"lr": 0.05, "momentum": momentum, "weight_decay": 1e-5}
    want, plain = run(lambda ps: torch.optim.SGD(ps, **options))
    got, fused = run(lambda ps: sgd(ps, torch.device("cpu"), **options))
    assert fused.param_groups[0]["fused"] and all(torch.equal(a, b) for a, b in zip(want, got))
    load_sgd_state(fused, plain.state_dict())  # a checkpoint of the loop version resumes fused
    assert fused.param_groups[0]["fused"]


def test_cpu_training_with_amp_and_channels_last_runs_and_records_both(folder, tmp_path):
    ckpt = _train(folder, tmp_path / "amp", "--set", "amp=true", "--set", "channels_last=true", epochs=1)
    assert all(v.dtype == torch.float32 for v in ckpt["state_dict"].values() if v.is_floating_point())
    config = (tmp_path / "amp" / "config.yaml").read_text()
    assert "amp: true" in config and "channels_last: true" in config
    record = json.loads((tmp_path / "amp" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["loss"] is not None and np.isfinite(record["loss"])
