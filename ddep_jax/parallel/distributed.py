"""Multi-host start-up: `jax.distributed.initialize()` where the platform
needs it, never on a single host.

Every host of a multi-host run (a Cloud TPU slice with several workers, GPU
nodes under SLURM or started by hand) runs the same command; JAX then sees
all devices of all hosts, each host feeds its own share of the batch, and
process 0 writes the logs, images and config. On a single host nothing is
initialised: `jax.distributed` would only add a coordinator service.

When to initialise (`--distributed`):
- 'auto' (default): when `--coordinator_address` is given, or the
  environment shows a multi-process launch: SLURM with more than one task
  (SLURM_NTASKS), Open MPI (OMPI_COMM_WORLD_SIZE), or a multi-host Cloud TPU
  slice (TPU_WORKER_HOSTNAMES lists more than one worker, or
  MEGASCALE_NUM_SLICES > 1).
- 'yes': always (JAX's cluster auto-detection: Cloud TPU, SLURM, Open MPI,
  Kubernetes); what launch/tpu.sh passes on multi-host slices.
- 'no': never.

Under SLURM, JAX's auto-detection gives each process the one GPU of its
local rank (one task per GPU). With one task per node that drives all of the
node's GPUs, set JAX_LOCAL_DEVICE_IDS=0,...,G-1 (launch/gpu_slurm.sbatch does).
"""

from __future__ import annotations

import os
from typing import Mapping

MODES = ("auto", "yes", "no")


def multi_process_environment(env: Mapping[str, str]) -> str | None:
    """The launcher that `env` shows started several processes, or None."""
    def count(name: str) -> int:
        try:
            return int(env.get(name, "1") or "1")
        except ValueError:
            return 1

    if count("SLURM_NTASKS") > 1 or count("SLURM_NPROCS") > 1:
        return "SLURM"
    if count("OMPI_COMM_WORLD_SIZE") > 1:
        return "Open MPI"
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1 or count("MEGASCALE_NUM_SLICES") > 1:
        return "Cloud TPU (multi-host)"
    return None


def should_initialize(mode: str, coordinator_address: str | None,
                      env: Mapping[str, str]) -> bool:
    """Whether to call `jax.distributed.initialize` (see the module doc).

    Raises:
      ValueError: `mode` not in MODES, or 'no' together with a coordinator.
    """
    if mode not in MODES:
        raise ValueError(f"--distributed={mode!r}: expected one of {MODES}.")
    if mode == "no":
        if coordinator_address:
            raise ValueError("--distributed=no contradicts --coordinator_address="
                             f"{coordinator_address!r}: drop one of them.")
        return False
    if mode == "yes" or coordinator_address:
        return True
    return multi_process_environment(env) is not None


LOST_PROCESS_EXIT_CODE = 76
"""The exit status of a process whose run lost another process (or the
coordinator): distinct from 75 (preempted, checkpoint saved) and 1 (an error
of the run). Restart every process: the run resumes from its last complete
checkpoint."""


def is_project_error(error: BaseException) -> bool:
    """Whether `error` is one the project raises on purpose (a bad config or
    input, a missing dataset, a non-finite loss, a lock or a disk: ValueError,
    FileNotFoundError, FloatingPointError, or RuntimeError itself). Those
    name what is wrong and happen on every process alike; anything else
    (XLA's runtime errors included) in a step of a multi-process run most
    likely means another process died (`exit_lost_process`)."""
    return isinstance(error, (ValueError, FileNotFoundError, FloatingPointError)) \
        or type(error) is RuntimeError


