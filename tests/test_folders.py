"""Own data in: an image folder for stage 2 and the mmsegmentation layout for
stage 3, both built in a temp folder from the real CamVid files of
../shared/data/camvid (linked, not copied into the project)."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from conftest import assert_resumes_bit_for_bit, SHARED_DATA, tiny_config, tiny_finetune_config
from PIL import Image

from ddep_jax.data import folders, pipeline, seg_datasets, seg_pipeline
from ddep_jax.trainers import loop

CAMVID = SHARED_DATA / "camvid"
MMSEG_SPLITS = {"train": "train", "val": "val", "test": "test"}


def _require_camvid():
    if not (CAMVID / "train" / "images").is_dir():
        pytest.skip(f"CamVid not found at {CAMVID}: put the shared data beside the "
                    "repo (../shared/data/camvid) to run real-data tests.")


def _link(src, dst):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    os.symlink(src, dst)


@pytest.fixture(scope="module")
def camvid_mmseg(tmp_path_factory):
    """CamVid in the mmseg layout: img_dir/{train,val,test}/*.jpg,
    ann_dir/.../*.png (links to the shared files) and classes.json."""
    _require_camvid()
    root = tmp_path_factory.mktemp("mmseg") / "camvid_mmseg"
    for split, sub in MMSEG_SPLITS.items():
        for name in os.listdir(CAMVID / split / "images"):
            _link(CAMVID / split / "images" / name, root / "img_dir" / sub / name)
        for name in os.listdir(CAMVID / split / "labels"):
            _link(CAMVID / split / "labels" / name, root / "ann_dir" / sub / name)
    shutil.copy(CAMVID / "classes.json", root / "classes.json")
    return root


def _train_jpgs(n):
    return sorted(os.listdir(CAMVID / "train" / "images"))[:n]


def _image_folder(root, n=20, bad=True):
    """n CamVid training photos in nested folders (a few re-encoded as PNG,
    WebP and greyscale), a non-image file, and one corrupt JPEG."""
    names = _train_jpgs(n)
    for i, name in enumerate(names):
        src = CAMVID / "train" / "images" / name
        sub = root / ("a" if i % 2 else "b/c")
        sub.mkdir(parents=True, exist_ok=True)
        if i == 1:
            Image.open(src).save(sub / (name[:-4] + ".PNG"))
        elif i == 2:
            Image.open(src).save(sub / (name[:-4] + ".webp"), lossless=True)
        elif i == 3:
            Image.open(src).convert("L").save(sub / (name[:-4] + ".png"))
        else:
            os.symlink(src, sub / name)
    (root / "a" / "notes.txt").write_text("not an image")
    if bad:
        data = (CAMVID / "train" / "images" / names[0]).read_bytes()
        (root / "a" / "truncated.jpg").write_bytes(data[:200])
    return root


def test_image_folder_records_equal_the_files(tmp_path):
    _require_camvid()
    root = _image_folder(tmp_path / "photos")
    skipped = tmp_path / "work" / "skipped_images.txt"
    source = folders.ImageFolderSource(str(root), "**/*", "skip", str(skipped))
    assert len(source) == 21 and "a/notes.txt" not in source.files
    assert source.files == sorted(source.files)
    for i, name in enumerate(source.files):
        record = source[i]
        if name == "a/truncated.jpg":
            assert record is None
            continue
        expected = np.asarray(Image.open(root / name).convert("RGB"))
        np.testing.assert_array_equal(record["image"], expected)
        assert record["image"].shape == (360, 480, 3) and record["image"].dtype == np.uint8
        assert record["file_name"] == name.encode()
    assert skipped.read_text() == "a/truncated.jpg\n" and source.skipped == ["a/truncated.jpg"]
    # A glob selects, and 'error' names the file.
    assert len(folders.ImageFolderSource(str(root), "b/**/*.jpg")) == 9  # 10 in b/c, one WebP
    strict = folders.ImageFolderSource(str(root), "**/*", "error")
    with pytest.raises(folders.BadImageError, match=r"a/truncated\.jpg"):
        strict[strict.files.index("a/truncated.jpg")]
    with pytest.raises(FileNotFoundError, match="no such folder"):
        folders.ImageFolderSource(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"no image files .*\*\.tif"):
        folders.ImageFolderSource(str(root), "*.tif")

    # Through the pipeline the corrupt file is filtered out: full batches,
    # the same stream again, the iterator state resumes exactly.
    ds = pipeline.make_train_dataset(source, image_size=(32, 32), batch_size=4, seed=0,
                                     num_threads=1, prefetch=1, skip_missing=True)
    it = iter(ds)
    batches = [next(it)["image"] for _ in range(12)]  # > 2 epochs of 20 images
    state = it.get_state()
    after = next(it)["image"]
    again = iter(ds)
    again.set_state(state)
    np.testing.assert_array_equal(next(again)["image"], after)
    np.testing.assert_array_equal(next(iter(ds))["image"], batches[0])
    assert all(b.shape == (4, 32, 32, 3) for b in batches)


