"""Segmentation metrics against an independent numpy computation."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ddep_jax.evaluation import metrics as M

C = 7
ABSENT = 5      # in neither labels nor predictions
ONLY_PRED = 6   # predicted, never in the ground truth


def _random_batch(seed, shape=(8, 12, 10)):
    rng = np.random.default_rng(seed)
    labels = rng.choice([0, 1, 2, 3, 4], size=shape).astype(np.uint8)
    labels[rng.random(shape) < 0.15] = 255                     # void
    preds = rng.choice([0, 1, 2, 3, 4, ONLY_PRED], size=shape).astype(np.int32)
    return labels, preds


def _reference(labels, preds, num_classes):
    """Plain loops over classes with boolean-mask sums."""
    valid = labels != 255
    ious, accs = {}, {}
    for c in range(num_classes):
        gt_c = (labels == c) & valid
        pr_c = (preds == c) & valid
        tp = np.sum(gt_c & pr_c)
        fp = np.sum(pr_c & ~gt_c)
        fn = np.sum(gt_c & ~pr_c)
        if tp + fp + fn > 0:
            ious[c] = tp / (tp + fp + fn)
        if np.sum(gt_c) > 0:
            accs[c] = tp / np.sum(gt_c)
    pixacc = np.sum((labels == preds) & valid) / np.sum(valid)
    return ious, accs, pixacc


def test_metrics_match_numpy_reference():
    labels, preds = _random_batch(0)
    cm = M.accumulate(None, M.confusion_matrix(labels, preds, C))
    assert cm.dtype == np.int64 and cm.shape == (C, C)
    names = [f"n{c}" for c in range(C)]
    m = M.segmentation_metrics(cm, names)
    ious, accs, pixacc = _reference(labels, preds, C)

    assert m["num_pixels"] == int(np.sum(labels != 255))
    assert m["excluded_classes"] == [ABSENT]
    assert m["excluded_class_names"] == [f"n{ABSENT}"]
    assert m["present_classes"] == [c for c in range(C) if c != ABSENT]
    assert m["per_class_iou"][ABSENT] is None
    assert m["per_class"] == dict(zip(names, m["per_class_iou"]))  # name -> IoU
    assert m["per_class"][f"n{ABSENT}"] is None
    assert m["per_class_iou"][ONLY_PRED] == 0.0
    assert ONLY_PRED in ious and ious[ONLY_PRED] == 0.0
    for c in range(C):
        if c in ious:
            assert m["per_class_iou"][c] == pytest.approx(ious[c], abs=1e-12)
        if c in accs:
            assert m["per_class_accuracy"][c] == pytest.approx(accs[c], abs=1e-12)
        else:
            assert m["per_class_accuracy"][c] is None
    # The only-predicted class (IoU 0) counts in the mean; the absent one does not.
    assert m["miou"] == pytest.approx(sum(ious.values()) / len(ious), abs=1e-12)
    assert len(ious) == C - 1
    assert m["pixel_accuracy"] == pytest.approx(pixacc, abs=1e-12)
    assert m["mean_class_accuracy"] == pytest.approx(np.mean(list(accs.values())),
                                                     abs=1e-12)
    json.dumps(m)  # plain Python types only
    table = M.format_table(m, names)
    assert "n3" in table and "excluded" in table and "mIoU" in table


def test_accumulated_batches_equal_one_computation():
    batches = [_random_batch(s, shape=(3, 9, 11)) for s in range(4)]
    total = None
    for lab, pr in batches:
        total = M.accumulate(total, M.confusion_matrix(lab, pr, C))
    all_l = np.concatenate([b[0] for b in batches])
    all_p = np.concatenate([b[1] for b in batches])
    np.testing.assert_array_equal(total, np.asarray(M.confusion_matrix(all_l, all_p, C)))
    assert total.dtype == np.int64


def test_confusion_excludes_out_of_range_labels_and_is_oriented():
    labels = np.array([0, 0, 1, 2, 255, 9])
    preds = np.array([0, 1, 1, 0, 2, 0])
    cm = np.asarray(jax.jit(M.confusion_matrix, static_argnums=2)(labels, preds, 3))
    expected = np.zeros((3, 3), int)
    for l, p in [(0, 0), (0, 1), (1, 1), (2, 0)]:
        expected[l, p] += 1   # rows: ground truth, columns: prediction
    np.testing.assert_array_equal(cm, expected)
    assert cm.dtype == np.int32
    # Same number of pixels in other shapes (e.g. labels [B, H, W, 1]) is fine.
    np.testing.assert_array_equal(
        np.asarray(M.confusion_matrix(labels.reshape(2, 3, 1), preds.reshape(2, 3), 3)),
        expected)
    with pytest.raises(ValueError, match="pixel for pixel"):
        M.confusion_matrix(labels, preds[:5], 3)


def test_sharded_jit_equals_single_device():
    assert jax.device_count() >= 8
    # Auto axes, as in ddep_jax.parallel.sharding.make_mesh (JAX 0.10's default is Explicit).
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    labels, preds = _random_batch(3, shape=(16, 12, 10))
    sharding = NamedSharding(mesh, P("data"))
    gl = jax.device_put(jnp.asarray(labels), sharding)
    gp = jax.device_put(jnp.asarray(preds), sharding)

    @jax.jit
    def step(l, p):
        return M.confusion_matrix(l, p, C)

    sharded = np.asarray(step(gl, gp))
    single = np.asarray(M.confusion_matrix(labels, preds, C))
    np.testing.assert_array_equal(sharded, single)
    # Summing per-device matrices on the host gives the same global matrix.
    per_device = None
    for shard_l, shard_p in zip(gl.addressable_shards, gp.addressable_shards):
        per_device = M.accumulate(per_device, M.confusion_matrix(
            np.asarray(shard_l.data), np.asarray(shard_p.data), C))
    np.testing.assert_array_equal(per_device, single)


def test_errors():
    with pytest.raises(ValueError, match="no pixels"):
        M.segmentation_metrics(np.zeros((3, 3), np.int64))
    with pytest.raises(ValueError, match=r"\[C, C\]"):
        M.segmentation_metrics(np.zeros((3, 4), np.int64))
    with pytest.raises(ValueError, match="class names"):
        M.segmentation_metrics(np.eye(3, dtype=np.int64), ["a"])
    with pytest.raises(ValueError, match="shape"):
        M.accumulate(np.zeros((3, 3), np.int64), np.zeros((4, 4), np.int32))
    m = M.segmentation_metrics(np.eye(3, dtype=np.int64))
    assert m["miou"] == 1.0 and not math.isnan(m["pixel_accuracy"])
    assert "per_class" not in m  # no names, no name -> IoU mapping
    # A repeated name cannot hide a class: its entries get their ids.
    m = M.segmentation_metrics(np.eye(3, dtype=np.int64), ["a", "b", "a"])
    assert m["per_class"] == {"a (id 0)": 1.0, "b": 1.0, "a (id 2)": 1.0}
