"""Orbax checkpoints of the train state and the grain iterator.

Layout: WORKDIR/checkpoints/<step>/{state, data_iter}. `state` is
{'step', 'params', 'opt_state'} and a stage's 'extra' state (StandardSave:
restored straight into the target shardings); `data_iter` is grain's
iterator state (one file per host).
The last `keep` checkpoints are kept (Orbax `LatestN` preservation policy).
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import sys
import traceback

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy

from ddep_jax.common import writers
from ddep_jax.common.tree_paths import flatten_with_paths

ITEMS = ("state", "data_iter")


def make_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        preservation_policy=preservation_policy.LatestN(keep),
        enable_async_checkpointing=True, create=True)
    return ocp.CheckpointManager(os.path.join(writers.absolute(workdir), "checkpoints"),
                                 options=options, item_names=ITEMS)


def save(manager: ocp.CheckpointManager, step: int, state, data_iter) -> None:
    """Saves asynchronously; arrays are copied off the device before returning,
    so `state` may be donated to the next step."""
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data_iter=grain.checkpoint.CheckpointSave(data_iter)), force=True)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state, data_iter):
    """Restores `state` into the shardings of `abstract_state` and sets
    `data_iter`'s position in place. Returns the state."""
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data_iter=grain.checkpoint.CheckpointRestore(data_iter)))
    return restored["state"]


def _key_name(k) -> str | None:
    """A tree-path component as a name; None for sequence indices (the
    position of an optax state in a chain, which moves when the chain
    changes)."""
    if isinstance(k, jax.tree_util.SequenceKey):
        return None
    name = getattr(k, "key", getattr(k, "name", k))
    return None if isinstance(name, int) or str(name).isdigit() else str(name)


def _named_leaves(tree) -> dict:
    """{path of names (indices dropped): leaf}; a name shared by several
    leaves maps to None (ambiguous)."""
    out: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = "/".join(n for n in map(_key_name, path) if n is not None)
        out[key] = None if key in out else leaf
    return out


def read_state(state_dir: str) -> dict:
    """A checkpoint's whole `state` item as host numpy arrays, in the tree
    it was saved with (no target needed).

    Raises:
      Any Orbax / TensorStore error of an unreadable checkpoint.
    """
    checkpointer = ocp.PyTreeCheckpointer()
    meta = checkpointer.metadata(state_dir).item_metadata
    target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), dict(meta))
    args = jax.tree.map(lambda a: ocp.RestoreArgs(restore_type=np.ndarray), target)
    return checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args=args))


def transplant_state(saved: dict, abstract_state, state_sharding, where: str):
    """A train state for the current optimizer from a checkpoint written with
    another one (gradient clipping added, Adam -> AdamW, ...).

    The step and every parameter must match exactly (else ValueError listing
    each mismatch). Optimizer-state leaves are taken from the checkpoint where
    a leaf with the same name path (chain positions ignored), shape and dtype
    exists (Adam's count, mu, nu), and re-initialised (zeros) otherwise.

    Returns:
      (state placed in `state_sharding`, [names of re-initialised leaves]).
    """
    problems = compare_trees(abstract_state["params"], saved["params"], "params/")
    if problems:
        raise ValueError(f"checkpoint {where} does not match the model in "
                         f"{len(problems)} place(s):\n  " + "\n  ".join(problems))
    old = _named_leaves(saved["opt_state"])
    fresh = []

    def take(path, a, s):
        key = "/".join(n for n in map(_key_name, path) if n is not None)
        leaf = old.get(key)
        if leaf is None or leaf.shape != a.shape or leaf.dtype != a.dtype:
            fresh.append(key)
            leaf = np.zeros(a.shape, a.dtype)
        return jax.device_put(leaf, s)

    opt_state = jax.tree_util.tree_map_with_path(
        take, abstract_state["opt_state"], state_sharding["opt_state"])
    state = {"step": jax.device_put(np.asarray(saved["step"], np.int32),
                                    state_sharding["step"]),
             "params": jax.tree.map(jax.device_put, saved["params"],
                                    state_sharding["params"]),
             "opt_state": opt_state}
    for name in abstract_state.keys() - state.keys():  # a stage's extra state
        problems = compare_trees(abstract_state[name], saved.get(name, {}), f"{name}/")
        if problems:
            raise ValueError(f"checkpoint {where} does not match the stage's {name} "
                             "state:\n  " + "\n  ".join(problems))
        state[name] = jax.tree.map(jax.device_put, saved[name], state_sharding[name])
    return state, fresh


