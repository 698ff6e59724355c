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


def initialize(mode: str = "auto", coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None,
               env: Mapping[str, str] | None = None) -> bool:
    """Calls `jax.distributed.initialize` when `should_initialize` says so,
    before anything touches a device. Explicit arguments (multi-node GPU
    without a cluster manager) override JAX's auto-detection.

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
                               num_processes=num_processes, process_id=process_id)
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices.",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())
    return True
