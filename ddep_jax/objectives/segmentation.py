"""Stage-3 objective: pixel-wise softmax cross-entropy that ignores void
pixels (DDeP Sec. 5.1: the standard semantic-segmentation loss), optionally
weighted per class (`class_weights`: median frequency balancing, Eigen &
Fergus 2015, the weighting SegNet trains CamVid with)."""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ddep_jax.data.seg_datasets import IGNORE_LABEL


CLASS_WEIGHTINGS = ("none", "median_frequency")


def class_frequencies(label_maps: Iterable[np.ndarray], num_classes: int,
                      ignore_label: int = IGNORE_LABEL) -> tuple[np.ndarray, np.ndarray]:
    """Per-class pixel counts of `label_maps` and the pixel counts of the
    images each class appears in.

    Args:
      label_maps: uint8/int [H, W] arrays of class ids or `ignore_label`.

    Returns:
      (pixels int64 [C]: pixels of class c; image_pixels int64 [C]: non-void
      pixels of the images holding class c).

    Raises:
      ValueError: a label outside [0, num_classes) that is not void.
    """
    pixels = np.zeros(num_classes, np.int64)
    image_pixels = np.zeros(num_classes, np.int64)
    for label in label_maps:
        label = np.asarray(label).ravel()
        label = label[label != ignore_label]
        if label.size and (label.min() < 0 or label.max() >= num_classes):
            raise ValueError(f"label values {sorted(set(np.unique(label)))} fall "
                             f"outside [0, {num_classes}) and are not void "
                             f"({ignore_label})")
        counts = np.bincount(label, minlength=num_classes)
        pixels += counts
        image_pixels[counts > 0] += label.size
    return pixels, image_pixels


def median_frequency_weights(pixels: np.ndarray, image_pixels: np.ndarray) -> np.ndarray:
    """Median frequency balancing (Eigen & Fergus 2015, Sec. 4.2; SegNet's
    CamVid weights): freq(c) = pixels of c / pixels of the images where c is
    present, weight(c) = median over present classes of freq / freq(c).

    Args:
      pixels, image_pixels: int [C], as `class_frequencies` returns.

    Returns:
      float32 [C]; a class absent from every image gets weight 1 (it never
      enters the loss).
    """
    present = pixels > 0
    weights = np.ones(len(pixels), np.float64)
    if present.any():
        freq = pixels[present] / image_pixels[present]
        weights[present] = np.median(freq) / freq
    return weights.astype(np.float32)


def segmentation_loss(logits: jax.Array, labels: jax.Array,
                      ignore_label: int = IGNORE_LABEL,
                      normaliser: jax.Array | None = None,
                      class_weights: jax.Array | None = None):
    """Pixel-wise softmax cross-entropy, mean over non-void pixels (with
    `class_weights`, the mean weighted by each pixel's class weight:
    sum(w[y] * ce) / sum(w[y]), PyTorch's `CrossEntropyLoss(weight=)`).

    Args:
      logits: float [B, H, W, C] (any float dtype; the loss is float32).
      labels: int [B, H, W], class ids or `ignore_label`.
      normaliser: divide the summed loss by this instead of these labels'
        own non-void count (or summed weight): a micro-batch passes the full
        batch's, so the micro-batch losses sum to the full batch's mean.
      class_weights: optional float [C].

    Returns:
      (loss scalar float32, number of counted pixels int32).
    """
    valid = labels != ignore_label
    safe = jnp.where(valid, labels, 0).astype(jnp.int32)
    ce = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), safe)
    count = valid.sum()
    if class_weights is None:
        weight = valid.astype(jnp.float32)
        own = count
    else:
        weight = jnp.where(valid, jnp.asarray(class_weights, jnp.float32)[safe], 0.0)
        own = weight.sum()
    denominator = own if normaliser is None else normaliser
    return jnp.sum(ce * weight) / jnp.maximum(denominator, 1e-12), count


def correct_pixels(logits: jax.Array, labels: jax.Array,
                   ignore_label: int = IGNORE_LABEL) -> jax.Array:
    """Number of non-void pixels whose argmax class is the label (int32)."""
    return jnp.sum((jnp.argmax(logits, -1) == labels) & (labels != ignore_label))