def barrier(name: str) -> None:
    """Waits until every process of the run reaches `barrier(name)` (nothing
    on one process): what process 0 wrote before it is then there for all."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def exit_lost_process(error: BaseException) -> None:
    """Ends this process of a multi-process run whose step failed (another
    process died, its host was lost, a collective broke): one line naming the
    error and what to do, then exit `LOST_PROCESS_EXIT_CODE` at once, without
    the interpreter's exit handlers. (Those would call
    `jax.distributed.shutdown`, whose barrier cannot complete without the
    lost process: the coordination client then aborts with SIGABRT and a
    native stack dump.) Nothing is saved: the last complete checkpoint is
    where the restart resumes."""
    import sys

    import jax

    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    sys.stderr.write(
        f"ddep_jax.main: error: process {jax.process_index()} of "
        f"{jax.process_count()}: the run failed ({type(error).__name__}: {first}); "
        "another process has probably stopped (see its log). Stopping with exit "
        f"status {LOST_PROCESS_EXIT_CODE}. Restart every process with the same "
        "command: the run resumes from its last complete checkpoint.\n")
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(LOST_PROCESS_EXIT_CODE)


def start_watchdog(timeout_seconds: float, interval_seconds: float = 1.0):
    """A daemon thread that ends this process with one line and
    `LOST_PROCESS_EXIT_CODE` when another process of the run stops counting
    (killed, its host gone) for `timeout_seconds`, or when the coordination
    service cannot be reached (process 0 gone).

    Every process increments its own counter in the coordination service's
    key-value store (`ddep_jax_alive/<process>`) every `interval_seconds` and
    reads everyone's; a counter that has not moved for `timeout_seconds` of
    this host's clock means that process is lost. It runs beside the train
    step (which may be blocked in a collective with the lost process,
    forever) and acts before JAX's own heartbeat timeout, whose handler
    aborts the process with SIGABRT and a native stack dump: so
    `timeout_seconds` should be below `--heartbeat_timeout` (main uses half).
    Returns the thread (None for a single process)."""
    import atexit
    import sys
    import threading
    import time

    import jax
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    if client is None or jax.process_count() < 2:
        return None
    me, n = jax.process_index(), jax.process_count()
    stopping = threading.Event()
    # Before JAX's own exit handler (atexit runs the latest first) shuts the
    # coordination service down: a finished run is no lost process.
    atexit.register(stopping.set)

    def lost(why: str) -> None:
        if stopping.is_set():
            return
        sys.stderr.write(
            f"ddep_jax.main: error: process {me} of {n}: {why}; stopping with exit "
            f"status {LOST_PROCESS_EXIT_CODE}. Restart every process with the same "
            "command: the run resumes from its last complete checkpoint.\n")
        sys.stderr.flush()
        os._exit(LOST_PROCESS_EXIT_CODE)

    def watch():
        seen: dict[str, tuple[str, float]] = {}
        while not stopping.is_set():
            now = time.monotonic()
            try:
                client.key_value_increment(f"ddep_jax_alive/{me}", 1)
                counts = dict(client.key_value_dir_get("ddep_jax_alive/"))
            except Exception as e:  # noqa: BLE001  (the coordinator is gone)
                lost(f"the coordination service (process 0) cannot be reached "
                     f"({str(e).splitlines()[0][:200]})")
                return
            for key, value in counts.items():
                if key not in seen or seen[key][0] != value:
                    seen[key] = (value, now)
            for i in range(n):
                key = f"ddep_jax_alive/{i}"
                first = seen.setdefault(key, ("", now))[1]
                if i != me and now - first > timeout_seconds:
                    lost(f"process {i} has not been heard from for "
                         f"{timeout_seconds:.0f} s (killed, or its host lost)")
                    return
            time.sleep(interval_seconds)

    thread = threading.Thread(target=watch, name="ddep_jax-watchdog", daemon=True)
    thread.start()
    return thread


def initialize(mode: str = "auto", coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None,
               env: Mapping[str, str] | None = None,
               heartbeat_timeout_seconds: int = 100) -> bool:
    """Calls `jax.distributed.initialize` when `should_initialize` says so,
    before anything touches a device. Explicit arguments (multi-node GPU
    without a cluster manager) override JAX's auto-detection.

    A process that stops sending heartbeats for `heartbeat_timeout_seconds`
    counts as lost (JAX's coordination service then stops the others).

    Returns:
      True if initialised.

    Raises:
      ValueError: see `should_initialize`; a coordinator without
        num_processes and process_id where no cluster manager can supply them.
    """
    import jax
    from absl import logging

    env = os.environ if env is None else env
    if not should_initialize(mode, coordinator_address, env):
        return False
    if coordinator_address and (num_processes is None or process_id is None) \
            and multi_process_environment(env) is None:
        raise ValueError(f"--coordinator_address={coordinator_address} needs "
                         "--num_processes and --process_id (no SLURM / MPI / TPU "
                         "environment to take them from).")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               heartbeat_timeout_seconds=heartbeat_timeout_seconds)
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices.",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())
    return True
