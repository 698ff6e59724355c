"""Evaluation and data outputs: a truncated shard's error, panel names and
legend, the JSON report's per-class names, evaluate's --split / --base_scale /
--flip, the evaluation progress bar and labelled image grids; on real CamVid
with a cheap linear "model" (no network to compile)."""

import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import flagsaver
from conftest import REPO, tiny_finetune_config
from PIL import Image

from ddep_jax.evaluation import visualize
from ddep_jax.data import seg_datasets, seg_pipeline, tfds_sources
from ddep_jax.evaluation import evaluator

SPEC = seg_datasets.get_spec("camvid")
RNG = np.random.default_rng(0)
W = RNG.normal(size=(3, SPEC.num_classes)).astype(np.float32)
B = RNG.normal(size=(SPEC.num_classes,)).astype(np.float32)


class LinearModel:
    """Stands in for a TransUNet: per-pixel logits ``x @ w + b``."""

    def apply(self, variables, x, train=False):
        del train
        p = variables["params"]
        return x @ p["w"] + p["b"]


PARAMS = {"w": jnp.asarray(W), "b": jnp.asarray(B)}


def _source(data_dir, split="validation"):
    return seg_pipeline.SegmentationSource(
        seg_datasets.open_split(SPEC, split, data_dir), SPEC, split=split)


def test_truncated_shard_error_names_dataset_split_and_file(camvid_tfds, tmp_path):
    data_dir = tmp_path / "tfds"
    shutil.copytree(os.path.join(camvid_tfds, "camvid"), data_dir / "camvid")
    shards = sorted((data_dir / "camvid").glob("*/camvid-train.array_record*"))
    assert shards
    shard = shards[-1]
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 3)
    source = tfds_sources.load_data_source("camvid", "train", data_dir)
    assert str(shard) in source.shard_files()
    with pytest.raises(tfds_sources.CorruptRecordError) as e:
        for i in range(len(source)):
            source[i]
    message = str(e.value)
    print(message)
    assert "'camvid'" in message and "split 'train'" in message
    assert "record " in message and f"shard file: {shard}" in message
    assert "truncated or corrupt" in message
    assert tfds_sources.prepare_command("camvid", str(data_dir)) in message
    assert isinstance(e.value, OSError)
    # The other splits are intact.
    assert tfds_sources.load_data_source("camvid", "validation", data_dir)[0][
        "image"].shape == (360, 480, 3)


def test_report_per_class_names_and_panels_named_with_legend(camvid_tfds, tmp_path):
    """run_evaluation on 2 real validation images: the JSON carries
    {class name: IoU}, the PNGs are named by image file and have a legend."""
    from ddep_jax.evaluation.segmentation import run_evaluation

    config = tiny_finetune_config(**{"data.data_dir": camvid_tfds})
    report = run_evaluation(config, SPEC, LinearModel(), PARAMS, "validation",
                            str(tmp_path), 5, max_images=2, num_visualize=2)
    saved = json.loads((tmp_path / "validation_00000005.json").read_text())
    for r in (report, saved):
        assert list(r["per_class"]) == list(SPEC.class_names)
        assert list(r["per_class"].values()) == r["per_class_iou"]
        keys = list(r)
        assert keys.index("per_class") == keys.index("per_class_iou") + 1
    print({k: v for k, v in saved.items() if k.startswith("per_class")})

    source = _source(camvid_tfds)
    stems = [os.path.splitext(source.records.record_name(i))[0] for i in range(2)]
    assert stems[0] == "0016E5_08059"
    files = sorted(os.listdir(tmp_path / "validation_00000005"))
    print(files)
    assert files == sorted(s + ".png" for s in stems)
    for i, stem in enumerate(stems):
        panel = np.asarray(Image.open(tmp_path / "validation_00000005" /
                                      f"{stem}.png").convert("RGB"))
        h, w = 360 + 2 * 2, 4 * (480 + 2) + 2  # the panels, as without legend
        assert panel.shape[0] > h and panel.shape[1] == w
        legend = panel[h:]
        label = source[i]["label"]
        colors = {tuple(c) for c in legend.reshape(-1, 3)}
        for c in np.unique(label):
            if c != seg_datasets.IGNORE_LABEL:
                assert tuple(SPEC.palette()[c]) in colors, SPEC.class_names[c]
        assert (legend.max(-1) < 60).sum() > 50  # dark text (names)
    # Records without a file name: panels fall back to the index.
    no_id = dataclasses.replace(SPEC, id_key=None)
    assert evaluator.panel_name(source, 3, no_id) == "00003"
    used = {"0016E5_08059"}
    assert evaluator.panel_name(source, 0, SPEC, used) == "0016E5_08059_00000"