def test_image_folder_edge_cases(tmp_path):
    """EXIF orientation, 16-bit greyscale, a skipped list that a resumed
    process extends, a folder of nothing decodable, a gs:// folder."""
    _require_camvid()
    root = tmp_path / "photos"
    root.mkdir()
    photo = Image.open(CAMVID / "train" / "images" / _train_jpgs(1)[0])  # 480x360
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees clockwise
    photo.save(root / "rotated.jpg", exif=exif)
    wide = (np.arange(64 * 32, dtype=np.uint16).reshape(32, 64) * 32)
    Image.fromarray(wide).save(root / "depth16.png")
    (root / "bad1.jpg").write_bytes(b"not a jpeg")
    (root / "bad2.png").write_bytes(b"not a png")
    listed = tmp_path / "skipped_images.txt"
    source = folders.ImageFolderSource(str(root), skipped_list=str(listed))
    rotated = source[source.files.index("rotated.jpg")]["image"]
    assert rotated.shape == (480, 360, 3)
    stored = np.asarray(Image.open(root / "rotated.jpg"))  # as stored: [360, 480]
    np.testing.assert_array_equal(rotated, np.rot90(stored, k=-1))  # clockwise
    depth = source[source.files.index("depth16.png")]["image"]
    np.testing.assert_array_equal(depth[..., 0], (wide >> 8).astype(np.uint8))
    assert source[source.files.index("bad1.jpg")] is None
    # A resumed run (a new process) adds its skips to the list.
    again = folders.ImageFolderSource(str(root), skipped_list=str(listed))
    assert again[again.files.index("bad2.png")] is None
    assert listed.read_text() == "bad1.jpg\nbad2.png\n"
    only_bad = folders.ImageFolderSource(str(root), "bad*")
    only_bad[0]
    with pytest.raises(folders.BadImageError, match=r"none of the 2 files"):
        only_bad[1]
    with pytest.raises(ValueError, match=r"gs://b/photos.*prepare"):
        folders.ImageFolderSource("gs://b/photos")


def test_ddep_on_an_image_folder_resumes_bit_for_bit(tmp_path):
    """DDeP on a folder of real photos with a corrupt file: straight vs killed
    and resumed give the same state; the skipped file is listed; a changed
    folder is refused on resume; 'error' stops naming the file."""
    _require_camvid()
    root = _image_folder(tmp_path / "photos")
    config = tiny_config(**{"data.source": "folder", "data.folder": str(root),
                            "total_steps": 4, "checkpoint_every": 2})
    assert_resumes_bit_for_bit(config, tmp_path)
    work = tmp_path / "resumed"
    assert (work / "skipped_images.txt").read_text() == "a/truncated.jpg\n"
    manifest = json.loads((work / "image_folder.json").read_text())
    assert manifest["num_files"] == 21 and manifest["folder"] == str(root)

    Image.new("RGB", (64, 48)).save(root / "a" / "added.png")
    with pytest.raises(ValueError, match=r"(?s)image_folder\.json.*21 files.*22"):
        loop.run(config, str(work))
    (root / "a" / "added.png").unlink()

    strict = tiny_config(**{"data.source": "folder", "data.folder": str(root),
                            "data.bad_images": "error", "total_steps": 4})
    with pytest.raises(folders.BadImageError, match=r"truncated\.jpg"):
        loop.run(strict, str(tmp_path / "strict"))
    with pytest.raises(ValueError, match=r"data\.folder"):
        loop.run(tiny_config(**{"data.source": "folder"}), str(tmp_path / "none"))


