"""The inference function of a fine-tuned model as an ONNX model (jax2onnx).

`python -m ddep_jax.export --format=onnx` calls `export_onnx`; docs/onnx.md
is the user's guide (running the model with onnxruntime alone, what to
install, accuracy and latency).

How the model gets to ONNX, and why this way:

1. The model is rebuilt with ``config.model.conv='xla'`` (`export_model`):
   plain ``lax.conv_general_dilated`` and ``flax.linen.max_pool``. The CPU
   training paths of `models.fast_conv` ('auto', 'tap_gemm') differ only in
   their *gradients* (custom VJPs: per-tap GEMM kernel gradients, per-tap
   max-pool gradients); their forward values are XLA's convolution and max
   pool, so the parameters and the logits are the same.
2. The inference function (uint8 [b, H, W, 3] -> float32 logits
   [b, H, W, C], b symbolic) is traced to a jaxpr by JAX itself
   (`trace_inference`), *outside* jax2onnx. jax2onnx's Flax plugins replace
   ``flax.linen.Conv.__call__`` (and GroupNorm, attention, max_pool...) while
   it traces; its Conv plugin reads the stored ``kernel`` and so skips the
   weight standardisation of our `hybrid_vit.StdConv` (whose ``param``
   standardises the kernel on every use): converted that way the R50's
   logits were wrong by as much as their own scale (argmax agreement 50%).
   Its linen max_pool patch also takes ``window_shape`` only by keyword
   (our encoder passes it positionally: TypeError). A jaxpr holds only
   ``lax`` primitives, whose values are what XLA computes.
3. jax2onnx converts that jaxpr, evaluated by `_evaluate`, an interpreter
   that inlines nested calls (``jit``, ``custom_jvp_call`` of ReLU / GELU /
   softmax, ``custom_vjp_call``) and rewrites two primitives:
   ``reduce_window_max`` (the ResNet root's 3x3/2 max pool on NHWC). jax2onnx
   lowers it to a MaxPool over all four NHWC axes (a 6-D tensor), which
   onnxruntime rejects ("Unsupported pooling size"); here it becomes the
   maximum of the 9 strided slices of the edge-padded input
   (`max_pool_as_slices`: Slice, Concat, strided Slice, Max in ONNX), the
   same values exactly. And ``stack`` (``jnp.stack``, a primitive since
   JAX 0.10; in the decoder's upsampling), which jax2onnx 0.13 has no
   lowering for, becomes a concatenation of expanded arrays.

Everything else converts primitive by primitive: the convolutions
(``conv_general_dilated`` -> Conv, with the weight standardisation computed
in the graph from the stored kernel: ReduceMean/Sub/Sqrt/Div), GroupNorm and
LayerNorm (their mean / variance / rsqrt arithmetic), attention
(``dot_general`` -> MatMul/Einsum, softmax's exp / reduce_max / reduce_sum),
the decoder's x2 bilinear upsampling (slices, concatenations and 0.75 / 0.25
weights: no Resize op), the position-embedding resampling (two einsums with
constant weights) and the noise-conditioning path (a constant sigma's
sinusoidal embedding, Dense, swish, FiLM). `tests/test_export_onnx.py`
checks each family, the conditioned decoder and the max-pool rewrite.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from ddep_jax.common import writers
from ddep_jax.models import to_float_images

ONNX_FILE = "model.onnx"
DEFAULT_OPSET = 18
"""ONNX opset of the exported model: 18 (onnxruntime >= 1.14, TensorRT >= 8.6,
OpenVINO >= 2023.0). jax2onnx 0.13 writes reductions in opset 18's form (axes
as an input), so 17 fails onnx.checker; nothing needs a newer one."""
INPUT_NAME = "images"
OUTPUT_NAME = "logits"


def require_jax2onnx():
    """The jax2onnx module, or an ImportError naming the install."""
    try:
        import jax2onnx
        import onnx  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"--format=onnx needs jax2onnx and onnx ({e}): pip install -e '.[onnx]' "
            "(see docs/onnx.md).") from e
    return jax2onnx


def export_model(model_config, num_classes: int):
    """The TransUNet of `model_config` with XLA's convolution and max pool
    (``conv='xla'``): the same function and parameter tree as any other
    `model.conv` setting (they differ only in gradients)."""
    from ddep_jax.models.transunet import build_model

    config = model_config.copy_and_resolve_references()
    with config.unlocked():
        config.conv = "xla"
    return build_model(config, num_classes)


def inference_fn(model, params) -> Callable[[jax.Array], jax.Array]:
    """uint8 RGB [b, H, W, 3] -> float32 logits [b, H, W, C] (the function
    `export` serializes with jax.export too)."""

    def infer(images_uint8):
        return model.apply({"params": params}, to_float_images(images_uint8),
                           train=False)

    return infer


def trace_inference(infer: Callable, size: tuple[int, int]):
    """(closed jaxpr of `infer` on uint8 [b, H, W, 3] with a symbolic batch b,
    the input's ShapeDtypeStruct)."""
    batch = jax.export.symbolic_shape("b")[0]
    spec = jax.ShapeDtypeStruct((batch, int(size[0]), int(size[1]), 3), jnp.uint8)
    return jax.make_jaxpr(infer)(spec), spec


def _pad_edge(x: jax.Array, axis: int, lo: int, hi: int) -> jax.Array:
    """`x` padded along `axis` by repeating its first / last slice."""
    n = x.shape[axis]
    parts = [lax.slice_in_dim(x, 0, 1, axis=axis)] * lo + [x]
    parts += [lax.slice_in_dim(x, n - 1, n, axis=axis)] * hi
    return lax.concatenate(parts, axis) if len(parts) > 1 else x


def max_pool_as_slices(x: jax.Array, window: Sequence[int], strides: Sequence[int],
                       padding: Sequence[tuple[int, int]]) -> jax.Array:
    """`lax.reduce_window` max of any rank, as the maximum of its window's
    strided slices (the same values: max is exact).

    The padding repeats the edge instead of -inf (the same maxima: a window
    reaching over an edge by at most `window` - 1 positions holds that edge
    element itself), with slices and concatenations only, which convert
    with a symbolic batch axis (jax2onnx 0.13's Pad lowering does not).

    Args:
      window, strides, padding: per axis of `x`, as ``reduce_window_max``'s
        window_dimensions, window_strides and padding (no dilation).

    Raises:
      NotImplementedError: a pad of `window` or more (a window of padding
        only, whose -inf this does not reproduce), or a negative pad.
    """
    axes = [a for a in range(x.ndim) if window[a] != 1 or strides[a] != 1
            or tuple(padding[a]) != (0, 0)]  # the batch and channel axes: none
    for a in axes:
        lo, hi = (int(p) for p in padding[a])
        if not (0 <= lo < window[a] and 0 <= hi < window[a]):
            raise NotImplementedError(f"ONNX export: max pool padding {tuple(padding)} "
                                      f"for window {tuple(window)}.")
        x = _pad_edge(x, a, lo, hi)
    taps = [x]
    for a in axes:
        out = (x.shape[a] - window[a]) // strides[a] + 1
        taps = [lax.slice_in_dim(t, i, i + strides[a] * (out - 1) + 1, strides[a], a)
                for t in taps for i in range(window[a])]
    y = taps[0]
    for tap in taps[1:]:
        y = jnp.maximum(y, tap)
    return y


def _rewrite_reduce_window_max(x, *, window_dimensions, window_strides, padding,
                               base_dilation, window_dilation):
    if any(d != 1 for d in (*base_dilation, *window_dilation)):
        raise NotImplementedError("ONNX export: reduce_window_max with dilation "
                                  f"{base_dilation}, {window_dilation}.")
    return max_pool_as_slices(x, window_dimensions, window_strides, padding)


def _rewrite_stack(*arrays, axis):
    """jnp.stack's primitive (JAX >= 0.10; jax2onnx 0.13 has no lowering for
    it): a concatenation of the arrays with a new axis of size 1."""
    return lax.concatenate([lax.expand_dims(a, (axis,)) for a in arrays], axis)


REWRITES: dict[str, Callable] = {"reduce_window_max": _rewrite_reduce_window_max,
                                 "stack": _rewrite_stack}
"""Primitives `_evaluate` expresses with others for ONNX (see module doc)."""

_INLINED = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr",
            "core_call": "call_jaxpr", "custom_jvp_call": "call_jaxpr",
            "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr",
            "remat": "jaxpr", "checkpoint": "jaxpr"}