def _set_aside(step_dir: str, folder: str) -> str:
    """Moves a checkpoint step folder to WORKDIR/<folder>/<step> (nothing is
    deleted) and returns the new path."""
    src = epath.Path(step_dir)
    dest = src.parent.parent / folder / src.name
    n = 1
    while dest.exists():
        dest = src.parent.parent / folder / f"{src.name}.{n}"
        n += 1
    dest.parent.mkdir(parents=True, exist_ok=True)
    src.rename(dest)
    return str(dest)


def checkpoint_steps(workdir: str) -> list[int]:
    """The finished checkpoint steps of a run's workdir, ascending."""
    root = epath.Path(writers.absolute(workdir)) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(d.name) for d in root.iterdir()
                  if d.name.isdigit() and is_finished(d))


def _closed_loop_callback(unraisable) -> bool:
    """Whether an unraisable error is a TensorStore read's completion callback
    that found Orbax's asyncio loop already closed: RuntimeError('Event loop
    is closed') raised in `loop.call_soon_threadsafe`, reported by TensorStore
    with PyErr_WriteUnraisable(NULL) (Python's default hook prints it as a
    bare traceback, no 'Exception ignored in' line)."""
    if unraisable.exc_type is not RuntimeError or unraisable.object is not None \
            or "Event loop is closed" not in str(unraisable.exc_value):
        return False
    frames = [f.f_code.co_name for f, _ in traceback.walk_tb(unraisable.exc_traceback)]
    return "call_soon_threadsafe" in frames


