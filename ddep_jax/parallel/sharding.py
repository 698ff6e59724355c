"""Device mesh and train-state shardings.

One 'data' mesh axis over every device of every host. The batch is split
over it. How each leaf of the train state is laid out is decided by rules
over its parameter path (big_vision's sharding rules): `config.mesh.
sharding_rules` is an ordered tuple of (regex, spec) pairs, tried first, and
`config.mesh.param_sharding` is the rule for everything else:

- 'replicated': a full copy on every device (data parallel);
- 'fsdp': split over 'data' along the leaf's largest dimension that the axis
  divides, when the leaf has at least `mesh.fsdp_min_size` elements
  (fully-sharded data parallel; smaller leaves stay replicated);
- 'dim=N': split dimension N (negative counts from the end) over 'data'.

Adam's moments follow the rule of their parameter (their path ends in the
parameter's path), so the optimizer state is sharded like the parameters;
the step counters are replicated. XLA inserts the all-gathers and
reduce-scatters.
"""

from __future__ import annotations

import re
from typing import Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ddep_jax.models import COLLECTIONS
from ddep_jax.common.tree_paths import path_str

PARAM_SHARDING_MODES = ("replicated", "fsdp")


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
    """1-D mesh with a 'data' axis over all (or the first `num_devices`) devices."""
    devices = jax.devices()[: num_devices or jax.device_count()]
    return jax.make_mesh((len(devices),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def check_spec(spec: str) -> None:
    """Raises ValueError unless `spec` is 'replicated', 'fsdp' or 'dim=N'."""
    if spec in PARAM_SHARDING_MODES:
        return
    if not re.fullmatch(r"dim=-?\d+", spec):
        raise ValueError(f"sharding spec {spec!r}: expected 'replicated', 'fsdp' or "
                         "'dim=N' (N the dimension split over 'data').")


def leaf_spec(shape: tuple[int, ...], axis_size: int, mode: str,
              min_size: int = 2**14, name: str = "") -> P:
    """PartitionSpec of one state leaf of `shape` under the spec `mode`.

    Raises:
      ValueError: an unknown spec, or a 'dim=N' that the leaf does not have or
        that the axis size does not divide (naming the leaf).
    """
    check_spec(mode)
    if mode == "replicated" or axis_size == 1:
        return P()
    if mode == "fsdp":
        if np.prod(shape) < min_size:
            return P()
        for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
            if shape[dim] % axis_size == 0:
                spec = [None] * len(shape)
                spec[dim] = "data"
                return P(*spec)
        return P()
    dim = int(mode.split("=")[1])
    if not -len(shape) <= dim < len(shape) or shape[dim] % axis_size:
        raise ValueError(f"sharding rule {mode!r} for {name or 'a leaf'} of shape "
                         f"{shape}: the dimension is missing or not divisible by "
                         f"the {axis_size} devices on 'data'.")
    spec = [None] * len(shape)
    spec[dim % len(shape)] = "data"
    return P(*spec)


def param_path(path) -> str | None:
    """The parameter path ('decoder/block0/conv1/conv/kernel') inside a state
    leaf's path: the part from the first collection name on; None for leaves
    that are no parameter (the step, Adam's count)."""
    parts = path_str(path).split("/")
    for i, part in enumerate(parts):
        if part in COLLECTIONS:
            return "/".join(parts[i:])
    return None


def rule_for(name: str | None, rules: Sequence[tuple[str, str]], default: str) -> str:
    """The spec of the first rule whose regex matches `name` (re.search), else
    `default`; non-parameter leaves (name None) are replicated."""
    if name is None:
        return "replicated"
    for regex, spec in rules:
        if re.search(regex, name):
            return spec
    return default


def state_shardings(abstract_state, mesh: jax.sharding.Mesh, mode: str,
                    min_size: int = 2**14, rules: Sequence[tuple[str, str]] = ()):
    """NamedShardings for every leaf of a (shape-only) train state.

    Args:
      abstract_state: the state (arrays or ShapeDtypeStructs).
      mesh: mesh with a 'data' axis.
      mode: the default spec (`PARAM_SHARDING_MODES`).
      min_size: 'fsdp' leaves with fewer elements stay replicated.
      rules: (regex, spec) pairs over parameter paths, tried before `mode`.

    Raises:
      ValueError: an invalid spec, or a 'dim=N' rule that does not fit a leaf.
    """
    size = mesh.shape["data"]
    rules = [(str(r), str(s)) for r, s in rules]

    def one(path, a):
        name = param_path(path)
        spec = rule_for(name, rules, mode)
        return NamedSharding(mesh, leaf_spec(tuple(a.shape), size, spec, min_size, name))

    return jax.tree_util.tree_map_with_path(one, abstract_state)
