"""Progress and logging of the loop: `itstime` (every N steps), `MetricLog`
(metrics queued as device arrays, fetched once per log, NaN stop, history,
progress line with ETA), `StepControl` (what happens after each step:
log, preemption, checked checkpoints), `guarded` (the loop's context:
profiler trace, errors, cleanup) and `step_trace`."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable

import jax
import numpy as np
import tqdm
from absl import logging

from ddep_jax.checkpoints import store
from ddep_jax.training import profiling
from ddep_jax.training.preemption import Preemption
from ddep_jax.training.step import _all_finite

def itstime(step: int, every: int, last_step: int | None = None) -> bool:
    """Whether a periodic job runs after `step` (1-based): every `every`
    steps (0: never), and at `last_step` when given. The one rule of every
    "every N steps" setting (log_every, checkpoint_every, eval.every_steps,
    image_grid_every)."""
    return bool(every) and step % every == 0 or (last_step is not None
                                                 and step == last_step)


def _format_eta(seconds: float) -> str:
    """'2d 03:04:05' or '03:04:05' (no wrap at 24 h)."""
    seconds = int(max(seconds, 0))
    days, rest = divmod(seconds, 86400)
    hms = time.strftime("%H:%M:%S", time.gmtime(rest))
    return f"{days}d {hms}" if days else hms


class MetricLog:
    """Metrics of a training loop between step `start` and `num_steps`.

    Args:
      writer: a `writers.MetricWriter`.
      manager: the run's Orbax CheckpointManager (for the NaN message).
      start: the step the loop resumes after (0 for a new run).
      num_steps: the run's last step (for the ETA).
      describe: metrics dict (host values) -> the stage's part of the log
        line, e.g. 'loss 0.6123 | lr 0.001'.

    Each log writes one progress line (also to log files): step, the stage's
    metrics, steps/s (smoothed: an exponential moving average over logs) and
    the ETA with days; on a terminal a tqdm bar shows every step.
    """

    def __init__(self, writer, manager, start: int, num_steps: int,
                 describe: Callable[[dict], str]):
        self.writer, self.manager, self.num_steps = writer, manager, num_steps
        self.describe = describe
        self.history: list[tuple[int, float]] = []
        self._pending: list[tuple[int, dict]] = []
        self._rate = None
        self._bar = tqdm.tqdm(total=num_steps, initial=start, unit="step",
                              dynamic_ncols=True, smoothing=0.1,
                              disable=not sys.stderr.isatty()
                              or jax.process_index() != 0)
        self.restart_clock(start)

    def add(self, step: int, metrics: dict) -> None:
        """Queues one step's metrics (device arrays; nothing is fetched)."""
        self._pending.append((step, metrics))
        self._bar.update(1)

    def flush(self) -> list[tuple[int, dict]]:
        """Fetches the queued metrics and extends the history.

        Raises:
          FloatingPointError: a non-finite loss at step j, naming it. The
            parameters of step j - 1 produced it, so the checkpoints of steps
            >= j - 1 are moved to WORKDIR/poisoned_checkpoints; the message
            names the newest remaining (checked) checkpoint, or says there is
            none.
        """
        fetched = jax.device_get(self._pending)
        self._pending.clear()
        for step, m in fetched:
            if not np.isfinite(m["loss"]):
                moved = store.set_aside_from(self.manager, step - 1)
                good = self.manager.latest_step()
                where = (f"The last checked checkpoint is step {good} in "
                         f"{self.manager.directory}: a rerun resumes from it"
                         if good is not None else
                         "No checkpoint was saved before it: a rerun starts "
                         "afresh")
                raise FloatingPointError(
                    f"non-finite loss ({m['loss']}) at step {step}: stopping. "
                    + (f"Checkpoints {moved} hold the parameters that produced it "
                       "and were set aside. " if moved else "") + where
                    + "; lower optimizer.learning_rate or set "
                    "optimizer.grad_clip_norm (a resume may change both).")
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
        self._rate = rate if self._rate is None else 0.7 * self._rate + 0.3 * rate
        self.writer.write_scalars(s, {**m, "steps_per_sec": rate})
        eta = (self.num_steps - step) / max(self._rate, 1e-9)
        line = (f"step {step}/{self.num_steps} | {self.describe(m)} | "
                f"{self._rate:.2f} steps/s | ETA {_format_eta(eta)}")
        self._bar.clear()  # the log line goes above the bar (terminals only)
        logging.info(line)
        self._bar.refresh()
        self.restart_clock(step)
        return m

    def restart_clock(self, step: int) -> None:
        """Starts timing steps/s afresh (after an evaluation, say)."""
        self._t0, self._s0 = time.perf_counter(), step

    def close(self) -> None:
        self._bar.close()

    @property
    def last_loss(self) -> float:
        return self.history[-1][1] if self.history else float("nan")


