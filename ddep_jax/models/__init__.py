"""The models and the conventions every stage shares.

`COLLECTIONS`: the top-level parameter collections. TransUNet has `encoder`,
`decoder` and `head`; ×Net adds `neck` (its Re-shapes between encoder,
decoder and head). The stage-1 classifier has `encoder` and `head`. The
stages freeze, hand over and drop parameters by these names.

`to_float_images`: the encoder's input convention (ViT: pixels in [-1, 1]).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

COLLECTIONS = ("encoder", "decoder", "neck", "head")


def to_float_images(images_uint8) -> jax.Array:
    """uint8 [..., 3] (array or numpy) -> float32 in [-1, 1]."""
    return jnp.asarray(images_uint8, jnp.float32) / 127.5 - 1.0
