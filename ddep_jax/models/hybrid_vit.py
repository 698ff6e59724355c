"""Hybrid-ViT encoder (ResNet stem + ViT), as in the public R50+ViT-B/16; with
`resnet_layers=()` the plain ViT-X/16 (16x16 patches on the pixels, no skips);
with `vit_size='none'` and four stages a plain ResNet (R50: (3, 4, 6, 3)),
the encoder of the paper's Table 7 U-Net (no transformer, output at 1/32).

Source: Dosovitskiy et al. 2021 (ViT, "hybrid" models); TransUNet (Chen et al.
2021) uses this encoder and takes skip features from its CNN stages; DDeP
(Brempong et al. 2022, Sec. 2, Fig. 2) keeps it unchanged.

Parameter names and shapes follow the Linen layout of the public
`google-research/vision_transformer` checkpoints, so that their `.npz` files
map onto this module by renaming keys only:

    conv_root/kernel            [7, 7, 3, W]          (raw, standardised at use)
    gn_root/{scale,bias}        [W]                   (upstream: [1, 1, 1, W])
    block{s}/unit{u}/conv{1,2,3}/kernel, gn{1,2,3}/{scale,bias}
    block{s}/unit1/conv_proj/kernel, gn_proj/{scale,bias}
    embedding/{kernel,bias}     [P, P, 16W, D], [D]    (plain ViT: [16P, 16P, 3, D])
    Transformer/posembed_input/pos_embedding   [1, h*w, D]  (no class token)
    Transformer/encoderblock_{i}/LayerNorm_0, MultiHeadDotProductAttention_0
        ({query,key,value}/kernel [D, heads, D/heads], out/kernel
        [heads, D/heads, D]), LayerNorm_1, MlpBlock_0/Dense_{0,1}
    Transformer/encoder_norm/{scale,bias}

The pre-Linen checkpoints name the block children LayerNorm_0,
MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3; the importer
(`ddep_jax.checkpoints.vit_import`) renames those.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from ddep_jax.models import fast_conv


# ViT widths by name (Dosovitskiy et al. 2021, Table 1; Ti/S from DeiT / AugReg).
# 'mu' and 'nano' are tiny sizes for tests and CPU smoke runs.
VIT_SIZES: dict[str, dict[str, int]] = {
    "mu": dict(hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64),
    "nano": dict(hidden_size=96, num_layers=4, num_heads=3, mlp_dim=384),
    "Ti": dict(hidden_size=192, num_layers=12, num_heads=3, mlp_dim=768),
    "S": dict(hidden_size=384, num_layers=12, num_heads=6, mlp_dim=1536),
    "B": dict(hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072),
    "L": dict(hidden_size=1024, num_layers=24, num_heads=16, mlp_dim=4096),
    # No transformer: the ResNet's last (fourth) stage is the encoder output.
    "none": {},
}
NO_VIT = "none"


def weight_standardize(kernel: jax.Array, eps: float = 1e-5) -> jax.Array:
    """Standardises a conv kernel per output channel (Qiao et al. 2019).

    Args:
      kernel: float [kh, kw, c_in, c_out].
      eps: added to the standard deviation (upstream BiT/ViT value 1e-5).

    Returns:
      (kernel - mean) / (std + eps), mean and std over axes (0, 1, 2).
    """
    mean = jnp.mean(kernel, axis=(0, 1, 2), keepdims=True)
    std = jnp.std(kernel, axis=(0, 1, 2), keepdims=True)
    return (kernel - mean) / (std + eps)


class StdConv(nn.Conv):
    """Conv whose stored `kernel` is raw and standardised on every use (BiT).

    Its `conv_general_dilated` is the model's convolution setting
    (`fast_conv.resolve`): on CPU the stride-1 convolutions take the per-tap
    GEMM kernel gradient, which matters for DeP, where the encoder trains.
    """

    def param(self, name, *args, **kwargs):
        value = super().param(name, *args, **kwargs)
        if name == "kernel":
            value = weight_standardize(value)
        return value


class BottleneckUnit(nn.Module):
    """ResNet bottleneck unit of the hybrid's stem (upstream `ResidualUnit`).

    1x1 -> 3x3 (strided) -> 1x1 (x4 channels), GroupNorm after each conv, the
    last GroupNorm's scale initialised to zero, projection shortcut where the
    shape changes.
    """

    features: int
    strides: int = 1
    num_groups: int = 32
    dtype: Any = jnp.float32
    conv: Callable = lax.conv_general_dilated

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda f, k, s, name: StdConv(  # noqa: E731
            f, (k, k), (s, s), use_bias=False, dtype=self.dtype,
            conv_general_dilated=self.conv, name=name)
        norm = lambda name, **kw: nn.GroupNorm(  # noqa: E731
            self.num_groups, dtype=self.dtype, name=name, **kw)
        out_features = 4 * self.features
        residual = x
        if x.shape[-1] != out_features or self.strides != 1:
            residual = conv(out_features, 1, self.strides, "conv_proj")(x)
            residual = norm("gn_proj")(residual)
        y = nn.relu(norm("gn1")(conv(self.features, 1, 1, "conv1")(x)))
        y = nn.relu(norm("gn2")(conv(self.features, 3, self.strides, "conv2")(y)))
        y = norm("gn3", scale_init=nn.initializers.zeros)(
            conv(out_features, 1, 1, "conv3")(y))
        return nn.relu(residual + y)


class ResNetStage(nn.Module):
    """`num_units` bottleneck units named unit1..unitN; the first one strides."""

    num_units: int
    features: int
    first_stride: int
    num_groups: int = 32
    dtype: Any = jnp.float32
    conv: Callable = lax.conv_general_dilated

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for u in range(self.num_units):
            x = BottleneckUnit(self.features, self.first_stride if u == 0 else 1,
                               self.num_groups, self.dtype, self.conv,
                               name=f"unit{u + 1}")(x)
        return x


class MlpBlock(nn.Module):
    mlp_dim: int
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        out_dim = x.shape[-1]
        dense = lambda f, name: nn.Dense(  # noqa: E731
            f, dtype=self.dtype, name=name,
            kernel_init=nn.initializers.xavier_uniform(),
            bias_init=nn.initializers.normal(stddev=1e-6))
        # tanh-approximated GELU, as upstream (flax `nn.gelu`'s default), so
        # that imported checkpoints compute what they were trained with.
        y = nn.gelu(dense(self.mlp_dim, "Dense_0")(x), approximate=True)
        y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
        y = dense(out_dim, "Dense_1")(y)
        return nn.Dropout(self.dropout_rate, deterministic=not train)(y)


class EncoderBlock(nn.Module):
    """Pre-LayerNorm transformer block (ViT `Encoder1DBlock`)."""

    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        y = nn.LayerNorm(dtype=self.dtype, name="LayerNorm_0")(x)
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads, dtype=self.dtype,
            # Mixed precision: the attention softmax stays in float32.
            force_fp32_for_softmax=True,
            kernel_init=nn.initializers.xavier_uniform(),
            # No attention dropout (upstream ViT's attention_dropout_rate=0).
            dropout_rate=0.0,
            deterministic=not train, name="MultiHeadDotProductAttention_0")(y, y)
        x = x + nn.Dropout(self.dropout_rate, deterministic=not train)(y)
        y = nn.LayerNorm(dtype=self.dtype, name="LayerNorm_1")(x)
        y = MlpBlock(self.mlp_dim, self.dropout_rate, self.dtype,
                     name="MlpBlock_0")(y, train=train)
        return x + y


def resize_pos_embedding(pos_emb: jax.Array, old_grid: tuple[int, int],
                         new_grid: tuple[int, int]) -> jax.Array:
    """Resamples a learned position embedding to another token grid, as upstream.

    Computes `scipy.ndimage.zoom(grid, (h / gh, w / gw, 1), order=1)` on the
    [gh, gw, D] grid: per axis, linear interpolation with aligned corners
    (scipy's default grid_mode=False: output i samples input coordinate
    i * (g - 1) / (n - 1); a 1-token output axis samples coordinate 0, a
    1-token input axis is copied), no antialiasing when shrinking. Source:
    google-research/vision_transformer's checkpoint loading
    (`vit_jax/checkpoint.py` `load_pretrained`, which resamples
    `Transformer/posembed_input/pos_embedding` of `models_vit.AddPositionEmbs`
    for fine-tuning at another resolution) and TransUNet's `load_from`
    (`networks/vit_seg_modeling.py`), both with `scipy.ndimage.zoom(order=1)`;
    the public checkpoints were fine-tuned with it.

    Traceable with static grids (a constant [n, g] weight matrix per axis and
    two einsums at HIGHEST precision, in float32 or wider), so the encoder can
    resample its embedding to the input's token grid inside `jit`.

    Args:
      pos_emb: [B, gh * gw, D] (B = 1 for the parameter), no class-token row.
      old_grid: (gh, gw) the embedding was learned for.
      new_grid: (h, w) wanted.

    Returns:
      [B, h * w, D] of `pos_emb`'s dtype; `pos_emb` itself when the grids are
      equal.

    Raises:
      ValueError: `pos_emb` is not [B, gh * gw, D].
    """
    old_grid = tuple(int(g) for g in old_grid)
    new_grid = tuple(int(g) for g in new_grid)
    if old_grid == new_grid:
        return pos_emb
    if pos_emb.ndim != 3 or pos_emb.shape[1] != old_grid[0] * old_grid[1]:
        raise ValueError(f"pos_emb {tuple(pos_emb.shape)} is not [B, gh * gw, D] "
                         f"for old_grid {old_grid}")

    def weights(n: int, g: int) -> list[list[float]]:
        """[n][g] order-1 zoom weights along one axis (rows sum to 1)."""
        step = (g - 1) / (n - 1) if n > 1 else 0.0  # scipy: factor 1 if n == 1
        rows = []
        for i in range(n):
            coord = min(max(i * step, 0.0), g - 1.0)
            lo = min(int(coord), g - 1)
            hi = min(lo + 1, g - 1)
            row = [0.0] * g
            row[lo] += 1.0 - (coord - lo)
            row[hi] += coord - lo
            rows.append(row)
        return rows

    b, _, d = pos_emb.shape
    compute = jnp.promote_types(pos_emb.dtype, jnp.float32)
    rows = jnp.asarray(weights(new_grid[0], old_grid[0]), compute)
    cols = jnp.asarray(weights(new_grid[1], old_grid[1]), compute)
    grid = pos_emb.astype(compute).reshape(b, *old_grid, d)
    highest = jax.lax.Precision.HIGHEST
    grid = jnp.einsum("ig,bghd->bihd", rows, grid, precision=highest)
    grid = jnp.einsum("jh,bihd->bijd", cols, grid, precision=highest)
    return grid.reshape(b, new_grid[0] * new_grid[1], d).astype(pos_emb.dtype)


class PosEmbedding(nn.Module):
    """Learned additive position embedding (upstream `AddPositionEmbs`)."""

    grid: tuple[int, int]

    @nn.compact
    def __call__(self, tokens: jax.Array, grid: tuple[int, int]) -> jax.Array:
        d = tokens.shape[-1]
        pos = self.param("pos_embedding", nn.initializers.normal(stddev=0.02),
                         (1, self.grid[0] * self.grid[1], d))
        return tokens + resize_pos_embedding(pos, self.grid, grid).astype(tokens.dtype)


class ViTEncoder(nn.Module):
    """The ViT part (upstream `Encoder`, scope name 'Transformer')."""

    num_layers: int
    num_heads: int
    mlp_dim: int
    pos_grid: tuple[int, int]
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, grid: tuple[int, int], *,
                 train: bool) -> jax.Array:
        x = PosEmbedding(self.pos_grid, name="posembed_input")(tokens, grid)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        for i in range(self.num_layers):
            x = EncoderBlock(self.num_heads, self.mlp_dim, self.dropout_rate,
                             self.dtype,
                             name=f"encoderblock_{i}")(x, train=train)
        return nn.LayerNorm(dtype=self.dtype, name="encoder_norm")(x)


@dataclasses.dataclass(frozen=True)
class EncoderFeatures:
    """What the encoder hands to the decoder.

    tokens: [B, H/16, W/16, D] ViT output reshaped to its grid; for the plain
      ResNet (`vit_size='none'`) the last stage's map [B, H/32, W/32, 32W].
    skips: features at 1/2 (root, W channels), 1/4 (4W), 1/8 (8W), finest first,
      and for the plain ResNet also 1/16 (16W); () for the plain ViT (the
      decoder then upsamples without skips).
    """

    tokens: jax.Array
    skips: tuple[jax.Array, ...]


jax.tree_util.register_dataclass(
    EncoderFeatures, data_fields=["tokens", "skips"], meta_fields=[])


class HybridViT(nn.Module):
    """R{layers}+ViT-{size}/16 encoder returning the token map and skip features.

    Attributes:
      vit_size: key of `VIT_SIZES` ('B' for the paper's R50+ViT-B/16);
        'none': no transformer, a plain ResNet of four stages (ResNet-50:
        `resnet_layers=(3, 4, 6, 3)`, outputs 4W..32W channels at 1/4..1/32),
        the encoder of the paper's ResNet-50 U-Net (Table 7).
      resnet_layers: bottleneck units per stage; (3, 4, 9) is the public R50
        hybrid (3 stages: outputs 4W, 8W, 16W channels at 1/4, 1/8, 1/16).
        () means no ResNet at all: the plain ViT-X/16, whose `embedding` is a
        16x16 stride-16 patch conv on the image and whose `skips` are ().
        (Upstream's `resnet.num_layers=()`, as in R+ViT-Ti/16, instead keeps
        the root conv; that model is not supported here.)
      resnet_width: W, channels of the root conv (64 upstream); unused when
        `resnet_layers=()`.
      image_size: (H, W) pixels the position embedding is learned for; other
        input sizes are served by resampling the embedding as upstream does
        (`resize_pos_embedding`: scipy.ndimage.zoom, order 1).
      num_groups: GroupNorm groups (32 upstream).
      dropout_rate: dropout in the transformer blocks (stage 1).
      conv: the ResNet convolutions' `conv_general_dilated`
        (`fast_conv.resolve(config.model.conv)`); it also selects the root's
        max pooling (`fast_conv.max_pool_of`).

    Call: images float [B, H, W, 3] in [-1, 1], H and W multiples of 16 (32
      for the plain ResNet) -> `EncoderFeatures`.

    Raises:
      ValueError: `resnet_layers` has neither 3 stages nor none (4 stages with
        `vit_size='none'`).
    """

    vit_size: str = "B"
    resnet_layers: Sequence[int] = (3, 4, 9)
    resnet_width: int = 64
    image_size: tuple[int, int] = (224, 224)
    num_groups: int = 32
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    conv: Callable = lax.conv_general_dilated

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> EncoderFeatures:
        layers = tuple(self.resnet_layers)
        if self.vit_size == NO_VIT:
            if len(layers) != 4:
                raise ValueError(
                    f"resnet_layers={layers} with vit_size='none': the plain ResNet "
                    "encoder needs 4 stages, e.g. (3, 4, 6, 3) for ResNet-50.")
            x, skips = self._resnet(images.astype(self.dtype), layers)
            return EncoderFeatures(x, skips)  # output at 1/32
        if layers and len(layers) != 3:
            raise ValueError(
                f"resnet_layers={layers}: the hybrid encoder needs exactly 3 ResNet "
                "stages (skips at 1/2, 1/4, 1/8, tokens at 1/16), or () for a "
                "plain ViT/16 (patch embedding on the pixels, no skips).")
        size = VIT_SIZES[self.vit_size]
        x, skips = images.astype(self.dtype), ()
        if layers:
            x, skips = self._resnet(x, layers)
            patch = 1  # one token per position of the 1/16 map
        else:
            patch = 16  # ViT/16 patches on the pixels
        x = nn.Conv(size["hidden_size"], (patch, patch), (patch, patch),
                    padding="VALID", dtype=self.dtype, name="embedding")(x)
        b, h, w, d = x.shape
        pos_grid = (self.image_size[0] // 16, self.image_size[1] // 16)
        tokens = ViTEncoder(size["num_layers"], size["num_heads"], size["mlp_dim"],
                            pos_grid, self.dropout_rate, self.dtype,
                            name="Transformer")(x.reshape(b, h * w, d), (h, w),
                                                train=train)
        return EncoderFeatures(tokens.reshape(b, h, w, d), skips)

    def _resnet(self, x: jax.Array, layers: tuple[int, ...]):
        """Root conv (7x7/2, GroupNorm, ReLU), 3x3/2 max pool, then the
        bottleneck stages (the first at stride 1, the others 2): (the last
        stage's map, skips = the root's 1/2 map and every stage's output but
        the last's, finest first). Called from `__call__` (compact)."""
        width = self.resnet_width
        x = StdConv(width, (7, 7), (2, 2), use_bias=False, dtype=self.dtype,
                    conv_general_dilated=self.conv, name="conv_root")(x)
        x = nn.relu(nn.GroupNorm(self.num_groups, dtype=self.dtype, name="gn_root")(x))
        skips = [x]  # 1/2
        # On CPU ("auto"), a max pool whose gradient avoids select-and-scatter.
        x = fast_conv.max_pool_of(self.conv)(x, (3, 3), strides=(2, 2), padding="SAME")
        for s, num_units in enumerate(layers):
            x = ResNetStage(num_units, width * 2**s, 2 if s > 0 else 1, self.num_groups,
                            self.dtype, self.conv, name=f"block{s + 1}")(x)
            if s < len(layers) - 1:
                skips.append(x)  # 1/4, 1/8 (and 1/16 with four stages)
        return x, tuple(skips)