def test_mmseg_split_records_equal_the_files_and_the_tfds_records(
        camvid_mmseg, camvid_tfds):
    c = tiny_finetune_config(**{"data.source": "mmseg",
                                "data.folder": str(camvid_mmseg)})
    spec = seg_datasets.spec_for(c.data)
    camvid = seg_datasets.get_spec("camvid")
    assert spec.name == "camvid_mmseg" and spec.num_classes == 11
    assert spec.class_names == camvid.class_names
    assert spec.class_colors == camvid.class_colors
    assert spec.splits == {"train": "train", "validation": "val", "test": "test"}
    records = seg_datasets.open_split(spec, "validation")
    assert len(records) == 101
    window = seg_datasets.open_split(spec, "val[3:7]")  # --split='test[3:7]'
    assert [window.record_name(i) for i in range(4)] == [
        records.record_name(i) for i in range(3, 7)]
    pairs = seg_pipeline.SegmentationSource(records, spec)
    tfds_source = seg_pipeline.SegmentationSource(
        seg_datasets.open_split(camvid, "validation", camvid_tfds), camvid)
    tfds_names = [tfds_source.records.record_name(i) for i in range(101)]
    for i in (0, 57, 100):
        name = records.record_name(i)
        image = np.asarray(Image.open(CAMVID / "val" / "images" / name))
        label = np.asarray(Image.open(CAMVID / "val" / "labels" / (name[:-4] + ".png")))
        np.testing.assert_array_equal(pairs[i]["image"], image)
        np.testing.assert_array_equal(pairs[i]["label"], label)
        theirs = tfds_source[tfds_names.index(name)]
        np.testing.assert_array_equal(pairs[i]["image"], theirs["image"])
        np.testing.assert_array_equal(pairs[i]["label"], theirs["label"])
    assert sorted(tfds_names) == [records.record_name(i) for i in range(101)]


def _small_mmseg(root, n=4):
    """n CamVid validation pairs in the mmseg layout, writable (copies)."""
    names = sorted(os.listdir(CAMVID / "val" / "images"))[:n]
    for split in ("train", "val"):
        (root / "img_dir" / split).mkdir(parents=True)
        (root / "ann_dir" / split).mkdir(parents=True)
        for name in names:
            shutil.copy(CAMVID / "val" / "images" / name, root / "img_dir" / split / name)
            shutil.copy(CAMVID / "val" / "labels" / (name[:-4] + ".png"),
                        root / "ann_dir" / split / (name[:-4] + ".png"))
    return names


def _spec(root, **data):
    c = tiny_finetune_config(**{"data.source": "mmseg", "data.folder": str(root),
                                **{f"data.{k}": v for k, v in data.items()}})
    return seg_datasets.spec_for(c.data, c.model.num_outputs)


