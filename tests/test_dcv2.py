"""DeepCluster-v2: the recipe's defaults, its pieces (spherical k-means, LARC, schedule), a real
run on every backbone family, exact resume after kill -9, torchrun with 2 processes, presets."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import dcbench
from dcbench.cli import main
from dcbench.cluster import spherical_kmeans
from dcbench.train import DCv2Config, resolve_config
from dcbench.train.optim import LARC, warmup_cosine
from dcbench.train.presets import recipe_warnings, small_data_settings
from test_train import SMALL_NET, _cli, _metrics, images, kill_in_epoch_1  # noqa: F401 - the shared fixture and helpers

TINY = ["--method", "deepcluster-v2", "--image-size", "64", "--batch-size", "8", "--workers", "0",
        "--set", "prototypes=[4,5]", "--set", "hidden_mlp=32", "--set", "feat_dim=16", "--set", "small_crops=2",
        "--set", "snapshot_every=0"]


def test_defaults_are_the_swav_recipe():
    c = DCv2Config()
    assert (c.arch, c.image_size, c.large_crops, c.small_crops, c.small_size(), c.crop_scale, c.small_crop_scale,
            c.feat_dim, c.hidden_mlp, c.prototypes, c.temperature, c.kmeans_iters, c.epochs, c.batch_size,
            c.optimizer, c.larc_trust, c.lr, c.final_lr, c.warmup_epochs, c.start_warmup, c.momentum,
            c.weight_decay, c.freeze_prototypes_iters, c.seed) == \
        ("tv:resnet50", 224, 2, 6, 96, (0.14, 1.0), (0.05, 0.14), 128, 2048, [3000, 3000, 3000], 0.1, 10, 800, 64,
         "larc", 0.001, 4.8, 0.0048, 10, 0.3, 0.9, 1e-6, 300_000, 31)


def test_list_settings_names_each_source():
    result = CliRunner().invoke(main, ["train", "--method", "deepcluster-v2", "--list-settings"])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines() if line.strip()}
    for name in ("prototypes", "temperature", "kmeans_iters", "lr", "final_lr", "warmup_epochs", "small_crops",
                 "crop_scale", "optimizer", "freeze_prototypes_iters", "weight_decay", "feat_dim", "hidden_mlp"):
        assert "swav" in lines[name], lines[name]


def test_spherical_kmeans_finds_separated_directions_and_is_seeded():
    rng = np.random.default_rng(0)
    centres = np.eye(3, 8)
    x = np.concatenate([c + 0.05 * rng.standard_normal((30, 8)) for c in centres])
    x = torch.nn.functional.normalize(torch.tensor(x, dtype=torch.float32), dim=1)
    a = spherical_kmeans(x, 3, n_iter=10, seed=1)
    b = spherical_kmeans(x, 3, n_iter=10, seed=1)
    assert np.array_equal(a.assignments, b.assignments) and torch.equal(a.centroids, b.centroids)
    assert sorted(a.sizes.tolist()) == [30, 30, 30] and a.empty_clusters == 0
    assert torch.allclose(a.centroids.norm(dim=1), torch.ones(3))
    cos = (x * a.centroids[torch.from_numpy(a.assignments)]).sum(1)
    assert a.objective == pytest.approx(float((2 - 2 * cos).sum()), rel=1e-5)
    with pytest.raises(ValueError, match="prototypes"):
        spherical_kmeans(x, 91)


def test_larc_scales_each_gradient_by_the_trust_ratio():
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # |w| = 5
    w.grad = torch.tensor([0.0, 2.0])  # |g| = 2
    LARC([w], lr=1.0, momentum=0.0, weight_decay=0.1, trust_coefficient=0.01).step()
    rate = 0.01 * 5 / (2 + 5 * 0.1 + 1e-8)
    expected = torch.tensor([3.0, 4.0]) - rate * (torch.tensor([0.0, 2.0]) + 0.1 * torch.tensor([3.0, 4.0]))
    assert torch.allclose(w.detach(), expected)


def test_larc_clip_caps_the_rate_and_exclude_1d_leaves_biases_to_plain_sgd():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # a 2-D weight: LARC applies
    b = torch.nn.Parameter(torch.tensor([1.0]))  # a 1-D bias: excluded
    w.grad, b.grad = torch.tensor([[0.0, 2.0]]), torch.tensor([0.5])
    LARC([w, b], lr=0.1, momentum=0.0, weight_decay=0.1, trust_coefficient=0.02, clip=True, exclude_1d=True).step()
    rate = min(0.02 * 5 / (2 + 0.5 + 1e-8) / 0.1, 1.0)  # 0.4: this layer steps at 0.4 x lr
    assert torch.allclose(w.detach(), torch.tensor([[3.0, 4.0]]) - 0.1 * rate * torch.tensor([[0.3, 2.4]]))
    assert torch.allclose(b.detach(), torch.tensor([1.0 - 0.1 * 0.5]))  # no LARC, no weight decay


def test_schedule_is_the_recipes_warmup_then_cosine():
    iters, epochs, warm = 5, 6, 2
    warmup = np.linspace(0.3, 4.8, iters * warm)
    steps = iters * (epochs - warm)
    cosine = [0.0048 + 0.5 * (4.8 - 0.0048) * (1 + math.cos(math.pi * t / steps)) for t in range(steps)]
    expected = np.concatenate([warmup, cosine])
    got = [warmup_cosine(i, iters, epochs, 4.8, 0.0048, warm, 0.3) for i in range(iters * epochs)]
    assert np.allclose(got, expected)


def test_a_run_shorter_than_its_warmup_stops_part_way_up_the_ramp():
    """swav main_deepclusterv2.py: lr_schedule = linspace(start, base, iters * warmup_epochs) followed
    by an empty cosine, read for the iterations the run has (was: the ramp squeezed into the run)."""
    iters, epochs, warm = 4, 3, 10
    expected = np.linspace(0.3, 4.8, iters * warm)[: iters * epochs]
    got = [warmup_cosine(i, iters, epochs, 4.8, 0.0048, warm, 0.3) for i in range(iters * epochs)]
    assert np.allclose(got, expected)
    assert got[-1] < 4.8 / 2  # a third of the way up the ramp


def test_run_writes_metrics_per_head_and_a_loadable_backbone(images, tmp_path):
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--data", str(images), "--epochs", "2", "--out", str(run),
                                       "--arch", "alexnet", *TINY])
    assert result.exit_code == 0, result.output
    records = _metrics(run)
    assert [r["epoch"] for r in records] == [0, 1]
    for key in ("nmi_prev", "nmi_labels", "kmeans_objective", "empty_clusters", "cluster_size_min",
                "cluster_size_max", "loss", "lr", "time_extract_s", "time_cluster_s", "time_train_s",
                "nmi_labels_h0", "nmi_labels_h1", "nmi_prev_h1", "cluster_size_max_h1", "empty_clusters_h1"):
        assert key in records[1], key
    assert records[0]["nmi_prev"] is None and 0 <= records[1]["nmi_prev_h1"] <= 1
    assert records[1]["n_clusters"] == 4 and records[1]["heads"] == 2 and records[1]["iterations"] == 6
    assert records[0]["time_extract_s"] > 0 and records[1]["time_extract_s"] == 0
    first, second = records
    assert 0 < first["time_extract_wait_s"] < first["time_extract_s"] and second["time_extract_wait_s"] == 0
    assert all(0 < r["time_train_wait_s"] < r["time_train_s"] for r in records)
    saved = np.load(run / "assignments" / "epoch_0001.npz")["assignments"]
    assert saved.shape == (2, 49) and saved[0].max() < 4 and saved[1].max() < 5 and (saved == -1).any()
    assert "method: deepcluster-v2" in (run / "config.yaml").read_text()
    bb = dcbench.load_backbone(str(run / "checkpoint.pth"))
    assert bb.arch == "alexnet" and bb.has_sobel  # the arch's default
    state = torch.load(run / "checkpoint.pth", weights_only=True)["train_state"]
    head = state["head"]
    assert head["prototypes.1.weight"].shape == (5, 16) and head["projection.0.weight"].shape == (32, 4096)


# VGG16 at 32 px (its five pools leave one cell): a quarter of the 64 px cost, the same code path
@pytest.mark.parametrize("arch", ["alexnet --no-sobel", "vgg16 --image-size 32", "timm:resnet18",
                                  "tv:resnet18 --sobel"])
def test_every_backbone_family_trains(images, tmp_path, arch):
    name, *flags = arch.split()
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--data", str(images), "--epochs", "1", "--out", str(run),
                                       "--arch", name, *TINY, *flags, "--set", "small_crop_size=32"])
    assert result.exit_code == 0, result.output
    assert _metrics(run)[0]["loss"] > 0
    assert dcbench.load_backbone(str(run / "checkpoint.pth")).arch == name


def test_prototypes_stay_the_centroids_and_dropout_is_off(images, tmp_path):
    from dcbench.train.dcv2 import setup, train_one_epoch
    from dcbench.train.distributed import DistInfo

    cfg = resolve_config({"method": "deepcluster-v2", "data": str(images), "out": str(tmp_path / "run"),
                          "arch": "alexnet", "image_size": 64, "batch_size": 8, "workers": 0, "epochs": 1,
                          "prototypes": [4], "hidden_mlp": 16, "feat_dim": 8, "small_crops": 0})
    t = setup(cfg, DistInfo(), resume=False)
    # the bank must hold projections of the views, not of dropout masks
    assert all(m.p == 0 for m in t.net.modules() if isinstance(m, torch.nn.Dropout))
    train_one_epoch(t)
    ts = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)["train_state"]
    centroids = ts["head"]["prototypes.0.weight"]
    assert torch.allclose(centroids.norm(dim=1), torch.ones(4), atol=1e-5)  # still the unit k-means centroids


def test_kill_9_mid_epoch_then_resume_gives_identical_weights(images, tmp_path):
    args = ["train", "--data", str(images), "--epochs", "3", "--checkpoint-every", "1", *SMALL_NET, *TINY,
            "--batch-size", "4"]  # 12 steps per epoch: a wide window for the kill to land in epoch 1
    straight = tmp_path / "straight"
    assert _cli(*args, "--out", str(straight)).returncode == 0

    killed = kill_in_epoch_1(args, tmp_path / "killed", after_iteration=2)
    resumed = _cli(*args, "--out", str(killed), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert [r["epoch"] for r in _metrics(killed)] == [0, 1, 2]
    a = torch.load(straight / "checkpoint.pth", weights_only=True)
    b = torch.load(killed / "checkpoint.pth", weights_only=True)
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    for key in a["train_state"]["head"]:
        assert torch.equal(a["train_state"]["head"][key], b["train_state"]["head"][key]), key
    assert torch.equal(a["train_state"]["bank"], b["train_state"]["bank"])
    assert _metrics(straight)[-1] == pytest.approx({**_metrics(killed)[-1], **{
        k: v for k, v in _metrics(straight)[-1].items() if k.startswith("time_")}})


def test_torchrun_two_processes(images, tmp_path):
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "dcbench", "train", "--data", str(images), "--epochs", "2", "--out", str(run), "--device", "cpu",
           *SMALL_NET, *TINY]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = _metrics(run)
    assert [r["epoch"] for r in records] == [0, 1]
    # 49 images, 2 processes of batch 8: 3 steps each, 48 bank rows, one image unreadable
    assert records[1]["iterations"] == 3 and records[1]["n_images"] == 47
    state = torch.load(run / "checkpoint.pth", weights_only=True)["train_state"]
    assert len(state["bank_rows"]) == 47  # both processes' rows reached the checkpoint


def test_small_data_preset_follows_the_stated_rules():
    v2 = small_data_settings("deepcluster-v2", 6000)
    assert (v2["batch_size"], v2["lr"], v2["prototypes"], v2["epochs"], v2["small_crops"], v2["image_size"]) == \
        (32, pytest.approx(0.6 * 32 / 256), [360, 360, 360], 10, 0, 64)
    assert v2["final_lr"] == pytest.approx(v2["lr"] / 1000) and v2["warmup_epochs"] == 0
    assert (v2["larc_trust"], v2["larc_clip"], v2["larc_exclude_1d"]) == (0.02, True, True)
    assert small_data_settings("deepcluster-v2", 6000, processes=2)["batch_size"] == 16
    assert small_data_settings("deepcluster-v2", 10**7)["prototypes"] == [3000, 3000, 3000]


def test_small_data_preset_gives_deepclusters_own_nets_its_sgd():
    # AlexNet/VGG16 (no BN in fc6/fc7): v1's SGD anchor 0.05 x B/256; at solo-learn's 0.6 x B/256
    # the loss stayed at ln(K) and the features fell below the random init (presets module doc)
    a = small_data_settings("deepcluster-v2", 6000, arch="alexnet")
    assert (a["optimizer"], a["lr"], a["final_lr"], a["batch_size"], a["prototypes"], a["epochs"]) == \
        ("sgd", pytest.approx(0.05 * 32 / 256), pytest.approx(0.05 * 32 / 256 / 1000), 32, [360, 360, 360], 10)
    two = small_data_settings("deepcluster-v2", 6000, processes=2, arch="vgg16")
    assert (two["batch_size"], two["lr"]) == (16, pytest.approx(0.05 * 32 / 256))  # lr follows the total batch
    r = small_data_settings("deepcluster-v2", 6000, arch="tv:resnet18")
    assert (r["optimizer"], r["lr"], r["larc_trust"]) == ("larc", pytest.approx(0.6 * 32 / 256), 0.02)
    cfg = resolve_config({"method": "deepcluster-v2", "preset": "small-data", "arch": "alexnet"}, n_images=6000)
    assert (cfg.optimizer, cfg.lr, cfg.final_lr) == ("sgd", pytest.approx(0.00625), pytest.approx(0.00625 / 1000))
    assert resolve_config({"method": "deepcluster-v2", "preset": "small-data"}, n_images=6000).optimizer == "larc"
    mine = resolve_config({"method": "deepcluster-v2", "preset": "small-data", "arch": "vgg16", "lr": 0.01,
                           "optimizer": "larc"}, n_images=6000)
    assert (mine.optimizer, mine.lr) == ("larc", 0.01)  # flags and --set still win


def test_small_data_preset_via_cli_and_overrides_win(images, tmp_path):
    cfg = resolve_config({"method": "deepcluster-v2", "preset": "small-data", "data": str(images), "epochs": 1})
    assert cfg.batch_size == 16 and cfg.prototypes == [3, 3, 3] and cfg.epochs == 1 and cfg.preset == "small-data"


def test_trainer_warns_about_too_few_steps_naming_the_preset():
    warnings = recipe_warnings(DCv2Config(batch_size=64), 5000)
    assert len(warnings) == 2 and "78 SGD steps" in warnings[0] and "--preset small-data" in warnings[0]
    assert "3000 prototypes" in warnings[1]
    small = resolve_config({"method": "deepcluster-v2", "preset": "small-data"}, n_images=5000)
    assert recipe_warnings(small, 5000) == []


def test_decoded_images_are_kept_across_epochs_with_the_same_weights(images, tmp_path):
    """decode_cache_gb (shared with v1): each image is decoded once per run, the loader workers fill
    the block, and the run's weights equal those of a run that decodes every epoch."""
    args = ["train", "--data", str(images), "--epochs", "2", *SMALL_NET, *TINY, "--workers", "2"]
    assert _cli(*args, "--out", str(tmp_path / "kept")).returncode == 0
    assert _cli(*args, "--out", str(tmp_path / "decoded"), "--set", "decode_cache_gb=0").returncode == 0
    kept, decoded = (torch.load(tmp_path / r / "checkpoint.pth", map_location="cpu", weights_only=False)
                     for r in ("kept", "decoded"))
    for name, value in kept["state_dict"].items():
        assert torch.equal(value, decoded["state_dict"][name]), name
    # 4 classes x 12 images + 1 corrupt file: the corrupt one is never stored; an epoch's dropped
    # last batch may leave an image unread until the next epoch
    counts = [m["decoded_in_memory"] for m in _metrics(tmp_path / "kept")]
    assert counts == sorted(counts) and counts[-1] == 48
    assert [m["decoded_in_memory"] for m in _metrics(tmp_path / "decoded")] == [None, None]


def test_multicrop_views_read_as_uint8_are_the_normalised_views_bit_for_bit(images):
    """The views travel as uint8 and each view position is scaled per batch on the device: the same
    random crops, jitter, greyscale and blur (drawn before ToTensor), the same inputs."""
    from dcbench.data import image_folder
    from dcbench.data.seeded import read_seeded
    from dcbench.train.multicrop import collate_views, multicrop_transform

    cfg = DCv2Config(image_size=64, small_crops=2)
    floats = image_folder(images, transform=multicrop_transform(cfg, fixed_input=False))
    pixels = image_folder(images, transform=multicrop_transform(cfg, fixed_input=False))
    pixels.transform, finish = pixels.transform.uint8_views()
    items = [(i, 1000 + i) for i in range(8)]
    expected, _, _ = collate_views([read_seeded(floats, i, s) for i, s in items])
    got, _, _ = collate_views([read_seeded(pixels, i, s) for i, s in items])
    assert len(got) == len(finish) == 4 and all(v.dtype == torch.uint8 for v in got)
    assert all(torch.equal(f(v), e) for f, v, e in zip(finish, got, expected))
