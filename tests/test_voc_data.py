"""The VOCdevkit reader (dcbench.data.voc) and its fixture generator (dcbench.data.synthetic_voc):
the real file formats, labels consistent with the XML, segmentation masks, and one-line errors
naming each missing or inconsistent piece."""
from __future__ import annotations

import hashlib
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from dcbench.data import DataError
from dcbench.data.synthetic_voc import make_voc
from dcbench.data.voc import (DIFFICULT, NEGATIVE, POSITIVE, VOC_CLASSES, VOID_LABEL, available_classes,
                              find_voc_dir, labels_from_annotations, load_segmentation_split, load_voc_split,
                              parse_annotation, read_class_set, voc_palette)

CLASSES = VOC_CLASSES[:4]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_voc(tmp_path_factory.mktemp("voc") / "data", classes=CLASSES)


@pytest.fixture
def copy_of(root, tmp_path):
    """A private copy of the fixture to break."""
    target = tmp_path / "data"
    shutil.copytree(root, target)
    return target, target / "VOCdevkit" / "VOC2007"


def one_line(excinfo: pytest.ExceptionInfo) -> str:
    text = str(excinfo.value)
    assert text and "\n" not in text
    return text


# ----------------------------------------------------------------------------- the fixture's format
def test_layout_and_file_formats(root):
    voc = root / "VOCdevkit" / "VOC2007"
    for sub in ("Annotations", "ImageSets/Main", "ImageSets/Segmentation", "JPEGImages", "SegmentationClass"):
        assert (voc / sub).is_dir()
    for split in ("train", "val", "trainval", "test"):
        ids = (voc / "ImageSets/Main" / f"{split}.txt").read_text().split()
        assert ids == sorted(ids) and all(re.fullmatch(r"\d{6}", i) for i in ids)
        for cls in CLASSES:  # the devkit's "%s %2d" lines
            lines = (voc / "ImageSets/Main" / f"{cls}_{split}.txt").read_text().splitlines()
            assert [line.split()[0] for line in lines] == ids
            assert all(re.fullmatch(r"\d{6} ( 1|-1| 0)", line) for line in lines)
    assert not (voc / "ImageSets/Main/bottle_train.txt").exists()  # classes outside the subset: absent
    train, val, trainval = (load_voc_split(root, s, classes=CLASSES) for s in ("train", "val", "trainval"))
    assert sorted(train.image_ids + val.image_ids) == trainval.image_ids
    assert not set(trainval.image_ids) & set(load_voc_split(root, "test", classes=CLASSES).image_ids)


def test_labels_follow_the_objects(root):
    for split in ("trainval", "test"):
        data = load_voc_split(root, split, classes=CLASSES)
        assert data.labels.shape == (len(data), 4) and data.labels.dtype == np.int8
        # the class files say what VOC derives from the XML: 1 / 0 (only difficult) / -1
        np.testing.assert_array_equal(labels_from_annotations(data.annotations(), CLASSES), data.labels)
        assert (data.labels == POSITIVE).any(axis=0).all()  # every class has positives in every split
        assert (data.labels == POSITIVE).any(axis=1).all()  # every image has a positive
    labels = load_voc_split(root, "trainval", classes=CLASSES).labels
    assert (labels == DIFFICULT).any() and (labels == NEGATIVE).any()


def test_annotation_fields(root):
    data = load_voc_split(root, "train", classes=CLASSES)
    anns = data.annotations()
    objects = [o for a in anns for o in a.objects]
    assert {a.width for a in anns} == {96} and {a.height for a in anns} == {80}
    assert all(a.filename == f"{a.image_id}.jpg" and a.depth == 3 and a.segmented for a in anns)
    assert any(o.difficult for o in objects) and any(o.truncated for o in objects)
    assert any(len(a.objects) >= 3 for a in anns)  # several objects per image
    for o in objects:
        x0, y0, x1, y1 = o.bbox
        assert 1 <= x0 <= x1 <= 96 and 1 <= y0 <= y1 <= 80 and o.name in CLASSES
    with Image.open(data.image_path(data.image_ids[0])) as img:
        assert img.size == (96, 80) and img.format == "JPEG"


def test_segmentation_masks(root):
    seg = load_segmentation_split(root, "val", year="2007")
    assert seg.image_ids == load_voc_split(root, "val", classes=None).image_ids
    indices = {VOC_CLASSES.index(c) + 1 for c in CLASSES}
    for image_id in seg.image_ids:
        with Image.open(seg.mask_path(image_id)) as mask:
            assert mask.mode == "P" and mask.getpalette()[:768] == voc_palette()
            values = set(np.unique(np.asarray(mask)).tolist())
        ann = parse_annotation(seg.voc_dir / "Annotations" / f"{image_id}.xml")
        visible = {VOC_CLASSES.index(o.name) + 1 for o in ann.objects if not o.difficult}
        assert VOID_LABEL in values and 0 in values and values - {0, VOID_LABEL} <= visible <= indices
    assert voc_palette()[3:6] == [128, 0, 0] and voc_palette()[-3:] == [224, 224, 192]