def test_mmseg_bad_pairs_sizes_labels_and_images_are_named(tmp_path):
    _require_camvid()
    root = tmp_path / "mine"
    names = _small_mmseg(root)
    stem = names[1][:-4]
    with pytest.raises(ValueError, match=r"classes\.json not found.*num_outputs"):
        _spec(root)
    spec = _spec(root, classes_file=str(CAMVID / "classes.json"))
    val = root / "ann_dir" / "val"

    # A label map without its image, and an image without its label map.
    (val / f"{stem}.png").rename(val / "orphan.png")
    with pytest.raises(ValueError, match=rf"(?s)1 images .*{names[1]}.*1 label maps.*orphan\.png"):
        seg_datasets.open_split(spec, "validation")
    (val / "orphan.png").rename(val / f"{stem}.png")

    # A label map of another size.
    label = Image.open(val / f"{stem}.png")
    label.resize((240, 180), Image.NEAREST).save(val / f"{stem}.png")
    with pytest.raises(ValueError, match=rf"{names[1]} \(360, 480\) vs {stem}\.png \(180, 240\)"):
        seg_datasets.open_split(spec, "validation")
    label.save(val / f"{stem}.png")

    # A label value outside the classes, named on decode.
    values = np.asarray(label).copy()
    values[0, 0] = 20
    Image.fromarray(values).save(val / f"{stem}.png")
    source = seg_pipeline.SegmentationSource(seg_datasets.open_split(spec, "validation"),
                                             spec, split="validation")
    with pytest.raises(ValueError, match=rf"{names[1]}.*values \[20\]"):
        source[1]
    label.save(val / f"{stem}.png")

    # A colour label map, and an unreadable image.
    label.convert("RGB").save(val / f"{stem}.png")
    with pytest.raises(folders.BadImageError, match=rf"{stem}\.png.*single-channel"):
        seg_datasets.open_split(spec, "validation")[1]
    label.save(val / f"{stem}.png")
    (root / "img_dir" / "val" / names[2]).write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(folders.BadImageError, match=names[2]):
        seg_datasets.open_split(spec, "validation")
    shutil.rmtree(root / "ann_dir")
    with pytest.raises(FileNotFoundError, match="no ann_dir"):
        _spec(root, classes_file=str(CAMVID / "classes.json"))


def test_mmseg_reduce_zero_label_and_classes_without_a_file(tmp_path):
    _require_camvid()
    root = tmp_path / "mine"
    _small_mmseg(root, n=2)
    (root / "classes.json").write_text(json.dumps(
        {"classes": ["a", "b", "c"], "palette": [[1, 2, 3], [4, 5, 6], [7, 8, 9]]}))
    spec = _spec(root, reduce_zero_label=True)
    assert spec.class_names == ("a", "b", "c") and spec.class_colors[2] == (7, 8, 9)
    assert spec.splits["test"] == "val"  # no test/ folder
    stored = np.array([[0, 1, 2], [3, 255, 1]], np.uint8)
    np.testing.assert_array_equal(spec.map_labels(stored),
                                  [[255, 0, 1], [2, 255, 0]])
    with pytest.raises(ValueError, match=r"values \[4\].*stored values 1\.\.3"):
        spec.map_labels(np.array([[4]], np.uint8))
    (root / "classes.json").unlink()
    c = tiny_finetune_config(**{"data.source": "mmseg", "data.folder": str(root),
                                "model.num_outputs": 11})
    spec = seg_datasets.spec_for(c.data, c.model.num_outputs)
    assert spec.class_names[10] == "class_10" and len(set(spec.class_colors)) == 11
    (root / "classes.json").write_text(json.dumps({"classes": [str(i) for i in range(256)]}))
    with pytest.raises(ValueError, match=r"256 classes; class ids are 0\.\.254"):
        _spec(root)
    (root / "classes.json").write_text('{"classes": [{"id": 1, "name": "x"}]}')
    with pytest.raises(ValueError, match=r"classes\.json.*ids must be 0\.\.C-1"):
        _spec(root)


def test_mmseg_folder_scores_like_tfds(tmp_path, camvid_mmseg, camvid_tfds):
    """A model evaluated on 21 validation pairs of the folder scores exactly
    as on the same pairs of the prepared TFDS CamVid (a fine-tuning on an
    mmseg folder runs in tests/test_examples.py)."""
    import jax.numpy as jnp

    from ddep_jax.evaluation import evaluator

    class PixelLinear:  # per-pixel logits x @ w: a model that compiles in no time
        def apply(self, variables, x, train=False):
            return x @ variables["params"]["w"]

    c = tiny_finetune_config(**{"data.source": "mmseg", "data.folder": str(camvid_mmseg),
                                "data.base_scale": 0.125})
    spec, camvid = seg_datasets.spec_for(c.data), seg_datasets.get_spec("camvid")
    w = jax.random.normal(jax.random.key(0), (3, 11))
    logits_fn = evaluator.make_logits_fn(PixelLinear(), {"w": w})
    mode, kwargs = evaluator.protocol(c.eval, c.data.base_scale)
    folder = seg_datasets.open_split(spec, "validation")
    records = seg_datasets.open_split(camvid, "validation", camvid_tfds)
    names = [records.record_name(i) for i in range(len(records))]
    picked = [folder.record_name(i) for i in range(0, 101, 5)]  # 21 pairs
    ours = evaluator.evaluate(logits_fn, seg_pipeline.SegmentationSource(
        folder, spec, list(range(0, 101, 5))), spec, mode, kwargs)
    theirs = evaluator.evaluate(logits_fn, seg_pipeline.SegmentationSource(
        records, camvid, [names.index(n) for n in picked]), camvid, mode, kwargs)
    assert ours["num_images"] == theirs["num_images"] == 21
    assert ours["num_pixels"] == theirs["num_pixels"] > 0
    assert ours["miou"] == theirs["miou"]
    assert ours["per_class_iou"] == theirs["per_class_iou"]


