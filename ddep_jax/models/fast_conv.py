"""Stride-1 'SAME' convolution whose kernel gradient is computed as GEMMs.

Why: XLA's CPU backend lowers the kernel-gradient convolution of a
high-resolution, low-channel layer (the decoder's 1/2 and full-resolution
blocks: 112x112 and 224x224 maps, 64-128 channels) at about 10 GFLOP/s on
2 cores, ten times slower than the forward convolution; those layers then
dominate the DDeP step. Here the kernel gradient is one matmul per kernel
tap,

    dW[i, j] = sum_{b, h, w} x_pad[b, h + i, w + j, :]^T  dy[b, h, w, :],

which runs at matmul speed, and the input gradient is the forward
convolution of dy with the spatially flipped, in/out-transposed kernel. The
function is the same as `lax.conv_general_dilated` (tests compare values and
gradients); any other configuration (strides, dilation, groups, even kernels,
other layouts) falls through to `lax.conv_general_dilated`.

Which implementation a model uses is its config value `model.conv`
(`CONV_IMPLS`), turned into a function once, where the model is built
(`resolve`): 'auto' takes this path on the CPU backend only (on GPU and TPU
the vendor libraries' kernel-gradient convolutions are the fast choice);
'xla' is plain `lax.conv_general_dilated` everywhere (FLOP counting asks for
it: XLA's cost analysis counts the body of the per-tap loop once); 'tap_gemm'
is this path everywhere.

Usage: `nn.Conv(..., conv_general_dilated=resolve(config.model.conv))`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")
CONV_IMPLS = ("auto", "xla", "tap_gemm")


def _conv(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=_NHWC)


@jax.custom_vjp
def conv_same(x: jax.Array, w: jax.Array) -> jax.Array:
    """x: [B, H, W, Cin], w: [kh, kw, Cin, Cout] (odd kh, kw) -> [B, H, W, Cout]."""
    return _conv(x, w)


def _conv_same_fwd(x, w):
    return _conv(x, w), (x, w)


def _conv_same_bwd(residuals, dy):
    x, w = residuals
    kh, kw = w.shape[:2]
    _, h, wd, _ = x.shape
    dx = _conv(dy, jnp.swapaxes(w[::-1, ::-1], 2, 3))
    x_pad = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))

    def tap(offset):
        # One shifted view of x at a time (a loop, so only one is ever live).
        shifted = lax.dynamic_slice(x_pad, (0, offset[0], offset[1], 0), x.shape)
        return jnp.einsum("bhwc,bhwd->cd", shifted, dy,
                          preferred_element_type=jnp.float32)

    offsets = jnp.array([(i, j) for i in range(kh) for j in range(kw)], jnp.int32)
    dw = lax.map(tap, offsets).reshape(w.shape).astype(w.dtype)
    return dx.astype(x.dtype), dw


conv_same.defvjp(_conv_same_fwd, _conv_same_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None,
                         feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
    """Drop-in for `lax.conv_general_dilated`, fast-pathing stride-1 SAME convs."""
    kh, kw = rhs.shape[:2] if rhs.ndim == 4 else (0, 0)
    same = [(kh // 2, kh // 2), (kw // 2, kw // 2)]
    nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
    fast = (lhs.ndim == 4 and kh % 2 == 1 and kw % 2 == 1
            and tuple(window_strides) == (1, 1)
            and (padding == "SAME" or [tuple(p) for p in padding] == same)
            and all(d in (None, 1) for d in (lhs_dilation or [None]))
            and all(d in (None, 1) for d in (rhs_dilation or [None]))
            and lax.conv_dimension_numbers(lhs.shape, rhs.shape,
                                           dimension_numbers) == nhwc
            and feature_group_count == 1 and batch_group_count == 1
            and precision is None and preferred_element_type is None)
    if fast:
        return conv_same(lhs, rhs)
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type)


def resolve(impl: str) -> Callable:
    """The `conv_general_dilated` function of a `model.conv` setting.

    Args:
      impl: 'auto' (the per-tap GEMM path on the CPU backend, XLA's
        convolution elsewhere), 'xla' or 'tap_gemm'.

    Raises:
      ValueError: `impl` is not one of `CONV_IMPLS`.
    """
    if impl == "auto":
        impl = "tap_gemm" if jax.default_backend() == "cpu" else "xla"
    if impl == "xla":
        return lax.conv_general_dilated
    if impl == "tap_gemm":
        return conv_general_dilated
    raise ValueError(f"model.conv={impl!r}: expected one of {CONV_IMPLS}.")
