"""Metric output: JSONL + TensorBoard event files, written by process 0 only;
and `write_json` for the JSON records a run leaves in its workdir.

TensorBoard events are written with tensorboardX, so training needs no
TensorFlow.
"""

from __future__ import annotations

import json
import os

import jax


def write_json(path: str, obj) -> None:
    """Writes `obj` as indented JSON atomically (a temporary file renamed into
    place), so a killed run never leaves a half-written file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


class MetricWriter:
    """Appends {'step': s, **scalars} lines to WORKDIR/metrics.jsonl and the same
    scalars to TensorBoard events under WORKDIR/tensorboard. No-op on hosts
    other than process 0."""

    def __init__(self, workdir: str):
        self.active = jax.process_index() == 0
        if not self.active:
            return
        from tensorboardX import SummaryWriter

        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        if not self.active:
            return
        scalars = {k: float(v) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
        self._jsonl.flush()
        for k, v in scalars.items():
            self._tb.add_scalar(k, v, int(step))

    def close(self) -> None:
        if self.active:
            self._jsonl.close()
            self._tb.close()
