"""Patch-level rotation pretext task (SSL4DP): the rotated patches and their
label map against a hand computation, the loss against numpy, the encoder
learning-rate multiplier, and a run on real CamVid images whose encoder +
decoder hand over to fine-tuning."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_hands_over_to_finetuning, tiny_config

from ddep_jax import config_lib
from ddep_jax.training import optim
from ddep_jax.objectives import rotation
from ddep_jax.trainers import loop
from ddep_jax.trainers import rotation as rotation_stage


def test_rotated_patches_and_label_map_by_hand():
    # One 4x4 image of 2x2 patches with distinct pixel values 0..15.
    image = np.arange(16, dtype=np.uint8).reshape(1, 4, 4, 1)
    angles = np.array([[[0, 1], [2, 3]]], np.int32)
    out = np.asarray(rotation.rotate_patches(jnp.asarray(image), jnp.asarray(angles), 2))
    # Patches (top-left, top-right, bottom-left, bottom-right) of the input:
    #   [[0, 1], [4, 5]]  [[2, 3], [6, 7]]  [[8, 9], [12, 13]]  [[10, 11], [14, 15]]
    # rotated counter-clockwise by 0, 90, 180 and 270 degrees:
    #   [[0, 1], [4, 5]]  [[3, 7], [2, 6]]  [[13, 12], [9, 8]]  [[14, 10], [15, 11]]
    expected = np.array([[0, 1, 3, 7],
                         [4, 5, 2, 6],
                         [13, 12, 14, 10],
                         [9, 8, 15, 11]], np.uint8)
    np.testing.assert_array_equal(out[0, :, :, 0], expected)
    assert out.dtype == np.uint8
    labels = np.asarray(rotation.angle_label_map(jnp.asarray(angles), 2))
    np.testing.assert_array_equal(labels[0], [[0, 0, 1, 1], [0, 0, 1, 1],
                                              [2, 2, 3, 3], [2, 2, 3, 3]])


def test_rotation_matches_numpy_rot90_on_colour_batches():
    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, (3, 12, 18, 3)).astype(np.uint8)
    angles = np.asarray(rotation.sample_angles(jax.random.key(1), 3, (12, 18), 6))
    assert angles.shape == (3, 2, 3) and set(np.unique(angles)) <= {0, 1, 2, 3}
    out = np.asarray(rotation.rotate_patches(jnp.asarray(images), jnp.asarray(angles), 6))
    for b in range(3):
        for i in range(2):
            for j in range(3):
                cell = images[b, 6 * i:6 * i + 6, 6 * j:6 * j + 6]
                np.testing.assert_array_equal(out[b, 6 * i:6 * i + 6, 6 * j:6 * j + 6],
                                              np.rot90(cell, angles[b, i, j]))
    # i.i.d. uniform angles: all four occur over many patches, about equally.
    many = np.asarray(rotation.sample_angles(jax.random.key(2), 64, (96, 96), 32))
    counts = np.bincount(many.ravel(), minlength=4)
    assert counts.min() > 0.2 * many.size
    with pytest.raises(ValueError, match="patch_size=5 must be > 0 and divide"):
        rotation.check_patch((12, 18), 5)


def test_rotation_loss_against_numpy():
    rng = np.random.RandomState(0)
    logits = rng.randn(2, 3, 5, 4).astype(np.float32)
    labels = rng.randint(0, 4, (2, 3, 5))
    loss, acc = rotation.rotation_loss(jnp.asarray(logits), jnp.asarray(labels))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ref = -np.take_along_axis(logp, labels[..., None], -1).mean()
    np.testing.assert_allclose(float(loss), ref, rtol=1e-6)
    assert float(acc) == pytest.approx((logits.argmax(-1) == labels).mean())


def test_encoder_learning_rate_multiplier():
    params = {"encoder": {"w": jnp.ones(3)}, "decoder": {"w": jnp.ones(3)},
              "head": {"b": jnp.ones(2)}}
    schedule = optim.make_schedule(1e-2, 10)
    tx, labels = optim.make_optimizer(params, (), schedule,
                                      lr_multipliers={"encoder": 0.01})
    assert labels == {"encoder": {"w": "train*0.01"}, "decoder": {"w": "train"},
                      "head": {"b": "train"}}
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    # Adam's first step moves by ~lr (sign of the gradient): 1e-2 and 1e-4.
    np.testing.assert_allclose(updates["decoder"]["w"], -1e-2, rtol=1e-3)
    np.testing.assert_allclose(updates["encoder"]["w"], -1e-4, rtol=1e-3)
    with pytest.raises(ValueError, match="frozen"):
        optim.make_optimizer(params, ("encoder",), schedule,
                             lr_multipliers={"encoder": 0.01})
    with pytest.raises(ValueError, match=r"lr_multipliers='encoder=0'.*> 0"):
        optim.parse_lr_multipliers("encoder=0")
    with pytest.raises(ValueError, match="'stem=0.1' must be COLLECTION"):
        optim.parse_lr_multipliers("stem=0.1")


def tiny_rotation_config(data_dir, **overrides):
    c = rotation_stage.default_config()
    c.model.update(tiny_config().model.to_dict())
    c.model.num_outputs = 4
    c.data.update(source="tfds", name="camvid", data_dir=data_dir, num_threads=1,
                  prefetch=1, cache="none")
    c.pretext.patch_size = 16
    c.update(batch_size=8, total_steps=4, log_every=1, checkpoint_every=2)
    c.mesh.data = 1
    return config_lib.apply_overrides(c, overrides)


def test_config_file_and_validation():
    c = config_lib.load_config_file("configs/rotation_camvid.py", "encoder=slow,steps=3")
    rotation_stage.validate(c, 1)
    assert c.frozen == () and c.optimizer.lr_multipliers == "encoder=0.01"
    for key, value, message in [("pretext.patch_size", 20, "divide the input size"),
                                ("model.num_outputs", 3, "predicts 4 angles"),
                                ("optimizer.lr_multipliers", "encoder=0.1",
                                 "names frozen collections")]:
        bad = config_lib.load_config_file("configs/rotation_camvid.py")
        config_lib.apply_overrides(bad, {key: value})
        with pytest.raises(ValueError, match=message):
            rotation_stage.validate(bad, 1)


def test_rotation_on_real_camvid_resumes_bit_for_bit_and_hands_over(camvid_tfds,
                                                                      tmp_path):
    """4 steps on CamVid images with the encoder at 1/100 of the rate equal 2
    steps + a resume + 2 steps bit for bit; the slow encoder moves (less than
    the decoder); stage 3 restores encoder + decoder exactly (new head)."""
    import orbax.checkpoint as ocp

    from ddep_jax.checkpoints.partial import resolve_state_dir

    config = tiny_rotation_config(camvid_tfds, **{
        "frozen": (), "optimizer.lr_multipliers": "encoder=0.01"})
    straight = loop.run(config, str(tmp_path / "straight"))
    assert straight["step"] == 4 and np.isfinite(straight["loss"])
    first = loop.run(config, str(tmp_path / "resumed"), stop_after_step=2)
    resumed = loop.run(config, str(tmp_path / "resumed"))
    assert first["history"] + resumed["history"] == straight["history"]
    state = jax.device_get(straight["state"])
    chex.assert_trees_all_equal(jax.device_get(resumed["state"]), state)

    state_dir, step = resolve_state_dir(str(tmp_path / "straight"), 2)
    at_2 = ocp.PyTreeCheckpointer().restore(state_dir)["params"]

    def moved(collection):
        diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                             state["params"][collection], at_2[collection])
        return max(jax.tree.leaves(diffs))

    assert step == 2 and 0 < moved("encoder") < moved("decoder")

    assert_hands_over_to_finetuning(str(tmp_path / "straight"), state["params"],
                                    camvid_tfds, tmp_path)
