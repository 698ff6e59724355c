"""The train step every stage shares, and its state: `build_state` (optimizer
and shape-first sharded state), `make_train_step` / `jit_train_step` (the
jitted step: prepare, extra state, gradient accumulation, frozen
collections), `global_batch_spec`, and `compile_step` (ahead-of-time
compile with its FLOPs / memory report)."""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from ddep_jax.training import optim, profiling
from ddep_jax.common import writers
from ddep_jax.models import fast_conv
from ddep_jax.parallel.sharding import state_shardings
from ddep_jax.training.stage import Stage, TrainState

def build_state(stage: Stage, config, num_steps: int, mesh, key) -> TrainState:
    """The optimizer (`optim.from_config`: Adam(W) + warm-up + cosine, the
    stage's frozen collections set to zero) and the train state's shapes and
    shardings (`sharding.state_shardings` with `config.mesh`'s rules)."""
    params = jax.eval_shape(stage.model.init, key, *stage.init_inputs)["params"]
    tx, schedule = optim.from_config(config.optimizer, params, stage.frozen,
                                     num_steps, stage.peak_lr)

    def init(key):
        params = stage.model.init(key, *stage.init_inputs)["params"]
        state = {"step": jnp.zeros((), jnp.int32), "params": params,
                 "opt_state": tx.init(params)}
        return rederive(state, key)

    def rederive(state, key):
        if stage.extra_state is None:
            return state
        return {**state, "extra": stage.extra_state(
            state["params"], jax.random.fold_in(key, EXTRA_STATE_FOLD))}

    # The shapes without tracing the model a second time (`init` is traced
    # once more when it is jitted): the optimizer's and extra states' from the
    # parameters' shapes.
    abstract = jax.eval_shape(
        lambda p, k: rederive({"step": jnp.zeros((), jnp.int32), "params": p,
                               "opt_state": tx.init(p)}, k), params, key)
    m = config.mesh
    shardings = state_shardings(abstract, mesh, m.param_sharding, m.fsdp_min_size,
                                tuple(m.get("sharding_rules", ())))
    return TrainState(tx, schedule, abstract, shardings,
                      jax.jit(init, out_shardings=shardings),
                      jax.jit(rederive, out_shardings=shardings))


EXTRA_STATE_FOLD = 0x657874
"""The extra state's key is the init key folded with this constant (its
draws, a queue's random start, differ from the parameters')."""


def make_train_step(stage: Stage, tx, schedule, grad_accum_steps: int = 1,
                    param_shardings=None):
    """The update of every stage: (state, batch, key) -> (state, metrics).

    `batch` is {name: global array} of `stage.batch_spec`; `key` the run's
    train key (folded with the step, so every step draws fresh noise and
    dropout). The frozen collections are constants of the differentiated
    function: no gradient (and no backward pass) is computed for them, and
    `optax.partition` gives them `set_to_zero` updates. With
    `grad_accum_steps` k > 1 the prepared batch runs as k strided
    micro-batches with one update (`optim.accumulate_gradients`; the running
    gradient sum kept in `param_shardings` where given), each micro-batch's
    loss key folded with its index.

    Returns:
      The step function (to be jitted with the state donated); metrics
      {'loss', the stage's `metrics`, 'learning_rate', 'grad_norm'}, float32
      scalars.
    """
    frozen, k = tuple(stage.frozen), grad_accum_steps

    def step_fn(state, batch, base_key):
        params = state["params"]
        key = jax.random.fold_in(base_key, state["step"])
        batch, context, key = stage.prepare(batch, key)
        extra = state.get("extra")
        if stage.update_extra is not None:
            extra, batch, context = stage.update_extra(extra, params, batch, context)
        trainable = {c: v for c, v in params.items() if c not in frozen}
        fixed = {c: v for c, v in params.items() if c in frozen}

        def micro_loss(p, micro_batch, index):
            rng = key if k == 1 else jax.random.fold_in(key, index)
            loss, aux = stage.loss_fn({**fixed, **p}, micro_batch, rng, context)
            if stage.mean_over_micro:
                return loss / k, jax.tree.map(lambda a: a / k, aux)
            return loss, aux

        shardings = None if param_shardings is None else {
            c: v for c, v in param_shardings.items() if c not in frozen}
        (loss, aux), grads = optim.accumulate_gradients(micro_loss, trainable, batch, k,
                                                        shardings)
        # Frozen leaves get zero "gradients" that set_to_zero ignores.
        grads = {**grads, **jax.tree.map(jnp.zeros_like, fixed)}
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {"step": state["step"] + 1,
                     "params": optax.apply_updates(params, updates),
                     "opt_state": opt_state}
        if extra is not None:
            new_state["extra"] = extra
        metrics = {"loss": loss, **stage.metrics(aux, context),
                   "learning_rate": schedule(state["step"]),
                   "grad_norm": optax.tree.norm(grads)}
        return new_state, metrics

    return step_fn


def jit_train_step(stage: Stage, state: TrainState, config, mesh):
    """`make_train_step` jitted with the state's shardings, the batch split
    over 'data', the state donated and the compiler options of the model's
    convolution setting (`fast_conv.compiler_options`: `model.conv` and
    `model.cpu_dot_fusion`)."""
    batch_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    step = make_train_step(stage, state.tx, state.schedule, config.grad_accum_steps,
                           state.sharding["params"])
    return jax.jit(step, in_shardings=(state.sharding, batch_sharding, replicated),
                   out_shardings=(state.sharding, replicated), donate_argnums=(0,),
                   compiler_options=fast_conv.compiler_options(
                       config.model.conv, config.model.get("cpu_dot_fusion", "ynn")))


def global_batch_spec(stage: Stage, mesh) -> dict:
    """`stage.batch_spec` with the batch sharding over 'data' attached."""
    sharding = NamedSharding(mesh, P("data"))
    return {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding)
            for k, s in stage.batch_spec.items()}


# ----------------------------------------------------------------------------
# Resuming: which config changes a run survives.
# ----------------------------------------------------------------------------
def compile_step(jitted, args: tuple, workdir: str, batch_size: int,
                 num_devices: int, name: str = "train_step"):
    """Compiles `jitted` for `args` ahead of time (args may be arrays or
    ShapeDtypeStructs with shardings), logs XLA's FLOPs and per-device memory
    (`profiling.compiled_report`) and writes them to
    WORKDIR/compile_report.json (process 0). Returns the compiled step, to be
    called with arrays of exactly those shapes and shardings."""
    t = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    report = profiling.compiled_report(compiled, batch_size, num_devices)
    report["compile_seconds"] = round(time.perf_counter() - t, 2)
    report["device_kind"] = jax.devices()[0].device_kind
    logging.info("Compiled %s in %.1f s on %d x %s: %s", name, report["compile_seconds"],
                 num_devices, report["device_kind"], profiling.describe(report))
    if jax.process_index() == 0:
        writers.write_json(os.path.join(workdir, "compile_report.json"), {name: report})
    return compiled


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))
