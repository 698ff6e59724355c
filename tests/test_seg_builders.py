"""Tests of the Cityscapes, ADE20K and PASCAL-Context builders and specs.

None of the three datasets can be downloaded here, so each test builds a tiny
fixture (64x32-pixel images, 2-3 per split) in the dataset's exact upstream
layout -- the zips / tars the datasets ship as, or their extracted folders --
prepares it with ``ddep_jax.data.prepare.prepare``, reads it back with
``load_data_source`` and checks the mapped labels of
``seg_datasets.get_spec(name).decode`` against mappings written out here
independently of the builders' tables.
"""

from __future__ import annotations

import io
import logging
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from ddep_jax.data import prepare as prepare_lib
from ddep_jax.data import seg_datasets
from ddep_jax.data import tfds_sources
from ddep_jax.data.builders import ade20k
from ddep_jax.data.builders import cityscapes
from ddep_jax.data.builders import manual_files
from ddep_jax.data.builders import pascal_context

W, H = 64, 32  # Fixture image size (pixels).


# ----------------------------------------------------------------- helpers --


def _rgb(seed: int, width: int = W, height: int = H) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def _encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _pattern(values, seed: int, width: int = W, height: int = H,
             dtype=np.uint8) -> np.ndarray:
    """A [height, width] label holding every one of ``values``, shuffled."""
    a = np.resize(np.asarray(values, dtype), height * width)
    return np.random.default_rng(seed).permutation(a).reshape(height, width)


