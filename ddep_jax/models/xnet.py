"""×Net: a pretrained classifier run forward as the decoder (Ning, Gan, Xuan,
Yokoya, "Is Pre-training Applicable to the Decoder for Dense Prediction?",
arXiv:2503.07637, ICRA 2026).

The paper's text is not available here; the architecture follows the
authors' overview figure (project page repository 2J472no/xNet, commit
8e4223c, static/images/Overview.png, panel (c)). What is the figure and what
is this project's assumption:

As in the figure:
- a pretrained encoder; only its deepest map leaves it: a Re-shape module
  takes it to image size, and it is multiplied element-wise into the image;
- the product is the input of a pretrained hierarchical classification
  backbone run forward as the decoder, whose H/4, H/8, H/16, H/32 outputs
  are used;
- no skip connection from encoder to decoder;
- the Post Feature Pyramid: the decoder's H/8, H/16, H/32 outputs each
  re-shaped to H/4, concatenated with its H/4 output, and a last Re-shape
  to the H x W predictions;
- only the Re-shape modules are new; encoder and decoder are pretrained.

Our assumptions (each a config value, `config.model.xnet`):
- Re-shape (`ReShape`): LayerNorm over channels, a 1x1 convolution to
  C_out * r * r channels, depth-to-space by r (pixel shuffle; equal to a
  transposed convolution with kernel = stride = r);
- the product: `image * (1 + g)` ('residual', the gate's projection
  initialised to zero, so that the decoder first sees the plain image it was
  pretrained on) or `image * g` ('plain'), g the Re-shaped encoder map with 3
  channels;
- our hybrid encoder's deepest map is its 1/16 token grid (the figure's is
  1/32): the encoder-side Re-shape uses r = 16 (32 for a plain ResNet
  encoder);
- the decoder is this project's plain ResNet-v2 (`HybridViT` with
  `vit_size='none'`, four stages: skips at 1/2 .. 1/16, output at 1/32) whose
  stage-1 classifier checkpoint exists (`configs/classify_cifar10.py:
  arch=r50unet`); its classification head is dropped and its 1/2 root map is
  not used;
- the Post Feature Pyramid's Re-shapes output `pyramid_width` channels each.

Parameter collections: `encoder` (the HybridViT encoder), `decoder` (the
classifier backbone, leaf for leaf the stage-1 classifier's `encoder`),
`neck` (the gate's and the Post Feature Pyramid's Re-shapes) and `head` (the
last Re-shape, to `num_outputs` channels). From two stage-1 classifiers
(`init.mode='encoder'` + `init.decoder_checkpoint`) neck and head are new at
fine-tuning. Beyond the paper, stage 2 can pretrain the decoder by denoising
(DDeP's objective on this network, encoder frozen, decoder from a random
initialisation: `configs/ddep_camvid.py:arch=xnet`); its fine-tuning
(`init.mode='pretrained'`) reads encoder, decoder and neck, and only the
head (3 noise channels there, classes here) is new, as the TransUNet's.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from ddep_jax.models.hybrid_vit import EncoderFeatures, HybridViT

PRODUCTS = ("residual", "plain")
"""How the re-shaped encoder map g enters the image: image * (1 + g), or
image * g."""


def depth_to_space(x: jax.Array, r: int) -> jax.Array:
    """Pixel shuffle: [B, h, w, r * r * C] -> [B, h * r, w * r, C], output
    pixel (i * r + a, j * r + b, c) = input (i, j, (a * r + b) * C + c)
    (TensorFlow's `depth_to_space`, DCR order)."""
    b, h, w, d = x.shape
    c = d // (r * r)
    x = x.reshape(b, h, w, r, r, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h * r, w * r, c)


class ReShape(nn.Module):
    """×Net's Re-shape module (our reading): LayerNorm over channels -> 1x1
    convolution to `features * ratio**2` channels -> depth-to-space by
    `ratio`.

    Attributes:
      features: output channels.
      ratio: upsampling factor r.
      zero_init: the projection starts at zero (output 0).

    Call: float [B, h, w, C] -> float [B, h * r, w * r, features].
    """

    features: int
    ratio: int
    zero_init: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.LayerNorm(dtype=self.dtype, name="norm")(x)
        init = nn.initializers.zeros if self.zero_init else nn.initializers.lecun_normal()
        x = nn.Dense(self.features * self.ratio**2, dtype=self.dtype, kernel_init=init,
                     name="proj")(x)
        return depth_to_space(x, self.ratio)


class XNet(nn.Module):
    """Pretrained encoder x pretrained decoder (see the module docstring).

    Attributes:
      encoder_kwargs: `HybridViT` keyword arguments of the encoder (the hybrid,
        or a plain ResNet with `vit_size='none'`).
      decoder_kwargs: `HybridViT` keyword arguments of the decoder, a plain
        ResNet (`vit_size='none'`, four stages).
      num_outputs: classes (or 3 for a denoising head).
      pyramid_width: channels of each Post Feature Pyramid Re-shape.
      product: one of `PRODUCTS`.
      dtype, conv: as `TransUNet`'s.

    Methods (images float [B, H, W, 3] in [-1, 1], H and W multiples of 32):
      encode(images, train) -> EncoderFeatures (only `tokens`, the deepest
        map, is used further)
      decoder_input(images, features) -> the decoder's input
      decode(features, images, train) -> float32 [B, H, W, num_outputs]
      decode_from(features, images, noise_level, train) == decode(features,
        images, train) (`TransUNet.decode_from`'s signature)
      __call__(images, noise_level=None, train) -> float32 [B, H, W, num_outputs]
    """

    encoder_kwargs: Mapping[str, Any]
    decoder_kwargs: Mapping[str, Any]
    num_outputs: int = 3
    pyramid_width: int = 64
    product: str = "residual"
    dtype: Any = jnp.float32
    conv: Callable = lax.conv_general_dilated

    def setup(self):
        if self.product not in PRODUCTS:
            raise ValueError(f"product={self.product!r}: expected one of {PRODUCTS}.")
        self.encoder = HybridViT(**dict(self.encoder_kwargs), dtype=self.dtype,
                                 conv=self.conv)
        self.decoder = HybridViT(**dict(self.decoder_kwargs), dtype=self.dtype,
                                 conv=self.conv)
        self.neck = XNetNeck(self.pyramid_width, self.encoder_stride, self.dtype)
        self.head = ReShape(self.num_outputs, 4, dtype=self.dtype)

    @property
    def encoder_stride(self) -> int:
        """The encoder's deepest map is at 1/16 (hybrid / ViT tokens) or 1/32
        (a plain ResNet encoder): the gate's Re-shape ratio."""
        return 32 if self.encoder_kwargs.get("vit_size") == "none" else 16

    def encode(self, images: jax.Array, *, train: bool = False) -> EncoderFeatures:
        return self.encoder(images, train=train)

    def decoder_input(self, images: jax.Array, features: EncoderFeatures) -> jax.Array:
        """The element-wise product of the image and the re-shaped deepest map."""
        g = self.neck.gate(features.tokens).astype(images.dtype)
        return images * (1.0 + g) if self.product == "residual" else images * g

    def decode(self, features: EncoderFeatures, images: jax.Array, *,
               train: bool = False) -> jax.Array:
        """The decoder on the image times the re-shaped deepest map of
        `features` (its other maps are not used), the Post Feature Pyramid
        and the last Re-shape: float32 [B, H, W, num_outputs]."""
        x = self.decoder_input(images, features)
        out = self.decoder(x.astype(self.dtype), train=train)
        _, c4, c8, c16 = out.skips  # the root's 1/2 map is not used
        fused = jnp.concatenate(
            [c4.astype(self.dtype)]
            + [p(c) for p, c in zip(self.neck.pyramid, (c8, c16, out.tokens))], axis=-1)
        return self.head(fused).astype(jnp.float32)

    def decode_from(self, features: EncoderFeatures, images: jax.Array,
                    noise_level: jax.Array | None = None, *,
                    train: bool = False) -> jax.Array:
        """`decode` under the signature both models share (stage 2 runs the
        frozen encoder apart): ×Net's decoder reads the images; it has no
        noise-level input."""
        del noise_level
        return self.decode(features, images, train=train)

    def __call__(self, images: jax.Array, noise_level: jax.Array | None = None, *,
                 train: bool = False) -> jax.Array:
        del noise_level  # ×Net has no noise-level conditioning
        return self.decode(self.encode(images, train=train), images, train=train)


class XNetNeck(nn.Module):
    """The `neck` collection of ×Net: `gate` (the encoder-side Re-shape of the
    deepest map to 3 channels at image size, zero-initialised) and `pyramid`
    (Re-shapes of the decoder's H/8, H/16, H/32 outputs to H/4 with
    `pyramid_width` channels). It has no `__call__`: ×Net calls the parts;
    the last Re-shape (H/4 -> H x W) is the `head`."""

    pyramid_width: int
    encoder_stride: int
    dtype: Any = jnp.float32

    def setup(self):
        self.gate = ReShape(3, self.encoder_stride, zero_init=True, dtype=self.dtype)
        self.pyramid = [ReShape(self.pyramid_width, r, dtype=self.dtype)
                        for r in (2, 4, 8)]
