"""The paper's Table 7 model: a U-Net on a plain ResNet (vit_size='none',
four stages), through the three stages on real data (CIFAR-10, CamVid) with
the encoder handed over bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_classify_config, tiny_config, tiny_finetune_config

from ddep_jax import config_lib
from ddep_jax.checkpoints import handover
from ddep_jax.models.classifier import build_classifier
from ddep_jax.models.transunet import build_model
from ddep_jax.trainers import ddep, loop

TINY_R50 = {"model.encoder.vit_size": "none",
            "model.encoder.resnet_layers": (1, 1, 1, 1)}


def test_shapes_skips_and_validation():
    config = tiny_config(**TINY_R50)
    model = build_model(config.model)
    x = jax.ShapeDtypeStruct((2, 64, 96, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    features = jax.eval_shape(lambda v, x: model.apply(v, x, method=model.encode),
                              variables, x)
    w = config.model.encoder.resnet_width
    # Output at 1/32 (32W channels), skips at 1/2 (W), 1/4, 1/8, 1/16 (4W..16W).
    assert features.tokens.shape == (2, 2, 3, 32 * w)
    assert [s.shape for s in features.skips] == [
        (2, 32, 48, w), (2, 16, 24, 4 * w), (2, 8, 12, 8 * w), (2, 4, 6, 16 * w)]
    assert jax.eval_shape(model.apply, variables, x).shape == (2, 64, 96, 3)
    assert set(variables["params"]["encoder"]) == {"conv_root", "gn_root", "block1",
                                                   "block2", "block3", "block4"}
    classifier = build_classifier(config.model, 10)
    images = jax.ShapeDtypeStruct((3, 32, 32, 3), jnp.float32)
    params = jax.eval_shape(classifier.init, jax.random.key(0), images)
    assert jax.eval_shape(classifier.apply, params, images).shape == (3, 10)
    # The ResNet-50 of the configs: stages (3, 4, 6, 3); inputs multiples of 32.
    r50 = config_lib.load_config_file("configs/finetune_camvid.py", "arch=r50unet")
    assert tuple(r50.model.encoder.resnet_layers) == (3, 4, 6, 3)
    assert r50.eval.size_multiple == 32
    bad = tiny_config(**TINY_R50, **{"model.encoder.image_size": (48, 48)})
    with pytest.raises(ValueError, match="image_size.*multiples of 32"):
        ddep.validate(bad, 1)
    bad = tiny_config(**{"model.encoder.vit_size": "none"})  # 3 stages
    with pytest.raises(ValueError, match="needs 4 stages"):
        ddep.validate(bad, 1)


def test_three_stages_on_real_data_hand_the_encoder_over(cifar_subset, camvid_tfds,
                                                         tmp_path):
    _, cifar_dir, _ = cifar_subset
    stage1 = str(tmp_path / "stage1")
    loop.run(tiny_classify_config(cifar_dir, total_steps=1, **TINY_R50), stage1)
    stage2 = str(tmp_path / "stage2")
    out = loop.run(tiny_config(total_steps=1, **TINY_R50, **{
        "data.source": "tfds", "data.name": "camvid", "data.data_dir": camvid_tfds,
        "init.checkpoint": stage1}), stage2)
    assert np.isfinite(out["loss"])
    stage3 = str(tmp_path / "stage3")
    ft = tiny_finetune_config(total_steps=1, **TINY_R50, **{
        "data.data_dir": camvid_tfds, "data.base_scale": 0.125,
        "eval.size_multiple": 32, "eval.num_visualize": 0,
        "init.mode": "pretrained", "init.checkpoint": stage2})
    result = loop.run(ft, stage3)
    assert 0 < result["eval"]["validation"]["miou"] < 1
    check = handover.check_encoder_chain(stage3)
    assert check["identical"] and len(check["chain"]) == 2
