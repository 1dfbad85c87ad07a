"""Augmentations seeded per (seed, epoch, image): independent of loader workers and of the number
of processes (dcbench.data.seeded; the augmented linear probe, version 5)."""
import json

import pytest
import torch
from click.testing import CliRunner
from torch.utils.data import DataLoader
from torchvision import transforms

from dcbench.cli import main
from dcbench.data import skip_collate
from dcbench.data.datasets import image_folder
from dcbench.data.datasets import Padding
from dcbench.data.seeded import PAD, SeededOrder, SeededViews, augmentation_seed
from dcbench.data.synthetic import make_image_folder


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("s") / "shapes", n_classes=3, per_class=6, image_size=48,
                             corrupt=1)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks_read_the_one_process_order_with_pads_instead_of_repeats(world):
    data = list(range(19))
    one = SeededOrder(data, seed=7)
    ranks = [SeededOrder(data, seed=7, num_replicas=world, rank=r) for r in range(world)]
    for epoch in (0, 3):
        for sampler in (one, *ranks):
            sampler.set_epoch(epoch)
        single = one.items()
        assert sorted(i for i, _ in single) == data  # a permutation: every image once
        assert all(seed == augmentation_seed(7, epoch, i) for i, seed in single)
        interleaved = [item for k in range(len(ranks[0])) for r in ranks for item in [r.items()[k]]]
        assert [item for item in interleaved if item[0] != PAD] == single  # same images, same crop seeds
        assert all(item[0] == PAD for item in interleaved[len(data):])  # pads only after the last image
        assert {len(r) for r in ranks} == {-(-len(data) // world)}  # equal shares: the same step count
        assert sorted(i for r in ranks for i in r.indices()) == data
    one.set_epoch(1)
    assert [i for i, _ in one.items()] != [i for i, _ in single]  # reshuffled per epoch


def test_views_are_the_same_with_any_number_of_workers(shapes):
    crops = transforms.Compose([transforms.RandomResizedCrop(32), transforms.RandomHorizontalFlip(),
                                transforms.ToTensor()])
    dataset = image_folder(shapes / "train", transform=crops)
    order = SeededOrder(dataset, seed=3)
    order.set_epoch(2)

    def batches(workers: int) -> list[tuple]:
        loader = DataLoader(SeededViews(dataset), batch_size=5, sampler=order, num_workers=workers,
                            collate_fn=skip_collate)
        return [(images, idx, skipped) for images, _targets, idx, skipped in loader]

    zero, two = batches(0), batches(2)
    assert sum(skipped for *_, skipped in zero) == 1  # the corrupt image, dropped
    assert len(zero) == len(two)
    for (a, ia, _), (b, ib, _) in zip(zero, two):
        assert torch.equal(ia, ib) and torch.equal(a, b)
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    SeededViews(dataset)[(1, 99)]
    assert torch.equal(torch.rand(1), before)  # the caller's RNG is untouched
    pad = SeededViews(dataset)[(PAD, 0)]
    assert isinstance(pad, Padding)
    images, _targets, idx, skipped = skip_collate([pad, None, dataset[0]])
    assert (len(idx), skipped) == (1, 1)  # the unreadable image counts, the pad does not


def _records_with_workers(args: list[str], tmp_path) -> list[dict]:
    """The stored record of ``dcbench ARGS --json`` with workers=0, then with workers=2."""
    records = []
    for workers in (0, 2):
        result = CliRunner().invoke(main, [*args, "--json", "--set", f"workers={workers}", "--store",
                                           str(tmp_path / f"w{workers}.db")])
        assert result.exit_code == 0, result.output
        records.append(json.loads(result.stdout.strip().splitlines()[-1]))
    return records


def test_augmented_linear_probe_gives_the_same_numbers_with_any_workers(shapes, tmp_path):
    zero, two = _records_with_workers(
        ["eval", "--protocol", "linear", "--checkpoint", "random:alexnet,size=64", "--data", str(shapes), "--set",
         "image_size=64", "--set", "batch_size=8", "--set", "epochs=2", "--set", "lr=0.05", "--set",
         "taps=[conv1,conv3]"], tmp_path)
    assert zero["protocol_version"] == "5" and zero["extra"]["mode"] == "augmented"
    assert zero["extra"]["history_top1"] == two["extra"]["history_top1"] and zero["metrics"] == two["metrics"]


def test_voc07_cls_fine_tune_gives_the_same_numbers_with_any_workers(tmp_path):
    from dcbench.data.synthetic_voc import make_voc
    from dcbench.data.voc import VOC_CLASSES

    root = make_voc(tmp_path / "voc", classes=VOC_CLASSES[:3])
    zero, two = _records_with_workers(
        ["eval", "--protocol", "voc07-cls", "--checkpoint", "random:alexnet,size=64", "--data", str(root), "--set",
         "image_size=64", "--set", "iterations=4", "--set", "batch_size=4"], tmp_path)
    assert zero["metrics"] == two["metrics"] and any(m["metric"] == "mAP" for m in zero["metrics"])


def test_voc_det_fine_tune_gives_the_same_numbers_with_any_workers(tmp_path):
    from dcbench.data.synthetic_voc import make_voc
    from dcbench.data.voc import VOC_CLASSES
    from dcbench.protocol import EvalContext, get_protocol
    from dcbench.checkpoint import resolve_checkpoint
    from dcbench.settings import apply_settings

    root = make_voc(tmp_path / "voc", classes=VOC_CLASSES[:3])
    proto = get_protocol("voc-det")
    small = {"iterations": 6, "batch_size": 4, "lr": 0.02, "min_size": [128], "test_size": 128, "max_size": 200,
             "anchor_sizes": [64, 128], "rois_per_image": 16, "proposals_train": 50, "proposals_test": 20,
             "mode": "all"}
    results = []
    for workers in (0, 2):
        settings = apply_settings(proto.default_settings(), {**small, "workers": workers})
        out = proto.run(resolve_checkpoint("random:alexnet,size=96"), settings, root, EvalContext())
        results.append(({r.metric: r.value for r in out.metrics}, out.extra["loss"]))
    assert results[0] == results[1] and "AP50" in results[0][0]


def test_seeded_stream_ranks_share_one_process_batches():
    """Per-rank batches of B / N consecutive stream items make up one process's batch of B, with
    the same augmentation seeds; each pass over the data is one permutation."""
    from itertools import islice

    from dcbench.data.seeded import SeededStream

    data = list(range(7))
    one = list(islice(SeededStream(data, seed=3), 28))
    assert sorted(i for i, _ in one[:7]) == data and sorted(i for i, _ in one[7:14]) == data
    assert [i for i, _ in one[:7]] != [i for i, _ in one[7:14]]  # a new shuffle each pass
    ranks = [list(islice(SeededStream(data, seed=3, num_replicas=2, rank=r), 14)) for r in (0, 1)]
    for b in range(7):  # global batch b: 2 items per rank, 4 per process
        assert sorted(ranks[0][2 * b:2 * b + 2] + ranks[1][2 * b:2 * b + 2]) == sorted(one[4 * b:4 * b + 4])


def test_voc07_cls_decodes_each_image_once_with_the_same_numbers(tmp_path):
    """decode_cache_gb: training images (and the 10 random test passes) read decoded pixels kept in
    memory, filled by the loader workers; the record equals a run that decodes every pass."""
    from dcbench.data.synthetic_voc import make_voc
    from dcbench.data.voc import VOC_CLASSES

    root = make_voc(tmp_path / "voc", classes=VOC_CLASSES[:3])
    args = ["eval", "--protocol", "voc07-cls", "--checkpoint", "random:alexnet,size=64", "--data", str(root),
            "--set", "image_size=64", "--set", "iterations=6", "--set", "batch_size=4", "--set", "workers=2"]
    records = []
    for budget in ("4", "0"):
        result = CliRunner().invoke(main, [*args, "--set", f"decode_cache_gb={budget}", "--store",
                                           str(tmp_path / f"{budget}.db"), "--json"])
        assert result.exit_code == 0, result.output
        records.append(json.loads(result.output.strip().splitlines()[-1]))
    assert records[0]["metrics"] == records[1]["metrics"] and records[0]["extra"]["loss"] == records[1]["extra"]["loss"]
    assert records[0]["extra"]["decoded_in_memory"] == records[0]["extra"]["images"]["trainval"]
    assert records[1]["extra"]["decoded_in_memory"] is None