def _write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def _write_zip(path: Path, files: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def _write_tar(path: Path, files: dict[str, bytes], mode: str = "w") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _read_all(tfds_name: str, split: str, data_dir: Path) -> list[dict]:
    source = tfds_sources.load_data_source(tfds_name, split, data_dir)
    return [source[i] for i in range(len(source))]


def _expected(raw: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    """Applies an explicit {raw value: class id} dict (every value listed)."""
    out = np.full(raw.shape, -1, np.int64)
    for value, target in mapping.items():
        out[raw == value] = target
    assert (out >= 0).all(), "test bug: a raw value is missing from the mapping"
    return out.astype(np.uint8)


# -------------------------------------------------------------- Cityscapes --

# Explicit label id -> train id for the ids written below (labels.py table).
_CS_MAPPING = {0: 255, 1: 255, 7: 0, 8: 1, 11: 2, 24: 11, 26: 13, 31: 16,
               33: 18, 9: 255}
_CS_CITIES = {  # upstream split folder -> [(city, seq, frame)]
    "train": [("aachen", 0, 19), ("aachen", 1, 19), ("bochum", 0, 313)],
    "val": [("frankfurt", 0, 294), ("lindau", 0, 19)],
    "test": [("berlin", 0, 19), ("bielefeld", 0, 19)],
}


def _cityscapes_files(label_values=tuple(_CS_MAPPING)):
    """{path: bytes} of leftImg8bit/ and gtFine/ plus {image_id: raw label}."""
    images, labels, raw = {}, {}, {}
    for s, (folder, frames) in enumerate(_CS_CITIES.items()):
        for j, (city, seq, frame) in enumerate(frames):
            image_id = f"{city}_{seq:06d}_{frame:06d}"
            stem = f"{folder}/{city}/{image_id}"
            label = _pattern(label_values, seed=10 * s + j)
            raw[image_id] = label
            images[f"leftImg8bit/{stem}_leftImg8bit.png"] = _encode(
                _rgb(10 * s + j), "PNG")
            labels[f"gtFine/{stem}_gtFine_labelIds.png"] = _encode(label, "PNG")
            # Files the builder must ignore.
            labels[f"gtFine/{stem}_gtFine_color.png"] = _encode(_rgb(99), "PNG")
            labels[f"gtFine/{stem}_gtFine_polygons.json"] = b"{}"
    images["README"] = labels["README"] = b"Cityscapes"
    images["license.txt"] = labels["license.txt"] = b"licence"
    return images, labels, raw


@pytest.fixture(scope="module")
def cityscapes_built(tmp_path_factory):
    root = tmp_path_factory.mktemp("cityscapes")
    images, labels, raw = _cityscapes_files()
    _write_zip(root / "manual" / cityscapes.IMAGES_ZIP, images)
    _write_zip(root / "manual" / cityscapes.LABELS_ZIP, labels)
    prepare_lib.prepare("cityscapes_seg", root / "manual", root / "data")
    return root / "data", images, raw


def test_cityscapes_from_zips(cityscapes_built):
    data_dir, images, raw = cityscapes_built
    spec = seg_datasets.get_spec("cityscapes")
    assert spec.tfds_name == "cityscapes_seg"
    train = _read_all(spec.tfds_name, spec.splits["train"], data_dir)
    val = _read_all(spec.tfds_name, spec.splits["validation"], data_dir)
    assert len(train) == 3 and len(val) == 2
    assert spec.splits["test"] == "validation"
    assert {r["image_id"] for r in val} == {b"frankfurt_000000_000294",
                                            b"lindau_000000_000019"}
    for split, records in (("train", train), ("val", val)):
        for i, record in enumerate(records):
            assert set(record) == {"image_id", "image_left", "segmentation_label"}
            assert record["image_left"].shape == (H, W, 3)
            assert record["image_left"].dtype == np.uint8
            assert record["segmentation_label"].shape == (H, W, 1)
            assert record["segmentation_label"].dtype == np.uint8
            image_id = record["image_id"].decode()
            city = image_id.split("_")[0]
            source = images[f"leftImg8bit/{split}/{city}/{image_id}_leftImg8bit.png"]
            np.testing.assert_array_equal(  # PNG: lossless, stored as is.
                record["image_left"], np.asarray(Image.open(io.BytesIO(source))))
            # Stored raw, mapped by the spec.
            np.testing.assert_array_equal(record["segmentation_label"][..., 0],
                                          raw[image_id])
            image, label = spec.decode(record, i, split)
            assert image.shape == (H, W, 3) and label.dtype == np.uint8
            np.testing.assert_array_equal(label, _expected(raw[image_id], _CS_MAPPING))


def test_cityscapes_spec_and_tables():
    spec = seg_datasets.get_spec("cityscapes")
    assert spec.num_classes == 19
    assert (spec.crop_size, spec.eval_mode) == (1024, "cityscapes")
    assert spec.class_names[0] == "road" and spec.class_names[18] == "bicycle"
    assert spec.class_colors[0] == (128, 64, 128)
    assert spec.class_colors[13] == (0, 0, 142)  # car
    assert spec.palette().shape == (256, 3)
    lut = np.asarray(spec.label_lut)
    assert lut.shape == (34,)
    assert sorted(set(lut.tolist()) - {255}) == list(range(19))
    assert int((lut != 255).sum()) == 19
    record = {"image_left": np.zeros((2, 2, 3), np.uint8),
              "segmentation_label": np.array([[[7], [34]], [[0], [0]]], np.uint8),
              "image_id": b"x_000000_000000"}
    with pytest.raises(ValueError, match=r"x_000000_000000.*\[34\]"):
        spec.decode(record)


def test_cityscapes_extracted_folders(tmp_path):
    images, labels, _ = _cityscapes_files()
    manual = _write_tree(tmp_path / "manual", {**images, **labels})
    builder = prepare_lib.prepare("cityscapes_seg", manual, tmp_path / "data")
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
        "train": 3, "validation": 2}


def test_cityscapes_label_out_of_range_names_file(tmp_path):
    images, labels, _ = _cityscapes_files()
    bad = "gtFine/val/lindau/lindau_000000_000019_gtFine_labelIds.png"
    labels[bad] = _encode(_pattern((7, 34, 255), seed=0), "PNG")
    _write_zip(tmp_path / "manual" / cityscapes.IMAGES_ZIP, images)
    _write_zip(tmp_path / "manual" / cityscapes.LABELS_ZIP, labels)
    with pytest.raises(ValueError, match=r"lindau_000000_000019_gtFine_labelIds\.png"
                       r".*\[34, 255\]"):
        prepare_lib.prepare("cityscapes_seg", tmp_path / "manual", tmp_path / "data")


def test_cityscapes_size_mismatch_and_missing_label(tmp_path):
    images, labels, _ = _cityscapes_files()
    name = "gtFine/train/bochum/bochum_000000_000313_gtFine_labelIds.png"
    labels[name] = _encode(_pattern((7,), seed=0, width=W // 2), "PNG")
    manual = _write_tree(tmp_path / "manual", {**images, **labels})
    with pytest.raises(ValueError) as excinfo:
        prepare_lib.prepare("cityscapes_seg", manual, tmp_path / "data")
    message = str(excinfo.value)
    assert "bochum_000000_000313_leftImg8bit.png" in message
    assert "bochum_000000_000313_gtFine_labelIds.png" in message
    assert f"{W}x{H}" in message and f"{W // 2}x{H}" in message

    (manual / name).unlink()
    with pytest.raises(ValueError, match=r"bochum_000000_000313_leftImg8bit\.png.* "
                       r"has no label"):
        prepare_lib.prepare("cityscapes_seg", manual, tmp_path / "data2")


def test_cityscapes_missing_files_raise_with_instructions(tmp_path):
    manual = tmp_path / "manual"
    _write_zip(manual / cityscapes.IMAGES_ZIP, _cityscapes_files()[0])
    with pytest.raises(FileNotFoundError) as excinfo:
        prepare_lib.prepare("cityscapes_seg", manual, tmp_path / "data")
    message = str(excinfo.value)
    assert "gtFine_trainvaltest.zip" in message
    assert "cityscapes-dataset.com" in message
    assert "--dataset=cityscapes_seg" in message


# ------------------------------------------------------------------ ADE20K --

# Explicit raw value -> class id for the values written below.
_ADE_MAPPING = {0: 255, 1: 0, 2: 1, 13: 12, 75: 74, 149: 148, 150: 149}


def _ade_files(label_values=tuple(_ADE_MAPPING)):
    files, raw = {}, {}
    root = ade20k.ROOT
    for s, (folder, prefix, n) in enumerate(
            (("training", "ADE_train", 3), ("validation", "ADE_val", 2))):
        for j in range(n):
            stem = f"{prefix}_{j + 1:08d}"
            image = _rgb(20 * s + j)
            if folder == "training" and j == 0:  # A greyscale JPEG, as upstream has.
                data = _encode(image[..., 0], "JPEG")
            else:
                data = _encode(image, "JPEG")
            files[f"{root}/images/{folder}/{stem}.jpg"] = data
            label = _pattern(label_values, seed=20 * s + j)
            raw[f"{stem}.jpg"] = label
            files[f"{root}/annotations/{folder}/{stem}.png"] = _encode(label, "PNG")
    files[f"{root}/objectInfo150.txt"] = b"Idx\tRatio\tTrain\tVal\tName\n"
    files[f"{root}/sceneCategories.txt"] = b"ADE_train_00000001 airport\n"
    return files, raw


@pytest.fixture(scope="module")
def ade_built(tmp_path_factory):
    root = tmp_path_factory.mktemp("ade20k")
    files, raw = _ade_files()
    _write_zip(root / "manual" / ade20k.ZIP_NAME, files)
    prepare_lib.prepare("ade20k", root / "manual", root / "data")
    return root / "data", files, raw


def test_ade20k_from_zip(ade_built):
    data_dir, files, raw = ade_built
    spec = seg_datasets.get_spec("ade20k")
    assert spec.num_classes == 150
    assert (spec.crop_size, spec.eval_mode) == (512, "multiscale")
    assert spec.splits["test"] == "validation"
    train = _read_all("ade20k", "train", data_dir)
    val = _read_all("ade20k", "validation", data_dir)
    assert len(train) == 3 and len(val) == 2
    assert {r["file_name"] for r in val} == {b"ADE_val_00000001.jpg",
                                             b"ADE_val_00000002.jpg"}
    for records in (train, val):
        for i, record in enumerate(records):
            assert set(record) == {"image", "annotation", "file_name"}
            assert record["image"].shape == (H, W, 3)
            assert record["image"].dtype == np.uint8
            assert record["annotation"].shape == (H, W, 1)
            assert record["annotation"].dtype == np.uint8
            name = record["file_name"].decode()
            np.testing.assert_array_equal(record["annotation"][..., 0], raw[name])
            image, label = spec.decode(record, i)
            np.testing.assert_array_equal(label, _expected(raw[name], _ADE_MAPPING))
    # RGB JPEGs are stored byte for byte; the greyscale one became RGB.
    by_name = {r["file_name"].decode(): r["image"] for r in train}
    source = files[f"{ade20k.ROOT}/images/training/ADE_train_00000002.jpg"]
    np.testing.assert_array_equal(by_name["ADE_train_00000002.jpg"],
                                  np.asarray(Image.open(io.BytesIO(source))))
    grey = by_name["ADE_train_00000001.jpg"]
    np.testing.assert_array_equal(grey[..., 0], grey[..., 2])


def test_ade20k_spec_tables():
    spec = seg_datasets.get_spec("ade20k")
    assert spec.class_names[:3] == ("wall", "building", "sky")
    assert spec.class_names[-1] == "flag" and len(set(spec.class_names)) == 150
    assert spec.class_colors[0] == (120, 120, 120)
    assert spec.class_colors[-1] == (92, 0, 255)
    record = {"image": np.zeros((1, 2, 3), np.uint8),
              "annotation": np.array([[[150], [151]]], np.uint8),
              "file_name": b"ADE_val_00000009.jpg"}
    with pytest.raises(ValueError, match=r"ADE_val_00000009\.jpg.*\[151\]"):
        spec.decode(record)


def test_ade20k_extracted_folder(tmp_path):
    files, _ = _ade_files()
    manual = _write_tree(tmp_path / "manual", files)
    for manual_dir in (manual, manual / ade20k.ROOT):  # Parent or the folder itself.
        builder = prepare_lib.prepare("ade20k", manual_dir,
                                     tmp_path / f"data_{manual_dir.name}")
        assert builder.info.splits["train"].num_examples == 3


def test_ade20k_bad_inputs_name_the_file(tmp_path):
    files, _ = _ade_files()
    name = f"{ade20k.ROOT}/annotations/validation/ADE_val_00000002.png"
    files[name] = _encode(_pattern((0, 150, 151, 200), seed=1), "PNG")
    manual = _write_tree(tmp_path / "manual", files)
    with pytest.raises(ValueError, match=r"ADE_val_00000002\.png.*\[151, 200\]"):
        prepare_lib.prepare("ade20k", manual, tmp_path / "data1")

    (manual / name).write_bytes(_encode(_pattern((0,), seed=1, height=H + 1), "PNG"))
    with pytest.raises(ValueError) as excinfo:
        prepare_lib.prepare("ade20k", manual, tmp_path / "data2")
    message = str(excinfo.value)
    assert "ADE_val_00000002.jpg" in message and "ADE_val_00000002.png" in message
    assert f"{W}x{H + 1}" in message

    (manual / name).unlink()
    with pytest.raises(ValueError, match=r"ADE_val_00000002\.jpg has no annotation"):
        prepare_lib.prepare("ade20k", manual, tmp_path / "data3")


def test_ade20k_missing_files_raise_with_instructions(tmp_path):
    (tmp_path / "manual").mkdir()
    (tmp_path / "manual" / "images.tar").write_bytes(b"not the release")
    with pytest.raises(FileNotFoundError) as excinfo:
        prepare_lib.prepare("ade20k", tmp_path / "manual", tmp_path / "data")
    assert "ADEChallengeData2016.zip" in str(excinfo.value)
    assert "--dataset=ade20k" in str(excinfo.value)


# ---------------------------------------------------------- PASCAL-Context --

# Explicit labels.txt id -> 59-class id for the ids written below.
_PC_MAPPING = {
    0: 255,    # unlabelled
    1: 255,    # accordion (not among the 59)
    2: 0,      # aeroplane
    100: 255,  # another of the 400 dropped classes
    284: 36,   # person
    397: 49,   # table
    458: 58,   # wood
}
_PC_SPLITS = {"train": ["2008_000002", "2008_000003", "2010_000001"],
              "val": ["2008_000007", "2009_000004"]}


def _labels_txt() -> bytes:
    names = {i: f"class{i}" for i in range(1, 460)}
    names.update({1: "accordion", 3: "air conditioner"})
    names.update(dict(pascal_context.CLASSES_59))
    names[308] = "potted plant"  # Spelling variants are tolerated.
    return "".join(f"{i}: {names[i]}\n" for i in range(1, 460)).encode()


def _59_labels_txt() -> bytes:
    renamed = {"table": "diningtable", "bedclothes": "bedcloth", "cloth": "clothes"}
    names = [renamed.get(n, n) for n in reversed(pascal_context.CLASS_NAMES)]
    return "".join(f"{i}: {n}\n" for i, n in enumerate(names, 1)).encode()


def _mat(label_map: np.ndarray) -> bytes:
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"LabelMap": label_map}, do_compression=True)
    return buf.getvalue()


def _pascal_files(label_values=tuple(_PC_MAPPING)):
    """({VOC tar member: bytes}, {trainval.tar.gz member: bytes}, {id: raw})."""
    voc, context, raw = {}, {}, {}
    root = pascal_context.VOC_ROOT
    for s, (split, ids) in enumerate(_PC_SPLITS.items()):
        voc[f"{root}/ImageSets/Main/{split}.txt"] = ("\n".join(ids) + "\n").encode()
        voc[f"{root}/ImageSets/Main/aeroplane_{split}.txt"] = b"2008_000002  1\n"
        for j, image_id in enumerate(ids):
            voc[f"{root}/JPEGImages/{image_id}.jpg"] = _encode(_rgb(30 * s + j), "JPEG")
            voc[f"{root}/Annotations/{image_id}.xml"] = b"<annotation/>"
            label_map = _pattern(label_values, 30 * s + j, dtype=np.uint16)
            raw[image_id] = label_map
            context[f"trainval/{image_id}.mat"] = _mat(label_map)
    voc[f"{root}/JPEGImages/2007_000999.jpg"] = _encode(_rgb(7), "JPEG")  # Unlisted.
    context["labels.txt"] = _labels_txt()
    return voc, context, raw


def _write_pascal(manual: Path, voc, context) -> Path:
    _write_tar(manual / pascal_context.VOC_TAR, voc)
    _write_tar(manual / pascal_context.CONTEXT_TAR, context, "w:gz")
    (manual / "59_labels.txt").write_bytes(_59_labels_txt())
    return manual


@pytest.fixture(scope="module")
def pascal_built(tmp_path_factory):
    root = tmp_path_factory.mktemp("pascal_context")
    voc, context, raw = _pascal_files()
    _write_pascal(root / "manual", voc, context)
    prepare_lib.prepare("pascal_context", root / "manual", root / "data")
    return root / "data", voc, raw


def test_pascal_context_from_archives(pascal_built):
    data_dir, voc, raw = pascal_built
    spec = seg_datasets.get_spec("pascal_context")
    assert (spec.num_classes, spec.crop_size, spec.eval_mode) == (59, 512, "multiscale")
    assert spec.label_lut is None and spec.splits["test"] == "validation"
    train = _read_all("pascal_context", "train", data_dir)
    val = _read_all("pascal_context", "validation", data_dir)
    assert len(train) == 3 and len(val) == 2
    assert sorted(r["file_name"].decode() for r in train) == [
        f"{i}.jpg" for i in _PC_SPLITS["train"]]
    for records in (train, val):
        for i, record in enumerate(records):
            assert set(record) == {"image", "segmentation_mask", "file_name"}
            assert record["image"].shape == (H, W, 3)
            assert record["image"].dtype == np.uint8
            assert record["segmentation_mask"].shape == (H, W, 1)
            assert record["segmentation_mask"].dtype == np.uint8
            image_id = record["file_name"].decode().removesuffix(".jpg")
            source = voc[f"{pascal_context.VOC_ROOT}/JPEGImages/{image_id}.jpg"]
            np.testing.assert_array_equal(
                record["image"], np.asarray(Image.open(io.BytesIO(source))))
            expected = _expected(raw[image_id], _PC_MAPPING)
            # Stored already mapped; decode validates and passes it through.
            np.testing.assert_array_equal(record["segmentation_mask"][..., 0], expected)
            _, label = spec.decode(record, i)
            np.testing.assert_array_equal(label, expected)


def test_pascal_context_tables():
    spec = seg_datasets.get_spec("pascal_context")
    names = spec.class_names
    assert (names[0], names[36], names[49], names[58]) == (
        "aeroplane", "person", "table", "wood")
    assert list(names) == sorted(names)  # Detail-API id order is alphabetical.
    ids = [i for i, _ in pascal_context.CLASSES_59]
    assert ids == sorted(ids) and len(set(ids)) == 59
    assert spec.class_colors[0] == (128, 0, 0)  # VOC colour map entry 1.
    assert len(set(spec.class_colors)) == 59 and (0, 0, 0) not in spec.class_colors
    assert manual_files.voc_colormap(4) == ((0, 0, 0), (128, 0, 0), (0, 128, 0),
                                            (128, 128, 0))


def test_pascal_context_extracted_folders(tmp_path, caplog):
    voc, context, _ = _pascal_files()
    manual = _write_tree(tmp_path / "manual", {**voc, **context})
    (manual / "59_labels.txt").write_bytes(b"1: aeroplane\n2: unicorn\n")
    with caplog.at_level(logging.WARNING):
        builder = prepare_lib.prepare("pascal_context", manual, tmp_path / "data")
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
        "train": 3, "validation": 2}
    assert "59_labels.txt names differ" in caplog.text


