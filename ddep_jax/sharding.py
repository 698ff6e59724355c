"""Device mesh and train-state shardings.

One 'data' mesh axis. The batch is split over it; the train state is either
replicated ('replicated') or fully sharded ('fsdp': every leaf of at least
`min_size` elements is split over 'data' along its largest dimension that the
axis divides, so Adam's moments follow their parameters; smaller leaves stay
replicated). XLA inserts the all-gathers and reduce-scatters.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

PARAM_SHARDING_MODES = ("replicated", "fsdp")


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
    """1-D mesh with a 'data' axis over all (or the first `num_devices`) devices."""
    devices = jax.devices()[: num_devices or jax.device_count()]
    return jax.make_mesh((len(devices),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def leaf_spec(shape: tuple[int, ...], axis_size: int, mode: str,
              min_size: int = 2**14) -> P:
    """PartitionSpec of one state leaf of `shape` under `mode`."""
    if mode == "replicated" or axis_size == 1 or np.prod(shape) < min_size:
        return P()
    if mode != "fsdp":
        raise ValueError(f"param_sharding={mode!r}: expected {PARAM_SHARDING_MODES}.")
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % axis_size == 0:
            spec = [None] * len(shape)
            spec[dim] = "data"
            return P(*spec)
    return P()


def state_shardings(abstract_state, mesh: jax.sharding.Mesh, mode: str,
                    min_size: int = 2**14):
    """NamedShardings for every leaf of a (shape-only) train state."""
    size = mesh.shape["data"]
    return jax.tree.map(
        lambda a: NamedSharding(mesh, leaf_spec(tuple(a.shape), size, mode, min_size)),
        abstract_state)


def sharded_train_state(model, init_inputs: tuple, config, num_steps: int,
                        mesh: jax.sharding.Mesh, key, *, frozen=(),
                        peak_lr: float | None = None):
    """A stage's optimizer and its shape-first train state {'step', 'params',
    'opt_state'}.

    Args:
      model: the Flax module; `model.init(key, *init_inputs)['params']` are
        the parameters.
      init_inputs: example inputs (one image of the configured size, ...).
      config: the stage config (`optimizer`, `mesh` sections).
      num_steps: length of the cosine schedule.
      mesh: the device mesh.
      key: PRNG key (only its shape matters for the abstract state).
      frozen: top-level collections that get no updates (`optim.make_optimizer`).
      peak_lr: the schedule's peak; None = `config.optimizer.learning_rate`.

    Returns:
      (tx, schedule, abstract state of ShapeDtypeStructs, NamedSharding tree,
      jitted key -> state created directly in those shardings).
    """
    import jax.numpy as jnp

    from ddep_jax import optim

    o = config.optimizer
    schedule = optim.make_schedule(o.learning_rate if peak_lr is None else peak_lr,
                                   num_steps, o.warmup_steps)
    params = jax.eval_shape(model.init, key, *init_inputs)["params"]
    tx, _ = optim.make_optimizer(params, frozen, schedule, b1=o.b1, b2=o.b2,
                                 weight_decay=o.weight_decay,
                                 grad_clip_norm=o.grad_clip_norm)

    def init(key):
        params = model.init(key, *init_inputs)["params"]
        return {"step": jnp.zeros((), jnp.int32), "params": params,
                "opt_state": tx.init(params)}

    abstract = jax.eval_shape(init, key)
    shardings = state_shardings(abstract, mesh, config.mesh.param_sharding,
                                config.mesh.fsdp_min_size)
    return tx, schedule, abstract, shardings, jax.jit(init, out_shardings=shardings)
