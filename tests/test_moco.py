"""MoCo pretext tasks (SSL4DP): the momentum rule, the queue and InfoNCE
against numpy; the views' geometry and the matched patch pairs under known
crops and flips; the stage's extra train state step by step; and a sharded
run on real CamVid images that resumes bit for bit, starts its momentum
encoder from the handed-over encoder, and hands over to fine-tuning."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_hands_over_to_finetuning, tiny_config

from ddep_jax import config_lib
from ddep_jax.objectives import moco
from ddep_jax.trainers import loop
from ddep_jax.trainers import moco as moco_stage


def test_momentum_rule_and_queue_by_hand():
    k = {"encoder": {"w": jnp.array([1.0, 2.0])}, "head": {"b": jnp.array([0.0])}}
    q = {"encoder": {"w": jnp.array([3.0, -2.0])}, "head": {"b": jnp.array([10.0])}}
    out = moco.momentum_update(k, q, 0.75)
    # 0.75 * k + 0.25 * q
    np.testing.assert_allclose(out["encoder"]["w"], [1.5, 1.0])
    np.testing.assert_allclose(out["head"]["b"], [2.5])

    queue = jnp.zeros((5, 2))
    keys = jnp.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    queue, ptr = moco.enqueue(queue, jnp.int32(0), keys)
    np.testing.assert_array_equal(queue[:, 0], [1, 2, 3, 0, 0])
    assert int(ptr) == 3
    # The next batch wraps around: rows 3, 4, then 0 (the oldest) again.
    queue, ptr = moco.enqueue(queue, ptr, keys + 3)
    np.testing.assert_array_equal(queue[:, 0], [6, 2, 3, 4, 5])
    assert int(ptr) == 1
    with pytest.raises(ValueError, match="queue_size=2 is smaller than the 3 keys"):
        moco.enqueue(jnp.zeros((2, 2)), jnp.int32(0), keys)
    unit = moco.initial_queue(jax.random.key(0), 7, 4)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-6)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_info_nce_against_numpy():
    rng = np.random.RandomState(0)
    q, k = _unit(rng.randn(4, 8)), _unit(rng.randn(6, 8))
    queue = _unit(rng.randn(10, 8))
    positive = np.array([2, 0, 5, 1])
    t = 0.2

    def ce(logits, target):
        logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        return -logp[np.arange(len(target)), target], logits.argmax(1) == target

    # MoCo: [q . k+, q . queue] / T, the positive at index 0.
    logits = np.concatenate([(q * k[positive]).sum(1, keepdims=True), q @ queue.T], 1) / t
    nll, hit = ce(logits, np.zeros(4, int))
    loss, acc = moco.info_nce(jnp.asarray(q), jnp.asarray(k), jnp.asarray(positive),
                              jnp.asarray(queue), t)
    np.testing.assert_allclose(float(loss), nll.mean(), rtol=1e-5)
    assert float(acc) == pytest.approx(hit.mean())

    # Patch-level: every key is a class too; only the valid queries count.
    valid = np.array([True, False, True, True])
    logits = np.concatenate([q @ k.T, q @ queue.T], 1) / t
    nll, hit = ce(logits, positive)
    loss, acc = moco.info_nce(jnp.asarray(q), jnp.asarray(k), jnp.asarray(positive),
                              jnp.asarray(queue), t, jnp.asarray(valid),
                              batch_negatives=True)
    np.testing.assert_allclose(float(loss), nll[valid].mean(), rtol=1e-5)
    assert float(acc) == pytest.approx(hit[valid].mean())
    none = moco.info_nce(jnp.asarray(q), jnp.asarray(k), jnp.asarray(positive),
                         jnp.asarray(queue), t, jnp.zeros(4, bool), batch_negatives=True)
    assert float(none[0]) == 0 and float(none[1]) == 0


def _coordinate_image(h, w):
    """float [1, h, w, 2]: each pixel holds its centre's (y, x) source
    coordinates (a linear ramp, which bilinear resampling reproduces)."""
    yy, xx = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    return np.stack([yy, xx], -1)[None].astype(np.float32)


def test_views_show_the_source_points_of_their_boxes_flipped_or_not():
    h, w, out = 48, 64, (16, 16)
    image = _coordinate_image(h, w)
    box = np.array([[8.0, 20.0, 24.0, 32.0]], np.float32)  # y0, x0, h, w
    for flip in (False, True):
        view = np.asarray(moco.crop_and_resize(jnp.asarray(image), jnp.asarray(box),
                                               jnp.asarray([flip]), out))[0]
        i, j = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
        jj = 15 - j if flip else j
        want_y = 8 + (i + 0.5) * 24 / 16
        want_x = 20 + (jj + 0.5) * 32 / 16
        # Shrinking (24 -> 16 rows, 32 -> 16 columns) with antialiasing: the
        # widened triangle kernel's discrete weights are not centred exactly
        # on the sample point, which moves a ramp's value by < 0.03 pixels.
        inner = (slice(2, -2), slice(2, -2))  # the border pixels blend the edge
        np.testing.assert_allclose(view[..., 0][inner], want_y[inner], atol=0.03)
        np.testing.assert_allclose(view[..., 1][inner], want_x[inner], atol=0.03)
        assert abs(np.mean(view[..., 0][inner] - want_y[inner])) < 1e-3
    boxes, flips = moco.sample_views(jax.random.key(0), 256, (h, w))
    boxes = np.asarray(boxes)
    area = boxes[..., 2] * boxes[..., 3] / (h * w)
    assert boxes.shape == (256, 2, 4) and flips.shape == (256, 2)
    assert (boxes[..., :2] >= 0).all()
    assert (boxes[..., 0] + boxes[..., 2] <= h + 1e-4).all()
    assert (boxes[..., 1] + boxes[..., 3] <= w + 1e-4).all()
    assert area.min() >= 0.2 - 1e-4 and area.max() <= 1 + 1e-4
    assert 0.3 < np.asarray(flips).mean() < 0.7


def test_matched_patch_pairs_by_hand_and_through_the_rendered_views():
    out, grid = (32, 32), (2, 2)  # 16-pixel patches
    # Query: the whole 64x64 image; key: its right half (x 32..64), flipped.
    boxes_q = jnp.array([[0.0, 0.0, 64.0, 64.0]])
    boxes_k = jnp.array([[0.0, 32.0, 64.0, 32.0]])
    index, valid = moco.match_patches(boxes_q, jnp.array([False]), boxes_k,
                                      jnp.array([True]), out, grid)
    # Query patch centres (y, x) in source pixels: (16, 16), (16, 48),
    # (48, 16), (48, 48). x = 16 lies left of the key view. x = 48 is key view
    # pixel 48 - 32 = 16 unflipped, 32 - 16 = 16 flipped: patch column 1;
    # y = 16 and 48 are view rows 8 and 24: patch rows 0 and 1. So query
    # patches 1 and 3 match key patches 0 * 2 + 1 = 1 and 1 * 2 + 1 = 3.
    np.testing.assert_array_equal(valid[0], [False, True, False, True])
    np.testing.assert_array_equal(index[0][np.asarray(valid[0])], [1, 3])
    # The same with the query flipped: its patch columns swap.
    index, valid = moco.match_patches(boxes_q, jnp.array([True]), boxes_k,
                                      jnp.array([True]), out, grid)
    np.testing.assert_array_equal(valid[0], [True, False, True, False])
    np.testing.assert_array_equal(index[0][np.asarray(valid[0])], [1, 3])

    # Random crops and flips: render a coordinate image through both views;
    # every matched query patch's centre (read off the rendered query view)
    # must lie inside its key patch's extent (read off the key view).
    h = w = 64
    out, grid = (64, 64), (4, 4)
    image = jnp.asarray(_coordinate_image(h, w))
    boxes, flips = moco.sample_views(jax.random.key(3), 32, (h, w))
    index, valid = moco.match_patches(boxes[:, 0], flips[:, 0], boxes[:, 1],
                                      flips[:, 1], out, grid)
    views = [np.asarray(moco.crop_and_resize(jnp.repeat(image, 32, 0), boxes[:, v],
                                             flips[:, v], out)) for v in range(2)]
    centres = np.asarray(moco.patch_centres(boxes[:, 0], flips[:, 0], out, grid))
    checked = 0
    for b in range(32):
        for n in np.flatnonzero(np.asarray(valid[b])):
            r, c = divmod(n, 4)
            # The query view's pixels around the patch centre show its source point.
            qv = views[0][b, 16 * r + 7:16 * r + 9, 16 * c + 7:16 * c + 9].mean((0, 1))
            np.testing.assert_allclose(qv, centres[b, n], atol=0.05)
            kr, kc = divmod(int(index[b, n]), 4)
            patch = views[1][b, 16 * kr:16 * kr + 16, 16 * kc:16 * kc + 16]
            lo, hi = patch.reshape(-1, 2).min(0), patch.reshape(-1, 2).max(0)
            pad = np.asarray(boxes[b, 1, 2:]) / 64  # half a view pixel, in source px
            assert (centres[b, n] >= lo - pad).all() and (centres[b, n] <= hi + pad).all()
            checked += 1
    assert checked > 100 and not np.asarray(valid).all()


def test_photometric_augmentation_keeps_range_and_changes_images():
    rng = np.random.RandomState(0)
    images = jnp.asarray(rng.uniform(0, 1, (64, 16, 16, 3)).astype(np.float32))
    out = np.asarray(moco.photometric(jax.random.key(0), images))
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    # Unchanged only where neither jitter (p 0.8) nor blur (p 0.5) was drawn
    # (p 0.1 each).
    changed = np.abs(out - np.asarray(images)).reshape(64, -1).max(1) > 1e-3
    assert 40 <= changed.sum() < 64
    gray = np.ptp(out, axis=-1).reshape(64, -1).max(1) < 1e-5
    assert 3 <= gray.sum() <= 30  # p 0.2 of turning grayscale
    none = moco.photometric(jax.random.key(0), images, jitter_prob=0.0,
                            grayscale_prob=0.0, blur_prob=0.0)
    np.testing.assert_array_equal(np.asarray(none), np.asarray(images))


def tiny_moco_config(variant="image", **overrides):
    c = moco_stage.default_config()
    c.model.update(tiny_config().model.to_dict())
    c.model.num_outputs = 16
    c.pretext.update(variant=variant, queue_size=64, hidden=32, momentum=0.9,
                     frame_size=(48, 64))
    c.data.update(source="embedded", num_threads=1, prefetch=1, cache="none")
    c.frozen = () if variant == "patch" else ("encoder",)
    c.update(batch_size=8, total_steps=4, log_every=1, checkpoint_every=2)
    c.mesh.data = 1
    return config_lib.apply_overrides(c, overrides)


@pytest.mark.parametrize("variant", ["patch", "patch_decoder"])
def test_step_shapes_of_the_patch_variants(variant):
    """The patch variants' step traced (not compiled): 4 embeddings per
    image (a 2x2 token grid), the queue advanced by 8 x 4 keys; `patch`
    has no decoder, so the state has none. (The image variant's numbers:
    the next test; patch_decoder's on real data: the last one.)"""
    from conftest import stage_step

    config = tiny_moco_config(variant)
    stage, ts, _ = stage_step(config)
    step = loop.make_train_step(stage, ts.tx, ts.schedule)
    batch = stage.example_batch(np.random.RandomState(0))
    state, metrics = jax.eval_shape(step, ts.abstract, batch, jax.random.key(1))
    assert state["extra"]["queue"].shape == (64, 16)
    assert ("decoder" in state["params"]) == (variant == "patch_decoder")
    assert jax.tree.structure(state["extra"]["momentum"]) == jax.tree.structure(
        state["params"])
    assert set(metrics) >= {"loss", "contrastive_accuracy", "matched_patches"}
    model = stage.model
    embeddings = jax.eval_shape(lambda p, x: model.apply({"params": p}, x),
                                state["params"], jnp.zeros((8, 32, 32, 3)))
    assert embeddings.shape == (8, 4, 16)


def test_one_step_updates_the_momentum_encoder_and_the_queue():
    from conftest import stage_step

    variant = "image"
    config = tiny_moco_config(variant)
    stage, ts, step = stage_step(config)
    state = ts.init(jax.random.key(0))
    before = jax.device_get(state)
    batch = stage.example_batch(np.random.RandomState(0))
    n = 1  # one embedding per image
    assert before["extra"]["queue"].shape == (64, 16)
    chex.assert_trees_all_equal(before["extra"]["momentum"], before["params"])
    assert ("decoder" in before["params"]) == (variant != "patch")
    state, metrics = step(state, batch, jax.random.key(1))
    after = jax.device_get(state)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) > 0
    # The momentum rule used the parameters before the step.
    want = jax.tree.map(lambda k, q: 0.9 * k + 0.1 * q, before["extra"]["momentum"],
                        before["params"])
    chex.assert_trees_all_close(after["extra"]["momentum"], want, rtol=1e-6, atol=1e-7)
    assert int(after["extra"]["pointer"]) == 8 * n
    # The enqueued keys are the momentum encoder's embeddings of the key views.
    prepare = moco_stage.make_prepare(config)
    prepared, _, _ = prepare(batch, jax.random.fold_in(jax.random.key(1), 0))
    keys = jax.jit(lambda p, x: stage.model.apply({"params": p}, x))(
        want, prepared["key_view"])
    np.testing.assert_allclose(after["extra"]["queue"][:8 * n],
                               np.asarray(keys).reshape(8 * n, 16), atol=2e-5)
    np.testing.assert_array_equal(after["extra"]["queue"][8 * n:],
                                  before["extra"]["queue"][8 * n:])
    np.testing.assert_allclose(np.linalg.norm(after["extra"]["queue"], axis=1), 1,
                               rtol=1e-5)


