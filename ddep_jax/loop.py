"""The bookkeeping all three trainers share around their jitted step.

`start_run` validates the config, creates the workdir, writes config.json and
returns the mesh; `total_steps` turns epochs into steps; `compile_step`
compiles the train step ahead of time and reports its FLOPs and per-device
memory once (log + WORKDIR/compile_report.json); `Preemption` turns SIGTERM
(or, on several hosts, JAX's preemption sync point) into a checkpoint of the
current step and a clean stop.

`MetricLog` queues each step's metrics as device arrays (no host sync per
step), fetches them in one transfer when asked, stops the run on a non-finite
loss (naming the step and the last checkpoint saved before it), keeps the
(step, loss) history, and writes the scalars plus steps/s and a progress line
with the ETA every time it logs.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from typing import Callable

import jax
import numpy as np
from absl import logging


class MetricLog:
    """Metrics of a training loop between step `start` and `num_steps`.

    Args:
      writer: a `writers.MetricWriter`.
      manager: the run's Orbax CheckpointManager (for the NaN message).
      start: the step the loop resumes after (0 for a new run).
      num_steps: the run's last step (for the ETA).
      describe: metrics dict (host values) -> the stage's part of the log
        line, e.g. 'loss 0.6123 | lr 0.001'.
    """

    def __init__(self, writer, manager, start: int, num_steps: int,
                 describe: Callable[[dict], str]):
        self.writer, self.manager, self.num_steps = writer, manager, num_steps
        self.describe = describe
        self.history: list[tuple[int, float]] = []
        self._pending: list[tuple[int, dict]] = []
        self.restart_clock(start)

    def add(self, step: int, metrics: dict) -> None:
        """Queues one step's metrics (device arrays; nothing is fetched)."""
        self._pending.append((step, metrics))

    def flush(self) -> list[tuple[int, dict]]:
        """Fetches the queued metrics and extends the history.

        Raises:
          FloatingPointError: a non-finite loss, naming its step and the last
            checkpoint (saved before it, since `flush` runs before each save).
        """
        fetched = jax.device_get(self._pending)
        self._pending.clear()
        for step, m in fetched:
            if not np.isfinite(m["loss"]):
                self.manager.wait_until_finished()
                raise FloatingPointError(
                    f"non-finite loss ({m['loss']}) at step {step}: stopping. The "
                    f"last good checkpoint is step {self.manager.latest_step()} in "
                    f"{self.manager.directory} (resume from it, e.g. with a lower "
                    "optimizer.learning_rate or optimizer.grad_clip_norm).")
        self.history.extend((s, float(m["loss"])) for s, m in fetched)
        return fetched

    def log(self, step: int) -> dict:
        """Flushes, writes the newest metrics with steps/s, logs a progress
        line, and returns those metrics."""
        fetched = self.flush()
        if not fetched:
            return {}
        s, m = fetched[-1]
        rate = (step - self._s0) / max(time.perf_counter() - self._t0, 1e-9)
        self.writer.write_scalars(s, {**m, "steps_per_sec": rate})
        eta = (self.num_steps - step) / max(rate, 1e-9)
        logging.info("step %d/%d | %s | %.2f steps/s | ETA %s", step, self.num_steps,
                     self.describe(m), rate, time.strftime("%H:%M:%S", time.gmtime(eta)))
        self.restart_clock(step)
        return m

    def restart_clock(self, step: int) -> None:
        """Starts timing steps/s afresh (after an evaluation, say)."""
        self._t0, self._s0 = time.perf_counter(), step

    @property
    def last_loss(self) -> float:
        return self.history[-1][1] if self.history else float("nan")


def write_config(config, workdir: str) -> None:
    """Writes WORKDIR/config.json; a different earlier one (a resumed run with
    other overrides) is kept as config.<n>.json rather than overwritten."""
    from etils import epath

    from ddep_jax import writers

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


def start_run(config, workdir: str, validate) -> jax.sharding.Mesh:
    """The start of every stage's job: `validate(config, num_devices,
    num_processes)` (raises ValueError naming the key, before anything is
    compiled), WORKDIR created, config.json written by process 0 (see
    `write_config`), and the 'data' mesh over `config.mesh.data` devices."""
    from ddep_jax.sharding import make_mesh

    num_devices = jax.device_count() if config.mesh.data == -1 else config.mesh.data
    validate(config, num_devices, jax.process_count())
    from ddep_jax import writers

    writers.makedirs(workdir)
    if jax.process_index() == 0:
        write_config(config, workdir)
    return make_mesh(num_devices)


