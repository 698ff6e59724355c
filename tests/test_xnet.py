"""×Net (models.xnet): the Re-shape module against numpy, the residual
product, no path from the encoder but its deepest map, shapes for both
encoder kinds, the decoder loaded bit for bit from a stage-1 classifier
(its head dropped, mismatches named), and a fine-tune on real CamVid that
resumes bit for bit."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (tiny_classify_config, tiny_config,
                      tiny_finetune_config)

from ddep_jax import config_lib
from ddep_jax.common import writers
from ddep_jax.models.hybrid_vit import EncoderFeatures
from ddep_jax.models.transunet import build_model
from ddep_jax.models.xnet import XNet, depth_to_space
from ddep_jax.recipes import xnet_decoder_classifier
from ddep_jax.trainers import ddep, loop

XNET = {"model.architecture": "xnet", "model.xnet.decoder_layers": (1, 1, 1, 1),
        "model.xnet.decoder_width": 8, "model.xnet.pyramid_width": 8}


def _numpy_depth_to_space(x, r):
    b, h, w, d = x.shape
    c = d // (r * r)
    out = np.zeros((b, h * r, w * r, c), x.dtype)
    for i in range(h):
        for j in range(w):
            for a in range(r):
                for bb in range(r):
                    out[:, i * r + a, j * r + bb, :] = x[:, i, j, (a * r + bb) * c:(a * r + bb + 1) * c]
    return out


@pytest.mark.parametrize("r", [2, 4])
def test_reshape_is_depth_to_space(r):
    x = np.random.RandomState(0).randn(2, 3, 5, r * r * 3).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(depth_to_space(jnp.asarray(x), r)),
                                  _numpy_depth_to_space(x, r))


def _model_and_vars(encoder="hybrid", product="residual", size=(64, 96)):
    config = tiny_config(**XNET, **{"model.xnet.product": product})
    if encoder == "resnet":
        config_lib.apply_overrides(config, {"model.encoder.vit_size": "none",
                                            "model.encoder.resnet_layers": (1, 1, 1, 1)})
    config.model.num_outputs = 5
    model = build_model(config.model)
    x = jax.random.uniform(jax.random.key(1), (2, *size, 3), minval=-1, maxval=1)
    return model, model.init(jax.random.key(0), x), x


@pytest.mark.parametrize("encoder", ["hybrid", "resnet"])
def test_shapes_for_both_encoder_kinds(encoder):
    model, variables, x = _model_and_vars(encoder)
    assert isinstance(model, XNet)
    assert model.encoder_stride == (32 if encoder == "resnet" else 16)
    assert set(variables["params"]) == {"encoder", "decoder", "neck", "head"}
    assert set(variables["params"]["neck"]) == {"gate", "pyramid_0", "pyramid_1",
                                                "pyramid_2"}
    assert set(variables["params"]["head"]) == {"norm", "proj"}
    out = model.apply(variables, x)
    assert out.shape == (2, 64, 96, 5) and out.dtype == jnp.float32
    gate = model.apply(variables, x, method=lambda m, x: m.neck.gate(m.encode(x).tokens))
    assert gate.shape == (2, 64, 96, 3)


def test_residual_product_feeds_the_image_exactly_and_plain_gates_it():
    model, variables, x = _model_and_vars("hybrid", "residual")
    fed = model.apply(variables, x, method=lambda m, x: m.decoder_input(x, m.encode(x)))
    np.testing.assert_array_equal(np.asarray(fed), np.asarray(x))  # the gate starts at 0
    model, variables, x = _model_and_vars("hybrid", "plain")
    fed = model.apply(variables, x, method=lambda m, x: m.decoder_input(x, m.encode(x)))
    np.testing.assert_array_equal(np.asarray(fed), 0.0)  # image * 0


def test_only_the_deepest_encoder_map_reaches_the_decoder():
    model, variables, x = _model_and_vars("hybrid")
    variables = jax.tree.map(lambda v: v + 0.05, variables)  # a gate that is not 0
    feats = model.apply(variables, x, method=lambda m, x: m.encode(x))
    base = model.apply(variables, feats, x, method=lambda m, f, x: m.decode(f, x))
    chex.assert_trees_all_close(base, model.apply(variables, x))
    skips = tuple(s + 1.0 for s in feats.skips)
    same = model.apply(variables, EncoderFeatures(feats.tokens, skips), x,
                       method=lambda m, f, x: m.decode(f, x))
    np.testing.assert_array_equal(np.asarray(same), np.asarray(base))
    moved = model.apply(variables, EncoderFeatures(feats.tokens + 1.0, feats.skips), x,
                        method=lambda m, f, x: m.decode(f, x))
    assert not np.allclose(moved, base)


def test_the_pretext_tasks_refuse_xnet():
    from ddep_jax.trainers import rotation

    with pytest.raises(ValueError, match="model.architecture"):
        rotation.validate(config_lib.apply_overrides(rotation.default_config(), XNET), 1)


def _xnet_finetune_config(camvid_tfds, **overrides):
    return tiny_finetune_config(**{**XNET, **{
        "data.data_dir": camvid_tfds, "data.crop_size": (64, 64),
        "eval.size_multiple": 32, "total_steps": 4, "checkpoint_every": 2,
        "eval.num_visualize": 0, "data.label_fraction": "1/30"}, **overrides})


def test_decoder_from_a_stage1_classifier_bit_for_bit_and_resume(cifar_subset,
                                                                 camvid_tfds, tmp_path):
    """A tiny stage-1 classifier whose backbone is the ×Net decoder (real
    CIFAR-10 images) hands its `encoder` over as ×Net's `decoder` exactly,
    its head dropped; a hybrid classifier hands over the encoder; the
    fine-tune on real CamVid resumes bit for bit; a classifier of another
    width is refused with every mismatch named. Stage 2 on ×Net (DDeP's
    objective, real CamVid images, the stage-1 encoder frozen) keeps the
    encoder bit for bit and trains the neck (its gate starts at 0);
    fine-tuning it (init=pretrained) places encoder, decoder and neck bit
    for bit, only the head new."""
    _, cifar_dir, _ = cifar_subset
    enc_run, dec_run = str(tmp_path / "stage1_encoder"), str(tmp_path / "stage1_decoder")
    encoder_params = jax.device_get(
        loop.run(tiny_classify_config(cifar_dir, total_steps=1), enc_run)["state"]["params"])
    dec_config = tiny_classify_config(cifar_dir, total_steps=1, **XNET)
    xnet_decoder_classifier(dec_config.model)
    decoder_params = jax.device_get(loop.run(dec_config, dec_run)["state"]["params"])

    config = _xnet_finetune_config(camvid_tfds, **{
        "init.mode": "encoder", "init.checkpoint": enc_run,
        "init.decoder_checkpoint": dec_run, "init.decoder_collection": "encoder"})
    # Step 1 of a linear warm-up trains at learning rate 0: the state after it
    # holds the initial parameters. That run, stopped there, then resumes to
    # the end bit for bit (the straight run is the reference).
    config.optimizer.warmup_steps = 2
    first = loop.run(config, str(tmp_path / "resumed"), stop_after_step=1)
    start = jax.device_get(first["state"]["params"])
    chex.assert_trees_all_equal(start["decoder"], decoder_params["encoder"])
    chex.assert_trees_all_equal(start["encoder"], encoder_params["encoder"])
    record = writers.read_json(str(tmp_path / "resumed" / "init.json"))
    assert record["collections"] == ["encoder"] and record["new"] == ["head", "neck"]
    assert [s["as"] for s in record["sources"]] == ["decoder"]
    assert record["sources"][0]["collections"] == ["encoder"]  # the head not read

    straight = loop.run(config, str(tmp_path / "straight"))
    resumed = loop.run(config, str(tmp_path / "resumed"))
    assert first["history"] + resumed["history"] == straight["history"]
    chex.assert_trees_all_equal(jax.device_get(resumed["state"]),
                                jax.device_get(straight["state"]))
    assert np.isfinite(straight["loss"])

    s2_config = tiny_config(**XNET, **{
        "data.source": "tfds", "data.name": "camvid", "data.data_dir": camvid_tfds,
        "total_steps": 2, "checkpoint_every": 2, "optimizer.warmup_steps": 1,
        "init.checkpoint": enc_run})
    ddep.validate(s2_config, 1)
    assert s2_config.frozen == ("encoder",)
    stage2 = str(tmp_path / "ddep_xnet")
    denoised = jax.device_get(loop.run(s2_config, stage2)["state"]["params"])
    chex.assert_trees_all_equal(denoised["encoder"], encoder_params["encoder"])
    assert np.abs(denoised["neck"]["gate"]["proj"]["kernel"]).max() > 0
    ft = _xnet_finetune_config(camvid_tfds, **{
        "init.mode": "pretrained", "init.checkpoint": stage2,
        "optimizer.warmup_steps": 2})
    first = jax.device_get(loop.run(ft, str(tmp_path / "ft_ddep"), stop_after_step=1)
                           ["state"]["params"])
    for name in ("encoder", "decoder", "neck"):
        chex.assert_trees_all_equal(first[name], denoised[name])
    record = writers.read_json(str(tmp_path / "ft_ddep" / "init.json"))
    assert record["collections"] == ["encoder", "decoder", "neck"]
    assert record["new"] == ["head"]

    wide = _xnet_finetune_config(camvid_tfds, **{
        "model.xnet.decoder_width": 16, "init.mode": "encoder",
        "init.checkpoint": enc_run, "init.decoder_checkpoint": dec_run})
    with pytest.raises(ValueError, match=r"does not match the model in \d+ place"):
        loop.run(wide, str(tmp_path / "wide"))


def test_finetune_config_arguments():
    c = config_lib.load_config_file(
        "configs/finetune_camvid.py",
        "arch=xnet,init=encoder,ckpt=/runs/enc,decoder_ckpt=/runs/dec,product=plain")
    assert c.model.architecture == "xnet" and c.model.xnet.product == "plain"
    assert c.init.decoder_checkpoint == "/runs/dec" and c.eval.size_multiple == 32
    assert tuple(c.model.xnet.decoder_layers) == (1, 1, 1, 1)
    paper = config_lib.load_config_file(
        "configs/finetune_cityscapes.py",
        "arch=xnet,init=encoder,ckpt=/runs/enc,decoder_ckpt=/runs/dec")
    assert tuple(paper.model.xnet.decoder_layers) == (3, 4, 6, 3)
    assert paper.model.encoder.vit_size == "B"
    dd = config_lib.load_config_file("configs/finetune_camvid.py",
                                     "arch=xnet,init=pretrained,ckpt=/runs/ddep_xnet")
    assert dd.init.mode == "pretrained" and dd.init.decoder_checkpoint == ""
    with pytest.raises(ValueError, match="init=pretrained reads the decoder from ckpt"):
        config_lib.load_config_file("configs/finetune_camvid.py",
                                    "arch=xnet,init=pretrained,ckpt=/x,decoder_ckpt=/y")
    s2 = config_lib.load_config_file("configs/ddep_camvid.py", "arch=xnet,ckpt=/runs/enc")
    assert s2.model.architecture == "xnet" and s2.model.num_outputs == 3
    assert tuple(s2.model.xnet.decoder_layers) == (1, 1, 1, 1)
    ddep.validate(s2, 1)
    with pytest.raises(ValueError, match="add arch=xnet"):
        config_lib.load_config_file("configs/finetune_camvid.py", "decoder_ckpt=/x")
    k = config_lib.load_config_file("configs/classify_cifar10.py", "arch=xnet")
    assert k.model.encoder.vit_size == "none"
    assert tuple(k.model.encoder.resnet_layers) == tuple(c.model.xnet.decoder_layers)
