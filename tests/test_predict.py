"""`python -m ddep_jax.predict`: listing the images (folder, files, globs),
failing early on no images, size buckets (fewer compilations), end to end on
real CamVid test images with a tiny fine-tuned checkpoint."""

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, SHARED_DATA, tiny_finetune_config
from PIL import Image

from ddep_jax import predict
from ddep_jax.evaluation import evaluator
from ddep_jax.evaluation.segmentation import load_finetuned

CAMVID_TEST = SHARED_DATA / "camvid" / "test" / "images"


def _touch(*paths):
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    return [str(p) for p in paths]


def test_list_images_folder_files_globs(tmp_path):
    b, a, c = _touch(tmp_path / "b.png", tmp_path / "a.JPG", tmp_path / "sub" / "c.tif")
    _touch(tmp_path / "notes.txt", tmp_path / "sub" / "d.csv")
    # A folder: its images (any case of suffix), not recursive, sorted.
    assert predict.list_images(str(tmp_path)) == [a, b]
    # Files, comma-separated (spaces allowed), de-duplicated, sorted.
    assert predict.list_images(f"{c}, {b},{b}") == [b, c]
    # Globs: non-images skipped; '**' recursive; overlaps de-duplicated.
    assert predict.list_images(str(tmp_path / "*")) == [a, b]
    assert predict.list_images(str(tmp_path / "**")) == [a, b, c]
    assert predict.list_images(f"{tmp_path}/**/*.tif,{c},{tmp_path}/./sub/c.tif") == [c]
    assert predict.list_images(f"{tmp_path}/*.png,{tmp_path}/sub") == [b, c]
    # A single existing path is taken whole, even with a comma in its name.
    (odd,) = _touch(tmp_path / "x,y.png")
    assert predict.list_images(odd) == [odd]


def test_list_images_errors_name_the_paths(tmp_path):
    (txt,) = _touch(tmp_path / "notes.txt")
    (png,) = _touch(tmp_path / "a.png")
    with pytest.raises(SystemExit, match=r"not image files .*\.png.*: .*notes\.txt$"):
        predict.list_images(f"{png},{txt}")
    with pytest.raises(SystemExit, match="no such file or folder: .*nope.png"):
        predict.list_images(f"{png},{tmp_path / 'nope.png'}")
    (tmp_path / "empty").mkdir()
    for empty in (str(tmp_path / "empty"), str(tmp_path / "*.jpg")):
        with pytest.raises(SystemExit) as e:
            predict.list_images(empty)
        message = str(e.value)
        assert repr(empty) in message and ".jpg/.jpeg/.png" in message
        assert "\n" not in message


def test_output_stems_never_collide():
    paths = ["in/a.png", "in/a.jpg", "in/x/b.png", "in/y/b.png", "in/c.png"]
    assert predict.output_stems(paths) == ["a_png", "a_jpg", "x_b_png", "y_b_png", "c"]


def test_no_images_fails_before_loading_the_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="no image files"):  # not the workdir's error
        predict.segment_folder(str(tmp_path / "no_workdir"), str(tmp_path / "empty"),
                               str(out))
    _touch(tmp_path / "a.png")
    with pytest.raises(ValueError, match="multiple of 16"):
        predict.segment_folder(str(tmp_path / "no_workdir"), str(tmp_path), str(out),
                               size_multiple=100)
    assert not out.exists()


