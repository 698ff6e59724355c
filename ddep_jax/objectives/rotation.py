"""Patch-level rotation prediction, a dense pretext task (SSL4DP draft report
on self-supervised learning for dense prediction; the image-level task is
RotNet, Gidaris et al. 2018).

The image is divided into a grid of square `patch` x `patch` cells; each
cell is rotated on its own by k * 90 degrees counter-clockwise (k i.i.d.
uniform in {0, 1, 2, 3}, `numpy.rot90`'s direction in (row, column) image
coordinates); the encoder-decoder predicts k at every pixel of the cell,
trained with a pixel-level 4-way softmax cross-entropy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NUM_ANGLES = 4


def check_patch(image_hw: tuple[int, int], patch: int) -> None:
    """Raises ValueError unless `patch` > 0 divides both image sides."""
    h, w = image_hw
    if patch <= 0 or h % patch or w % patch:
        raise ValueError(f"pretext.patch_size={patch} must be > 0 and divide the "
                         f"input size {h}x{w} (square patches tile the image).")


def sample_angles(key: jax.Array, batch: int, image_hw: tuple[int, int],
                  patch: int) -> jax.Array:
    """i.i.d. rotation indices k in {0, 1, 2, 3}: int32 [B, H / patch, W / patch]."""
    h, w = image_hw
    return jax.random.randint(key, (batch, h // patch, w // patch), 0, NUM_ANGLES,
                              jnp.int32)


def rotate_patches(images: jax.Array, angles: jax.Array, patch: int) -> jax.Array:
    """Rotates every patch of `images` by its angle.

    Args:
      images: [B, H, W, C] (any dtype), H and W multiples of `patch`.
      angles: int [B, H / patch, W / patch], k: rotate by k * 90 degrees
        counter-clockwise (`jnp.rot90(cell, k)` on the (row, column) axes).
      patch: the side of the square patches, in pixels.

    Returns:
      [B, H, W, C] of `images`' dtype: the image with its patches rotated in
      place (a square patch maps onto itself).
    """
    b, h, w, c = images.shape
    nh, nw = h // patch, w // patch
    cells = images.reshape(b, nh, patch, nw, patch, c).transpose(0, 1, 3, 2, 4, 5)
    rotated = jnp.stack([jnp.rot90(cells, k, axes=(3, 4)) for k in range(NUM_ANGLES)])
    onehot = jax.nn.one_hot(angles, NUM_ANGLES, dtype=jnp.bool_)  # [B, nh, nw, 4]
    select = jnp.moveaxis(onehot, -1, 0)[..., None, None, None]
    out = jnp.sum(jnp.where(select, rotated, jnp.zeros_like(rotated)), axis=0)
    return out.astype(images.dtype).transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


def angle_label_map(angles: jax.Array, patch: int) -> jax.Array:
    """Each pixel's target: the angle of its patch. int32 [B, H, W]."""
    return jnp.repeat(jnp.repeat(angles, patch, axis=1), patch, axis=2).astype(jnp.int32)


def rotation_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean pixel-wise 4-way softmax cross-entropy, pixel accuracy) of
    float [B, H, W, 4] logits against int [B, H, W] angle labels."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
    return jnp.mean(nll), accuracy