def test_evaluate_split_names_base_scale_and_flip(camvid_tfds, tmp_path,
                                                   monkeypatch):
    from ddep_jax import evaluate
    from ddep_jax.common import writers

    # The dataset's own names (spec.splits values) and the config's (keys).
    spec = dataclasses.replace(SPEC, splits={"train": "train", "validation": "val",
                                             "test": "val"})
    assert evaluate.split_names(spec) == ["train", "validation", "test", "val"]
    for name in ("val", "validation", "test", "train"):
        assert evaluate.check_split(spec, name) == name
    assert evaluate.check_split(spec, "test[:5]") == "val[:5]"
    with pytest.raises(ValueError, match=r"'dev' is not a split of camvid; its "
                       r"splits are: train, validation, test, val\.$"):
        evaluate.check_split(spec, "dev")

    # An unknown --split: one line, before any checkpoint is read.
    workdir = tmp_path / "run"
    config = tiny_finetune_config(**{"data.data_dir": camvid_tfds})
    writers.write_json(str(workdir / "config.json"), config.to_dict())
    out = subprocess.run(
        [sys.executable, "-m", "ddep_jax.evaluate", f"--workdir={workdir}",
         "--split=val"], cwd=REPO, capture_output=True, text=True, timeout=300)
    print(out.stderr)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.strip().splitlines()[-1] == (
        "error: --split='val' is not a split of camvid; its splits are: train, "
        "validation, test.")
    assert "Traceback" not in out.stderr

    # --base_scale and --flip reach the protocol (2 real images via slicing).
    monkeypatch.setattr(evaluate, "load_finetuned", lambda workdir, step: {
        "config": config, "spec": SPEC, "model": LinearModel(), "params": PARAMS,
        "step": 3, "checkpoint": "fake"})
    assert config.data.base_scale == 0.25 and not config.eval.flip
    _run_main(evaluate, f"--workdir={workdir}", "--split=validation[:2]",
              "--base_scale=0.125", "--flip", "--num_visualize=1")
    report = json.loads((workdir / "eval_standalone" /
                         "validation[:2]_whole_00000003.json").read_text())
    print(report["protocol"], report["num_images"])
    assert report["protocol"] == {"scale": 0.125, "flip": True, "size_multiple": 16}
    assert report["num_images"] == 2 and report["checkpoint"] == "fake"
    with pytest.raises(SystemExit, match="--base_scale=0.0 must be > 0"):
        _run_main(evaluate, f"--workdir={workdir}", "--base_scale=0")


def _run_main(module, *args):
    """`module.main` with `args` parsed as its flags (restored afterwards)."""
    from absl import flags

    if "num_visualize" not in flags.FLAGS:  # evaluate's flags, defined once
        module.define_flags()
    with flagsaver.flagsaver():
        try:
            module.main(flags.FLAGS([module.__name__, *args]))
        finally:
            flags.FLAGS.unparse_flags()


class _Stream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_progress_bar_only_on_a_terminal(camvid_tfds, monkeypatch):
    source = _source(camvid_tfds, "test")
    logits_fn = evaluator.make_logits_fn(LinearModel(), PARAMS)
    outputs = {}
    for tty in (True, False):
        stream = _Stream(tty)
        monkeypatch.setattr(sys, "stderr", stream)
        result = evaluator.evaluate(logits_fn, source, SPEC, "whole",
                                    {"scale": 0.25, "flip": False}, max_images=2)
        monkeypatch.undo()
        assert result["num_images"] == 2
        outputs[tty] = stream.getvalue()
    print(repr(outputs[True][:200]))
    assert "eval camvid" in outputs[True] and "0/2" in outputs[True]
    assert "eval camvid" not in outputs[False] and "%|" not in outputs[False]


def test_image_grid_row_labels(tmp_path):
    rng = np.random.default_rng(1)
    rows = [rng.uniform(-1, 1, size=(3, 20, 24, 3)).astype(np.float32)
            for _ in range(3)]
    pad = 2
    plain, labelled = tmp_path / "plain.png", tmp_path / "labelled.png"
    visualize.save_image_grid(str(plain), rows, pad)
    labels = ["clean", "noisy 19.4 dB", "denoised 24.1 dB"]
    visualize.save_image_grid(str(labelled), rows, pad, row_labels=labels)
    # Without labels: exactly the grid as before (white, images at their cells).
    expected = np.full((3 * (20 + pad) + pad, 3 * (24 + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j in range(3):
            y, x = pad + i * (20 + pad), pad + j * (24 + pad)
            expected[y:y + 20, x:x + 24] = visualize.to_uint8(row[j])
    grid = np.asarray(Image.open(plain))
    np.testing.assert_array_equal(grid, expected)
    # With labels: the same grid to the right of a strip holding the text.
    out = np.asarray(Image.open(labelled))
    strip_width = out.shape[1] - grid.shape[1]
    assert out.shape[0] == grid.shape[0] and strip_width > 60
    np.testing.assert_array_equal(out[:, strip_width:], grid)
    dark = out[:, :strip_width].min(-1) < 128
    ink = [int(dark[pad + i * (20 + pad):pad + i * (20 + pad) + 20].sum())
           for i in range(3)]
    print(strip_width, ink)
    assert all(n > 10 for n in ink) and int(dark.sum()) == sum(ink)  # in its row
    with pytest.raises(ValueError, match="2 row_labels for 3 rows"):
        visualize.save_image_grid(str(labelled), rows, pad, row_labels=labels[:2])
