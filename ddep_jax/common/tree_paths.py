"""Tree paths as strings: the one helper for naming and flattening the
leaves of a parameter or state tree ('encoder/Transformer/encoder_norm/scale')
and the keys of a nested dict ('optimizer.learning_rate'). Used by the
optimizer's labels, sharding rules, checkpoints, hand-over and export."""

from __future__ import annotations

from typing import Any, Mapping

import jax


def path_str(path) -> str:
    """'encoder/Transformer/encoder_norm/scale' for a tree path (dict keys and
    attribute names; a sequence index shows as '[i]')."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def flatten_with_paths(tree) -> dict[str, Any]:
    """{`path_str` of each leaf: leaf}, in the tree's leaf order."""
    return {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def flatten_dict(d: Mapping, sep: str = ".", prefix: str = "") -> dict[str, Any]:
    """{'a.b.c': value} of a nested dict (a config's JSON), dicts recursed
    into, every other value a leaf."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten_dict(v, sep, f"{prefix}{k}{sep}"))
        else:
            out[f"{prefix}{k}"] = v
    return out
