"""Hybrid-ViT image classifier: stage 1 (supervised encoder pretraining).

The paper's encoder is a Hybrid-ViT trained as an ImageNet-21k classifier
(DDeP Sec. 2 and 5.1, Dosovitskiy et al. 2021). Here the classifier is the
very `HybridViT` that TransUNet uses, under the same top-level collection
name `encoder`, plus a `head`:

    params = {'encoder': <HybridViT params, identical paths/shapes to
                          TransUNet's 'encoder'>,
              'head': {'kernel': [D, num_classes], 'bias': [num_classes]}}

so a stage-1 checkpoint hands its `encoder` to stage 2 or 3 leaf for leaf.

Pooling is global average pooling over the ViT tokens after the final
LayerNorm (the 'gap' classifier of the ViT paper's Appendix D.3 and of
big_vision). A class token would add a parameter and a position-embedding row
outside the shared encoder tree, which TransUNet has no use for (the public
checkpoints' class-token row is dropped on import for the same reason).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from ddep_jax.models import transunet
from ddep_jax.models.hybrid_vit import HybridViT


class HybridViTClassifier(nn.Module):
    """Hybrid-ViT encoder -> mean over tokens -> linear head (logits).

    Attributes:
      encoder_kwargs: keyword arguments of `HybridViT` (as in `TransUNet`).
      num_classes: logits per image.
      head_bias_init: initial head bias; upstream ViT zero-initialises the
        head kernel, and big_vision sets the bias to -10 for sigmoid
        cross-entropy on ImageNet-21k (a low initial prior per class).

    Call: images float [B, H, W, 3] in [-1, 1] (H, W multiples of 16) ->
      float32 logits [B, num_classes].
    """

    encoder_kwargs: Mapping[str, Any]
    num_classes: int
    head_bias_init: float = 0.0
    dtype: Any = jnp.float32
    conv: Callable = lax.conv_general_dilated

    def setup(self):
        self.encoder = HybridViT(**dict(self.encoder_kwargs), dtype=self.dtype,
                                 conv=self.conv)
        self.head = nn.Dense(self.num_classes, dtype=self.dtype,
                             kernel_init=nn.initializers.zeros,
                             bias_init=nn.initializers.constant(self.head_bias_init))

    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        tokens = self.encoder(images, train=train).tokens  # [B, h, w, D]
        pooled = jnp.mean(tokens, axis=(1, 2))
        return self.head(pooled).astype(jnp.float32)


def build_classifier(model_config, num_classes: int,
                     head_bias_init: float = 0.0) -> HybridViTClassifier:
    """The classifier whose encoder is `model_config.encoder` (the same
    ConfigDict layout as the TransUNet stages, so stage 2 can copy it)."""
    return HybridViTClassifier(
        encoder_kwargs=transunet.encoder_kwargs(model_config.encoder),
        num_classes=num_classes, head_bias_init=head_bias_init,
        dtype=jnp.dtype(model_config.dtype), conv=transunet.conv_of(model_config))
