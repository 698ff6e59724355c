"""Stage-1 objective: image classification (the supervised encoder).

Softmax cross-entropy over classes, or sigmoid binary cross-entropy per class
summed over classes (big_vision's `sigmoid_xent`, the loss of the public
ImageNet-21k checkpoints; Dosovitskiy et al. 2021, App. B.1), with label
smoothing (Szegedy et al. 2016).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

LOSS_TYPES = ("softmax", "sigmoid")


def classification_loss(logits: jax.Array, labels: jax.Array, loss_type: str,
                        label_smoothing: float = 0.0) -> jax.Array:
    """Mean classification loss over the batch.

    Args:
      logits: float [B, C].
      labels: int [B] in [0, C).
      loss_type: 'softmax' (cross-entropy over classes) or 'sigmoid' (binary
        cross-entropy per class, summed over classes).
      label_smoothing: s: targets (1 - s) * one_hot + s / C
        (`optax.smooth_labels`).

    Returns:
      float32 scalar.

    Raises:
      ValueError: `loss_type` is not one of `LOSS_TYPES`.
    """
    logits = logits.astype(jnp.float32)
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    if loss_type == "softmax":
        return jnp.mean(optax.softmax_cross_entropy(logits, targets))
    if loss_type == "sigmoid":
        return jnp.mean(jnp.sum(optax.sigmoid_binary_cross_entropy(logits, targets),
                                axis=-1))
    raise ValueError(f"loss type {loss_type!r}: expected one of {LOSS_TYPES}.")
