"""Export time and CPU latency: the ONNX model (onnxruntime) next to the JAX
model (jax.jit, as `python -m ddep_jax.predict` runs it).

  python benchmarks/export_latency.py [--archs=hybrid,r50unet] \
      [--size=192,256] [--batches=1,4] [--rounds=5] [--iters=10] \
      [--output=workdirs/export_latency.json]

For each architecture, the CPU CamVid model of `recipes.cpu_camvid_model`
(what configs/*camvid*.py train; weights at random init plus noise: the
compute is the same as a trained model's) at --size (CamVid's 360x480 at
data.base_scale 0.5 is 180x240, padded to a multiple of 32: 192x256):

- export time: `onnx_export.export_onnx` (trace, convert with jax2onnx,
  onnx.checker, write) and, for comparison, jax.export (export + serialize);
  `python -m ddep_jax.export` adds the checkpoint restore to either, and
  its first conversion the one-time import of jax2onnx's plugins (timed
  apart: 'jax2onnx import').
- first-call cost: jax.jit's compilation; onnxruntime's session creation.
- latency per batch: --rounds rounds, each --iters calls of JAX, then of
  onnxruntime with its default threads (one per physical core), then with
  intra_op_num_threads = the CPU count (interleaved, so that all see the
  same background load);
  the median over all calls and the range of the per-round medians.
- agreement: max |logit difference| between the two on the same random
  images.

Prints a Markdown table (docs/onnx.md quotes it) and writes the figures to
--output as JSON. Noisy on a shared machine: report medians of several
runs of this script.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time

from absl import app, flags

_ARCHS = flags.DEFINE_list("archs", ["hybrid", "r50unet"], "recipes.ARCHITECTURES.")
_SIZE = flags.DEFINE_list("size", ["192", "256"], "H,W of the exported input.")
_BATCHES = flags.DEFINE_list("batches", ["1", "4"], "Batch sizes to time.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved rounds.")
_ITERS = flags.DEFINE_integer("iters", 10, "Calls per round and runtime.")
_OUTPUT = flags.DEFINE_string("output", "", "JSON file for the figures.")
_NUM_CLASSES = 11  # CamVid


def build(arch: str, size):
    import jax
    import jax.numpy as jnp

    from ddep_jax import config_lib, recipes
    from ddep_jax.models.transunet import build_model

    m = recipes.cpu_camvid_model(config_lib.model_config(), arch)
    model = build_model(m, _NUM_CLASSES)
    params = model.init(jax.random.key(0), jnp.zeros((1, *size, 3)))["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = tree.unflatten([p + 0.02 * jax.random.normal(k, p.shape)
                             for p, k in zip(leaves, keys)])
    return m, model, jax.device_get(params)


def time_calls(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def bench(arch: str, size, batches, rounds: int, iters: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import onnxruntime as ort

    from ddep_jax.checkpoints import onnx_export

    m, model, params = build(arch, size)
    infer = onnx_export.inference_fn(model, params)
    row = {"arch": arch, "size": list(size),
           "params": int(sum(np.size(p) for p in jax.tree.leaves(params)))}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        info = onnx_export.export_onnx(onnx_export.export_model(m, _NUM_CLASSES),
                                       params, size, path, metadata={})
        row.update(onnx_export_s=info["seconds"], onnx_bytes=info["bytes"],
                   onnx_ops=info["ops"], converter=info["converter"])
        t0 = time.perf_counter()
        spec = jax.ShapeDtypeStruct((jax.export.symbolic_shape("b")[0], *size, 3),
                                    jnp.uint8)
        exported = jax.export.export(jax.jit(infer))(spec)
        row["jax_export_s"] = time.perf_counter() - t0
        row["jax_export_bytes"] = len(exported.serialize())
        t0 = time.perf_counter()
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        row["ort_session_s"] = time.perf_counter() - t0
        options = ort.SessionOptions()  # default: one thread per physical core
        options.intra_op_num_threads = os.cpu_count()
        session_all = ort.InferenceSession(path, options,
                                           providers=["CPUExecutionProvider"])
    jitted = jax.jit(infer)
    rng = np.random.default_rng(0)
    row["batches"] = {}
    for b in batches:
        images = rng.integers(0, 256, (b, *size, 3), dtype=np.uint8)
        t0 = time.perf_counter()
        want = np.asarray(jitted(images))
        compile_s = time.perf_counter() - t0
        got = session.run(None, {"images": images})[0]  # warm-up
        session_all.run(None, {"images": images})
        jax_runs, ort_runs, all_runs = [], [], []
        jax_medians, ort_medians, all_medians = [], [], []
        for _ in range(rounds):
            j = time_calls(lambda: jitted(images).block_until_ready(), iters)
            o = time_calls(lambda: session.run(None, {"images": images}), iters)
            a = time_calls(lambda: session_all.run(None, {"images": images}), iters)
            jax_runs += j
            ort_runs += o
            all_runs += a
            jax_medians.append(statistics.median(j))
            ort_medians.append(statistics.median(o))
            all_medians.append(statistics.median(a))
        row["batches"][b] = {
            "jax_first_call_s": compile_s,
            "jax_ms": 1e3 * statistics.median(jax_runs),
            "jax_round_ms": [1e3 * min(jax_medians), 1e3 * max(jax_medians)],
            "onnx_ms": 1e3 * statistics.median(ort_runs),
            "onnx_round_ms": [1e3 * min(ort_medians), 1e3 * max(ort_medians)],
            "onnx_all_threads_ms": 1e3 * statistics.median(all_runs),
            "onnx_all_threads_round_ms": [1e3 * min(all_medians), 1e3 * max(all_medians)],
            "max_abs_diff": float(np.abs(got - want).max()),
            "argmax_agreement": float((got.argmax(-1) == want.argmax(-1)).mean()),
        }
    return row


def table(rows) -> str:
    lines = ["| model | params | ONNX export s | jax.export s | ORT session s | batch "
             "| JAX first call s | JAX ms (round medians) | ONNX ms (round medians) "
             "| ONNX ms, intra_op_num_threads=cpu_count | max abs diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for b, t in r["batches"].items():
            lines.append(
                f"| {r['arch']} {r['size'][0]}x{r['size'][1]} | {r['params'] / 1e6:.2f}M "
                f"| {r['onnx_export_s']:.1f} | {r['jax_export_s']:.1f} "
                f"| {r['ort_session_s']:.2f} | {b} | {t['jax_first_call_s']:.1f} "
                f"| {t['jax_ms']:.0f} ({t['jax_round_ms'][0]:.0f}-{t['jax_round_ms'][1]:.0f}) "
                f"| {t['onnx_ms']:.0f} ({t['onnx_round_ms'][0]:.0f}-"
                f"{t['onnx_round_ms'][1]:.0f}) | {t['onnx_all_threads_ms']:.0f} "
                f"({t['onnx_all_threads_round_ms'][0]:.0f}-"
                f"{t['onnx_all_threads_round_ms'][1]:.0f}) | {t['max_abs_diff']:.1e} |")
    return "\n".join(lines)


def main(argv):
    del argv
    import jax
    import onnxruntime

    t0 = time.perf_counter()
    from jax2onnx.plugins.plugin_system import import_all_plugins

    from ddep_jax.checkpoints import onnx_export

    with onnx_export._quiet_converter_logs():
        import_all_plugins()
    plugins_s = time.perf_counter() - t0
    size = tuple(int(s) for s in _SIZE.value)
    batches = [int(b) for b in _BATCHES.value]
    rows = [bench(a, size, batches, _ROUNDS.value, _ITERS.value) for a in _ARCHS.value]
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor()
            or platform.machine(), "cpus": os.cpu_count(), "jax": jax.__version__,
            "onnxruntime": onnxruntime.__version__, "converter": rows[0]["converter"],
            "rounds": _ROUNDS.value, "iters": _ITERS.value,
            "jax2onnx_import_s": round(plugins_s, 1)}
    print(json.dumps(meta))
    print(table(rows))
    if _OUTPUT.value:
        os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
        with open(_OUTPUT.value, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
