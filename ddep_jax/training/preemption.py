"""Preemption: SIGTERM / Ctrl-C or the hosts' preemption sync point -> all
processes agree on a step, checkpoint it and exit `PREEMPTED_EXIT_CODE`."""

from __future__ import annotations

import os
import signal
import threading

import jax
from absl import logging


PREEMPTED_EXIT_CODE = 75
"""Exit status of `python -m ddep_jax.main` after a preemption checkpoint
(EX_TEMPFAIL): run it again on the same workdir to resume."""


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
    `PREEMPTED_EXIT_CODE`. A signal during the final evaluation lets it
    finish (a run killed before it ends redoes it when rerun).
    """

    _UNSET = object()

    def __init__(self, manager=None):
        self.manager = manager
        self.signalled = False
        self._previous = {}

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
        logging.warning("%s received: saving a checkpoint after this step and "
                        "stopping%s.", signal.Signals(signum).name,
                        " (Ctrl-C again aborts)" if signum == signal.SIGINT else "")

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1 and self.manager is not None:
            return bool(self.manager.reached_preemption(step))
        return self.signalled

    def close(self) -> None:
        """Puts back the handlers that were there before."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous or signal.SIG_DFL)
        self._previous = {}
