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
- 'auto' (default): XLA's convolutions; on the CPU backend the step is
  compiled with XLA's YNNPACK dot fusions on (`YNN_DOT_OPTIONS`), and
  strided convolutions with at most 4x4 outputs get their input gradient per
  kernel tap (`conv_strided`, `MAX_STRIDED_OUTPUT`): in the stage-1 CIFAR-10
  step XLA CPU lowered that gradient (the ResNet's block3, 8x8 -> 4x4) as a
  batch/feature-swapped convolution taking 168 of 528 ms; per tap the step
  is 1.48-1.54x faster (stage 3 at 96x96 unchanged: 1.04x, noise). The
  ResNet root's max pool takes its gradient per window tap
  (`max_pool_taps`, chosen by `max_pool_of(conv)`): stage-1 step time
  0.94x (1.06x faster), stage 3 1.00x (alternating A/B in one process).
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

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")
CONV_IMPLS = ("auto", "xla", "tap_gemm")
MIN_CHANNELS = 16
"""Input and output channels from which the per-tap gradients are used."""
MIN_STRIDED_CHANNELS = 64
"""Input and output channels from which 'auto' takes the strided per-tap
input gradient: the slow case had 128 -> 256; narrower layers (the tests'
tiny models) keep XLA's, which also compiles faster."""
MAX_STRIDED_OUTPUT = 16
"""'auto' computes a strided convolution's input gradient per tap where its
output has at most this many positions (4x4): there XLA CPU's convolution,
inside the train step, took 168 of 528 ms of the stage-1 CIFAR-10 step (the
ResNet's block3, 8x8 -> 4x4, batch 128); at larger outputs (stage 3 at
96x96: 12x12, 6x6) XLA's is as fast or faster (measured 0.95x overall)."""


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


def _plain_nhwc(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers,
                feature_group_count, batch_group_count, precision,
                preferred_element_type) -> bool:
    """A 2-D NHWC / HWIO convolution without dilation, groups, precision or
    output-type settings: what this module's paths compute."""
    return (lhs.ndim == 4 and rhs.ndim == 4
            and all(d in (None, 1) for d in (lhs_dilation or [None]))
            and all(d in (None, 1) for d in (rhs_dilation or [None]))
            and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
            == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
            and feature_group_count == 1 and batch_group_count == 1
            and precision is None and preferred_element_type is None)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None,
                         feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
    """Drop-in for `lax.conv_general_dilated`, fast-pathing stride-1 SAME convs."""
    kh, kw = rhs.shape[:2] if rhs.ndim == 4 else (0, 0)
    same = [(kh // 2, kh // 2), (kw // 2, kw // 2)]
    fast = (_plain_nhwc(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers,
                        feature_group_count, batch_group_count, precision,
                        preferred_element_type)
            and kh % 2 == 1 and kw % 2 == 1 and tuple(window_strides) == (1, 1)
            and (padding == "SAME" or [tuple(p) for p in padding] == same))
    if fast:
        return conv_same(lhs, rhs)
    return conv_general_dilated_auto(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type)


def explicit_pads(in_hw, kernel_hw, strides, padding) -> list[tuple[int, int]]:
    if isinstance(padding, str):
        return [tuple(p) for p in lax.padtype_to_pads(in_hw, kernel_hw, strides, padding)]
    return [tuple(int(v) for v in p) for p in padding]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_strided(x: jax.Array, w: jax.Array, strides: tuple[int, int],
                 pads: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """x: [B, H, W, Cin], w: [kh, kw, Cin, Cout], strides (sh, sw) > 1, explicit
    pads ((lo, hi), (lo, hi)) -> [B, Ho, Wo, Cout]: `lax.conv_general_dilated`,
    whose input gradient is computed per kernel tap (`strided_input_gradient`)."""
    return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC)


def _conv_strided_fwd(x, w, strides, pads):
    return conv_strided(x, w, strides, pads), (x, w)


def strided_input_gradient(dy: jax.Array, w: jax.Array, in_hw: tuple[int, int],
                           strides: tuple[int, int], pads) -> jax.Array:
    """dx of a strided convolution without a convolution: each tap's
    contribution dy @ w[i, j]^T (a GEMM) lands on the padded input grid at
    rows i + s * y. Taps are grouped by phase (i mod s, j mod s); a phase's
    contributions are shifted sums on a grid s times coarser, and the s x s
    phases are interleaved (depth to space) into the padded input, then
    cropped. XLA CPU lowers this gradient as a convolution that, at small
    spatial sizes (the ResNet's block3 at 8x8 -> 4x4), ran ~60x slower than
    the same FLOPs as GEMMs.

    dy: [B, Ho, Wo, Cout], w: [kh, kw, Cin, Cout] -> [B, H, W, Cin]."""
    kh, kw, cin, _ = w.shape
    b, ho, wo, _ = dy.shape
    (sh, sw), ((lo_h, hi_h), (lo_w, hi_w)) = strides, pads
    hp, wp = in_hw[0] + lo_h + hi_h, in_hw[1] + lo_w + hi_w
    gh, gw = -(-hp // sh), -(-wp // sw)
    acc = jnp.promote_types(dy.dtype, jnp.float32)  # float32 sums for bfloat16
    phases = []
    for p in range(sh):
        row = []
        for q in range(sw):
            grid = jnp.zeros((b, gh, gw, cin), acc)
            for i in range(p, kh, sh):
                for j in range(q, kw, sw):
                    a, c = (i - p) // sh, (j - q) // sw
                    part = jnp.einsum("bhwd,cd->bhwc", dy, w[i, j],
                                      preferred_element_type=acc)
                    grid = grid + jnp.pad(part, ((0, 0), (a, gh - ho - a),
                                                 (c, gw - wo - c), (0, 0)))
            row.append(grid)
        phases.append(jnp.stack(row))
    full = jnp.stack(phases)  # [sh, sw, B, gh, gw, Cin]
    full = full.transpose(2, 3, 0, 4, 1, 5).reshape(b, gh * sh, gw * sw, cin)
    return full[:, lo_h:lo_h + in_hw[0], lo_w:lo_w + in_hw[1]].astype(dy.dtype)


def _conv_strided_bwd(strides, pads, residuals, dy):
    x, w = residuals
    dx = strided_input_gradient(dy, w, x.shape[1:3], strides, pads)
    dw = jax.vjp(lambda k: lax.conv_general_dilated(
        x, k, strides, pads, dimension_numbers=_NHWC), w)[1](dy)[0]
    return dx.astype(x.dtype), dw


conv_strided.defvjp(_conv_strided_fwd, _conv_strided_bwd)


def conv_general_dilated_auto(lhs, rhs, window_strides, padding, lhs_dilation=None,
                              rhs_dilation=None, dimension_numbers=None,
                              feature_group_count=1, batch_group_count=1,
                              precision=None, preferred_element_type=None):
    """Drop-in for `lax.conv_general_dilated` ('auto' on CPU): XLA's
    convolution, except strided NHWC convolutions of at least
    `MIN_STRIDED_CHANNELS` input and output channels and at most `MAX_STRIDED_OUTPUT` output
    positions, whose input gradient is `strided_input_gradient`."""
    if (_plain_nhwc(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers,
                    feature_group_count, batch_group_count, precision,
                    preferred_element_type)
            and any(s > 1 for s in window_strides)
            and min(rhs.shape[2], rhs.shape[3]) >= MIN_STRIDED_CHANNELS):
        strides = tuple(int(s) for s in window_strides)
        pads = tuple(explicit_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding))
        out_hw = [(n + lo + hi - k) // s + 1 for n, (lo, hi), k, s in zip(
            lhs.shape[1:3], pads, rhs.shape[:2], strides)]
        if out_hw[0] * out_hw[1] <= MAX_STRIDED_OUTPUT:
            return conv_strided(lhs, rhs, strides, pads)
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type)


def _window_taps(xp: jax.Array, window: tuple[int, int], strides: tuple[int, int],
                 out_hw: tuple[int, int]):
    """((i, j), xp[:, i::sh, j::sw][:, :Ho, :Wo]) for every tap of the window,
    row-major (the order in which XLA's select-and-scatter visits it)."""
    (kh, kw), (sh, sw), (ho, wo) = window, strides, out_hw
    for i in range(kh):
        for j in range(kw):
            yield (i, j), lax.slice(xp, (0, i, j, 0),
                                    (xp.shape[0], i + sh * (ho - 1) + 1,
                                     j + sw * (wo - 1) + 1, xp.shape[3]),
                                    (1, sh, sw, 1))


def _pool_geometry(x, window, strides, pads):
    (lo_h, hi_h), (lo_w, hi_w) = pads
    hp, wp = x.shape[1] + lo_h + hi_h, x.shape[2] + lo_w + hi_w
    out_hw = ((hp - window[0]) // strides[0] + 1, (wp - window[1]) // strides[1] + 1)
    return (hp, wp), out_hw


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool_taps(x: jax.Array, window: tuple[int, int], strides: tuple[int, int],
                  pads: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """NHWC max pooling, -inf padded, whose gradient is computed per window tap.

    x: [B, H, W, C] float; window (kh, kw); strides (sh, sw); explicit pads
    ((lo, hi), (lo, hi)) -> [B, Ho, Wo, C] of x.dtype, the values of
    `flax.linen.max_pool` / `lax.reduce_window(max)`.

    The gradient goes, as XLA's select-and-scatter sends it, to the first
    maximum of each window in row-major order (ties: after a ReLU whole
    windows are 0), but is computed with elementwise ops: per tap, a mask
    (tap == max and no earlier tap matched) and the masked dy scattered back
    with a strided `lax.pad`. On CPU XLA expands select-and-scatter into a
    reduce-window over (value, index) tuples, index iotas and a scatter:
    ~95 ms of the 446 ms stage-1 CIFAR-10 step (the ResNet root's 3x3/2 pool,
    batch 128, 16x16x64 -> 8x8x64, `jax.profiler` trace). A NaN in a window
    gets no gradient here.
    """
    (lo_h, hi_h), (lo_w, hi_w) = pads
    xp = jnp.pad(x, ((0, 0), (lo_h, hi_h), (lo_w, hi_w), (0, 0)),
                 constant_values=-jnp.inf)
    _, out_hw = _pool_geometry(x, window, strides, pads)
    y = None
    for _, tap in _window_taps(xp, window, strides, out_hw):
        y = tap if y is None else jnp.maximum(y, tap)
    return y


def _max_pool_taps_fwd(x, window, strides, pads):
    y = max_pool_taps(x, window, strides, pads)
    return y, (x, y)


def _max_pool_taps_bwd(window, strides, pads, residuals, dy):
    x, y = residuals
    (lo_h, hi_h), (lo_w, hi_w) = pads
    (hp, wp), (ho, wo) = _pool_geometry(x, window, strides, pads)
    sh, sw = strides
    xp = jnp.pad(x, ((0, 0), (lo_h, hi_h), (lo_w, hi_w), (0, 0)),
                 constant_values=-jnp.inf)
    taken = jnp.zeros(y.shape, bool)
    zero = jnp.zeros((), dy.dtype)
    dxp = jnp.zeros(xp.shape, dy.dtype)
    for (i, j), tap in _window_taps(xp, window, strides, (ho, wo)):
        hit = (tap == y) & ~taken
        taken = taken | hit
        part = jnp.where(hit, dy, zero)
        dxp = dxp + lax.pad(part, zero, ((0, 0, 0),
                                         (i, hp - i - sh * (ho - 1) - 1, sh - 1),
                                         (j, wp - j - sw * (wo - 1) - 1, sw - 1),
                                         (0, 0, 0)))
    return (dxp[:, lo_h:lo_h + x.shape[1], lo_w:lo_w + x.shape[2]],)


max_pool_taps.defvjp(_max_pool_taps_fwd, _max_pool_taps_bwd)


def max_pool_auto(x: jax.Array, window_shape: tuple[int, int],
                  strides: tuple[int, int] | None = None, padding="VALID") -> jax.Array:
    """Drop-in for `flax.linen.max_pool` on NHWC inputs ('auto' and 'tap_gemm'
    on CPU): `max_pool_taps` for a float [B, H, W, C] input, `nn.max_pool`
    otherwise. strides: None means 1; padding: 'SAME', 'VALID' or
    ((lo, hi), (lo, hi))."""
    window = tuple(int(k) for k in window_shape)
    strides = tuple(int(s) for s in strides) if strides is not None else (1,) * len(window)
    if x.ndim != 4 or len(window) != 2 or not jnp.issubdtype(x.dtype, jnp.floating):
        return nn.max_pool(x, window, strides, padding)
    pads = tuple(explicit_pads(x.shape[1:3], window, strides, padding))
    return max_pool_taps(x, window, strides, pads)


def max_pool_of(conv: Callable) -> Callable:
    """The max pooling that goes with a model's convolution function (so that
    `model.conv` alone selects the CPU paths): `max_pool_auto` for this
    module's CPU functions (`resolve('auto')` and `resolve('tap_gemm')` on the
    CPU backend), `flax.linen.max_pool` for anything else (XLA's
    reduce-window and select-and-scatter, what GPUs and TPUs run)."""
    if conv is conv_general_dilated_auto or (
            conv is conv_general_dilated and jax.default_backend() == "cpu"):
        return max_pool_auto
    return nn.max_pool


YNN_DOT_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
"""XLA CPU compiler options: YNNPACK's dot fusions on, as
`--xla_cpu_experimental_ynn_fusion_type=dot` would for the whole process
(the kernel-gradient convolutions get faster with it; see above)."""


CPU_DOT_FUSIONS = ("ynn", "xla")
"""`model.cpu_dot_fusion`: the dots of an 'auto' / 'tap_gemm' step on CPU,
by YNNPACK ('ynn', `YNN_DOT_OPTIONS`) or XLA ('xla'). Which is faster
depends on the shapes and threads (docs/performance.md, "CPU convolutions")."""


def compiler_options(impl: str, dot_fusion: str = "ynn") -> dict[str, str] | None:
    """The XLA compiler options (`jax.jit(..., compiler_options=...)`) of a
    `model.conv` setting on the current backend: `YNN_DOT_OPTIONS` for 'auto'
    and 'tap_gemm' on CPU with `dot_fusion` 'ynn' (`model.cpu_dot_fusion`),
    None (XLA's defaults) otherwise.

    Raises:
      ValueError: `impl` is not one of `CONV_IMPLS`, or `dot_fusion` not one
        of `CPU_DOT_FUSIONS`.
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"model.conv={impl!r}: expected one of {CONV_IMPLS}.")
    if dot_fusion not in CPU_DOT_FUSIONS:
        raise ValueError(f"model.cpu_dot_fusion={dot_fusion!r}: expected one of "
                         f"{CPU_DOT_FUSIONS}.")
    if impl != "xla" and dot_fusion == "ynn" and jax.default_backend() == "cpu":
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
    if impl == "auto":
        if jax.default_backend() == "cpu":
            return conv_general_dilated_auto
        return lax.conv_general_dilated
    if impl == "xla":
        return lax.conv_general_dilated
    if impl == "tap_gemm":
        return conv_general_dilated
    raise ValueError(f"model.conv={impl!r}: expected one of {CONV_IMPLS}.")