def _drop_closed_loop_callbacks() -> None:
    """Installs (once per process) an unraisable hook that drops exactly the
    errors `_closed_loop_callback` names and passes every other one on.

    Needed after a damaged checkpoint: its failed read leaves reads pending
    in TensorStore, whose callbacks run on TensorStore's threads after Orbax
    closed the read's event loop, seconds later and outside any `with`
    (dozens of tracebacks, one per pending read, around the one warning)."""
    if getattr(sys.unraisablehook, "_ddep_closed_loop_filter", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _closed_loop_callback(unraisable):
            previous(unraisable)

    hook._ddep_closed_loop_filter = True
    sys.unraisablehook = hook


@contextlib.contextmanager
def _quiet_read_errors(suppressed: list):
    """While a damaged checkpoint is read (and its pending reads are
    collected): the 'Exception ignored in <coroutine ...>' tracebacks of its
    abandoned Orbax / asyncio reads (one per array, ~60 lines each, some
    'RuntimeError: Event loop is closed') go to `suppressed` instead of
    stderr; the caller logs one line. Other unraisable errors pass. On an
    error, the closed-loop callbacks that come later are dropped too
    (`_drop_closed_loop_callbacks`)."""
    previous = sys.unraisablehook

    def hook(unraisable):
        code = getattr(unraisable.object, "cr_code", None) or getattr(
            unraisable.object, "__code__", None)
        where = getattr(code, "co_filename", "") or type(unraisable.object).__module__
        if any(k in str(where) for k in ("orbax", "asyncio", "tensorstore")) \
                or _closed_loop_callback(unraisable):
            suppressed.append(unraisable.exc_value)
            return
        previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    except BaseException:
        gc.collect()  # the abandoned reads are finalised here, under the hook
        sys.unraisablehook = previous
        _drop_closed_loop_callbacks()
        raise
    else:
        gc.collect()
        sys.unraisablehook = previous


_DATA_ITER_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json$")


def saved_process_count(step_dir: str) -> int | None:
    """How many processes wrote checkpoint `step_dir`: the N of its data
    iterators' files ``data_iter/process_<i>-of-<N>.json`` (None where there
    are none)."""
    folder = epath.Path(step_dir) / "data_iter"
    if not folder.is_dir():
        return None
    counts = {int(m.group(2)) for f in folder.iterdir()
              if (m := _DATA_ITER_FILE.search(f.name))}
    return max(counts) if counts else None


def check_process_layout(step_dir: str, workdir: str) -> None:
    """Refuses to resume a checkpoint written by another number of processes.

    Each process saves its own data-iterator position and reads its own
    shard of the data (`pipeline.make_train_dataset`: records i::N), so a
    run on another process count would read another data order with the
    same global batch: that is not the interrupted run. Another number of
    devices per process is fine (the state is resharded on restore; only
    the floating-point reduction order changes).

    Raises:
      ValueError: naming both layouts and the ways out.
    """
    saved = saved_process_count(step_dir)
    now = jax.process_count()
    if saved is None or saved == now:
        return
    raise ValueError(
        f"{workdir}: its checkpoint {step_dir} was written by {saved} process(es) "
        f"(data_iter/process_<i>-of-{saved}.json); this run has {now} process(es) x "
        f"{jax.local_device_count()} local device(s). Each process reads its own "
        "shard of the data and saved its own position in it, so resuming on "
        f"{now} process(es) would change the data order. Resume with {saved} "
        "process(es) (any number of devices per process), or start a new workdir "
        f"from its weights (init.checkpoint={workdir}).")


def resume(workdir: str, keep: int, abstract_state, state_sharding, data_iter):
    """Opens the run's checkpoints and restores the newest readable one.

    - A checkpoint that cannot be read (a corrupt or truncated file) is moved
      to WORKDIR/corrupt_checkpoints/<step> with a warning naming it, and the
      previous one is taken.
    - A checkpoint whose parameters differ from the model's (a changed
      model.* setting) is refused, listing every mismatch.
    - A checkpoint of another process count is refused, naming both layouts
      (`check_process_layout`).
    - A checkpoint written with another optimizer (gradient clipping added,
      weight decay changed) keeps its step, parameters and data position;
      the optimizer-state leaves that match are restored, the others
      re-initialised, and both are logged.

    Returns:
      (CheckpointManager, state or None, step or None, notes: list of str).

    Raises:
      ValueError: the parameters of the newest readable checkpoint do not
        match the model (every mismatch listed, with the workdir).
    """
    abstract_sharded = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract_state, state_sharding)
    notes = []
    for step in reversed(checkpoint_steps(workdir)):
        step_dir = os.path.join(writers.absolute(workdir), "checkpoints", str(step))
        state_dir = os.path.join(step_dir, "state")
        suppressed: list = []
        try:
            with _quiet_read_errors(suppressed):
                meta = ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata
            problems = compare_trees(abstract_state["params"], meta["params"],
                                     "params/")
        except Exception as e:  # unreadable metadata: a damaged checkpoint
            moved = _set_aside(step_dir, "corrupt_checkpoints")
            notes.append(f"checkpoint {step_dir} is unreadable ({type(e).__name__}: "
                         f"{str(e)[:200]}); moved to {moved}, trying the previous one")
            logging.warning(notes[-1])
            continue
        check_process_layout(step_dir, workdir)
        if problems:
            raise ValueError(
                f"the checkpoint of step {step} in {workdir} does not match the "
                f"configured model in {len(problems)} place(s) (a resumed run must "
                "keep model.*; fine-tune or train into a new workdir):\n  "
                + "\n  ".join(problems))
        manager = make_manager(workdir, keep)
        try:
            with _quiet_read_errors(suppressed):
                state = restore(manager, step, abstract_sharded, data_iter)
            logging.info("Resumed from %s at step %d.", manager.directory, step)
            return manager, state, step, notes
        except ValueError as e:
            if "tree structures do not match" not in str(e):
                raise
            saved = read_state(state_dir)
            manager.restore(step, args=ocp.args.Composite(
                data_iter=grain.checkpoint.CheckpointRestore(data_iter)))
            state, fresh = transplant_state(saved, abstract_state, state_sharding,
                                            state_dir)
            notes.append(f"the optimizer changed since checkpoint {step}: restored "
                         "its step, parameters, data position and the optimizer "
                         f"state that matches; re-initialised {fresh or 'nothing'}")
            logging.warning(notes[-1])
            return manager, state, step, notes
        except Exception as e:  # unreadable arrays: a damaged checkpoint
            with _quiet_read_errors(suppressed):
                manager.close()
            moved = _set_aside(step_dir, "corrupt_checkpoints")
            why = str(e).split(" See full TensorStore details")[0][:200]
            notes.append(f"checkpoint {step_dir} is unreadable ({type(e).__name__}: "
                         f"{why}"
                         + (f"; {len(suppressed)} more read errors of it not shown"
                            if suppressed else "")
                         + f"); moved to {moved}, trying the previous one")
            logging.warning(notes[-1])
    return make_manager(workdir, keep), None, None, notes