def test_config_file_and_validation():
    c = config_lib.load_config_file("configs/moco_camvid.py",
                                    "variant=patch_decoder,encoder=slow,steps=3")
    moco_stage.validate(c, 1)
    assert c.frozen == () and c.pretext.variant == "patch_decoder"
    assert moco_stage.grid(c) == (6, 6)  # 96x96 crops, 1/16
    for overrides, message in [
            ({"pretext.variant": "pixel"}, "expected one of"),
            ({"pretext.queue_size": 100}, "must hold one batch's 576 keys"),
            ({"pretext.variant": "patch", "frozen": ("encoder",)},
             "only the head would train"),
            ({"pretext.momentum": 1.0}, r"in \[0, 1\)")]:
        bad = config_lib.load_config_file("configs/moco_camvid.py", "variant=patch_decoder")
        config_lib.apply_overrides(bad, overrides)
        with pytest.raises(ValueError, match=message):
            moco_stage.validate(bad, 1)


def test_patch_moco_on_real_camvid_sharded_resumes_bit_for_bit_and_hands_over(
        camvid_tfds, tmp_path):
    """Patch-level encoder-decoder MoCo on CamVid images, the momentum
    encoder's large leaves sharded (FSDP) over 2 devices: 4 steps equal 2 +
    a resume + 2 bit for bit, momentum encoder and queue included. A second
    run initialised from the first starts its momentum encoder as the
    handed-over encoder; stage 3 restores encoder + decoder exactly."""
    import orbax.checkpoint as ocp

    from ddep_jax.checkpoints.partial import resolve_state_dir
    from ddep_jax.parallel.sharding import make_mesh

    config = tiny_moco_config("patch_decoder", **{
        "data.source": "tfds", "data.name": "camvid", "data.data_dir": camvid_tfds,
        "mesh.data": 2, "mesh.param_sharding": "fsdp", "mesh.fsdp_min_size": 256,
        "frozen": ()})
    mesh = make_mesh(2)
    initial = jax.device_get(loop.build_state(
        loop.trainer("moco").stage(config, mesh, data=False), config, 4, mesh,
        jax.random.split(jax.random.key(config.seed), 2)[0]).init(
            jax.random.split(jax.random.key(config.seed), 2)[0]))
    straight = loop.run(config, str(tmp_path / "straight"))
    assert straight["step"] == 4 and np.isfinite(straight["loss"])
    momentum_kernel = straight["state"]["extra"]["momentum"]["decoder"]
    specs = {str(leaf.sharding.spec) for leaf in jax.tree.leaves(momentum_kernel)}
    assert any("data" in s for s in specs), specs  # sharded like the parameters
    first = loop.run(config, str(tmp_path / "resumed"), stop_after_step=2)
    assert first["step"] == 2
    resumed = loop.run(config, str(tmp_path / "resumed"))
    assert first["history"] + resumed["history"] == straight["history"]
    state = jax.device_get(straight["state"])
    chex.assert_trees_all_equal(jax.device_get(resumed["state"]), state)
    assert int(state["extra"]["pointer"]) == (4 * 8 * 4) % 64

    # A run initialised from the first one's encoder: its momentum encoder
    # starts as the handed-over encoder (one step later it is m x + (1 - m)
    # x of it, the momentum update using the parameters before the step),
    # not as a fresh initialisation.
    with config.unlocked():
        config.init.checkpoint = str(tmp_path / "straight")
    run2 = jax.device_get(loop.run(config, str(tmp_path / "second"),
                                   stop_after_step=1)["state"])
    state_dir, _ = resolve_state_dir(str(tmp_path / "straight"), 2)
    at_2 = ocp.PyTreeCheckpointer().restore(state_dir)["params"]["encoder"]
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), at_2,
                         state["params"]["encoder"])
    assert max(jax.tree.leaves(moved)) > 0  # the first run trained its encoder
    chex.assert_trees_all_close(run2["extra"]["momentum"]["encoder"],
                                state["params"]["encoder"], rtol=1e-6, atol=1e-7)
    # The decoder was not handed over: fresh, as in the first run's start.
    chex.assert_trees_all_close(run2["extra"]["momentum"]["decoder"],
                                initial["params"]["decoder"], rtol=1e-6, atol=1e-7)

    assert_hands_over_to_finetuning(str(tmp_path / "straight"), state["params"],
                                    camvid_tfds, tmp_path)