def test_pascal_context_bad_inputs_name_the_file(tmp_path):
    voc, context, _ = _pascal_files()
    context["trainval/2009_000004.mat"] = _mat(
        _pattern((2, 460, 999), 0, dtype=np.uint16))
    _write_pascal(tmp_path / "m1", voc, context)
    with pytest.raises(ValueError, match=r"2009_000004\.mat.*\[460, 999\]"):
        prepare_lib.prepare("pascal_context", tmp_path / "m1", tmp_path / "d1")

    context["trainval/2009_000004.mat"] = _mat(
        _pattern((2,), 0, width=H, dtype=np.uint16))
    _write_pascal(tmp_path / "m2", voc, context)
    with pytest.raises(ValueError) as excinfo:
        prepare_lib.prepare("pascal_context", tmp_path / "m2", tmp_path / "d2")
    message = str(excinfo.value)
    assert "2009_000004.jpg" in message and "2009_000004.mat" in message
    assert f"{W}x{H}" in message and f"{H}x{H}" in message

    del context["trainval/2009_000004.mat"]
    _write_pascal(tmp_path / "m3", voc, context)
    with pytest.raises(ValueError, match=r"trainval/2009_000004\.mat.* is missing"):
        prepare_lib.prepare("pascal_context", tmp_path / "m3", tmp_path / "d3")