def set_aside_from(manager: ocp.CheckpointManager, first_step: int,
                   folder: str = "poisoned_checkpoints") -> list[str]:
    """Moves the checkpoints of steps >= `first_step` out of the run (to
    WORKDIR/<folder>/<step>), so that a resume cannot pick them. Waits for a
    save in progress first. Returns the new paths."""
    manager.wait_until_finished()
    moved = []
    for step in sorted(s for s in manager.all_steps() if s >= first_step):
        moved.append(_set_aside(os.path.join(str(manager.directory), str(step)),
                                folder))
    manager.reload()
    return moved


# ----------------------------------------------------------------------------
# Reading parameter collections of another run (stage hand-over).
# ----------------------------------------------------------------------------
def is_finished(step_dir) -> bool:
    """A complete Orbax step folder: locally Orbax renames a temporary folder
    into `<step>` when done; on object stores (gs://) it writes `<step>`
    in place and marks completion with commit_success.txt."""
    if not (step_dir / "state").is_dir():
        return False
    return not writers.is_remote(step_dir) or (step_dir / "commit_success.txt").exists()


def _flat_shapes(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    return {k: (tuple(v.shape), str(v.dtype)) for k, v in flatten_with_paths(tree).items()}


def compare_trees(expected, found, prefix: str = "") -> list[str]:
    """Path/shape/dtype differences between two trees of arrays or shape structs.

    Returns:
      One line per problem: ``missing <path> ...``, ``unexpected <path>``,
      ``shape <path>: checkpoint ... vs model ...``, ``dtype <path>: ...``;
      empty if they match exactly.
    """
    want, have = _flat_shapes(expected), _flat_shapes(found)
    problems = []
    for k in sorted(want.keys() - have.keys()):
        problems.append(f"missing {prefix}{k} (model {want[k][0]} {want[k][1]})")
    for k in sorted(have.keys() - want.keys()):
        problems.append(f"unexpected {prefix}{k} (checkpoint {have[k][0]} {have[k][1]})")
    for k in sorted(want.keys() & have.keys()):
        if want[k][0] != have[k][0]:
            problems.append(f"shape {prefix}{k}: checkpoint {have[k][0]} vs model "
                            f"{want[k][0]}")
        elif want[k][1] != have[k][1]:
            problems.append(f"dtype {prefix}{k}: checkpoint {have[k][1]} vs model "
                            f"{want[k][1]}")
    return problems