def test_own_image_is_never_a_negative_after_two_epochs_of_a_tiny_dataset(tmp_path):
    """15 images, batch 4, a queue of 8 keys: after two epochs the queue
    holds keys of images that are queried again. The queue keeps each key's
    image id (the source index the pipeline adds), and InfoNCE over the queue
    with the query's own image's keys excluded equals InfoNCE over the queue
    with those rows removed."""
    config = tiny_moco_config("image", **{"pretext.queue_size": 8, "batch_size": 4,
                                          "total_steps": 8, "checkpoint_every": 8})
    result = loop.run(config, str(tmp_path / "run"))
    extra = jax.device_get(result["state"]["extra"])
    ids = extra["queue_ids"]
    assert ids.shape == (8,) and ids.min() >= 0 and ids.max() < 15
    # The stream's last two batches are in the queue, in order.
    stage = loop.trainer("moco").stage(config, None, str(tmp_path / "data"))
    it = iter(stage.dataset)
    batches = [next(it)["image_id"] for _ in range(8)]
    np.testing.assert_array_equal(np.sort(ids), np.sort(np.concatenate(batches[-2:])))
    # Two epochs of 15 images in batches of 4: some queried image has a key
    # in the queue (the situation the exclusion exists for).
    query_ids = np.concatenate([next(it)["image_id"] for _ in range(4)])
    exclude, none = moco.negative_exclusions(jnp.asarray(query_ids), jnp.asarray(ids), 1)
    exclude = np.asarray(exclude)
    assert none is None and exclude.any()
    np.testing.assert_array_equal(exclude, query_ids[:, None] == ids[None, :])
    rng = np.random.RandomState(0)
    q, k = _unit(rng.randn(len(query_ids), 16)), _unit(rng.randn(len(query_ids), 16))
    queue = extra["queue"]
    for i in range(len(query_ids)):
        masked = moco.info_nce(jnp.asarray(q[i:i + 1]), jnp.asarray(k[i:i + 1]),
                               jnp.zeros(1, jnp.int32), jnp.asarray(queue), 0.2,
                               exclude_queue=jnp.asarray(exclude[i:i + 1]))
        removed = moco.info_nce(jnp.asarray(q[i:i + 1]), jnp.asarray(k[i:i + 1]),
                                jnp.zeros(1, jnp.int32),
                                jnp.asarray(queue[~exclude[i]]), 0.2)
        np.testing.assert_allclose(float(masked[0]), float(removed[0]), rtol=1e-6)