def test_folders_prepared_as_array_record_read_back_equal(tmp_path):
    """python -m ddep_jax.data.prepare --folder: both layouts become TFDS
    datasets whose records equal the folders' (the corrupt file left out),
    opened by name by stage 2 and stage 3."""
    import subprocess
    import sys

    from conftest import REPO, subprocess_env

    from ddep_jax.data import prepare, tfds_sources
    from ddep_jax.trainers import finetune

    _require_camvid()
    photos = _image_folder(tmp_path / "photos", n=8)
    data_dir = str(tmp_path / "tfds")
    out = subprocess.run(
        [sys.executable, "-m", "ddep_jax.data.prepare", f"--folder={photos}",
         "--layout=images", "--name=my_photos", f"--data_dir={data_dir}"],
        env=subprocess_env(), cwd=str(REPO), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Prepared my_photos 1.0.0" in out.stdout and "train=8" in out.stdout
    folder = folders.ImageFolderSource(str(photos))
    prepared = tfds_sources.load_data_source("my_photos", "train", data_dir)
    assert len(prepared) == 8  # 9 files, the truncated JPEG skipped
    for i in range(8):
        record = prepared[i]
        name = record["file_name"].decode()
        np.testing.assert_array_equal(
            record["image"], folder[folder.files.index(name)]["image"])
    from ddep_jax.trainers import ddep

    # Stage 2 opens it by name (the same reader as every prepared dataset).
    source = ddep.make_source(tiny_config(**{
        "data.source": "tfds", "data.name": "my_photos", "data.data_dir": data_dir}).data)
    assert len(source) == 8 and source[0]["image"].dtype == np.uint8

    root = tmp_path / "mine"
    _small_mmseg(root)
    (root / "ann_dir" / "val" / "extra.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"1 label maps .*extra\.png"):
        prepare.prepare_folder(str(root), "mmseg", "mine", data_dir,
                               classes_file=str(CAMVID / "classes.json"))
    (root / "ann_dir" / "val" / "extra.png").unlink()
    prepare.prepare_folder(str(root), "mmseg", "mine", data_dir,
                           classes_file=str(CAMVID / "classes.json"))
    config = tiny_finetune_config(**{"data.name": "mine", "data.data_dir": data_dir})
    finetune.validate(config, 1)
    spec = seg_datasets.spec_for(config.data)
    assert spec.class_names == seg_datasets.get_spec("camvid").class_names
    assert spec.splits == {"train": "train", "validation": "validation",
                           "test": "validation"}
    ours = _spec(root, classes_file=str(CAMVID / "classes.json"))
    direct = seg_pipeline.SegmentationSource(
        seg_datasets.open_split(ours, "validation"), ours)
    names = [direct.records.record_name(i) for i in range(4)]
    records = seg_datasets.open_split(spec, "validation", data_dir)
    through = seg_pipeline.SegmentationSource(records, spec)
    assert len(through) == 4
    for i in range(4):
        j = names.index(records.record_name(i))
        np.testing.assert_array_equal(through[i]["image"], direct[j]["image"])
        np.testing.assert_array_equal(through[i]["label"], direct[j]["label"])
    with pytest.raises(ValueError, match=r"config.data.name='nope'.*prepare --folder"):
        finetune.validate(tiny_finetune_config(**{"data.name": "nope",
                                                   "data.data_dir": data_dir}), 1)
