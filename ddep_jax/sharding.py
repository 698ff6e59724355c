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


def sharded_train_state(init_params, tx, mesh: jax.sharding.Mesh, mesh_config, key):
    """The shape-first train state {'step', 'params', 'opt_state'} of a stage.

    Args:
      init_params: key -> params (e.g. ``lambda k: model.init(k, x)['params']``).
      tx: the optax transformation whose state is kept.
      mesh: the device mesh; mesh_config: `config.mesh` (param_sharding,
        fsdp_min_size).
      key: PRNG key (only its shape matters for the abstract state).

    Returns:
      (abstract state of ShapeDtypeStructs, NamedSharding tree, jitted
      key -> state created directly in those shardings).
    """
    import jax.numpy as jnp

    def init(key):
        params = init_params(key)
        return {"step": jnp.zeros((), jnp.int32), "params": params,
                "opt_state": tx.init(params)}

    abstract = jax.eval_shape(init, key)
    shardings = state_shardings(abstract, mesh, mesh_config.param_sharding,
                                mesh_config.fsdp_min_size)
    return abstract, shardings, jax.jit(init, out_shardings=shardings)