def test_cli_empty_input_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "ddep_jax.predict", f"--workdir={tmp_path / 'none'}",
           f"--images={tmp_path / 'empty'}/*.png", f"--output_dir={out}"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr
    assert res.stderr.strip().splitlines()[-1] == (
        f"--images='{tmp_path / 'empty'}/*.png': no image files "
        "(.jpg/.jpeg/.png/.bmp/.webp/.tif/.tiff) found.")
    assert not out.exists()
    res = subprocess.run(cmd[:-1] + [f"--output_dir={out}", "--size_multiple=24"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "multiple of 16" in res.stderr
    assert not out.exists()


@pytest.fixture(scope="module")
def finetuned_workdir(tmp_path_factory, camvid_tfds):
    """A tiny CamVid fine-tuning (from scratch, base_scale 0.25) stopped with
    its checkpoint after step 1 of 2, before the final evaluation (which
    predict does not need)."""
    from ddep_jax.trainers import loop

    workdir = str(tmp_path_factory.mktemp("ft_predict"))
    loop.run(tiny_finetune_config(total_steps=2, **{
        "data.data_dir": camvid_tfds, "eval.final_splits": (),
        "eval.num_visualize": 0}), workdir, stop_after_step=1)
    return workdir


def _model_compiles(run):
    """Entries in the jit cache of the run's model apply (one per input shape)."""
    return evaluator._APPLY_CACHE[id(run["model"])][1]._cache_size()


def test_size_buckets_share_one_compilation(finetuned_workdir, tmp_path, monkeypatch):
    source = Image.open(sorted(CAMVID_TEST.iterdir())[0])
    sizes = [(97, 201), (100, 190), (120, 250)]  # (H, W)
    for i, (h, w) in enumerate(sizes):
        source.resize((w, h)).save(tmp_path / f"im{i}.png")
    paths = predict.list_images(str(tmp_path / "*.png"))
    shapes = []  # model input shapes, per call
    make = evaluator.make_logits_fn

    def recording(model, params):
        fn = make(model, params)
        return lambda x: (shapes.append(tuple(x.shape)), fn(x))[1]

    monkeypatch.setattr(evaluator, "make_logits_fn", recording)
    labels = {}
    for multiple, compiles in ((128, 1), (16, 3)):
        run = load_finetuned(finetuned_workdir)  # a new model: an empty jit cache
        run["config"].data.base_scale = 1.0
        shapes.clear()
        out = tmp_path / f"out{multiple}"
        assert predict.segment_images(run, paths, str(out),
                                      size_multiple=multiple) == {}
        assert _model_compiles(run) == compiles == len(set(shapes))
        labels[multiple] = [np.asarray(Image.open(out / f"im{i}_labels.png"))
                            for i in range(3)]
        assert [lab.shape for lab in labels[multiple]] == sizes
    assert set(shapes) == {(1, 112, 208, 3), (1, 112, 192, 3), (1, 128, 256, 3)}
    agree = np.mean([np.mean(a == b) for a, b in zip(labels[128], labels[16])])
    print(f"labels agreeing between size multiples 128 and 16: {agree:.4f}")
    assert agree > 0.5  # the model sees the padding, so not always identical


def test_predict_glob_of_camvid_test_images(finetuned_workdir, tmp_path):
    pattern = str(CAMVID_TEST / "0001TP_0085[58]0.jpg")
    names = ["0001TP_008550", "0001TP_008580"]
    out = tmp_path / "out"
    assert predict.segment_folder(finetuned_workdir, pattern, str(out)) == {}
    assert sorted(os.listdir(out)) == sorted(
        f"{n}_{kind}.png" for n in names for kind in ("labels", "mask", "overlay"))
    for n in names:
        w, h = Image.open(CAMVID_TEST / f"{n}.jpg").size
        labels = np.asarray(Image.open(out / f"{n}_labels.png"))
        assert labels.shape == (h, w) and labels.dtype == np.uint8 and labels.max() < 11
        for kind in ("mask", "overlay"):
            assert np.asarray(Image.open(out / f"{n}_{kind}.png")).shape == (h, w, 3)


def test_predict_and_the_image_folders_take_the_same_files(tmp_path):
    """One set of image files: what `predict` lists in a folder is what the
    folder dataset lists (any case, .bmp and .tif included)."""
    from PIL import Image

    from ddep_jax.data import folders

    for name in ("a.PNG", "b.jpg", "c.bmp", "d.tif", "e.webp", "f.tiff", "g.jpeg"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    from_predict = [os.path.basename(p) for p in predict.list_images(str(tmp_path))]
    assert from_predict == folders.list_images(str(tmp_path), "*")
    assert len(from_predict) == 7