PREEMPTED_EXIT_CODE = 75
"""Exit status of `python -m ddep_jax.main` after a preemption checkpoint
(EX_TEMPFAIL): run it again on the same workdir to resume."""


class Preemption:
    """Notices that the platform wants the machine back.

    On one host a SIGTERM handler sets a flag (Cloud TPU, GCE spot VMs, SLURM
    and Kubernetes send SIGTERM before they stop a job); on several hosts
    JAX's preemption sync manager (started by `jax.distributed.initialize`)
    catches the signal and `manager.reached_preemption(step)` makes every
    host agree on the same step, so that all of them save it (Orbax's
    preemption checkpointing). The trainers ask `reached(step)` after every
    step; on True they save that step's checkpoint and stop with
    `PREEMPTED_EXIT_CODE`.
    """

    _UNSET = object()

    def __init__(self, manager):
        self.manager = manager
        self.signalled = False
        self._previous = self._UNSET
        main_thread = threading.current_thread() is threading.main_thread()
        if jax.process_count() == 1 and main_thread:
            # None: the previous handler was installed from C; SIG_DFL restores
            # the default (terminate) then.
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        del signum, frame
        self.signalled = True
        logging.warning("SIGTERM received: saving a checkpoint after this step "
                        "and stopping.")

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            return bool(self.manager.reached_preemption(step))
        return self.signalled

    def close(self) -> None:
        """Puts back the SIGTERM handler that was there before."""
        if self._previous is not self._UNSET:
            signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)
            self._previous = self._UNSET


def compile_step(jitted, args: tuple, workdir: str, batch_size: int,
                 num_devices: int, name: str = "train_step"):
    """Compiles `jitted` for `args` ahead of time (args may be arrays or
    ShapeDtypeStructs with shardings), logs XLA's FLOPs and per-device memory
    (`profiling.compiled_report`) and writes them to
    WORKDIR/compile_report.json (process 0). Returns the compiled step, to be
    called with arrays of exactly those shapes and shardings."""
    from ddep_jax import profiling, writers

    t = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    report = profiling.compiled_report(compiled, batch_size, num_devices)
    report["compile_seconds"] = round(time.perf_counter() - t, 2)
    report["device_kind"] = jax.devices()[0].device_kind
    logging.info("Compiled %s in %.1f s on %d x %s: %s", name, report["compile_seconds"],
                 num_devices, report["device_kind"], profiling.describe(report))
    if jax.process_index() == 0:
        writers.write_json(os.path.join(workdir, "compile_report.json"), {name: report})
    return compiled


class StepControl:
    """What happens around each step of a training loop (all three stages):
    the profiler trace window, queuing the metrics, the preemption check,
    the periodic log line and checkpoint. Made by `guarded`."""

    def __init__(self, config, log: MetricLog, trace, preemption: Preemption):
        self.config, self.log, self.trace, self.preemption = config, log, trace, preemption
        self.manager = preemption.manager

    def before(self, step: int) -> None:
        self.trace.before(step)

    def after(self, step: int, metrics, last_step: int, state, data_iter) -> bool:
        """Queues `metrics`, logs every `log_every` steps, saves `state` and
        `data_iter`'s position (`checkpointing.save`) every `checkpoint_every`
        steps, at `last_step` and on preemption.

        Returns:
          True if the run was preempted: the checkpoint of `step` is saved and
          the loop must stop.
        """
        self.trace.after(step, metrics)
        self.log.add(step, metrics)
        preempted = self.preemption.reached(step)  # every step, on every host
        if step % self.config.log_every == 0 or step == last_step or preempted:
            self.log.log(step)
        if step % self.config.checkpoint_every == 0 or step == last_step or preempted:
            from ddep_jax import checkpointing

            self.log.flush()  # never save parameters that produced a NaN
            checkpointing.save(self.manager, step, state, data_iter)
        return preempted


@contextlib.contextmanager
def guarded(config, workdir: str, manager, writer, log: MetricLog):
    """The training loop's context: yields a `StepControl` and, however the
    loop ends, stops the profiler trace and puts back the SIGTERM handler;
    when it raises (a NaN loss, a bad record), the metric writer is closed
    too, so that buffered metrics (gs://) are not lost."""
    preemption = Preemption(manager)
    trace = step_trace(config, workdir)
    try:
        yield StepControl(config, log, trace, preemption)
    except BaseException:
        writer.close()
        raise
    finally:
        trace.close()
        preemption.close()


def step_trace(config, workdir: str):
    """The `profiling.StepTrace` that `config.profile` asks for."""
    from ddep_jax import profiling

    return profiling.StepTrace(profiling.trace_dir(workdir), config.profile.start_step,
                               config.profile.num_steps)