def test_pascal_context_rejects_mismatching_labels_txt(tmp_path):
    voc, context, _ = _pascal_files()
    context["labels.txt"] = context["labels.txt"].replace(b"284: person", b"284: pig")
    _write_pascal(tmp_path / "manual", voc, context)
    with pytest.raises(ValueError, match=r"labels\.txt.*284: 'pig'"):
        prepare_lib.prepare("pascal_context", tmp_path / "manual", tmp_path / "data")


def test_pascal_context_missing_files_raise_with_instructions(tmp_path):
    voc, _, _ = _pascal_files()
    _write_tar(tmp_path / "manual" / pascal_context.VOC_TAR, voc)
    with pytest.raises(FileNotFoundError) as excinfo:
        prepare_lib.prepare("pascal_context", tmp_path / "manual", tmp_path / "data")
    message = str(excinfo.value)
    assert "trainval.tar.gz" in message and "roozbeh/pascal-context" in message
    assert "--dataset=pascal_context" in message


# -------------------------------------------------------------- registries --


def test_specs_and_prepare_registry():
    assert {"camvid", "cityscapes", "ade20k", "pascal_context"} <= set(
        seg_datasets.names())
    for name in ("cityscapes", "ade20k", "pascal_context"):
        spec = seg_datasets.get_spec(name)
        assert spec.tfds_name in prepare_lib.DATASETS
        assert len(spec.class_names) == len(spec.class_colors) == spec.num_classes
        assert spec.palette()[spec.num_classes:].sum() == 0


