"""TransUNet: Hybrid-ViT encoder + UNet decoder + output head (DDeP Sec. 2).

The top-level parameter collections are `encoder`, `decoder` and `head`, so
that the stages can hand over, freeze and drop them by name: stage 2 freezes
`encoder` and trains `decoder` + a 3-channel `head`; stage 3 keeps `encoder`
and `decoder` and replaces `head` with a `num_classes` one.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from ddep_jax.models import fast_conv
from ddep_jax.models.hybrid_vit import EncoderFeatures, HybridViT
from ddep_jax.models.unet_decoder import DECODER_WIDTHS_1X, UNetDecoder


class TransUNet(nn.Module):
    """Encoder-decoder with a per-pixel output head.

    Attributes:
      encoder_kwargs: keyword arguments of `HybridViT` (vit_size,
        resnet_layers, resnet_width, image_size, num_groups, ...).
      decoder_multiplier: 1, 2 or 3 (the paper's 1x / 2x / 3x decoders).
      decoder_widths: explicit 5 block widths; overrides the multiplier (small
        decoders for tests and CPU runs).
      num_outputs: channels of the head (3 for denoising, classes later).
      decoder_num_groups: GroupNorm groups in the decoder.
      noise_conditioning: condition the decoder's norms on sigma (Sec. 4.4).
      clean_noise_level: the sigma a conditioned decoder gets without a
        noise level (clean images: fine-tuning, inference).
      conv: `conv_general_dilated` of the stride-1 convolutions of encoder,
        decoder and head (`fast_conv.resolve(config.model.conv)`).

    Methods (images: float [B, H, W, 3] in [-1, 1], H, W multiples of 16):
      encode(images, train) -> EncoderFeatures
      decode(features, noise_level, train) -> float32 [B, H, W, num_outputs]
      decode_from(features, images, noise_level, train) == decode(features,
        noise_level, train) (the signature ×Net shares: its decoder reads
        the images too; stage 2 calls it on the frozen encoder's features)
      __call__(images, noise_level, train) == decode(encode(images), ...)
    """

    encoder_kwargs: Mapping[str, Any]
    decoder_multiplier: int = 1
    decoder_widths: tuple[int, ...] | None = None
    num_outputs: int = 3
    decoder_num_groups: int = 32
    noise_conditioning: bool = False
    clean_noise_level: float = 0.0
    dtype: Any = jnp.float32
    conv: Callable = lax.conv_general_dilated

    def setup(self):
        self.encoder = HybridViT(**dict(self.encoder_kwargs), dtype=self.dtype,
                                 conv=self.conv)
        self.decoder = UNetDecoder(
            widths=self.decoder_widths or tuple(
                w * self.decoder_multiplier for w in DECODER_WIDTHS_1X),
            num_groups=self.decoder_num_groups,
            noise_conditioning=self.noise_conditioning,
            clean_noise_level=self.clean_noise_level, dtype=self.dtype,
            conv=self.conv)
        self.head = self.make_head()

    def make_head(self) -> nn.Module:
        """The `head` collection's module (a subclass's own head overrides
        this): a 3x3 convolution to `num_outputs` channels."""
        return nn.Conv(self.num_outputs, (3, 3), dtype=self.dtype,
                       conv_general_dilated=self.conv)

    def encode(self, images: jax.Array, *, train: bool = False) -> EncoderFeatures:
        return self.encoder(images, train=train)

    def decode(self, features: EncoderFeatures,
               noise_level: jax.Array | None = None, *,
               train: bool = False) -> jax.Array:
        del train  # the decoder has no dropout or batch statistics
        x = self.decoder(features, noise_level)
        return self.head(x).astype(jnp.float32)

    def decode_from(self, features: EncoderFeatures, images: jax.Array,
                    noise_level: jax.Array | None = None, *,
                    train: bool = False) -> jax.Array:
        del images  # the decoder reads the encoder's features only
        return self.decode(features, noise_level, train=train)

    def __call__(self, images: jax.Array, noise_level: jax.Array | None = None, *,
                 train: bool = False) -> jax.Array:
        return self.decode(self.encode(images, train=train), noise_level, train=train)


def encoder_kwargs(encoder_config) -> dict[str, Any]:
    """`HybridViT` keyword arguments from a `config.model.encoder` ConfigDict
    (shared by every stage's model, so their encoders are the same module)."""
    enc = encoder_config
    return dict(vit_size=enc.vit_size, resnet_layers=tuple(enc.resnet_layers),
                resnet_width=enc.resnet_width, image_size=tuple(enc.image_size),
                num_groups=enc.num_groups, dropout_rate=enc.dropout_rate)


def conv_of(model_config) -> Callable:
    """The convolution function of `config.model.conv` (`fast_conv.resolve`;
    'auto' where a workdir's config.json predates the setting)."""
    return fast_conv.resolve(model_config.get("conv", "auto"))


def build_model(model_config, num_outputs: int | None = None):
    """Builds the model named by a `config.model` ConfigDict: the TransUNet,
    or ×Net (`model.architecture='xnet'`, `models.xnet.XNet`).

    Args:
      model_config: `config.model`.
      num_outputs: the head's channels where `model_config.num_outputs` is 0
        (stage 3: the dataset's class count); None keeps the config's.
    """
    if model_config.get("architecture", "transunet") == "xnet":
        from ddep_jax.models.xnet import XNet

        x, e = model_config.xnet, model_config.encoder
        decoder = dict(vit_size="none", resnet_layers=tuple(x.decoder_layers),
                       resnet_width=x.decoder_width, image_size=tuple(e.image_size),
                       num_groups=e.num_groups)
        return XNet(encoder_kwargs=encoder_kwargs(e), decoder_kwargs=decoder,
                    num_outputs=model_config.num_outputs or num_outputs or 0,
                    pyramid_width=x.pyramid_width, product=x.product,
                    dtype=jnp.dtype(model_config.dtype), conv=conv_of(model_config))
    return TransUNet(
        encoder_kwargs=encoder_kwargs(model_config.encoder),
        decoder_multiplier=model_config.decoder_multiplier,
        decoder_widths=(tuple(model_config.decoder_widths)
                        if model_config.decoder_widths else None),
        num_outputs=model_config.num_outputs or num_outputs or 0,
        decoder_num_groups=model_config.decoder_num_groups,
        noise_conditioning=model_config.noise_conditioning,
        clean_noise_level=float(model_config.get("clean_noise_level", 0.0)),
        dtype=jnp.dtype(model_config.dtype),
        conv=conv_of(model_config),
    )
