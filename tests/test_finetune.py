"""Stage 3: loss, checkpoint hand-over (exact, or a listed mismatch), config
errors, and fine-tuning + evaluation + resume on real CamVid."""

import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, read_tensorboard, tiny_config, tiny_finetune_config

from ddep_jax.checkpoints import handover, partial
from ddep_jax.data import seg_datasets, seg_pipeline
from ddep_jax.evaluation.segmentation import load_finetuned
from ddep_jax.models.transunet import build_model
from ddep_jax.objectives.segmentation import (class_frequencies, median_frequency_weights,
                                              segmentation_loss)
from ddep_jax.parallel.sharding import make_mesh, state_shardings
from ddep_jax.trainers import finetune, loop


def test_segmentation_loss_ignores_void_and_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 6, 4)).astype(np.float32)
    labels = rng.integers(0, 4, size=(2, 5, 6))
    labels[0, :2] = 255
    loss, count = segmentation_loss(jnp.asarray(logits), jnp.asarray(labels))
    valid = labels != 255
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -np.take_along_axis(logp, np.where(valid, labels, 0)[..., None],
                                   -1)[..., 0][valid].mean()
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert int(count) == valid.sum()


def test_class_weighted_loss_matches_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 5, 6, 4)).astype(np.float32)
    labels = rng.integers(0, 4, size=(2, 5, 6))
    labels[1, 3:] = 255
    weights = np.array([0.5, 2.0, 1.0, 4.0], np.float32)
    loss, count = segmentation_loss(jnp.asarray(logits), jnp.asarray(labels),
                                    class_weights=jnp.asarray(weights))
    valid = labels != 255
    safe = np.where(valid, labels, 0)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, safe[..., None], -1)[..., 0]
    w = np.where(valid, weights[safe], 0.0)
    np.testing.assert_allclose(float(loss), (w * ce).sum() / w.sum(), rtol=1e-5)
    assert int(count) == valid.sum()
    # All weights equal: the plain mean.
    plain, _ = segmentation_loss(jnp.asarray(logits), jnp.asarray(labels))
    same, _ = segmentation_loss(jnp.asarray(logits), jnp.asarray(labels),
                                class_weights=jnp.full(4, 3.0))
    np.testing.assert_allclose(float(same), float(plain), rtol=1e-6)


