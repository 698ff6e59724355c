"""Stage hand-over: a run's initial weights taken from another run.

Stage 1 -> 2 -> 3 pass the `encoder` (and stage 2 -> 3 the `decoder`) on by
name. `load_collections` reads them from

* a ddep_jax run (a workdir, one of its ``checkpoints/<step>`` folders, or an
  Orbax state folder such as ``python -m ddep_jax.checkpoints.vit_import`` writes), only
  the named collections being read from disk, or
* a public vision_transformer ``.npz`` (encoder only), converted on the fly
  by `ddep_jax.checkpoints.vit_import`,

and every leaf must match the model exactly in path, shape and dtype.
`initialise` puts them into a fresh train state and writes WORKDIR/init.json,
the provenance record, which includes the source run's own init.json, so the
whole chain (stage 3 <- stage 2 <- stage 1 or .npz) can be read back.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags, logging

from ddep_jax.checkpoints import partial, vit_import
from ddep_jax.common import writers
from ddep_jax.common.tree_paths import flatten_with_paths


def token_grid(model_config) -> tuple[int, int]:
    """The token grid (h, w) the encoder's position embedding is learned for."""
    h, w = model_config.encoder.image_size
    return h // 16, w // 16


def source_record(state_dir: str) -> dict | None:
    """The init.json of the run that wrote the Orbax state `state_dir`: the
    workdir's (``<workdir>/checkpoints/<step>/state``) or, for a converted
    checkpoint (``<dir>/state``), the converter's record; None if absent."""
    parent = os.path.dirname(state_dir)
    candidates = [os.path.join(parent, "init.json")]
    if os.path.basename(os.path.dirname(parent)) == "checkpoints":
        candidates.insert(0, os.path.join(os.path.dirname(os.path.dirname(parent)),
                                          "init.json"))
    for path in candidates:
        record = writers.read_json(path)
        if record is not None:
            return record
    return None


def load_collections(path: str, collections: Sequence[str], abstract_params: dict,
                     param_shardings: dict, step: int = -1, *,
                     pos_grid: tuple[int, int] | None = None,
                     num_groups: int | None = None) -> tuple[dict, dict]:
    """Reads `collections` of the model's params from `path`, exactly.

    Args:
      path: a ddep_jax workdir / checkpoint / Orbax state folder, or an upstream
        vision_transformer ``.npz`` file (then `collections` must be
        ('encoder',)).
      collections: top-level parameter collections, e.g. ('encoder',).
      abstract_params: the model's params (ShapeDtypeStruct leaves).
      param_shardings: matching NamedSharding leaves.
      step: which checkpoint of a workdir; -1 = the latest.
      pos_grid: (h, w) token grid of the model's position embedding
        (image_size // 16), for resampling an .npz's; None = square.
      num_groups: the encoder's GroupNorm groups, checked against the public
        checkpoints' 32 when reading an .npz (None: not checked).

    Returns:
      ({collection: params placed in `param_shardings`}, provenance dict:
      'checkpoint', 'step', 'collections', 'num_arrays', 'num_params' and,
      where the source run recorded one, 'source_init').

    Raises:
      FileNotFoundError: nothing at `path`.
      ValueError: a missing collection or any leaf whose path, shape or dtype
        differs (every mismatch listed); an .npz asked for other collections.
    """
    if str(path).endswith(".npz"):
        if tuple(collections) != ("encoder",):
            raise ValueError(f"{path} is a vision_transformer .npz, which holds "
                             f"an encoder only; cannot read {list(collections)} "
                             "from it.")
        flat = vit_import.load_npz(path)
        encoder, report = vit_import.npz_to_encoder_params(
            flat, abstract_params["encoder"], source=path, target_grid=pos_grid,
            num_groups=num_groups)
        params = {"encoder": jax.device_put(encoder, param_shardings["encoder"])}
        leaves = jax.tree.leaves(params)
        return params, {"checkpoint": writers.absolute(path), "step": -1,
                        "collections": ["encoder"], "num_arrays": len(leaves),
                        "num_params": int(sum(x.size for x in leaves)),
                        "source_init": {"npz_import": report}}
    params, provenance = partial.restore_collections(
        path, collections, abstract_params, param_shardings, step)
    record = source_record(provenance["checkpoint"])
    if record is not None:
        provenance["source_init"] = record
    return params, provenance