def test_views_are_cropped_from_the_whole_frame(tmp_path):
    """The MoCo stage's batches are whole frames (resized and centre-cropped
    to `pretext.frame_size`), not the pipeline's random crops, with the
    source index of each; the views' boxes lie inside that whole frame and
    range over all of it (MoCo v2 crops both views from the whole image)."""
    from ddep_jax.data import pipeline
    from ddep_jax.data.embedded import EmbeddedImages

    config = tiny_moco_config("image", **{"pretext.frame_size": (48, 64)})
    stage = loop.trainer("moco").stage(config, None, str(tmp_path))
    assert stage.batch_spec["image"].shape == (8, 48, 64, 3)
    batch = next(iter(stage.dataset))
    source = EmbeddedImages()
    for image, i in zip(batch["image"], batch["image_id"]):
        np.testing.assert_array_equal(image, pipeline.resize_centre_crop(
            source[int(i)]["image"], (48, 64), 1.0))
    boxes, _ = moco.sample_views(jax.random.key(0), 4000, (48, 64))
    boxes = np.asarray(boxes)
    assert boxes[..., 0].min() >= 0 and boxes[..., 1].min() >= 0
    assert (boxes[..., 0] + boxes[..., 2]).max() <= 48 + 1e-4
    assert (boxes[..., 1] + boxes[..., 3]).max() <= 64 + 1e-4
    # Over many draws the views reach every border of the whole frame.
    assert boxes[..., 0].min() < 0.5 and boxes[..., 1].min() < 0.5
    assert (boxes[..., 0] + boxes[..., 2]).max() > 47.5
    assert (boxes[..., 1] + boxes[..., 3]).max() > 63.5
    c = config_lib.load_config_file("configs/moco_camvid.py", "")
    assert tuple(c.pretext.frame_size) == (180, 240)  # CamVid's frames at half size