def test_median_frequency_weights_by_hand():
    """Eigen & Fergus's freq(c) = pixels of c / pixels of the images holding c;
    weight = median(freq) / freq(c); void pixels count nowhere."""
    a = np.array([[0, 0, 0, 1], [0, 0, 1, 255]], np.uint8)  # 7 non-void: 0 x5, 1 x2
    b = np.array([[2, 2, 0, 0], [255, 255, 255, 255]], np.uint8)  # 4: 2 x2, 0 x2
    pixels, image_pixels = class_frequencies([a, b], 4)
    np.testing.assert_array_equal(pixels, [7, 2, 2, 0])
    np.testing.assert_array_equal(image_pixels, [11, 7, 4, 0])
    freq = np.array([7 / 11, 2 / 7, 2 / 4])  # classes 0, 1, 2; median 1/2
    weights = median_frequency_weights(pixels, image_pixels)
    np.testing.assert_allclose(weights, [0.5 / freq[0], 0.5 / freq[1], 1.0, 1.0],
                               rtol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        class_frequencies([np.array([[5]], np.uint8)], 4)


@pytest.fixture(scope="module")
def ddep_workdir(tmp_path_factory):
    """A 2-step stage-2 run of the tiny model (its checkpoint is the input)."""
    workdir = str(tmp_path_factory.mktemp("ddep"))
    loop.run(tiny_config(total_steps=2), workdir)
    return workdir


def _saved_params(ddep_workdir):
    import orbax.checkpoint as ocp

    from ddep_jax.checkpoints.partial import resolve_state_dir

    state_dir, step = resolve_state_dir(ddep_workdir)
    assert step == 2
    return ocp.PyTreeCheckpointer().restore(state_dir)["params"]


def test_restore_copies_collections_exactly_and_reinitialises_head(
        tmp_path, ddep_workdir):
    """The hand-over of init.mode pretrained / encoder into the stage-3 state."""
    config = tiny_finetune_config()
    key = jax.random.key(config.seed)
    mesh = make_mesh(1)
    ts = loop.build_state(finetune.stage(config, mesh, data=False), config, 10, mesh,
                          key)
    fresh = jax.device_get(ts.init(key)["params"])
    saved = _saved_params(ddep_workdir)
    for mode in ("pretrained", "encoder"):
        config.init.mode, config.init.checkpoint = mode, ddep_workdir
        workdir = tmp_path / mode
        workdir.mkdir()
        state = handover.initialise(
            ts.init(key), ts.tx, ts.sharding, ddep_workdir,
            finetune.INIT_COLLECTIONS[mode], str(workdir), record={"mode": mode},
            pos_grid=handover.token_grid(config.model))
        params = jax.device_get(state["params"])
        chex.assert_trees_all_equal(params["encoder"], saved["encoder"])
        chex.assert_trees_all_equal(
            params["decoder"], saved["decoder"] if mode == "pretrained"
            else fresh["decoder"])
        # A new 11-class head, as a fresh init makes it (the denoising head had 3).
        assert params["head"]["kernel"].shape[-1] == 11
        assert saved["head"]["kernel"].shape[-1] == 3
        chex.assert_trees_all_equal(params["head"], fresh["head"])
        record = json.loads((workdir / "init.json").read_text())
        assert record["step"] == 2 and record["mode"] == mode
        assert record["checkpoint"].startswith(ddep_workdir)
        assert record["new"] == (["decoder", "head"] if mode == "encoder"
                                 else ["head"])


def _abstract_params(config, num_classes=11):
    model = build_model(config.model, num_classes)
    h, w = config.model.encoder.image_size
    abstract = jax.eval_shape(model.init, jax.random.key(0),
                              jnp.zeros((1, h, w, 3)))["params"]
    return abstract, state_shardings(abstract, make_mesh(1), "replicated", 1)


def test_checkpoint_of_another_architecture_lists_mismatches(ddep_workdir):
    config = tiny_finetune_config(**{"model.decoder_widths": (32, 16, 16, 8, 4),
                                     "model.encoder.vit_size": "Ti"})
    abstract, shardings = _abstract_params(config)
    with pytest.raises(ValueError) as e:
        partial.restore_collections(ddep_workdir, ("encoder", "decoder"),
                                          abstract, shardings)
    message = str(e.value)
    assert "does not match the model" in message
    assert "shape decoder/block4/" in message  # last decoder block: 8 -> 4 channels
    assert "shape encoder/Transformer/" in message  # ViT-mu -> Ti width


def test_missing_checkpoint_or_step_is_named(tmp_path, ddep_workdir):
    abstract, shardings = _abstract_params(tiny_finetune_config())
    with pytest.raises(FileNotFoundError, match="nope"):
        partial.restore_collections(str(tmp_path / "nope"), ("encoder",),
                                          abstract, shardings)
    with pytest.raises(FileNotFoundError, match=r"step 7 is not among .*\[2\]"):
        partial.restore_collections(ddep_workdir, ("encoder",), abstract,
                                          shardings, step=7)


@pytest.mark.parametrize("key,value,message", [
    ("init.mode", "imagenet", "init.mode"),
    ("init.mode", "pretrained", "needs a checkpoint"),
    ("data.label_fraction", "150%", "data.label_fraction"),
    ("data.name", "kitti", "data.name"),
    ("eval.mode", "tiles", "eval.mode"),
    ("data.crop_size", (30, 32), "data.crop_size"),
    ("model.num_outputs", 5, "camvid has 11 classes"),
    ("eval.final_splits", ("val",), "eval.final_splits"),
    ("optimizer.learning_rate", 0.0, "optimizer.learning_rate"),
])
def test_invalid_finetune_config_named(tmp_path, key, value, message):
    with pytest.raises(ValueError, match=message):
        loop.run(tiny_finetune_config(**{key: value}),
                                       str(tmp_path))


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, camvid_tfds, ddep_workdir):
    """Tiny fine-tuning on real CamVid from the DDeP checkpoint, killed after
    step 1 and resumed: (workdir, first call's result, second call's result)."""
    workdir = str(tmp_path_factory.mktemp("ft"))
    config = tiny_finetune_config(**{"data.data_dir": camvid_tfds,
                                     "init.mode": "pretrained",
                                     "init.checkpoint": ddep_workdir,
                                     "eval.final_max_images": 0})  # all 101
    first = loop.run(config, workdir, stop_after_step=1)
    return workdir, first, loop.run(config, workdir)


