"""Stride-1 'SAME' convolution whose kernel gradient is computed as GEMMs.

Why: XLA's CPU backend lowers the kernel-gradient convolution of a
high-resolution layer with many channels (the decoder's 1/2 and
full-resolution blocks: 48x48-224x224 maps, 64-128 channels) at 10-15% of
the dense matmul peak on 2 cores, while the forward and input-gradient
convolutions of the same layer run at 60-95%; those kernel gradients then
dominate the DDeP step. Here the kernel gradient is one GEMM per kernel tap
over the flattened, padded batch:

    x_pad: [B, H + kh - 1, W + kw - 1, Cin] flattened to rows r,
    dy_pad: dy on the same grid (zero in the padding), flattened,
    dW[i, j] = sum_r x_pad[r + i * (W + kw - 1) + j, :]^T dy_pad[r, :],

so every tap reads one contiguous row range of x_pad (products that would
wrap into a neighbouring row or image meet a zero of dy_pad), and the taps
run one at a time in a loop (one shifted copy live). Layers with fewer than
`MIN_CHANNELS` input or output channels (the 3-channel head) keep XLA's
kernel gradient, which is faster there. The input gradient is the forward
convolution of dy with the spatially flipped, in/out-transposed kernel. The
function is the same as `lax.conv_general_dilated` (tests compare values and
gradients); any other configuration (strides, dilation, groups, even kernels,
other layouts) falls through to `lax.conv_general_dilated`.

Measured on this project's 2-core CPU (jaxlib 0.10.2, fp32, batch 16), kernel
gradient alone, XLA -> here: 96x96 64->64 511 -> 360 ms; 48x48 128->64
216 -> 145 ms; 24x24 160->96 65 -> 29 ms; 96x96 64->3 52 -> 191 ms (hence
the channel threshold).

Which implementation a model uses is its config value `model.conv`
(`CONV_IMPLS`), turned into a function once, where the model is built
(`resolve`), and into XLA compiler options where its steps are jitted
(`compiler_options`):
- 'auto' (default): XLA's convolutions everywhere; on the CPU backend the
  step is compiled with XLA's YNNPACK dot fusions on (`YNN_DOT_OPTIONS`).
  With them XLA CPU runs the kernel-gradient convolutions 3-4x faster (the
  96x96 64->64 one above: 484 -> 141 ms; the optimised HLO is the same
  convolution, so the difference is in the runtime kernel XLA picks, not
  inspected further), faster than the per-tap GEMMs here; the CPU DDeP step
  of configs/ddep_camvid.py 2.1 -> 1.4 s. GPU and TPU compile with their
  defaults.
- 'xla': plain `lax.conv_general_dilated` and XLA's default options
  everywhere (FLOP counting asks for it: XLA's cost analysis counts neither
  YNNPACK fusions nor more than one pass of the per-tap loop).
- 'tap_gemm': this module's per-tap kernel gradient everywhere (with the
  YNNPACK dots on CPU).

Usage: `nn.Conv(..., conv_general_dilated=resolve(config.model.conv))`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")
CONV_IMPLS = ("auto", "xla", "tap_gemm")
MIN_CHANNELS = 16
"""Input and output channels from which the per-tap kernel gradient is used."""


def _conv(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=_NHWC)


@jax.custom_vjp
def conv_same(x: jax.Array, w: jax.Array) -> jax.Array:
    """x: [B, H, W, Cin], w: [kh, kw, Cin, Cout] (odd kh, kw) -> [B, H, W, Cout]."""
    return _conv(x, w)


def _conv_same_fwd(x, w):
    return _conv(x, w), (x, w)


def kernel_gradient(x: jax.Array, dy: jax.Array, kh: int, kw: int) -> jax.Array:
    """dW of a stride-1 SAME convolution as one GEMM per tap (module docstring).

    x: [B, H, W, Cin], dy: [B, H, W, Cout] -> [kh, kw, Cin, Cout] float32
    accumulation, in x's dtype."""
    b, h, w, cin = x.shape
    cout = dy.shape[-1]
    ph, pw = kh // 2, kw // 2
    width = w + 2 * pw
    rows = b * (h + 2 * ph) * width
    x_pad = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0))).reshape(rows, cin)
    dy_pad = jnp.pad(dy, ((0, 0), (0, 2 * ph), (0, 2 * pw), (0, 0))).reshape(rows, cout)
    n = rows - (kh - 1) * width - (kw - 1)  # the rows every tap can shift by
    dy_rows = dy_pad[:n]

    def tap(offset):
        shifted = lax.dynamic_slice_in_dim(x_pad, offset, n)
        return jnp.einsum("rc,rd->cd", shifted, dy_rows,
                          preferred_element_type=jnp.float32)

    offsets = jnp.array([i * width + j for i in range(kh) for j in range(kw)],
                        jnp.int32)
    return lax.map(tap, offsets).reshape(kh, kw, cin, cout).astype(x.dtype)


def _conv_same_bwd(residuals, dy):
    x, w = residuals
    kh, kw, cin, cout = w.shape
    dx = _conv(dy, jnp.swapaxes(w[::-1, ::-1], 2, 3))
    if min(cin, cout) >= MIN_CHANNELS:
        dw = kernel_gradient(x, dy, kh, kw).astype(w.dtype)
    else:  # XLA's kernel-gradient convolution is faster for few channels
        dw = jax.vjp(lambda k: _conv(x, k), w)[1](dy)[0]
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


YNN_DOT_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
"""XLA CPU compiler options: YNNPACK's dot fusions on, as
`--xla_cpu_experimental_ynn_fusion_type=dot` would for the whole process
(the kernel-gradient convolutions get faster with it; see above)."""


def compiler_options(impl: str) -> dict[str, str] | None:
    """The XLA compiler options (`jax.jit(..., compiler_options=...)`) of a
    `model.conv` setting on the current backend: `YNN_DOT_OPTIONS` for 'auto'
    and 'tap_gemm' on CPU, None (XLA's defaults) otherwise.

    Raises:
      ValueError: `impl` is not one of `CONV_IMPLS`.
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"model.conv={impl!r}: expected one of {CONV_IMPLS}.")
    if impl != "xla" and jax.default_backend() == "cpu":
        return dict(YNN_DOT_OPTIONS)
    return None


def resolve(impl: str) -> Callable:
    """The `conv_general_dilated` function of a `model.conv` setting.

    Args:
      impl: 'auto' or 'xla' (XLA's convolution), or 'tap_gemm' (this
        module's per-tap kernel gradient).

    Raises:
      ValueError: `impl` is not one of `CONV_IMPLS`.
    """
    if impl in ("auto", "xla"):
        return lax.conv_general_dilated
    if impl == "tap_gemm":
        return conv_general_dilated
    raise ValueError(f"model.conv={impl!r}: expected one of {CONV_IMPLS}.")