"""Call primitives whose body `_evaluate` runs in place (their custom
derivative rules do not matter for inference)."""


def _evaluate(jaxpr, consts, *args, rewrites=None):
    """Evaluates `jaxpr` (a core Jaxpr) like ``jax.core.eval_jaxpr``, inlining
    `_INLINED` calls and applying `rewrites` ({primitive name: function of
    (operands, **params)}, default `REWRITES`)."""
    from jax.extend import core as jex_core

    rewrites = REWRITES if rewrites is None else rewrites
    env: dict[Any, Any] = {}

    def read(v):
        return v.val if isinstance(v, jex_core.Literal) else env[v]

    for v, value in zip(jaxpr.constvars, consts):
        env[v] = value
    for v, value in zip(jaxpr.invars, args):
        env[v] = value
    for eqn in jaxpr.eqns:
        operands = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        sub = eqn.params.get(_INLINED.get(name, ""))
        if sub is not None:
            inner = getattr(sub, "jaxpr", sub)
            inner_consts = getattr(sub, "consts", ())
            if name == "custom_jvp_call" or name == "custom_vjp_call":
                operands = operands[len(operands) - len(inner.invars):]
            outs = _evaluate(inner, inner_consts, *operands, rewrites=rewrites)
        elif name in rewrites:
            outs = rewrites[name](*operands, **eqn.params)
        else:
            outs = eqn.primitive.bind(*operands, **eqn.params)
        if not eqn.primitive.multiple_results:
            outs = [outs]
        for v, value in zip(eqn.outvars, outs):
            env[v] = value
    return [read(v) for v in jaxpr.outvars]


