"""A run's workdir bookkeeping: what may change on resume (`check_resume`,
`resume_changes`), config.json (`write_config`), done.json (`DONE_FILE`) and
the step count (`total_steps`)."""

from __future__ import annotations

import json
import math
import os

from absl import logging
from etils import epath

from ddep_jax.checkpoints import store
from ddep_jax.common import writers
from ddep_jax.common.tree_paths import flatten_dict

RESUME_SAFE_KEYS = (
    "log_every", "checkpoint_every", "keep_checkpoints", "image_grid_every",
    "image_grid_size", "eval.", "profile.", "mesh.", "init.", "data.num_threads",
    "data.prefetch", "data.cache", "data.cache_max_mib", "data.data_dir",
    "optimizer.learning_rate", "optimizer.warmup_steps", "optimizer.grad_clip_norm",
    "optimizer.weight_decay", "grad_accum_steps", "final_eval_grace_seconds")
"""Config keys (or prefixes, ending in '.') a resumed run may change: how
often it logs, checkpoints, evaluates and draws (and how long a signalled
final evaluation may go on); the device layout; where the
data lives and how many threads read it; `init.*` (read only by a new run);
and the optimizer settings a diverged run is resumed with (learning rate,
warm-up, clipping, weight decay; the optimizer state that still fits is
kept). `grad_accum_steps` keeps the batch but changes the float summation
order, so the continuation is no longer bit-identical. Every other key
(model, batch size, seed, data, schedule length, objective) defines the run:
a change is refused."""


def resume_changes(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(changes that break the run, changes it survives) between the config
    a workdir was run with (its config.json) and the new one, as
    'key: old -> new' lines (see `RESUME_SAFE_KEYS`; keys present on one side
    only, i.e. settings added or removed by a newer version, are survivable)."""
    a, b = flatten_dict(old), flatten_dict(json.loads(json.dumps(new)))
    breaking, safe = [], []
    for key in sorted(a.keys() | b.keys()):
        if a.get(key, "<absent>") == b.get(key, "<absent>"):
            continue
        line = f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}"
        # A key the workdir's config.json lacks is a setting added since that
        # run was written (its default keeps the old behaviour); one the new
        # config lacks is no longer read.
        ok = key not in a or key not in b or any(
            key == k or (k.endswith(".") and key.startswith(k))
            for k in RESUME_SAFE_KEYS)
        (safe if ok else breaking).append(line)
    return breaking, safe


def check_resume(config, workdir: str) -> None:
    """Compares `config` with the workdir's config.json when the workdir holds
    checkpoints: logs the changes a resume survives, refuses the others.

    Raises:
      ValueError: naming every key whose change would mix two runs, with both
        values, and what to do.
    """
    if not store.checkpoint_steps(workdir):
        return
    old = writers.read_json(os.path.join(workdir, "config.json"))
    if old is None:
        return
    breaking, safe = resume_changes(old, config.to_dict())
    if breaking:
        raise ValueError(
            f"{workdir} holds checkpoints of a run with another config; resuming "
            "would mix two runs. Changed (config.json -> now):\n  "
            + "\n  ".join(breaking) + "\nUse the old values to resume, or a new "
            "--workdir for the new run. (Keys a resume may change: "
            f"{', '.join(RESUME_SAFE_KEYS)}.)")
    if safe:
        logging.warning("Resuming %s with changed settings: %s.", workdir,
                        "; ".join(safe))


# ----------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------
DONE_FILE = "done.json"
"""WORKDIR/done.json: written when a run has finished its last step and its
final evaluation; a rerun of a finished run reads it and does nothing."""


def write_config(config, workdir: str) -> None:
    """Writes WORKDIR/config.json; a different earlier one (a resumed run with
    other overrides) is kept as config.<n>.json rather than overwritten."""
    path = epath.Path(workdir) / "config.json"
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    if path.exists():
        if path.read_text() == text:
            return
        n = 1
        while (epath.Path(workdir) / f"config.{n}.json").exists():
            n += 1
        path.rename(epath.Path(workdir) / f"config.{n}.json")
    writers.write_bytes(str(path), text.encode())


def total_steps(config, num_examples: int) -> int:
    if config.total_steps > 0:
        return int(config.total_steps)
    return int(math.ceil(config.num_epochs * num_examples / config.batch_size))
