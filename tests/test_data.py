"""Tests for dcbench.data: layouts, error messages, corrupt images, fingerprints, digits,
transforms and the synthetic fixtures."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from dcbench.data import (
    IMAGE_EXTENSIONS,
    IMAGENET_MEAN,
    DataError,
    ImageDataset,
    SkipCounter,
    dataset_fingerprint,
    digits_dataset,
    eval_transform,
    image_folder,
    open_training_data,
    skip_collate,
    train_transform,
    unlabelled_images,
    write_digits_imagefolder,
)
from dcbench.data.synthetic import make_file_list, make_image_folder, make_unlabelled_folder


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text and text
    return text


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_digits_imagefolder(tmp_path_factory.mktemp("digits"), image_size=16)


# ----------------------------------------------------------------- layouts


def test_image_folder_classes_targets_len(tmp_path: Path) -> None:
    make_image_folder(tmp_path, n_classes=3, per_class=5, splits=None)
    (tmp_path / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes
    (tmp_path / "class_01" / "notes.txt").write_text("not an image")
    nested = tmp_path / "class_02" / "more"
    nested.mkdir()
    shutil.copy(tmp_path / "class_02" / "0000.jpg", nested / "x.JPG")  # upper-case ext, nested

    ds = image_folder(tmp_path)
    assert ds.classes == ["class_00", "class_01", "class_02"]
    assert len(ds) == 16 and ds.has_labels
    assert ds.targets == [0] * 5 + [1] * 5 + [2] * 6
    image, target, index = ds[7]
    assert image.shape == (3, 48, 48) and target == 1 and index == 7
    assert ds.paths[-1].endswith("more/x.JPG")


def test_image_folder_keeps_empty_class_with_warning(tmp_path: Path, caplog) -> None:
    make_image_folder(tmp_path, n_classes=2, per_class=2, splits=None)
    (tmp_path / "class_00b").mkdir()
    with caplog.at_level(logging.WARNING, logger="dcbench"):
        ds = image_folder(tmp_path)
    assert ds.classes == ["class_00", "class_00b", "class_01"]
    assert ds.targets == [0, 0, 2, 2]
    assert "class_00b" in caplog.text


def test_image_folder_without_classes_is_an_error(tmp_path: Path) -> None:
    make_unlabelled_folder(tmp_path, n=3)
    with pytest.raises(DataError) as excinfo:
        image_folder(tmp_path)
    assert "no class subfolders" in one_line_error(excinfo)


def test_unlabelled_folder_is_recursive_and_sorted(tmp_path: Path) -> None:
    make_unlabelled_folder(tmp_path, n=6)
    make_unlabelled_folder(tmp_path / "sub", n=2)
    ds = unlabelled_images(tmp_path)
    assert len(ds) == 8 and not ds.has_labels and ds.targets is None and ds.classes is None
    names = [str(Path(p).relative_to(tmp_path)) for p in ds.paths]
    assert names[:6] == sorted(names[:6]) and names[6:] == ["sub/img_0000.jpg", "sub/img_0001.jpg"]
    assert any(n.endswith(".png") for n in names)
    image, target, index = ds[3]
    assert image.shape == (3, 48, 48) and target == -1 and index == 3


def test_file_list_relative_absolute_comments(tmp_path: Path) -> None:
    list_path = make_file_list(tmp_path / "a", n=5)
    ds = unlabelled_images(list_path)
    assert len(ds) == 5 and ds.root == str(list_path.parent)
    assert all(Path(p).is_file() for p in ds.paths)

    other = make_unlabelled_folder(tmp_path / "b", n=2)
    custom = tmp_path / "a" / "custom.txt"
    custom.write_text(
        "# header\n\n  images/img_0001.jpg  \n"
        f"{other / 'img_0000.jpg'}\n"   # absolute path
        "../b/img_0001.jpg\n"          # relative to the list's folder
        "   # indented comment\n"
    )
    ds = unlabelled_images(custom)
    assert ds.paths == [
        str(tmp_path / "a" / "images" / "img_0001.jpg"),
        str(other / "img_0000.jpg"),
        str(other / "img_0001.jpg"),
    ]
    assert all(ds[i] is not None for i in range(len(ds)))


# ----------------------------------------------------------------- open_training_data


def test_open_training_data_dispatch(tmp_path: Path) -> None:
    labelled = make_image_folder(tmp_path / "lab", n_classes=2, per_class=3, splits=None)
    flat = make_unlabelled_folder(tmp_path / "flat", n=4)
    listed = make_file_list(tmp_path / "lst", n=3)

    ds = open_training_data(labelled)
    assert ds.has_labels and ds.classes == ["class_00", "class_01"] and len(ds) == 6
    ds = open_training_data(flat)
    assert not ds.has_labels and len(ds) == 4
    ds = open_training_data(listed)
    assert not ds.has_labels and len(ds) == 3

    # Images at the top *and* in subfolders: nothing may be dropped, so no ImageFolder.
    make_unlabelled_folder(flat / "deeper", n=2)
    ds = open_training_data(flat)
    assert not ds.has_labels and len(ds) == 6


@pytest.mark.parametrize("case", ["missing", "empty", "no_images", "splits", "single_image",
                                  "binary_list", "empty_list"])
def test_open_training_data_errors(tmp_path: Path, case: str) -> None:
    target = tmp_path / "data"
    if case == "empty":
        target.mkdir()
    elif case == "no_images":
        (target / "docs").mkdir(parents=True)
        (target / "docs" / "readme.txt").write_text("hello")
    elif case == "splits":
        make_image_folder(target, n_classes=2, per_class=2)
    elif case == "single_image":
        make_unlabelled_folder(tmp_path, n=1)
        target = tmp_path / "img_0000.jpg"
    elif case == "binary_list":
        target.write_bytes(bytes(range(256)) * 4)
    elif case == "empty_list":
        target.write_text("# only a comment\n\n")

    with pytest.raises(DataError) as excinfo:
        open_training_data(target)
    message = one_line_error(excinfo)
    assert str(target) in message
    expected = {
        "missing": "no such file or folder",
        "empty": "it is empty",
        "no_images": "none ends in",
        "splits": f"pass {target / 'train'}",
        "single_image": "single image",
        "binary_list": "not a text file",
        "empty_list": "lists no images",
    }[case]
    assert expected in message


def test_file_list_bad_lines_name_the_file_and_line(tmp_path: Path) -> None:
    list_path = make_file_list(tmp_path, n=2)
    lines = list_path.read_text()

    list_path.write_text(lines + "images/notes.txt\n")
    with pytest.raises(DataError) as excinfo:
        open_training_data(list_path)
    message = one_line_error(excinfo)
    assert "images/notes.txt" in message and "line 5" in message and "not an image" in message

    list_path.write_text(lines + "images/gone.jpg\n")
    with pytest.raises(DataError) as excinfo:
        open_training_data(list_path)
    message = one_line_error(excinfo)
    assert str(tmp_path / "images" / "gone.jpg") in message and "does not exist" in message


# ----------------------------------------------------------------- corrupt images


def test_corrupt_images_return_none_and_are_skipped(tmp_path: Path) -> None:
    make_image_folder(tmp_path, n_classes=2, per_class=3, splits=None, corrupt=3)
    ds = image_folder(tmp_path, transform=eval_transform(32))
    assert len(ds) == 9
    items = [ds[i] for i in range(len(ds))]
    bad = [i for i, item in enumerate(items) if item is None]
    assert [Path(ds.paths[i]).name for i in bad] == ["corrupt_000.jpg", "corrupt_002.png",
                                                     "corrupt_001.jpg"]
    images, targets, indices, n_skipped = skip_collate(items)
    assert images.shape == (6, 3, 32, 32) and n_skipped == 3
    assert targets.dtype == torch.long and indices.tolist() == [i for i in range(9) if i not in bad]

    images, targets, indices, n_skipped = skip_collate([None, None])
    assert n_skipped == 2 and len(indices) == 0 and images.numel() == 0 and len(targets) == 0


def test_strict_raises_naming_the_path(tmp_path: Path) -> None:
    make_image_folder(tmp_path, n_classes=1, per_class=1, splits=None, corrupt=2)
    ds = image_folder(tmp_path, strict=True)
    assert ds[0] is not None
    for i in (1, 2):
        with pytest.raises(DataError) as excinfo:
            ds[i]
        message = one_line_error(excinfo)
        assert message.startswith(f"cannot read image {ds.paths[i]} (")
        assert message.count(ds.paths[i]) == 1 and "--strict" in message


def test_strict_error_stays_one_line_through_dataloader_workers(tmp_path: Path) -> None:
    make_image_folder(tmp_path, n_classes=1, per_class=2, splits=None, corrupt=1)
    ds = image_folder(tmp_path, transform=eval_transform(16), strict=True)
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=skip_collate)
    with pytest.raises(DataError) as excinfo:
        list(loader)
    message = one_line_error(excinfo)
    assert message.startswith(f"cannot read image {ds.paths[-1]} (")
    assert "Original Traceback" in excinfo.value.worker_traceback


@pytest.mark.parametrize("workers", [0, 2])
def test_dataloader_epoch_with_corrupt_files(tmp_path: Path, workers: int, caplog) -> None:
    make_image_folder(tmp_path, n_classes=3, per_class=4, splits=None, corrupt=4)
    ds = image_folder(tmp_path, transform=train_transform(24))
    loader = DataLoader(ds, batch_size=3, shuffle=True, num_workers=workers,
                        collate_fn=skip_collate, generator=torch.Generator().manual_seed(0))
    counter = SkipCounter(ds)
    n_images = 0
    for images, targets, indices, n_skipped in loader:
        counter.update(indices, n_skipped)
        n_images += len(indices)
        assert images.shape[0] == len(indices)
    assert n_images == 12 and counter.count == 4
    with caplog.at_level(logging.WARNING, logger="dcbench"):
        message = counter.report()
    first = next(p for p in ds.paths if "corrupt" in p)
    assert message == (f"skipped 4 unreadable images (first: {first}); "
                       "use --strict to stop at the first one")
    assert [r.getMessage() for r in caplog.records] == [message]
    assert counter.count == 0 and counter.report() is None  # reset for the next epoch


def test_skip_counter_with_expected_subset(tmp_path: Path) -> None:
    make_image_folder(tmp_path, n_classes=2, per_class=2, splits=None, corrupt=2)
    ds = image_folder(tmp_path)
    bad = [i for i in range(len(ds)) if ds[i] is None]
    subset = [bad[1], 0, 1]  # e.g. one rank's shard: only the second corrupt file
    counter = SkipCounter(ds)
    batch = skip_collate([ds[i] for i in subset])
    counter.update(batch[2], batch[3])
    assert counter.message(expected=subset) == (
        f"skipped 1 unreadable image (first: {ds.paths[bad[1]]}); "
        "use --strict to stop at the first one")
    bare = SkipCounter()  # without the dataset it can count but not name a file
    bare.update([0], 2)
    assert bare.message() == "skipped 2 unreadable images; use --strict to stop at the first one"


def test_greyscale_16bit_and_palette_images_become_rgb(tmp_path: Path) -> None:
    Image.fromarray(np.full((10, 12), 200, np.uint8)).save(tmp_path / "grey.png")
    Image.fromarray(np.full((10, 12), 40000, np.uint16)).save(tmp_path / "deep.png")
    pal = Image.new("P", (12, 10), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pal.png", transparency=0)
    ds = unlabelled_images(tmp_path)
    by_name = {Path(p).name: ds[i][0] for i, p in enumerate(ds.paths)}
    for image in by_name.values():
        assert image.shape == (3, 10, 12)
    assert torch.allclose(by_name["grey.png"], torch.full((3, 10, 12), 200 / 255))
    assert 0.5 < by_name["deep.png"].mean() < 0.7  # 40000/65535, not clipped to white
    assert by_name["pal.png"][:, 0, 0].tolist() == [1.0, 0.0, 0.0]


# ----------------------------------------------------------------- fingerprint


def test_fingerprint_stable_across_copies_and_sensitive_to_changes(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "a", n_classes=2, per_class=3, splits=None)
    fp = image_folder(tmp_path / "a").fingerprint()
    assert len(fp) == 16 and int(fp, 16) >= 0

    shutil.copytree(tmp_path / "a", tmp_path / "elsewhere" / "b")
    assert image_folder(tmp_path / "elsewhere" / "b").fingerprint() == fp

    copy = tmp_path / "elsewhere" / "b"
    shutil.copy(copy / "class_00" / "0000.jpg", copy / "class_00" / "extra.jpg")
    added = image_folder(copy).fingerprint()
    assert added != fp
    (copy / "class_00" / "extra.jpg").unlink()
    assert image_folder(copy).fingerprint() == fp

    with open(copy / "class_01" / "0001.jpg", "ab") as f:
        f.write(b"\0")  # same name, different size
    assert image_folder(copy).fingerprint() not in (fp, added)


def test_dataset_fingerprint_function(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "1.jpg").write_bytes(b"abc")
    (tmp_path / "2.jpg").write_bytes(b"abcd")
    fp = dataset_fingerprint(str(tmp_path), ["x/1.jpg", "2.jpg"])
    assert fp == dataset_fingerprint(str(tmp_path), ["2.jpg", "x/1.jpg"])  # order-free
    assert fp != dataset_fingerprint(str(tmp_path), ["2.jpg"])
    with pytest.raises(DataError) as excinfo:
        dataset_fingerprint(str(tmp_path), ["missing.jpg"])
    assert "missing.jpg" in one_line_error(excinfo)


def test_file_list_fingerprint_is_location_independent(tmp_path: Path) -> None:
    list_path = make_file_list(tmp_path / "one", n=4)
    fp = unlabelled_images(list_path).fingerprint()
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    assert unlabelled_images(tmp_path / "two" / list_path.name).fingerprint() == fp
    loose = ImageDataset([str(p) for p in sorted((tmp_path / "two" / "images").iterdir())])
    assert loose.fingerprint() == unlabelled_images(tmp_path / "one" / "images").fingerprint()


# ----------------------------------------------------------------- digits


def test_digits_dataset() -> None:
    ds = digits_dataset(image_size=20)
    assert len(ds) == 1797 and ds.classes == [str(d) for d in range(10)]
    assert sorted(set(ds.targets)) == list(range(10))
    image, target, index = ds[5]
    assert image.shape == (3, 20, 20) and target == ds.targets[5] and index == 5
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])  # grey -> RGB
    assert image.max() > 0.9 and image.min() < 0.1  # real strokes on a dark background
    assert ds.fingerprint() == digits_dataset(image_size=20).fingerprint()
    assert ds.fingerprint() != digits_dataset(image_size=16).fingerprint()
    timed = digits_dataset(image_size=32, transform=eval_transform(32))
    assert timed[0][0].shape == (3, 32, 32)


def test_write_digits_imagefolder_layout_and_stratification(digits_folder: Path) -> None:
    train, val = image_folder(digits_folder / "train"), image_folder(digits_folder / "val")
    assert train.classes == val.classes == [str(d) for d in range(10)]
    assert len(train) + len(val) == 1797 and abs(len(val) - 0.25 * 1797) <= 1
    counts_all = np.bincount(train.targets + val.targets, minlength=10)
    fractions = np.bincount(val.targets, minlength=10) / counts_all
    assert np.all(np.abs(fractions - 0.25) < 0.02)
    names = {Path(p).name for p in train.paths} | {Path(p).name for p in val.paths}
    assert len(names) == 1797  # the split is a partition
    with Image.open(train.paths[0]) as img:
        assert img.size == (16, 16)


def test_write_digits_imagefolder_is_idempotent(digits_folder: Path) -> None:
    some = next((digits_folder / "train" / "3").iterdir())
    before = some.stat().st_mtime_ns
    assert write_digits_imagefolder(digits_folder, image_size=16) == digits_folder
    assert some.stat().st_mtime_ns == before
    with pytest.raises(DataError) as excinfo:
        write_digits_imagefolder(digits_folder, image_size=24)
    assert str(digits_folder) in one_line_error(excinfo)


# ----------------------------------------------------------------- transforms


@pytest.mark.parametrize("size", [32, 224])
def test_transform_shapes(size: int) -> None:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), np.uint8))
    out = eval_transform(size)(img)
    assert out.shape == (3, size, size) and out.dtype == torch.float32
    assert train_transform(size)(img).shape == (3, size, size)
    assert train_transform(size, scale=(0.5, 1.0))(img.resize((20, 30))).shape == (3, size, size)
    assert eval_transform(size, resize=size)(img).shape == (3, size, size)


def test_eval_transform_normalises_with_imagenet_stats() -> None:
    grey = Image.new("RGB", (64, 64), (124, 116, 104))  # ~ the ImageNet mean colour
    out = eval_transform(32)(grey)
    expected = [(v / 255 - m) for v, m in zip((124, 116, 104), IMAGENET_MEAN)]
    assert np.allclose(out.mean((1, 2)).numpy() * np.array([0.229, 0.224, 0.225]), expected,
                       atol=1e-4)


# ----------------------------------------------------------------- synthetic fixtures


def test_make_image_folder_layout_and_determinism(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "a", n_classes=5, per_class=3, corrupt=2, seed=7)
    for split in ("train", "val"):
        files = sorted((root / split).rglob("*"))
        images = [p for p in files if p.is_file()]
        assert len(images) == 5 * 3 + 2
        assert all(p.suffix.lower() in IMAGE_EXTENSIONS for p in images)
    again = make_image_folder(tmp_path / "b", n_classes=5, per_class=3, corrupt=2, seed=7)
    first = (root / "val" / "class_04" / "0002.jpg").read_bytes()
    assert first == (again / "val" / "class_04" / "0002.jpg").read_bytes()
    other = make_image_folder(tmp_path / "c", n_classes=5, per_class=3, seed=8)
    assert first != (other / "val" / "class_04" / "0002.jpg").read_bytes()
    assert (root / "train" / "class_00" / "0000.jpg").read_bytes() != \
        (root / "val" / "class_00" / "0000.jpg").read_bytes()


def _pooled(ds: ImageDataset, grid: int) -> tuple[np.ndarray, np.ndarray]:
    feats = [F.adaptive_avg_pool2d(ds[i][0][None], grid).flatten().numpy() for i in range(len(ds))]
    return np.stack(feats), np.array(ds.targets)


@pytest.mark.parametrize("grid", [1, 3])
def test_make_image_folder_is_learnable(tmp_path: Path, grid: int) -> None:
    root = make_image_folder(tmp_path, n_classes=4, per_class=25)
    x_train, y_train = _pooled(image_folder(root / "train"), grid)
    x_val, y_val = _pooled(image_folder(root / "val"), grid)
    centroids = np.stack([x_train[y_train == c].mean(0) for c in range(4)])
    predicted = ((x_val[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    accuracy = (predicted == y_val).mean()
    assert accuracy > 0.6, accuracy  # chance is 0.25


def _pil_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        img.load()
        return np.asarray(img.convert("RGB"))


def test_jpegs_decode_to_the_pixels_pil_gives(tmp_path):
    """load_rgb decodes JPEGs with libjpeg-turbo through torchvision (faster): every pixel equals
    PIL's on real photographs saved at several qualities, chroma subsamplings, progressive and
    greyscale; CMYK goes through PIL; a truncated JPEG fails as PIL fails."""
    from sklearn.datasets import load_sample_images

    from dcbench.data import load_rgb
    from dcbench.data.datasets import _decode_jpeg

    files = []
    for n, photo in enumerate(load_sample_images().images):  # china.jpg and flower.jpg, 427 x 640
        image = Image.fromarray(photo)
        for quality, subsampling, progressive, size in [(95, 0, False, None), (75, 2, False, (123, 97)),
                                                        (90, 1, True, (320, 213)), (50, 2, True, None)]:
            path = tmp_path / f"{n}-{quality}-{subsampling}-{progressive}.jpg"
            (image if size is None else image.resize(size)).save(path, quality=quality, subsampling=subsampling,
                                                                 progressive=progressive)
            files.append(path)
        image.convert("L").save(tmp_path / f"{n}-grey.jpg", quality=85)
        files.append(tmp_path / f"{n}-grey.jpg")
    for path in files:
        assert _decode_jpeg(str(path)) is not None, path  # the fast path decoded it
        fast = load_rgb(str(path))
        assert fast.mode == "RGB" and np.array_equal(np.asarray(fast), _pil_rgb(path)), path

    cmyk = tmp_path / "cmyk.jpg"
    Image.fromarray(load_sample_images().images[0]).convert("CMYK").save(cmyk)
    assert _decode_jpeg(str(cmyk)) is None and np.array_equal(np.asarray(load_rgb(str(cmyk))), _pil_rgb(cmyk))
    png = tmp_path / "a.png"
    Image.fromarray(load_sample_images().images[1]).save(png)
    assert _decode_jpeg(str(png)) is None

    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(files[0].read_bytes()[:5000])
    assert _decode_jpeg(str(truncated)) is None
    with pytest.raises(OSError, match="truncated"):
        load_rgb(str(truncated))


def test_a_split_folder_passed_as_the_root_names_its_parent(tmp_path):
    """`--data ROOT/train` (a common slip) says to pass ROOT, not that ROOT/train/train is missing."""
    from dcbench.data.layouts import check_train_val

    root = make_image_folder(tmp_path / "if", n_classes=2, per_class=2, image_size=16)
    for split in ("train", "val"):
        with pytest.raises(DataError, match=rf"^{root / split} is one split of the data; pass its parent {root} "
                                            r"\(it holds train/ and val/\); expected layout for knn: L$"):
            check_train_val(root / split, "knn", "L")
    assert check_train_val(root, "knn", "L") == ["class_00", "class_01"]


class _Slow(torch.utils.data.Dataset):
    """Each image takes 20 ms to load."""

    def __len__(self) -> int:
        return 5

    def __getitem__(self, i: int) -> torch.Tensor:
        import time

        time.sleep(0.02)
        return torch.zeros(1)


def test_metered_waits_add_up_every_engine_loader_of_the_run():
    """A run's loops (any a protocol writes over the engine's loaders) report how long they
    waited for images: 5 images x 20 ms; a loop left early counts what it waited; no meter
    around a loader: it is a plain DataLoader."""
    from dcbench.data import MeteredLoader, metered_waits

    loader = MeteredLoader(_Slow(), batch_size=1)
    with metered_waits() as waits:
        assert len(list(loader)) == 5
        assert 0.1 <= waits.seconds < 1.0
        for _batch in loader:
            break
        assert 0.12 <= waits.seconds < 1.2
    before = waits.seconds
    assert len(list(loader)) == 5 and waits.seconds == before
