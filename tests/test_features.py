"""Tests for dcbench.features: extraction, the on-disk feature cache, BN re-estimation and the
frozen-backbone check."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

from dcbench.checkpoint import resolve_checkpoint
from dcbench.data import DataError, eval_transform, image_folder
from dcbench.data.synthetic import make_image_folder
from dcbench.checkpoint import weights_sha256 as checkpoint_weights_sha256
from dcbench.digest import weights_sha256
from dcbench.features import (assert_unchanged, extract_features, extract_rows, feature_key, forward_pooled,
                              key_hash, numerics_id, pool_id, prepared_backbone, recalibrate_bn, shard_indices,
                              tensor_digests, wants_bn_recalibration)

SHA = "ab" * 32




@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("feat") / "data", n_classes=3, per_class=5,
                             image_size=32, corrupt=2)


@pytest.fixture()
def dataset(data_root):
    return image_folder(data_root / "train", transform=eval_transform(64))


@pytest.fixture()
def ckpt():
    return resolve_checkpoint("random:alexnet,size=64")


def count_forwards(backbone: nn.Module) -> list:
    """Wrap ``backbone.forward`` to record the taps of every call."""
    calls = []
    original = backbone.forward

    def forward(x, taps=None):
        calls.append(list(taps) if taps is not None else None)
        return original(x, taps=taps)

    backbone.forward = forward
    return calls


POOLS = {"conv1": nn.AdaptiveAvgPool2d(2), "conv2": nn.AdaptiveAvgPool2d(1)}


def test_extract_shapes_labels_and_skips(ckpt, dataset):
    out = extract_features(ckpt.backbone, dataset, ["conv1", "conv2"], POOLS, batch_size=4)
    n_readable = 15  # 3 classes x 5 images; the 2 corrupt files are skipped
    assert len(dataset) == 17
    assert out.features["conv1"].shape == (n_readable, 96 * 4)
    assert out.features["conv2"].shape == (n_readable, 256)
    assert out.features["conv1"].dtype == np.float32
    corrupt = {i for i, p in enumerate(dataset.paths) if "corrupt" in p}
    assert not corrupt & set(out.indices.tolist())
    assert out.labels.tolist() == [dataset.targets[i] for i in out.indices]
    feats, labels, indices = out  # unpacks like a tuple
    assert indices.dtype == np.int64 and len(labels) == n_readable


def test_extract_leaves_mode_and_weights(ckpt, dataset):
    ckpt.backbone.train()
    before = tensor_digests(ckpt.backbone)
    extract_features(ckpt.backbone, dataset, ["conv3"], batch_size=8)
    assert ckpt.backbone.training  # mode restored
    assert_unchanged(ckpt.backbone, before)  # eval mode during the pass: BN buffers untouched


def test_cache_hit_does_no_forward(ckpt, dataset, tmp_path):
    cache = tmp_path / "cache"
    calls = count_forwards(ckpt.backbone)
    first = extract_features(ckpt.backbone, dataset, ["conv1", "conv2"], POOLS, "t64", SHA, cache, batch_size=4)
    n_batches = len(calls)
    assert n_batches == 5 and all(c == ["conv1", "conv2"] for c in calls)  # ONE forward per batch for both taps
    second = extract_features(ckpt.backbone, dataset, ["conv1", "conv2"], POOLS, "t64", SHA, cache, batch_size=4)
    assert len(calls) == n_batches  # no forward at all
    for tap in ("conv1", "conv2"):
        np.testing.assert_array_equal(first.features[tap], second.features[tap])
    np.testing.assert_array_equal(first.indices, second.indices)
    np.testing.assert_array_equal(first.labels, second.labels)


def test_cache_layout_and_sidecar(ckpt, dataset, tmp_path):
    cache = tmp_path / "cache"
    extract_features(ckpt.backbone, dataset, ["conv1"], POOLS, "t64", SHA, cache, batch_size=8)
    folder = cache / SHA[:16]
    key = feature_key(SHA, "conv1", "t64", dataset.fingerprint(), pool_id(POOLS["conv1"]), device="cpu")
    stem = key_hash(key)
    assert sorted(p.name for p in folder.iterdir()) == sorted([f"{stem}.npy", f"{stem}.idx.npy", f"{stem}.json"])
    meta = json.loads((folder / f"{stem}.json").read_text())
    assert meta["key"]["tap"] == "conv1" and meta["key"]["transform"] == "t64"
    assert meta["key"]["pooling"] == "AdaptiveAvgPool2d(output_size=2)"
    assert meta["shape"] == [15, 384]


def test_partial_cache_extracts_only_missing_taps(ckpt, dataset, tmp_path):
    cache = tmp_path / "cache"
    extract_features(ckpt.backbone, dataset, ["conv1"], POOLS, "t64", SHA, cache, batch_size=8)
    calls = count_forwards(ckpt.backbone)
    out = extract_features(ckpt.backbone, dataset, ["conv1", "conv2"], POOLS, "t64", SHA, cache, batch_size=8)
    assert calls == [["conv2"]] * 3  # ceil(17 files / 8): conv1 is read, not recomputed
    assert set(out.features) == {"conv1", "conv2"}


@pytest.mark.parametrize("change", ["sha", "transform", "pool", "data"])
def test_cache_key_parts_cause_misses(ckpt, dataset, data_root, tmp_path, change):
    cache = tmp_path / "cache"
    extract_features(ckpt.backbone, dataset, ["conv1"], POOLS, "t64", SHA, cache, batch_size=8)
    calls = count_forwards(ckpt.backbone)
    args = {"sha": SHA, "transform": "t64", "pool": POOLS, "data": dataset}
    args[change] = {"sha": "cd" * 32, "transform": "t72", "pool": {"conv1": nn.AdaptiveAvgPool2d(3)},
                    "data": image_folder(data_root / "val", transform=eval_transform(64))}[change]
    extract_features(ckpt.backbone, args["data"], ["conv1"], args["pool"], args["transform"], args["sha"],
                     cache, batch_size=8)
    assert len(calls) > 0


def test_damaged_cache_entry_is_recomputed(ckpt, dataset, tmp_path):
    cache = tmp_path / "cache"
    first = extract_features(ckpt.backbone, dataset, ["conv2"], POOLS, "t64", SHA, cache, batch_size=8)
    for npy in (cache / SHA[:16]).glob("*.idx.npy"):
        npy.write_bytes(b"garbage")
    calls = count_forwards(ckpt.backbone)
    second = extract_features(ckpt.backbone, dataset, ["conv2"], POOLS, "t64", SHA, cache, batch_size=8)
    assert calls and np.allclose(first.features["conv2"], second.features["conv2"])


def test_no_cache_dir_writes_nothing_and_sha_required(ckpt, dataset, tmp_path):
    extract_features(ckpt.backbone, dataset, ["conv1"], POOLS, batch_size=8, cache_dir=None)
    assert not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match="ckpt_sha"):
        extract_features(ckpt.backbone, dataset, ["conv1"], POOLS, "t64", "", tmp_path / "c")


def test_pool_ids():
    assert pool_id(None) == "identity"
    assert pool_id(nn.AvgPool2d(6, 6, 3)) == "AvgPool2d(kernel_size=6, stride=6, padding=3)"

    def named(x):
        return x
    named.pool_id = "mine"
    assert pool_id(named) == "mine"
    with pytest.raises(ValueError, match="pool_id"):
        pool_id(lambda x: x)


def test_forward_pooled_one_pass(ckpt):
    calls = count_forwards(ckpt.backbone)
    out = forward_pooled(ckpt.backbone.eval(), torch.randn(2, 3, 64, 64), ["conv1", "conv5"],
                         {"conv1": nn.AdaptiveAvgPool2d(1)})
    assert calls == [["conv1", "conv5"]]
    assert out["conv1"].shape == (2, 96) and out["conv5"].shape == (2, 256 * 3 * 3)


def _bn_buffers(module: nn.Module) -> torch.Tensor:
    return torch.cat([m.running_mean for m in module.modules() if isinstance(m, nn.BatchNorm2d)])


def test_recalibrate_bn_changes_copy_only(ckpt, dataset):
    before = tensor_digests(ckpt.backbone)
    clone, info = recalibrate_bn(ckpt.backbone, dataset, batch_size=4, seed=0)
    assert clone is not ckpt.backbone
    assert info["ran"] and info["batches"] >= 3 and info["images"] >= 12
    assert not torch.equal(_bn_buffers(clone), _bn_buffers(ckpt.backbone))
    assert_unchanged(ckpt.backbone, before)  # the original keeps its stats
    assert not clone.training
    bns = [m for m in clone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.momentum == 0.1 for m in bns)  # momentum restored after the cumulative average
    again, _ = recalibrate_bn(ckpt.backbone, dataset, batch_size=4, seed=0)
    assert torch.allclose(_bn_buffers(again), _bn_buffers(clone))  # seeded: reproducible


def test_recalibrating_on_one_image_is_a_data_error_naming_the_setting(ckpt, tmp_path):
    """A batch of one image has no batch statistics: one line naming bn_recalibrate=off (was an
    internal RuntimeError after loading)."""
    root = make_image_folder(tmp_path / "one", n_classes=1, per_class=1, image_size=64, splits=None)
    one = image_folder(root, transform=eval_transform(64))
    with pytest.raises(DataError, match=r"^BatchNorm re-estimation needs a batch of 2 or more readable training "
                                        r"images \(1 listed\); add images or pass --set bn_recalibrate=off$"):
        recalibrate_bn(ckpt.backbone, one, batch_size=4, seed=0)


def test_recalibrate_without_batchnorm(dataset):
    class NoBN(nn.Module):
        conv_tap_names = ["conv"]

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x, taps=None):
            return {"conv": self.conv(x)}

    _, info = recalibrate_bn(NoBN(), dataset, batch_size=4)
    assert info == {"ran": False, "reason": "no BatchNorm layers"}


def test_wants_bn_recalibration():
    assert wants_bn_recalibration("auto", "random")
    assert not wants_bn_recalibration("auto", "dcbench")
    assert wants_bn_recalibration("on", "dcbench")
    assert not wants_bn_recalibration("off", "random")
    with pytest.raises(ValueError):
        wants_bn_recalibration("sometimes", "random")


def test_prepared_backbone(ckpt, dataset):
    with prepared_backbone(ckpt, "auto", dataset, batch_size=4) as (bb, sha, info):
        assert bb is not ckpt.backbone and info["ran"] and sha != ckpt.sha256
    trained = dataclasses.replace(ckpt, format="dcbench")
    with prepared_backbone(trained, "auto", dataset, batch_size=4) as (bb, sha, info):
        assert bb is ckpt.backbone and sha == ckpt.sha256
        assert info == {"ran": False, "setting": "auto", "reason": "not a random init (auto)"}


def test_assert_unchanged_names_the_tensor(ckpt):
    snapshot = tensor_digests(ckpt.backbone)
    assert_unchanged(ckpt.backbone, snapshot)
    ckpt.backbone.features[1].running_var.mul_(1.5)  # a BN buffer, not a weight
    with pytest.raises(RuntimeError, match=r"features\.1\.running_var"):
        assert_unchanged(ckpt.backbone, snapshot)


# ----------------------------------------------------------------------------- rows, shards, spill
class TwoRegions:
    """A per-region pool: the left and right halves of the map, max-pooled (B x 2 x C)."""

    per_region = True
    pool_id = "test-two-regions"

    def __call__(self, fmap):
        w = fmap.shape[-1] // 2
        return torch.stack([fmap[..., :w].amax(dim=(-2, -1)), fmap[..., w:].amax(dim=(-2, -1))], dim=1)


def test_shards_cover_the_dataset_and_concatenate_to_the_whole(ckpt, dataset):
    assert [list(shard_indices(17, (r, 3))) for r in range(3)] == [list(range(6)), list(range(6, 12)),
                                                                   list(range(12, 17))]
    assert list(shard_indices(2, (2, 3))) == []  # more ranks than images: an empty shard
    whole = extract_rows(ckpt.backbone, dataset, ["conv2"], POOLS, batch_size=4)
    parts = [extract_rows(ckpt.backbone, dataset, ["conv2"], POOLS, batch_size=4, shard=(r, 2)) for r in range(2)]
    assert [p.n_items for p in parts] == [9, 8] and whole.n_items == 17
    np.testing.assert_array_equal(np.concatenate([p.taps["conv2"].rows for p in parts]), whole.taps["conv2"].rows)
    np.testing.assert_array_equal(np.concatenate([p.taps["conv2"].owner for p in parts]), whole.taps["conv2"].owner)


def test_sharded_cache_entries_are_keyed_by_shard(ckpt, dataset, tmp_path):
    key = feature_key(SHA, "conv1", "t64", "fp", "p")
    assert feature_key(SHA, "conv1", "t64", "fp", "p", shard=(0, 1)) == key  # unsharded keys never change
    assert feature_key(SHA, "conv1", "t64", "fp", "p", shard=(1, 2))["shard"] == "1/2"
    cache = tmp_path / "cache"
    first = extract_rows(ckpt.backbone, dataset, ["conv1"], POOLS, "t64", SHA, cache, batch_size=8, shard=(1, 2))
    calls = count_forwards(ckpt.backbone)
    again = extract_rows(ckpt.backbone, dataset, ["conv1"], POOLS, "t64", SHA, cache, batch_size=8, shard=(1, 2))
    assert not calls and again.cached == ["conv1"] and again.seconds is None
    np.testing.assert_array_equal(first.taps["conv1"].owner, again.taps["conv1"].owner)
    extract_rows(ckpt.backbone, dataset, ["conv1"], POOLS, "t64", SHA, cache, batch_size=8, shard=(0, 2))
    assert calls  # the other shard is another entry


def test_spilled_rows_equal_ram_rows_and_leave_no_file(ckpt, dataset, tmp_path):
    ram = extract_rows(ckpt.backbone, dataset, ["conv1", "conv2"], POOLS, batch_size=4)
    disk = extract_rows(ckpt.backbone, dataset, ["conv1", "conv2"], POOLS, batch_size=4, spill_dir=tmp_path,
                        spill_over_bytes=0)
    assert isinstance(disk.taps["conv1"].rows, np.memmap)
    for tap in ("conv1", "conv2"):
        np.testing.assert_array_equal(disk.taps[tap].rows, ram.taps[tap].rows)
    assert not list(tmp_path.iterdir())  # unlinked as soon as mapped: nothing left, even after a crash


def test_per_region_rows_name_their_image_and_go_through_the_cache(ckpt, dataset, tmp_path):
    pools = {"conv5": TwoRegions(), "conv2": POOLS["conv2"]}
    out = extract_rows(ckpt.backbone, dataset, ["conv5", "conv2"], pools, "t64", SHA, tmp_path, batch_size=4)
    regions, images = out.taps["conv5"], out.taps["conv2"]
    assert regions.rows.shape == (2 * len(images.owner), 256)
    np.testing.assert_array_equal(regions.owner, np.repeat(images.owner, 2))
    again = extract_rows(ckpt.backbone, dataset, ["conv5"], pools, "t64", SHA, tmp_path, batch_size=4)
    np.testing.assert_array_equal(again.taps["conv5"].rows, regions.rows)
    with pytest.raises(ValueError, match="extract_rows"):
        extract_features(ckpt.backbone, dataset, ["conv5"], pools)


def test_one_tensor_hash_for_checkpoints_and_digests(ckpt):
    state = ckpt.backbone.backbone_state_dict()
    assert weights_sha256(state) == checkpoint_weights_sha256(state) == ckpt.sha256


# ----------------------------------------------------------------------------- cache checksums
def _entry_files(cache, suffix):
    return sorted(p for p in (cache / SHA[:16]).iterdir() if p.name.endswith(suffix) and
                  (suffix != ".npy" or not p.name.endswith(".idx.npy")))


@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize("damage", ["flip", "truncate"])
@pytest.mark.parametrize("which", [".npy", ".idx.npy"])
def test_corrupted_cache_file_is_detected_recomputed_and_rewritten(ckpt, dataset, tmp_path, caplog, mmap, damage,
                                                                   which):
    cache = tmp_path / "cache"
    clean = extract_features(ckpt.backbone, dataset, ["conv2"], POOLS, "t64", SHA, cache, batch_size=8)
    (path,) = _entry_files(cache, which)
    good = path.read_bytes()
    data = bytearray(good)
    if damage == "flip":  # one byte of the data (not the header): np.load alone would not notice
        data[len(data) - 3] ^= 0x01
    else:
        del data[len(data) // 2:]
    path.write_bytes(bytes(data))
    calls = count_forwards(ckpt.backbone)
    with caplog.at_level("WARNING", logger="dcbench"):
        again = extract_features(ckpt.backbone, dataset, ["conv2"], POOLS, "t64", SHA, cache, batch_size=8, mmap=mmap)
    assert calls, "the corrupted entry was used instead of recomputed"
    assert sum("is corrupted" in r.getMessage() for r in caplog.records) == 1
    np.testing.assert_array_equal(clean.features["conv2"], again.features["conv2"])
    np.testing.assert_array_equal(clean.indices, again.indices)
    assert path.read_bytes() == good  # rewritten
    calls.clear()
    third = extract_features(ckpt.backbone, dataset, ["conv2"], POOLS, "t64", SHA, cache, batch_size=8, mmap=mmap)
    assert not calls and np.array_equal(third.features["conv2"], clean.features["conv2"])


def test_memmapped_entry_is_hashed_once_per_process(ckpt, dataset, tmp_path, monkeypatch):
    import dcbench.features as features

    cache = tmp_path / "cache"
    extract_features(ckpt.backbone, dataset, ["conv1"], POOLS, "t64", SHA, cache, batch_size=8)
    hashed = []
    real = features.file_sha256
    monkeypatch.setattr(features, "file_sha256", lambda p: hashed.append(p) or real(p))
    for _ in range(3):
        extract_features(ckpt.backbone, dataset, ["conv1"], POOLS, "t64", SHA, cache, batch_size=8, mmap=True)
    assert len(hashed) == 1


def test_entry_without_checksum_is_not_used(ckpt, dataset, tmp_path):
    cache = tmp_path / "cache"
    extract_features(ckpt.backbone, dataset, ["conv1"], POOLS, "t64", SHA, cache, batch_size=8)
    (meta_path,) = _entry_files(cache, ".json")
    meta = json.loads(meta_path.read_text())
    del meta["sha256"]  # as written before checksums existed
    meta_path.write_text(json.dumps(meta))
    calls = count_forwards(ckpt.backbone)
    extract_features(ckpt.backbone, dataset, ["conv1"], POOLS, "t64", SHA, cache, batch_size=8)
    assert calls and "sha256" in json.loads(meta_path.read_text())


# ----------------------------------------------------------------------------- numerics in the key
def test_key_names_device_precision_and_autocast():
    cpu = feature_key(SHA, "conv1", "t64", "fp", "p", device="cpu")
    assert cpu["cache_version"] == 2
    assert cpu["numerics"]["device"] == "cpu" and cpu["numerics"]["autocast"] == "off"
    assert {"cuda_matmul_allow_tf32", "cudnn_allow_tf32", "float32_matmul_precision"} <= set(cpu["numerics"])
    cuda = feature_key(SHA, "conv1", "t64", "fp", "p", device="cuda:1")
    assert cuda["numerics"]["device"] == "cuda" and key_hash(cuda) != key_hash(cpu)
    assert feature_key(SHA, "conv1", "t64", "fp", "p", device="cuda", amp=True)["numerics"]["autocast"] == "bfloat16"
    cpu_amp = feature_key(SHA, "conv1", "t64", "fp", "p", device="cpu", amp=True)  # bfloat16 autocast on the CPU too
    assert cpu_amp["numerics"]["autocast"] == "bfloat16" and key_hash(cpu_amp) != key_hash(cpu)
    old = dict(feature_key(SHA, "conv1", "t64", "fp", "p"), cache_version=1)  # a version-1 key
    assert key_hash(old) != key_hash(cpu)


def _precision_state() -> list:
    """Every precision switch torch has (the newer fp32_precision ones are the state behind allow_tf32)."""
    owners = [torch.backends, torch.backends.cuda.matmul, torch.backends.cudnn,
              getattr(torch.backends.cudnn, "conv", None), getattr(torch.backends.cudnn, "rnn", None),
              getattr(torch.backends, "mkldnn", None)]
    state = [(o, "fp32_precision", o.fp32_precision) for o in owners
             if o is not None and isinstance(getattr(o, "fp32_precision", None), str)]
    if state:  # torch >= 2.9: the flags follow these
        return state
    return [(torch.backends.cuda.matmul, "allow_tf32", torch.backends.cuda.matmul.allow_tf32),
            (torch.backends.cudnn, "allow_tf32", torch.backends.cudnn.allow_tf32)]


@pytest.mark.parametrize("switch", ["precision", "tf32_matmul", "tf32_cudnn"])
def test_precision_settings_cause_cache_misses(ckpt, dataset, tmp_path, switch):
    cache = tmp_path / "cache"
    extract_features(ckpt.backbone, dataset, ["conv1"], POOLS, "t64", SHA, cache, batch_size=8)
    calls = count_forwards(ckpt.backbone)
    precision, state = torch.get_float32_matmul_precision(), _precision_state()
    before = numerics_id("cpu")
    try:
        if switch == "precision":
            torch.set_float32_matmul_precision("high")
        else:  # the fp32_precision API where torch has it (mixing it with allow_tf32 leaves state behind)
            owner = torch.backends.cuda.matmul if switch == "tf32_matmul" else torch.backends.cudnn
            if isinstance(getattr(owner, "fp32_precision", None), str):
                owner = owner if switch == "tf32_matmul" else owner.conv
                owner.fp32_precision = "ieee" if owner.fp32_precision == "tf32" else "tf32"
            else:
                owner.allow_tf32 = not owner.allow_tf32
        assert numerics_id("cpu") != before
        extract_features(ckpt.backbone, dataset, ["conv1"], POOLS, "t64", SHA, cache, batch_size=8)
    finally:
        if switch == "precision":
            torch.set_float32_matmul_precision(precision)
        for owner, name, value in state:  # parents before children
            setattr(owner, name, value)
    assert numerics_id("cpu") == before  # nothing leaks into the other tests
    assert calls, "features computed under other precision settings were reused"
    assert len(_entry_files(cache, ".json")) == 2


@pytest.mark.parametrize("transform", [
    "center", "squash", "weights"])
def test_uint8_batches_are_the_normalised_inputs_bit_for_bit(data_root, transform):
    """Workers send uint8 pixels and each batch is scaled once (split_normalisation): the backbone
    sees exactly the tensors ToTensor + Normalize produce per image."""
    from torchvision import transforms as T

    from dcbench.data import skip_collate
    from dcbench.data.transforms import center_transform, split_normalisation, squash_transform
    from dcbench.data import uint8_batches

    chosen = {"center": center_transform(64), "squash": squash_transform(48),
              "weights": T.Compose([T.Resize(40), T.CenterCrop(36), T.ToTensor(),
                                    T.Normalize(mean=(0.5, 0.25, 0.125), std=(0.3, 0.7, 0.11))])}[transform]
    ds = image_folder(data_root / "train", transform=chosen)
    pixels, finish = uint8_batches(ds)
    assert finish is not None and pixels is not ds and ds.transform is chosen
    readable = [i for i in range(len(ds)) if ds[i] is not None]
    expected = skip_collate([ds[i] for i in readable])[0]
    batch = skip_collate([pixels[i] for i in readable])[0]
    assert batch.dtype == torch.uint8 and batch.shape == expected.shape
    assert torch.equal(finish(batch), expected)
    # anything else keeps its transform: random crops, ten crops, no normalisation
    assert split_normalisation(T.Compose([T.Resize(40), T.ToTensor()])) is None
    assert split_normalisation(T.Compose([T.ToTensor(), T.Normalize((0.5,), (0.5,)), T.RandomErasing()])) is None
    items = [ds[0]]
    assert uint8_batches(items)[0] is items and uint8_batches(items)[1] is None


def test_extract_rows_gives_the_per_image_normalised_features(ckpt, dataset):
    """extract_rows (uint8 batches) equals the forward of per-image ToTensor + Normalize inputs."""
    from dcbench.data import skip_collate

    rows = extract_rows(ckpt.backbone, dataset, ["conv2", "conv5"], batch_size=4, workers=0).taps
    readable = [i for i in range(len(dataset)) if dataset[i] is not None]
    ckpt.backbone.eval()
    direct = {"conv2": [], "conv5": []}
    for start in range(0, len(dataset), 4):  # the same batches (a batch's size moves the last bits)
        images = skip_collate([dataset[i] for i in range(start, min(start + 4, len(dataset)))])[0]
        for tap, value in forward_pooled(ckpt.backbone, images, ["conv2", "conv5"], {}).items():
            direct[tap].append(value.numpy())
    for tap in ("conv2", "conv5"):
        assert np.array_equal(rows[tap].rows, np.concatenate(direct[tap]))
        assert list(rows[tap].owner) == readable


def test_finished_batches_scale_each_batch_and_pass_empty_ones():
    """A batch with no readable image (an empty tensor, e.g. a rank's padding) passes unscaled."""
    from dcbench.data import FinishedBatches
    from dcbench.data.transforms import BatchNormalise

    pixels = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    empty = torch.empty(0, dtype=torch.long)
    loader = [(pixels, torch.tensor([1, 2]), torch.tensor([0, 1]), 0), (torch.empty(0), empty, empty, 2)]
    batches = FinishedBatches(loader, BatchNormalise((0.5, 0.25, 0.125), (0.5, 2.0, 4.0)), "cpu")
    assert len(batches) == 2
    (images, targets, _, _), (nothing, _, _, skipped) = list(batches)
    expected = (pixels.float() / 255 - torch.tensor([0.5, 0.25, 0.125]).view(1, 3, 1, 1)) \
        / torch.tensor([0.5, 2.0, 4.0]).view(1, 3, 1, 1)
    assert images.dtype == torch.float32 and torch.allclose(images, expected) and targets.tolist() == [1, 2]
    assert nothing.numel() == 0 and nothing.dtype == torch.float32 and skipped == 2


def test_waited_batches_count_the_time_spent_waiting_for_the_loader_only():
    """WaitedBatches adds up each next() (the workers' start and the loader's end included), never
    the loop body's time: what the metrics' ``time_*_wait_s`` report."""
    from dcbench.data import WaitedBatches

    now = [0.0]

    def loader():
        now[0] += 2.0  # starting the workers
        for i in range(3):
            now[0] += 0.5  # decoding and collating batch i
            yield i
        now[0] += 0.25  # the end of the epoch

    waited = WaitedBatches(loader(), clock=lambda: now[0])
    seen = []
    for batch in waited:
        now[0] += 10.0  # the forward and backward passes: not waiting
        seen.append(batch)
    assert seen == [0, 1, 2] and waited.seconds == 2.0 + 3 * 0.5 + 0.25
    assert len(WaitedBatches([[1], [2]])) == 2