def test_finetune_and_evaluate_on_real_camvid_resumes(finetuned, camvid_tfds):
    workdir, first, result = finetuned
    assert first["step"] == 1 and first["eval"] == {}
    assert result["step"] == 2 and np.isfinite(result["loss"])
    assert [s for s, _ in result["history"]] == [2]  # resumed, not restarted

    subset = json.load(open(os.path.join(workdir, "labelled_subset.json")))
    assert subset["num_examples"] == 367 and subset["num_labelled"] == 13
    assert len(subset["ids"]) == 13 and all(i.endswith(".jpg") for i in subset["ids"])
    report = result["eval"]["validation"]
    saved = json.load(open(os.path.join(workdir, "eval", "validation_00000002.json")))
    assert saved["miou"] == report["miou"]
    present = [v for v in report["per_class_iou"] if v is not None]
    assert report["miou"] == pytest.approx(np.mean(present), abs=1e-12)
    assert report["num_images"] == 101 and len(report["per_class_iou"]) == 11
    # Every labelled pixel of the 101 full-size (360x480) validation labels is
    # scored (evaluation at base_scale 0.25, probabilities resized back).
    spec = seg_datasets.get_spec("camvid")
    source = seg_pipeline.SegmentationSource(
        seg_datasets.open_split(spec, "validation", camvid_tfds), spec)
    assert report["num_pixels"] == sum(
        int(np.sum(source[i]["label"] != seg_datasets.IGNORE_LABEL))
        for i in range(len(source)))
    panels = sorted(os.listdir(os.path.join(workdir, "eval", "validation_00000002")))
    assert len(panels) == 2
    tags = read_tensorboard(os.path.join(workdir, "tensorboard"))
    assert tags["validation/miou"] == [(2, "scalar")]
    for name in panels:  # the eval panels in TensorBoard's image tab too
        assert tags[f"validation/{name[:-4]}"] == [(2, "image")]

    # Another label fraction in the same workdir is refused; nothing is lost.
    other = tiny_finetune_config(**{"data.data_dir": camvid_tfds,
                                    "data.label_fraction": "10%", "total_steps": 3})
    with pytest.raises(ValueError, match=r"(?s)would mix two runs.*data.label_fraction"):
        loop.run(other, workdir)
    assert json.load(open(os.path.join(workdir, "labelled_subset.json"))) == subset


def test_median_frequency_weights_of_real_camvid_subset(tmp_path, camvid_tfds):
    """loss.class_weighting='median_frequency' on CamVid's 1/30 subset: the
    weights come from the 13 labelled images only (written to
    class_weights.json) and lift the thin classes above the large ones."""
    config = tiny_finetune_config(**{"data.data_dir": camvid_tfds,
                                     "loss.class_weighting": "median_frequency"})
    stage = finetune.stage(config, make_mesh(1), str(tmp_path))
    saved = json.load(open(tmp_path / "class_weights.json"))
    subset = json.load(open(tmp_path / "labelled_subset.json"))
    spec = seg_datasets.get_spec("camvid")
    records = seg_datasets.open_split(spec, "train", camvid_tfds)
    source = seg_pipeline.SegmentationSource(records, spec, subset["indices"])
    pixels, image_pixels = class_frequencies(
        [source[i]["label"] for i in range(len(source))], 11)
    assert saved["labelled_images"] == 13 and saved["pixels"] == pixels.tolist()
    weights = np.asarray(saved["weights"])
    names = [c.lower() for c in spec.class_names]
    for thin in ("pole", "signsymbol", "pedestrian", "bicyclist"):
        if pixels[names.index(thin)]:
            assert weights[names.index(thin)] > 1 > weights[names.index("road")]
    # The step normalises by the batch's summed class weight (one road pixel).
    batch, context, _ = stage.prepare(
        {"image": np.zeros((1, 2, 2, 3), np.uint8),
         "label": np.array([[[names.index("road"), 255], [255, 255]]], np.uint8)},
        jax.random.key(0))
    assert float(context["normaliser"]) == pytest.approx(weights[names.index("road")],
                                                      rel=1e-5)
    assert int(context["count"]) == 1


