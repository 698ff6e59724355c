"""UNet decoder: TransUNet's cascaded upsampler (CUP) with the paper's 5 blocks.

Source: DDeP Sec. 2 / Fig. 2 (widths [1024, 512, 256, 128, 64], "1x"; the 2x
and 3x decoders multiply every width, Sec. 4.3); TransUNet (Chen et al. 2021)
for the block structure (upsample x2, concatenate the skip, two 3x3 conv +
norm + ReLU).

Normalisation is GroupNorm rather than TransUNet's BatchNorm: it has no batch
statistics to carry, synchronise across devices or freeze, and behaves the
same at every per-device batch size (1 on a laptop, 512 on a pod).

Optional noise-level conditioning (DDeP Sec. 4.4 ablation): every norm layer
gets a per-channel scale and shift predicted from an embedding of log(sigma),
initialised to the identity.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from ddep_jax.models.hybrid_vit import EncoderFeatures

DECODER_WIDTHS_1X: tuple[int, ...] = (1024, 512, 256, 128, 64)


# The lowest noise level the embedding tells apart: sigma below it (clean
# images, sigma = 0, as fine-tuning and inference feed a conditioned decoder)
# is embedded as this level, since log(0) = -inf makes sin/cos NaN.
SIGMA_FLOOR = 1e-3


def noise_level_embedding(sigma: jax.Array, dim: int) -> jax.Array:
    """Sinusoidal features of log(max(sigma, SIGMA_FLOOR)).

    Args:
      sigma: float [B] noise standard deviations (>= 0); values below
        `SIGMA_FLOOR` (1e-3), clean images included, embed as the floor.
      dim: even embedding size.

    Returns:
      float32 [B, dim], finite for every sigma >= 0.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(1000.0) * jnp.arange(half) / max(half - 1, 1))
    sigma = jnp.maximum(sigma.astype(jnp.float32), SIGMA_FLOOR)
    angles = jnp.log(sigma)[:, None] * freqs[None, :] * 100.0
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def upsample2x_bilinear(x: jax.Array) -> jax.Array:
    """x2 bilinear upsampling of [B, H, W, C] -> [B, 2H, 2W, C].

    Half-pixel centres with edge clamping: the same function as
    `jax.image.resize(x, (B, 2H, 2W, C), 'bilinear')`, but with two taps per
    output pixel (0.75 / 0.25) instead of resize's dense [2H, H] and [2W, W]
    weight contractions, whose cost grows with the image size.
    """

    def along(x, axis):
        n = x.shape[axis]
        first = lax.slice_in_dim(x, 0, 1, axis=axis)
        last = lax.slice_in_dim(x, n - 1, n, axis=axis)
        prev = jnp.concatenate([first, lax.slice_in_dim(x, 0, n - 1, axis=axis)], axis)
        nxt = jnp.concatenate([lax.slice_in_dim(x, 1, n, axis=axis), last], axis)
        even, odd = 0.75 * x + 0.25 * prev, 0.75 * x + 0.25 * nxt
        shape = list(x.shape)
        shape[axis] = 2 * n
        return jnp.stack([even, odd], axis=axis + 1).reshape(shape)

    return along(along(x, 1), 2)


class ConvNormReLU(nn.Module):
    """3x3 conv -> GroupNorm (optionally modulated by the noise level) -> ReLU."""

    features: int
    num_groups: int = 32
    dtype: Any = jnp.float32
    conv: Callable = lax.conv_general_dilated

    @nn.compact
    def __call__(self, x: jax.Array, cond: jax.Array | None) -> jax.Array:
        x = nn.Conv(self.features, (3, 3), use_bias=False, dtype=self.dtype,
                    conv_general_dilated=self.conv, name="conv")(x)
        x = nn.GroupNorm(self.num_groups, dtype=self.dtype, name="norm")(x)
        if cond is not None:
            film = nn.Dense(2 * self.features, kernel_init=nn.initializers.zeros,
                            dtype=self.dtype, name="noise_film")(cond)
            scale, shift = jnp.split(film[:, None, None, :], 2, axis=-1)
            x = x * (1.0 + scale) + shift
        return nn.relu(x)


