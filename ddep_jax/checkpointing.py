"""Orbax checkpoints of the train state and the grain iterator.

Layout: WORKDIR/checkpoints/<step>/{state, data_iter}. `state` is
{'step', 'params', 'opt_state'} (StandardSave: restored straight into the
target shardings); `data_iter` is grain's iterator state (one file per host).
The last `keep` checkpoints are kept (Orbax `LatestN` preservation policy).
"""

from __future__ import annotations

import os

import grain
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy

ITEMS = ("state", "data_iter")


def make_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        preservation_policy=preservation_policy.LatestN(keep),
        enable_async_checkpointing=True, create=True)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
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