def test_patch_regions_and_overlapping_negatives_by_hand():
    """Query view: the whole 64x64 frame; key view: its top-left quarter,
    flipped; a 2x2 grid. The key's four patches all lie inside the query's
    top-left patch: for that query patch the three other key patches overlap
    it fully and are no negatives (the positive stays); at
    negative_max_overlap 1.0 every patch is a negative."""
    boxes_q = jnp.array([[0.0, 0.0, 64.0, 64.0]])
    boxes_k = jnp.array([[0.0, 0.0, 32.0, 32.0]])
    flips_q, flips_k = jnp.array([False]), jnp.array([True])
    rq = np.asarray(moco.patch_regions(boxes_q, flips_q, (2, 2)))[0]
    rk = np.asarray(moco.patch_regions(boxes_k, flips_k, (2, 2)))[0]
    np.testing.assert_allclose(rq, [[0, 0, 32, 32], [0, 32, 32, 64],
                                    [32, 0, 64, 32], [32, 32, 64, 64]])
    # Flipped: the view's first column shows the box's right half.
    np.testing.assert_allclose(rk, [[0, 16, 16, 32], [0, 0, 16, 16],
                                    [16, 16, 32, 32], [16, 0, 32, 16]])
    overlap = moco.overlap_coefficient(jnp.asarray(rq)[None], jnp.asarray(rk)[None])
    np.testing.assert_allclose(np.asarray(overlap)[0],
                               [[1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    positive, valid = moco.match_patches(boxes_q, flips_q, boxes_k, flips_k,
                                         (64, 64), (2, 2))
    assert bool(valid[0, 0]) and not bool(valid[0, 1:].any())
    ids = jnp.array([7])
    no_queue = jnp.full((4,), moco.NO_IMAGE, jnp.int32)
    _, exclude = moco.negative_exclusions(ids, no_queue, 4, overlap, 0.25)
    np.testing.assert_array_equal(np.asarray(exclude)[0], [True] * 4)
    np.testing.assert_array_equal(np.asarray(exclude)[1:], False)
    _, keep_all = moco.negative_exclusions(ids, no_queue, 4, overlap, 1.0)
    assert not np.asarray(keep_all).any()
    # Query patch 0's centre (16, 16) is key-view pixel (32, 32), flipped
    # column 32 -> key patch 3: the positive, which info_nce never excludes.
    assert int(positive[0, 0]) == 3
    rng = np.random.RandomState(0)
    q = jnp.asarray(_unit(rng.randn(4, 8)))
    k = jnp.asarray(_unit(rng.randn(4, 8)))
    pos = jnp.asarray(np.asarray(positive)[0])
    loss, _ = moco.info_nce(q[:1], k, pos[:1], jnp.zeros((0, 8)), 0.2,
                            batch_negatives=True, exclude_keys=exclude[:1])
    assert float(loss) == pytest.approx(0.0, abs=1e-6)  # one class left: the positive


def test_patch_level_exclusions_on_sampled_views():
    """On MoCo v2's random views (6x6 grid): without the overlap exclusion
    many queries have a negative overlapping them by more than 25%; with it
    none does, and a query's own queued image keys are excluded too."""
    cells, hw = (6, 6), (96, 96)
    boxes, flips = moco.sample_views(jax.random.key(3), 256, (180, 240))
    positive, valid = moco.match_patches(boxes[:, 0], flips[:, 0], boxes[:, 1],
                                         flips[:, 1], hw, cells)
    overlap = moco.overlap_coefficient(moco.patch_regions(boxes[:, 0], flips[:, 0], cells),
                                       moco.patch_regions(boxes[:, 1], flips[:, 1], cells))
    overlap, positive, valid = map(np.asarray, (overlap, positive, valid))
    n = 36
    not_pos = np.arange(n)[None, None, :] != positive[:, :, None]
    high = ((overlap > 0.25) & not_pos).any(-1)[valid]
    print(f"queries with an overlapping (>25%) negative: {high.mean():.1%}")
    assert high.mean() > 0.2
    ids = jnp.arange(256, dtype=jnp.int32)
    queue_ids = jnp.array([3, 5, moco.NO_IMAGE, 3], jnp.int32)
    ex_queue, ex_keys = moco.negative_exclusions(ids, queue_ids, n,
                                                 jnp.asarray(overlap), 0.25)
    ex_keys = np.asarray(ex_keys).reshape(256, n, 256, n)
    for b in range(0, 256, 37):
        block = ex_keys[b, :, b, :]
        np.testing.assert_array_equal(block, overlap[b] > 0.25)
        assert not np.delete(ex_keys[b], b, axis=1).any()  # other images: kept
    ex_queue = np.asarray(ex_queue).reshape(256, n, 4)
    np.testing.assert_array_equal(ex_queue[3, 0], [True, False, False, True])
    np.testing.assert_array_equal(ex_queue[4, 0], [False] * 4)