class DecoderBlock(nn.Module):
    features: int
    upsample: bool
    num_groups: int = 32
    dtype: Any = jnp.float32
    conv: Callable = lax.conv_general_dilated

    @nn.compact
    def __call__(self, x: jax.Array, skip: jax.Array | None,
                 cond: jax.Array | None) -> jax.Array:
        if self.upsample:
            x = upsample2x_bilinear(x)
        if skip is not None:
            x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
        x = ConvNormReLU(self.features, self.num_groups, self.dtype, self.conv,
                         name="conv1")(x, cond)
        return ConvNormReLU(self.features, self.num_groups, self.dtype, self.conv,
                            name="conv2")(x, cond)


class UNetDecoder(nn.Module):
    """Five decoder blocks from the 1/16 token map back to full resolution.

    Block 0 works at 1/16 on the tokens; blocks 1-3 upsample x2 and take the
    skip features at 1/8, 1/4, 1/2; block 4 upsamples to full resolution
    without a skip. From a plain ResNet's 1/32 map (four skips, the paper's
    ResNet-50 U-Net) every block upsamples: blocks 0-3 take the skips at
    1/16, 1/8, 1/4, 1/2, block 4 none.

    Attributes:
      widths: channels per block, `DECODER_WIDTHS_1X` times the multiplier.
      num_groups: GroupNorm groups.
      noise_conditioning: if True, the norms are modulated by `noise_level`
        (Sec. 4.4); without one (fine-tuning, inference: clean images) the
        level is `clean_noise_level`.
      clean_noise_level: sigma given to a conditioned decoder on clean images
        (`config.model.clean_noise_level`; 0 embeds as `SIGMA_FLOOR`).
      cond_dim: size of the noise-level embedding.
      conv: the 3x3 convolutions' `conv_general_dilated`
        (`fast_conv.resolve(config.model.conv)`).

    Call: (features: EncoderFeatures, noise_level: float [B] sigma or None)
      -> float [B, H, W, widths[-1]].
    """

    widths: Sequence[int] = DECODER_WIDTHS_1X
    num_groups: int = 32
    noise_conditioning: bool = False
    clean_noise_level: float = 0.0
    cond_dim: int = 128
    dtype: Any = jnp.float32
    conv: Callable = lax.conv_general_dilated

    @nn.compact
    def __call__(self, features: EncoderFeatures,
                 noise_level: jax.Array | None = None) -> jax.Array:
        if len(self.widths) != 5:
            raise ValueError(f"decoder widths {tuple(self.widths)}: need 5 blocks.")
        cond = None
        if self.noise_conditioning:
            if noise_level is None:  # clean images: fine-tuning and inference
                noise_level = jnp.full((features.tokens.shape[0],),
                                       self.clean_noise_level, jnp.float32)
            cond = noise_level_embedding(noise_level, self.cond_dim)
            cond = nn.swish(nn.Dense(self.cond_dim, dtype=self.dtype,
                                     name="noise_embed")(cond))
        skips = list(features.skips[::-1])  # 1/8, 1/4, 1/2 (1/16 first: plain ResNet)
        x = features.tokens
        # The plain ResNet's output is at 1/32: every block upsamples, blocks
        # 0-3 take the skips at 1/16, 1/8, 1/4, 1/2 (a standard U-Net).
        offset = 0 if len(skips) == 4 else 1
        for i, width in enumerate(self.widths):
            j = i - offset
            skip = skips[j] if 0 <= j < len(skips) else None
            x = DecoderBlock(width, upsample=i >= offset, num_groups=self.num_groups,
                             dtype=self.dtype, conv=self.conv,
                             name=f"block{i}")(x, skip, cond)
        return x
