"""Stage-3 objective: pixel-wise softmax cross-entropy that ignores void
pixels (DDeP Sec. 5.1: the standard semantic-segmentation loss)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from ddep_jax.data.seg_datasets import IGNORE_LABEL


def segmentation_loss(logits: jax.Array, labels: jax.Array,
                      ignore_label: int = IGNORE_LABEL,
                      normaliser: jax.Array | None = None):
    """Pixel-wise softmax cross-entropy, mean over non-void pixels.

    Args:
      logits: float [B, H, W, C] (any float dtype; the loss is float32).
      labels: int [B, H, W], class ids or `ignore_label`.
      normaliser: divide the summed loss by this instead of these labels'
        own non-void count: a micro-batch passes the full batch's count, so
        the micro-batch losses sum to the full batch's mean.

    Returns:
      (loss scalar float32, number of counted pixels int32).
    """
    valid = labels != ignore_label
    safe = jnp.where(valid, labels, 0).astype(jnp.int32)
    ce = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), safe)
    count = valid.sum()
    denominator = count if normaliser is None else normaliser
    return jnp.sum(ce * valid) / jnp.maximum(denominator, 1), count


def correct_pixels(logits: jax.Array, labels: jax.Array,
                   ignore_label: int = IGNORE_LABEL) -> jax.Array:
    """Number of non-void pixels whose argmax class is the label (int32)."""
    return jnp.sum((jnp.argmax(logits, -1) == labels) & (labels != ignore_label))