def test_manual_files_reads_folder_zip_and_tar(tmp_path):
    files = {"a/b.txt": b"one", "a/c/d.bin": b"two", "e.txt": b"three"}
    sources = [
        _write_tree(tmp_path / "tree", files),
        _write_zip(tmp_path / "x.zip", files),
        _write_tar(tmp_path / "x.tar", files),
        _write_tar(tmp_path / "x.tar.gz", files, "w:gz"),
    ]
    for location in sources:
        with manual_files.ManualFiles(location) as mf:
            assert mf.names() == sorted(files)
            assert mf.list("a") == ["a/b.txt", "a/c/d.bin"]
            assert mf.exists("a/c/d.bin") and not mf.exists("a/x")
            assert mf.is_dir("a/c") and not mf.is_dir("z")
            assert dict(mf.iter_read(["e.txt", "a/b.txt"])) == {
                "e.txt": b"three", "a/b.txt": b"one"}
            with pytest.raises(FileNotFoundError, match="nope"):
                mf.read("nope")
    assert manual_files.ManualFiles(sources[3]).compressed
    (tmp_path / "plain.txt").write_text("x")
    with pytest.raises(ValueError, match="neither a folder nor a zip or tar"):
        manual_files.ManualFiles(tmp_path / "plain.txt")
