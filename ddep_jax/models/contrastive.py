"""The TransUNet with a MoCo projection head (the SSL4DP contrastive pretext
tasks, `objectives.moco`).

The `encoder` and `decoder` collections are the TransUNet's, so a MoCo
checkpoint hands over to stage 3 exactly as a DDeP one does; the `head`
collection is MoCo v2's projection MLP (Chen et al. 2020, "Improved
Baselines with Momentum Contrastive Learning": fc(hidden) -> ReLU -> fc(dim)),
dropped at fine-tuning.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddep_jax.models.transunet import TransUNet

VARIANTS = ("image", "patch", "patch_decoder")
"""What one embedding describes: `image`, the encoder-decoder's output
average-pooled over the whole image (SSL4DP "encoder-decoder MoCo");
`patch`, one cell of the encoder's token grid (1/16 of the input for the
hybrid, 1/32 for the plain ResNet; "patch-level MoCo", the decoder unused);
`patch_decoder`, the decoder's output average-pooled over the same cells
("patch-level encoder-decoder MoCo")."""


class ProjectionHead(nn.Module):
    """MoCo v2's projection MLP applied to the last axis, then L2-normalised.

    [..., C] -> float32 [..., dim], unit norm.
    """

    hidden: int
    dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x)
        x = nn.Dense(self.dim, dtype=self.dtype, name="fc2")(nn.relu(x))
        x = x.astype(jnp.float32)
        return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class ContrastiveTransUNet(TransUNet):
    """TransUNet whose head embeds images or patches for MoCo.

    Attributes (besides TransUNet's; `num_outputs` is the embedding size,
    MoCo's 128):
      variant: one of `VARIANTS`.
      hidden: the projection MLP's hidden width (MoCo v2: 2048).

    __call__(images float [B, H, W, 3] in [-1, 1], train) -> float32
    [B, N, num_outputs] unit vectors, N = 1 (`image`) or the token grid's
    gh * gw cells in row-major order (`patch`, `patch_decoder`).
    """

    variant: str = "image"
    hidden: int = 2048

    def make_head(self) -> nn.Module:
        return ProjectionHead(self.hidden, self.num_outputs, dtype=self.dtype)

    def __call__(self, images: jax.Array, noise_level=None, *,
                 train: bool = False) -> jax.Array:
        del noise_level
        if self.variant not in VARIANTS:
            raise ValueError(f"pretext.variant={self.variant!r}: expected one of "
                             f"{VARIANTS}.")
        features = self.encode(images, train=train)
        b = images.shape[0]
        gh, gw = features.tokens.shape[1:3]
        if self.variant == "patch":
            x = features.tokens
        else:
            x = self.decoder(features, None)  # [B, H, W, C]
            _, h, w, c = x.shape
            if self.variant == "image":
                x = jnp.mean(x, axis=(1, 2), keepdims=True)
            else:
                x = jnp.mean(x.reshape(b, gh, h // gh, gw, w // gw, c), axis=(2, 4))
        return self.head(x).reshape(b, -1, self.num_outputs)
