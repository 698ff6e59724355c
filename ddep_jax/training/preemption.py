"""Preemption: SIGTERM / Ctrl-C or the hosts' preemption sync point -> all
processes agree on a step, checkpoint it and exit `PREEMPTED_EXIT_CODE`."""

from __future__ import annotations

import contextlib
import os
import signal
import threading

import jax
from absl import logging


PREEMPTED_EXIT_CODE = 75
"""Exit status of `python -m ddep_jax.main` after a preemption checkpoint
(EX_TEMPFAIL): run it again on the same workdir to resume."""


class GracePeriodOver(BaseException):
    """The final evaluation did not end within `final_eval_grace_seconds` of a
    SIGTERM / SIGINT. A BaseException, so that no `except Exception` of the
    evaluation's libraries swallows it."""

    def __init__(self, seconds: float):
        super().__init__(f"the final evaluation did not end within {seconds:g} s "
                         "of the signal")
        self.seconds = seconds


class Preemption:
    """Notices that the platform (or the user) wants the machine back.

    A context manager held for the whole of `run`. On one host, handlers for
    SIGTERM (Cloud TPU, GCE spot VMs, SLURM and Kubernetes send it before
    they stop a job) and SIGINT (Ctrl-C) set a flag; a second SIGINT aborts the
    process at once. On several hosts JAX's preemption sync manager
    (started by `jax.distributed.initialize`) catches SIGTERM and
    `manager.reached_preemption(step)` makes every host agree on the same
    step, so that all of them save it (Orbax's preemption checkpointing).
    The loop asks `reached(step)` before the first step and after every
    step; on True it saves that step's checkpoint and stops with
    `PREEMPTED_EXIT_CODE`.

    A signal during the final evaluation (`grace_period`, on one host) lets
    it go on for `final_eval_grace_seconds` more: an evaluation that ends
    within them is the run's normal end (exit 0); one that does not is
    stopped (`GracePeriodOver`), the run exits `PREEMPTED_EXIT_CODE`, and a
    rerun on the workdir redoes the final evaluation only (the last step's
    checkpoint is saved before the evaluation starts; reports of the splits
    already evaluated stay in WORKDIR/eval). On several hosts the final
    evaluation finishes whatever the signal: JAX's preemption notifier takes
    SIGTERM there, and a host that stopped alone would leave the others
    waiting in the evaluation's all-gather.
    """

    _UNSET = object()

    def __init__(self, manager=None):
        self.manager = manager
        self.signalled = False
        self._previous = {}
        self._grace: float | None = None  # seconds, while in grace_period
        self._armed = False

    def __enter__(self) -> "Preemption":
        main_thread = threading.current_thread() is threading.main_thread()
        if jax.process_count() == 1 and main_thread:
            for sig in (signal.SIGTERM, signal.SIGINT):
                # None: a handler installed from C; SIG_DFL restores the default.
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _on_signal(self, signum, frame) -> None:
        del frame
        if signum == signal.SIGINT and self.signalled:
            # A second Ctrl-C: abort now, as Ctrl-C does without the handler
            # (an exception raised here could land in a library callback and
            # be swallowed).
            logging.warning("SIGINT again: aborting.")
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
            return
        self.signalled = True
        if self._grace is not None:
            logging.warning("%s received during the final evaluation: it may go on "
                            "for %g s more (final_eval_grace_seconds), then it is "
                            "stopped%s.", signal.Signals(signum).name, self._grace,
                            " (Ctrl-C again aborts)" if signum == signal.SIGINT else "")
            self._arm()
            return
        logging.warning("%s received: saving a checkpoint after this step and "
                        "stopping%s.", signal.Signals(signum).name,
                        " (Ctrl-C again aborts)" if signum == signal.SIGINT else "")

    def _arm(self) -> None:
        """Starts the grace period's clock (once): SIGALRM after it raises
        GracePeriodOver in the main thread."""
        if self._armed:
            return
        self._armed = True
        signal.setitimer(signal.ITIMER_REAL, max(self._grace, 1e-3))

    def _on_alarm(self, signum, frame) -> None:
        del signum, frame
        if self._grace is not None:
            raise GracePeriodOver(self._grace)

    @contextlib.contextmanager
    def grace_period(self, seconds: float):
        """Held around the final evaluation: a signal (or one received since
        the last step) leaves it `seconds` to finish, then `GracePeriodOver`
        is raised in it. seconds < 0: no bound (the evaluation always
        finishes). No effect on several hosts or where no handler is
        installed (not the main thread)."""
        if seconds < 0 or not self._previous:
            yield
            return
        previous_alarm = signal.signal(signal.SIGALRM, self._on_alarm)
        self._grace, self._armed = float(seconds), False
        try:
            if self.signalled:
                self._arm()
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            self._grace, self._armed = None, False
            signal.signal(signal.SIGALRM, previous_alarm or signal.SIG_DFL)

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1 and self.manager is not None:
            return bool(self.manager.reached_preemption(step))
        return self.signalled

    def close(self) -> None:
        """Puts back the handlers that were there before."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous or signal.SIG_DFL)
        self._previous = {}
