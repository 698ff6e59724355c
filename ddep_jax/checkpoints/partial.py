"""Reading another run's checkpoint: find its Orbax `state` folder from a
workdir, a step folder or a converted encoder (`resolve_state_dir`), compare
its tree with the model's (`store.compare_trees`), and restore some parameter
collections exactly, straight into the target shardings
(`restore_collections`, Orbax partial restore). The hand-over between stages
(`handover`) and the evaluation of a fine-tuned workdir read through here."""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from etils import epath

from ddep_jax.checkpoints import store
from ddep_jax.common import writers


def resolve_state_dir(path: str, step: int = -1) -> tuple[str, int]:
    """Finds the Orbax `state` item that `path` names.

    Args:
      path: a run's workdir (holding ``checkpoints/<step>/state``), one
        ``checkpoints/<step>`` folder, or an Orbax PyTree folder itself (e.g. a
        converted encoder).
      step: which step of a workdir; -1 = the latest.

    Returns:
      (absolute state folder, step); step is -1 when the folder does not say.

    Raises:
      FileNotFoundError: nothing checkpoint-like at `path`, or `step` absent;
        the message lists what was looked for and the steps that exist.
    """
    path = writers.absolute(path)
    if not epath.Path(path).exists():
        raise FileNotFoundError(f"checkpoint path {path!r} does not exist.")
    ckpt_root = os.path.join(path, "checkpoints")
    if epath.Path(ckpt_root).is_dir():
        steps = sorted(int(d.name) for d in epath.Path(ckpt_root).iterdir()
                       if d.name.isdigit() and store.is_finished(d))
        if not steps:
            raise FileNotFoundError(f"{ckpt_root} holds no finished checkpoint "
                                    "(no <step>/state folder).")
        chosen = steps[-1] if step < 0 else step
        if chosen not in steps:
            raise FileNotFoundError(f"step {step} is not among the checkpoints of "
                                    f"{ckpt_root}: {steps}.")
        return os.path.join(ckpt_root, str(chosen), "state"), chosen
    if (epath.Path(path) / "state").is_dir():
        base = os.path.basename(path)
        state_dir, found = os.path.join(path, "state"), int(base) if base.isdigit() else -1
    elif any((epath.Path(path) / f).exists() for f in ("_METADATA", "manifest.ocdbt")):
        parent = os.path.basename(os.path.dirname(path))
        state_dir, found = path, int(parent) if parent.isdigit() else -1
    else:
        state_dir = None
    if state_dir is not None:
        if step >= 0 and step != found:
            raise FileNotFoundError(
                f"{path} is the checkpoint of step {found}, not the requested step "
                f"{step}: name the workdir (or its checkpoints/{step}) instead.")
        return state_dir, found
    raise FileNotFoundError(
        f"no checkpoint at {path!r}: expected a workdir with checkpoints/<step>/"
        "state, a checkpoints/<step> folder, or an Orbax state folder (with "
        "_METADATA).")


def restore_collections(path: str, collections, abstract_params: dict,
                        param_shardings: dict, step: int = -1) -> tuple[dict, dict]:
    """Reads top-level parameter collections (e.g. 'encoder', 'decoder') of
    another run's checkpoint, exactly: nothing is padded, cut or skipped.

    Only the named collections are read from disk (Orbax partial restore),
    straight into the target shardings.

    Args:
      path: see `resolve_state_dir`.
      collections: names under ``params`` to read.
      abstract_params: the model's params (ShapeDtypeStruct leaves).
      param_shardings: matching NamedSharding leaves.
      step: workdir step; -1 = latest.

    Returns:
      (``{collection: params}``, provenance ``{'checkpoint', 'step',
      'collections', 'num_arrays', 'num_params'}``).

    Raises:
      FileNotFoundError: no checkpoint at `path`.
      ValueError: the checkpoint lacks a collection, or any leaf differs in
        path, shape or dtype; the message lists every mismatch.
    """
    state_dir, found_step = resolve_state_dir(path, step)
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(state_dir).item_metadata
    params_meta = tree.get("params") if hasattr(tree, "get") else None
    if params_meta is None:
        raise ValueError(f"checkpoint {state_dir} has no 'params' entry (top-level "
                         f"keys: {sorted(tree.keys())}); is it a ddep_jax state?")
    problems = []
    for name in collections:
        if name not in params_meta:
            problems.append(f"missing collection params/{name} (checkpoint has "
                            f"{sorted(params_meta.keys())})")
            continue
        problems += store.compare_trees(abstract_params[name], params_meta[name],
                                  prefix=f"{name}/")
    if problems:
        raise ValueError(
            f"checkpoint {state_dir} does not match the model in {len(problems)} "
            "place(s) (check that model.* equals the config that wrote it):\n  "
            + "\n  ".join(problems))
    target = {"params": {
        name: jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract_params[name], param_shardings[name])
        for name in collections}}
    restore_args = jax.tree.map(
        lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape,
                                       dtype=a.dtype), target)
    restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True))
    params = restored["params"]
    leaves = jax.tree.leaves(params)
    provenance = {"checkpoint": state_dir, "step": found_step,
                  "collections": list(collections), "num_arrays": len(leaves),
                  "num_params": int(sum(x.size for x in leaves))}
    return params, provenance
