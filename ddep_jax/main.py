"""Entry point: python -m ddep_jax.main --config=configs/<stage>.py[:args] --workdir=DIR.

`config.stage` picks the stage: 'classify' (stage 1), 'ddep' (stage 2) or
'finetune' (stage 3), each a trainer module under `ddep_jax.trainers` run by
the one loop (`ddep_jax.trainers.loop.run`).

Any config value can be overridden with --config.a.b=value. On several hosts
every host runs the same command (`ddep_jax.parallel.distributed` decides whether to
call `jax.distributed.initialize`; multi-node GPU without a cluster manager
adds --coordinator_address, --num_processes, --process_id).

Exit status: 0 when the run finished; 75 (`loop.PREEMPTED_EXIT_CODE`) when a
SIGTERM stopped it after saving a checkpoint: run it again on the same
workdir to resume; anything else is an error.
"""

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from ddep_jax.parallel import distributed
from ddep_jax.trainers import loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (resumes if it "
                               "holds checkpoints).")
flags.mark_flags_as_required(["config", "workdir"])
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", list(distributed.MODES),
    "jax.distributed.initialize(): 'auto' when a multi-process launcher is "
    "detected (SLURM, Open MPI, a multi-host TPU slice, --coordinator_address), "
    "'yes' always, 'no' never.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0 (multi-node GPU without "
    "a cluster manager).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes "
                                      "(with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index "
                                   "(with --coordinator_address).")
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout", 100, "Seconds without a heartbeat after which a process "
    "counts as lost by JAX; the project's watchdog stops the others after half "
    f"of it, with one line and exit status {distributed.LOST_PROCESS_EXIT_CODE} "
    "(restart all to resume).")


class _QuietLibraries:
    """Drops INFO records from Orbax and grain, which log every checkpoint
    step, and Orbax's warning about the optional per-step metadata file that
    every restore of a checkpoint without one prints."""

    def filter(self, record) -> bool:
        noisy = ("/orbax/", "/grain/", "/tensorflow_datasets/")
        if "/orbax/" in record.pathname and str(record.msg).startswith(
                "Metadata file does not exist"):
            return False
        return record.levelno >= 30 or not any(n in record.pathname for n in noisy)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    if distributed.initialize(_DISTRIBUTED.value, _COORDINATOR.value,
                              _NUM_PROCESSES.value, _PROCESS_ID.value,
                              heartbeat_timeout_seconds=_HEARTBEAT.value):
        if jax.process_index() != 0:  # process 0 logs the progress for all
            logging.set_verbosity(logging.WARNING)
        # A lost process ends the others cleanly, before JAX's heartbeat abort.
        distributed.start_watchdog(max(2.0, _HEARTBEAT.value / 2))
    config = _CONFIG.value
    try:
        loop.trainer(config.get("stage", "ddep"))
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    try:
        result = loop.run(config, _WORKDIR.value)
    except Exception as e:  # noqa: BLE001
        if jax.process_count() > 1 and not distributed.is_project_error(e):
            # A step of a multi-process run failed: most likely another process
            # died. Exit at once, before the distributed shutdown's barrier.
            logging.flush()
            distributed.exit_lost_process(e)
        if not isinstance(e, (ValueError, FileNotFoundError, FloatingPointError,
                              RuntimeError)):
            raise
        # The errors the project raises on purpose name what is wrong and what
        # to do: the message is the last thing printed, as one line (bugs of
        # other types keep their traceback).
        logging.flush()
        sys.stderr.write(f"ddep_jax.main: error: {e}\n")
        sys.exit(1)
    if result.get("already_finished"):
        logging.info("Already finished at step %d (loss %.4f): nothing to do for "
                     "workdir %s.", result["step"], result["loss"], _WORKDIR.value)
        return
    if result.get("preempted"):
        logging.warning("Preempted at step %d (checkpoint saved); exiting with %d: "
                        "rerun on --workdir=%s to resume.", result["step"],
                        loop.PREEMPTED_EXIT_CODE, _WORKDIR.value)
        sys.exit(loop.PREEMPTED_EXIT_CODE)
    logging.info("Done: step %d, loss %.4f, workdir %s", result["step"],
                 result["loss"], _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