def initialise(state: dict, tx, state_sharding: dict, checkpoint: str,
               collections: Sequence[str], workdir: str, *, step: int = -1,
               record: dict[str, Any] | None = None,
               pos_grid: tuple[int, int] | None = None,
               num_groups: int | None = None,
               sources: Sequence[tuple[str, str, str]] = ()) -> dict:
    """A fresh train state with `collections` taken from `checkpoint`, and
    WORKDIR/init.json written (on process 0).

    Args:
      state: the freshly initialised train state {'step', 'params',
        'opt_state', and the stage's 'extra' (kept as it is: the loop
        rebuilds it from the new parameters)}; its params give the target
        shapes.
      tx: the optimizer, whose state is rebuilt for the new params.
      state_sharding: the state's NamedSharding tree.
      checkpoint: see `load_collections`; '' or no `collections` keeps
        `state` (init.json then says the weights are new).
      record: extra entries for init.json (e.g. the stage-3 init mode).
      pos_grid, num_groups: see `load_collections`.
      sources: more collections from other checkpoints, each (checkpoint,
        collection in it, collection of the model it becomes), e.g. ×Net's
        decoder from a stage-1 classifier: (workdir, 'encoder', 'decoder');
        the checkpoint's other collections (the classifier's head) are not
        read; every leaf must match, mismatches listed. Recorded in
        init.json under 'sources'.

    Returns:
      The state (the same object when nothing is restored).

    Raises:
      ValueError: a collection asked for twice, or a mismatch (as
        `load_collections`).
    """
    provenance: dict[str, Any] = {**(record or {}), "collections": []}
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state["params"])
    params = dict(state["params"])
    restored_any = False
    if checkpoint and collections:
        restored, found = load_collections(checkpoint, collections, abstract,
                                           state_sharding["params"], step,
                                           pos_grid=pos_grid, num_groups=num_groups)
        provenance.update(found)
        params.update(restored)
        restored_any = True
    taken = set(provenance["collections"])
    for path, source, target in sources:
        if target in taken:
            raise ValueError(f"params/{target} would be read twice (from "
                             f"{provenance.get('checkpoint')} and from {path}).")
        restored, found = load_collections(
            path, (source,), {source: abstract[target]},
            {source: state_sharding["params"][target]}, -1)
        params[target] = restored[source]
        provenance.setdefault("sources", []).append({**found, "as": target})
        taken.add(target)
        restored_any = True
    if restored_any:
        opt_init = jax.jit(tx.init, out_shardings=state_sharding["opt_state"])
        state = {**state, "params": params, "opt_state": opt_init(params)}
    provenance["new"] = sorted(set(state["params"]) - taken)
    if jax.process_index() == 0:
        writers.write_json(os.path.join(workdir, "init.json"), provenance)
    logging.info("Initialised %s from %s%s; new: %s.",
                 provenance["collections"] or "nothing",
                 provenance.get("checkpoint", "-"),
                 "".join(f", {s['as']} from {s['checkpoint']} ({s['collections'][0]})"
                         for s in provenance.get("sources", ())), provenance["new"])
    return state


# ----------------------------------------------------------------------------
# Reading a chain of hand-overs back (python -m ddep_jax.checkpoints.handover).
# ----------------------------------------------------------------------------
def read_collection(state_dir: str, collection: str = "encoder") -> dict:
    """One parameter collection of an Orbax state folder as host numpy arrays
    (no model needed: shapes and dtypes come from the checkpoint)."""
    checkpointer = ocp.PyTreeCheckpointer()
    meta = checkpointer.metadata(state_dir).item_metadata
    target = {"params": {collection: jax.tree.map(
        lambda m: np.zeros(m.shape, m.dtype), meta["params"][collection])}}
    restore_args = jax.tree.map(lambda a: ocp.RestoreArgs(restore_type=np.ndarray),
                                target)
    restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True))
    return restored["params"][collection]


def lineage(workdir: str) -> list[dict]:
    """The hand-over chain ending at `workdir`, newest first: its init.json,
    then the source runs' records nested in it ('source_init')."""
    path = os.path.join(workdir, "init.json")
    record = writers.read_json(path)
    if record is None:
        raise FileNotFoundError(f"{path} not found: is {workdir} a ddep_jax run?")
    chain = []
    while record is not None:
        chain.append(record)
        record = record.get("source_init")
    return chain


def check_encoder_chain(workdir: str) -> dict:
    """Follows `workdir`'s init.json back to the first run that loaded or
    trained the encoder it took over, and compares the encoder arrays of the
    checkpoint `workdir` started from with those of the oldest checkpoint in
    the chain, bit for bit.

    Returns:
      {'chain': [checkpoint paths, newest first], 'num_arrays',
      'num_params', 'identical': bool, 'differing': [paths]}.

    Raises:
      ValueError: `workdir` did not start from a checkpoint's encoder.
    """
    chain = [r["checkpoint"] for r in lineage(workdir)
             if "encoder" in r.get("collections", []) and "checkpoint" in r]
    if not chain:
        raise ValueError(f"{workdir}/init.json records no encoder hand-over.")
    first, last = read_collection(chain[0]), read_collection(chain[-1])
    a, b = flatten_with_paths(first), flatten_with_paths(last)
    differing = sorted(k for k in a.keys() | b.keys()
                       if k not in a or k not in b or a[k].dtype != b[k].dtype
                       or not np.array_equal(a[k], b[k]))
    return {"chain": chain, "num_arrays": len(a),
            "num_params": int(sum(v.size for v in a.values())),
            "identical": not differing, "differing": differing}


def main(argv):
    del argv
    report = check_encoder_chain(flags.FLAGS.check_encoder)
    print(json.dumps(report, indent=1))
    if not report["identical"]:
        raise SystemExit(f"encoder differs in {len(report['differing'])} arrays")


if __name__ == "__main__":
    flags.DEFINE_string("check_encoder", None, "A run's workdir: compare the "
                        "encoder it started from with the oldest checkpoint of "
                        "its hand-over chain, bit for bit.", required=True)
    app.run(main)