class StepControl:
    """What happens around each step of a training loop (all stages): the
    profiler trace window, queuing the metrics, the preemption check, the
    periodic log line and checkpoint. Made by `guarded`."""

    def __init__(self, config, log: MetricLog, trace, preemption: Preemption):
        self.config, self.log, self.trace, self.preemption = config, log, trace, preemption
        self.manager = preemption.manager
        self._first = True

    def before(self, step: int) -> None:
        self.trace.before(step)

    def after(self, step: int, metrics, last_step: int, state, data_iter) -> bool:
        """Queues `metrics`, logs at the first step, every `log_every` steps
        and at the end, and saves `state` and `data_iter`'s position
        (`store.save`) every `checkpoint_every` steps, at `last_step`
        and on preemption, after checking the loss of every step so far and
        the parameters to be saved.

        Returns:
          True if the run was preempted: the checkpoint of `step` is saved and
          the loop must stop.

        Raises:
          FloatingPointError: a non-finite loss (see `MetricLog.flush`) or
            non-finite parameters to be saved (nothing is saved).
        """
        self.trace.after(step, metrics)
        self.log.add(step, metrics)
        preempted = self.preemption.reached(step)  # every step, on every host
        if (itstime(step, self.config.log_every, last_step) or preempted
                or self._first):  # the first step shows compile + first step
            self.log.log(step)
            self._first = False
        if itstime(step, self.config.checkpoint_every, last_step) or preempted:
            self.log.flush()  # never save parameters that produced a NaN
            if not bool(_all_finite(state["params"])):
                raise FloatingPointError(
                    f"the parameters after step {step} are not finite although its "
                    "loss was: not saved. Lower optimizer.learning_rate or set "
                    "optimizer.grad_clip_norm and resume from the last checkpoint "
                    f"({self.manager.latest_step()}).")
            store.save(self.manager, step, state, data_iter)
        return preempted


@contextlib.contextmanager
def guarded(config, workdir: str, manager, writer, log: MetricLog | None,
            preemption: Preemption):
    """The training loop's context: yields a `StepControl` and, however the
    loop ends, stops the profiler trace and the progress bar. When it raises
    (a NaN loss, a bad record, a second Ctrl-C), the checkpoint being written
    is waited for (so that it is complete, not left as a temporary folder)
    and the metric writer closed (buffered metrics on gs:// are kept), and
    the error propagates unchanged."""
    trace = step_trace(config, workdir)
    try:
        yield StepControl(config, log, trace, preemption) if log else None
    except BaseException:
        try:
            manager.wait_until_finished()
            manager.close()
        except Exception as e:  # the original error matters more
            logging.error("While stopping: could not finish the checkpoint being "
                          "written: %s", e)
        writer.close()
        raise
    finally:
        trace.close()
        if log is not None:
            log.close()


def step_trace(config, workdir: str):
    """The `profiling.StepTrace` that `config.profile` asks for."""
    return profiling.StepTrace(profiling.trace_dir(workdir), config.profile.start_step,
                               config.profile.num_steps)
