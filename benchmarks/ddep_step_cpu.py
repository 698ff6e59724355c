"""Times the DDeP train step of R50+ViT-B/16 + 1x decoder at 224x224.

Prints images/s, the step's FLOPs from XLA's cost analysis, the achieved
GFLOP/s, and the ratio to this machine's dense float32 matmul throughput,
measured in the same run. Not a test: run it by hand and record the figures.

  python benchmarks/ddep_step_cpu.py [--batch=8] [--steps=5] [--dtype=float32]
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from ddep_jax import config_lib, train
from ddep_jax.sharding import make_mesh
from ddep_jax.models import fast_conv

_BATCH = flags.DEFINE_integer("batch", 8, "Global batch size.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps (after 2 warm-up steps).")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Model compute dtype.")
_MATMUL_N = flags.DEFINE_integer("matmul_n", 2048, "Matmul size for the peak.")


def matmul_peak_gflops(n: int, reps: int = 10) -> float:
    """Best-of-`reps` float32 [n, n] @ [n, n] throughput in GFLOP/s."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(jnp.matmul)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def main(_):
    config = config_lib.ddep_config()  # the paper's model: R50+ViT-B/16, 1x
    config.batch_size = _BATCH.value
    config.model.dtype = _DTYPE.value
    config.mesh.data = 1
    model, tx, schedule, abstract, _, init = train.build_training(
        config, 1000, make_mesh(1), jax.random.key(0))  # lr: the paper's 6e-5
    state = init(jax.random.key(0))
    n_params = sum(np.prod(p.shape) for p in jax.tree.leaves(abstract["params"]))
    images = jnp.asarray(np.random.RandomState(0).randint(
        0, 256, (_BATCH.value, 224, 224, 3)), jnp.uint8)
    key = jax.random.key(1)

    step = jax.jit(train.make_train_step(config, model, tx, schedule),
                   donate_argnums=(0,))
    # Model FLOPs from the step written with plain lax convolutions (the same
    # math): the CPU fast path's kernel-gradient loop is counted once by XLA.
    with fast_conv.disabled():
        cost = jax.jit(train.make_train_step(config, model, tx, schedule)).lower(
            state, images, key).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost["flops"])
    t = time.perf_counter()
    compiled = step.lower(state, images, key).compile()
    compile_s = time.perf_counter() - t
    memory = compiled.memory_analysis()

    for _ in range(2):
        state, metrics = compiled(state, images, key)
    jax.block_until_ready(state)
    times = []
    for _ in range(_STEPS.value):
        t = time.perf_counter()
        state, metrics = compiled(state, images, key)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t)
    step_s = float(np.median(times))
    achieved = flops / step_s / 1e9
    peak = matmul_peak_gflops(_MATMUL_N.value)

    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}, "
          f"dtype {_DTYPE.value}")
    print(f"model: R50+ViT-B/16 + 1x decoder, {n_params / 1e6:.1f}M params, "
          f"encoder frozen; batch {_BATCH.value} at 224x224")
    print(f"compile: {compile_s:.1f} s; peak temp memory "
          f"{getattr(memory, 'temp_size_in_bytes', 0) / 2**30:.2f} GiB")
    print(f"step time: median {step_s:.3f} s over {len(times)} steps "
          f"(min {min(times):.3f}, max {max(times):.3f})")
    print(f"images/s: {_BATCH.value / step_s:.2f}")
    print(f"step FLOPs (XLA cost analysis): {flops / 1e9:.1f} GFLOP "
          f"({flops / _BATCH.value / 1e9:.1f} GFLOP/image)")
    print(f"achieved: {achieved:.1f} GFLOP/s")
    print(f"dense f32 matmul peak ({_MATMUL_N.value}^3, same run): {peak:.1f} GFLOP/s")
    print(f"fraction of matmul peak: {achieved / peak:.1%}")
    print(f"loss: {float(metrics['loss']):.4f}")


if __name__ == "__main__":
    app.run(main)