def test_voc2012_layout_and_determinism(tmp_path):
    first = make_voc(tmp_path / "a", classes=["cat", "dog"], year="2012", images_per_split={"train": 4, "val": 4},
                     segmented_fraction=0.5)
    again = make_voc(tmp_path / "b", classes=["cat", "dog"], year="2012", images_per_split={"train": 4, "val": 4},
                     segmented_fraction=0.5)
    train = load_voc_split(first, "train", year="2012", classes=["cat", "dog"])
    assert all(re.fullmatch(r"2008_\d{6}", i) for i in train.image_ids)
    assert len(load_segmentation_split(first, "train", year="2012")) == 2
    for rel in ("JPEGImages", "Annotations", "SegmentationClass", "ImageSets/Main"):
        files = sorted((first / "VOCdevkit/VOC2012" / rel).iterdir())
        twins = sorted((again / "VOCdevkit/VOC2012" / rel).iterdir())
        assert [hashlib.sha256(f.read_bytes()).hexdigest() for f in files] == \
               [hashlib.sha256(f.read_bytes()).hexdigest() for f in twins]
    with pytest.raises(DataError, match="no VOC2007 folder"):
        find_voc_dir(first, "2007")


# ----------------------------------------------------------------------------- reading
def test_root_forms_and_class_discovery(root):
    voc = root / "VOCdevkit" / "VOC2007"
    assert find_voc_dir(root) == find_voc_dir(root / "VOCdevkit") == find_voc_dir(voc) == voc
    assert available_classes(root, ["trainval", "test"]) == list(CLASSES)
    data = load_voc_split(voc, "test", classes=CLASSES)
    assert len(data.dataset()) == len(data) and data.dataset()[0][0].shape == (3, 80, 96)
    assert read_class_set(voc / "ImageSets/Main/bird_test.txt")[data.image_ids[0]] == data.labels[0, 2]


def test_fingerprint_follows_labels(copy_of):
    root, voc = copy_of
    before = load_voc_split(root, "test", classes=CLASSES).fingerprint()
    path = voc / "ImageSets/Main/boat_test.txt"
    path.write_text(path.read_text().replace(" 1\n", "-1\n", 1))
    assert load_voc_split(root, "test", classes=CLASSES).fingerprint() != before


# ----------------------------------------------------------------------------- errors: one line naming the piece
def test_missing_split_file(copy_of):
    root, voc = copy_of
    (voc / "ImageSets/Main/test.txt").unlink()
    with pytest.raises(DataError) as exc:
        load_voc_split(root, "test", classes=CLASSES)
    assert "ImageSets/Main/test.txt is missing" in one_line(exc) and "VOCtest_06-Nov-2007.tar" in one_line(exc)


def test_all_20_classes_are_required_by_default(root):
    with pytest.raises(DataError) as exc:
        load_voc_split(root, "train")
    assert "bottle_train.txt is missing" in one_line(exc)


def test_missing_jpeg(copy_of):
    root, voc = copy_of
    victim = load_voc_split(root, "test", classes=CLASSES).image_ids[3]
    (voc / "JPEGImages" / f"{victim}.jpg").unlink()
    with pytest.raises(DataError) as exc:
        load_voc_split(root, "test", classes=CLASSES)
    assert f"JPEGImages/{victim}.jpg is missing" in one_line(exc) and "ImageSets/Main/test.txt" in one_line(exc)


def test_inconsistent_class_file(copy_of):
    root, voc = copy_of
    path = voc / "ImageSets/Main/bird_val.txt"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(DataError) as exc:
        load_voc_split(root, "val", classes=CLASSES)
    assert "bird_val.txt is inconsistent with val.txt" in one_line(exc) and lines[0].split()[0] in one_line(exc)


def test_bad_label_line(copy_of):
    root, voc = copy_of
    path = voc / "ImageSets/Main/boat_train.txt"
    path.write_text(path.read_text().replace(" 1\n", " 2\n", 1))
    with pytest.raises(DataError) as exc:
        load_voc_split(root, "train", classes=CLASSES)
    assert "boat_train.txt line" in one_line(exc) and "1, -1 or 0" in one_line(exc)


def test_class_file_missing_for_one_split(copy_of):
    root, voc = copy_of
    (voc / "ImageSets/Main/bicycle_test.txt").unlink()
    with pytest.raises(DataError) as exc:
        available_classes(root, ["trainval", "test"])
    assert "bicycle_test.txt is missing" in one_line(exc)


def test_missing_annotation_and_bad_xml(copy_of):
    root, voc = copy_of
    data = load_voc_split(root, "train", classes=CLASSES)
    (voc / "Annotations" / f"{data.image_ids[0]}.xml").unlink()
    with pytest.raises(DataError) as exc:
        data.check_annotations()
    assert f"Annotations/{data.image_ids[0]}.xml is missing" in one_line(exc)
    (voc / "Annotations" / f"{data.image_ids[1]}.xml").write_text("<annotation><size>")
    with pytest.raises(DataError) as exc:
        data.annotation(data.image_ids[1])
    assert f"{data.image_ids[1]}.xml is not valid XML" in one_line(exc)


def test_missing_devkit(tmp_path):
    with pytest.raises(DataError) as exc:
        find_voc_dir(tmp_path / "nowhere")
    assert "is not a folder" in one_line(exc)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as exc:
        load_voc_split(tmp_path / "empty", "train")
    assert "no VOC2007 folder" in one_line(exc) and "VOCdevkit/VOC2007" in one_line(exc)