_QUIET_LOGGERS = ("jax2onnx", "onnx_ir")
"""Loggers turned down to errors while converting: jax2onnx warns about each
of its plugins that fails to import (with JAX 0.10: dm_pix's space_to_depth,
which we do not use) and onnx_ir about shapes of constants it cannot type."""


@contextlib.contextmanager
def _quiet_converter_logs():
    loggers = [logging.getLogger(n) for n in _QUIET_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def prune_unused_initializers(proto) -> int:
    """Removes initializers no node of the main graph reads (jax2onnx leaves
    some behind; onnxruntime warns about each); returns how many."""
    used = {name for node in proto.graph.node for name in node.input}
    used |= {o.name for o in proto.graph.output}
    keep = [t for t in proto.graph.initializer if t.name in used]
    removed = len(proto.graph.initializer) - len(keep)
    if removed:
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(keep)
    return removed


def converter_version() -> str:
    """'jax2onnx <version>'."""
    try:
        return f"jax2onnx {importlib.metadata.version('jax2onnx')}"
    except importlib.metadata.PackageNotFoundError:
        return "jax2onnx (unknown version)"


def convert(infer: Callable, size: tuple[int, int], *, opset: int = DEFAULT_OPSET,
            model_name: str = "ddep_jax_transunet", rewrites=None):
    """The ONNX ModelProto of `infer` (uint8 [b, H, W, 3] -> one array), input
    'images' with a dynamic batch axis 'b', output 'logits'."""
    jax2onnx = require_jax2onnx()
    closed, spec = trace_inference(infer, size)

    def body(images):
        return _evaluate(closed.jaxpr, closed.consts, images, rewrites=rewrites)[0]

    with _quiet_converter_logs():
        proto = jax2onnx.to_onnx(body, [spec], model_name=model_name, opset=opset,
                                 input_names=[INPUT_NAME], output_names=[OUTPUT_NAME])
    prune_unused_initializers(proto)
    return proto


def set_metadata(proto, metadata: dict[str, Any]) -> None:
    """Replaces `proto`'s metadata_props by `metadata` (non-strings as JSON)."""
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key = key
        entry.value = value if isinstance(value, str) else json.dumps(value)


def read_metadata(proto) -> dict[str, str]:
    """{key: value} of an ONNX model's metadata_props (values as stored)."""
    return {p.key: p.value for p in proto.metadata_props}


def export_onnx(model, params, size: tuple[int, int], path: str, *,
                metadata: dict[str, Any], opset: int = DEFAULT_OPSET) -> dict[str, Any]:
    """Writes the inference function of (`model`, `params`) at `size` to
    `path` as one self-contained .onnx file.

    Args:
      model: a TransUNet built by `export_model` (conv='xla').
      params: its parameters.
      size: (H, W) of the input.
      path: the .onnx file to write.
      metadata: metadata_props to store (class names, palette, ...); 'opset',
        'input' and 'output' are added.
      opset: the ONNX opset (default `DEFAULT_OPSET`).

    Returns:
      {'path', 'opset', 'seconds' (tracing and conversion), 'ops' (the ONNX
      op types used), 'bytes' (file size), 'converter' (jax2onnx version)}.

    Raises:
      ImportError: jax2onnx or onnx is not installed.
    """
    require_jax2onnx()
    import onnx

    t0 = time.perf_counter()
    proto = convert(inference_fn(model, params), size, opset=opset)
    seconds = time.perf_counter() - t0
    set_metadata(proto, {
        **metadata, "opset": str(opset), "converter": converter_version(),
        "input": f"{INPUT_NAME}: uint8 RGB NHWC [b, {size[0]}, {size[1]}, 3], "
                 "b dynamic",
        "output": f"{OUTPUT_NAME}: float32 [b, {size[0]}, {size[1]}, num_classes]; "
                  "argmax over the last axis = class ids"})
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    writers.write_bytes(path, data)
    ops = sorted({n.op_type for n in proto.graph.node})
    return {"path": path, "opset": opset, "seconds": seconds, "ops": ops,
            "bytes": len(data), "converter": converter_version()}