def test_main_dispatches_to_finetune_stage(tmp_path):
    """`python -m ddep_jax.main` runs stage 3 for a finetune config: its
    validation (stage 3 only) rejects a bad init mode, naming the key."""
    cmd = [sys.executable, "-m", "ddep_jax.main",
           "--config=configs/finetune_camvid.py:steps=1",
           f"--workdir={tmp_path}", "--config.init.mode=imagenet"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "config.init.mode='imagenet' is invalid" in out.stderr


def test_stage3_config_keys_checked():
    c = tiny_finetune_config()
    c.unlock()
    c.frozen = ("encoder",)
    with pytest.raises(ValueError, match="config.frozen is not a known key"):
        finetune.validate(c, 1)


def test_predict_folder_of_own_images(finetuned, tmp_path):
    from PIL import Image

    from ddep_jax import predict

    workdir = finetuned[0]
    images = tmp_path / "images"
    images.mkdir()
    camvid = REPO.parent / "shared/data/camvid/test/images"
    Image.open(sorted(camvid.iterdir())[0]).resize((201, 97)).save(images / "odd.png")
    (images / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "out"
    failed = predict.segment_folder(workdir, str(images), str(out))
    assert list(failed) == [str(images / "broken.jpg")]
    labels = np.asarray(Image.open(out / "odd_labels.png"))
    assert labels.shape == (97, 201) and labels.max() < 11
    assert np.asarray(Image.open(out / "odd_overlay.png")).shape == (97, 201, 3)


def test_standalone_multiscale_evaluation(finetuned, camvid_tfds):
    from ddep_jax.evaluation import evaluator

    run = load_finetuned(finetuned[0])
    assert run["step"] == 2
    run["config"].eval.mode = "multiscale"
    run["config"].eval.scales = (0.75, 1.25)
    mode, kwargs = evaluator.protocol(run["config"].eval, 0.25)
    assert kwargs == {"scales": (0.1875, 0.3125), "flip": True, "size_multiple": 16}
    source = seg_pipeline.SegmentationSource(
        seg_datasets.open_split(run["spec"], "test", camvid_tfds), run["spec"])
    result = evaluator.evaluate(evaluator.make_logits_fn(run["model"], run["params"]),
                                source, run["spec"], mode, kwargs, max_images=2)
    assert result["num_images"] == 2 and result["num_pixels"] > 0.9 * 2 * 360 * 480


def test_export_reloads_bit_identical_parameters_and_equal_inference(finetuned,
                                                                     tmp_path):
    """python -m ddep_jax.export of the real-CamVid fine-tuning: the
    safetensors parameters equal the checkpoint's bit for bit, the model
    rebuilt from model.json alone computes the same logits, the jax.export
    artifact (symbolic batch) equals the live model within float tolerance,
    and the model card carries data, metrics and lineage."""
    import ml_collections

    from ddep_jax import export
    from ddep_jax.models import to_float_images

    workdir, _, result = finetuned
    with pytest.raises(ValueError, match="multiples of 16"):
        export.export(workdir, str(tmp_path / "bad"), size=(30, 48))
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="expected H,W"):
        export.parse_size("192x240")
    paths = export.export(workdir, str(tmp_path / "out"), size=(32, 48))
    run = load_finetuned(workdir)
    live = jax.device_get(run["params"])
    params = export.load_params(paths["params"])
    chex.assert_trees_all_equal(params, live)

    record = json.load(open(paths["model"]))
    assert record["num_classes"] == 11 and len(record["class_names"]) == 11
    assert record["exported"]["input"] == ["b", 32, 48, 3]
    rebuilt = build_model(ml_collections.ConfigDict(record["model"]),
                          record["num_classes"])
    infer = export.load_exported(paths["exported"])
    rng = np.random.RandomState(0)
    apply = jax.jit(lambda p, x: rebuilt.apply({"params": p}, to_float_images(x)))
    for batch in (1, 3):  # one artifact for any batch size
        images = rng.randint(0, 256, (batch, 32, 48, 3)).astype(np.uint8)
        want = np.asarray(jax.jit(lambda p, x: run["model"].apply(
            {"params": p}, to_float_images(x)))(live, images))
        np.testing.assert_array_equal(np.asarray(apply(params, images)), want)
        got = np.asarray(infer(images))
        assert got.shape == (batch, 32, 48, 11) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    card = open(paths["card"]).read()
    miou = result["eval"]["validation"]["miou"]
    assert f"validation: mIoU {100 * miou:.2f}" in card
    assert "label fraction: 1/30 (13 of 367 labelled images)" in card
    assert "stage finetune, mode pretrained" in card and "stage ddep" in card
    assert "per-class IoU: Sky " in card
