"""What a compiled train step costs, and traces of a few steps.

`compiled_report` reads XLA's cost analysis (FLOPs, bytes accessed) and
memory analysis (per-device argument, output, temporary and peak bytes) of an
ahead-of-time compiled step; the trainers log it once at start-up and write
it to WORKDIR/compile_report.json, and `benchmarks/train_step.py` prints it
with the measured throughput. `StepTrace` captures a `jax.profiler` trace of
steps [start, start + num) into WORKDIR/profile (TensorBoard's profile plugin
or Perfetto read it).
"""

from __future__ import annotations

import os

import jax
from absl import logging

GIB = 2.0**30


def _first(analysis):
    """cost_analysis() is a dict, or a list with one dict per program."""
    if isinstance(analysis, (list, tuple)):
        return analysis[0] if analysis else {}
    return analysis or {}


def compiled_report(compiled, batch_size: int, num_devices: int) -> dict:
    """FLOPs and memory of one compiled step.

    Args:
      compiled: a `jax.stages.Compiled` (`jax.jit(f).lower(...).compile()`).
      batch_size: global examples per step (for FLOPs per example).
      num_devices: devices the step runs on (XLA's FLOPs are per device for
        an SPMD program; the global figure multiplies them).

    XLA counts the body of a loop once: with gradient accumulation (a
    `lax.scan` over micro-batches) and on the CPU backend (whose convolution
    kernel gradients loop over the kernel taps, `models.fast_conv`) the FLOPs
    are an undercount; `benchmarks/train_step.py` counts the model FLOPs of
    the same step without those loops.

    Returns:
      {'flops_per_step' (global), 'flops_per_example', 'bytes_accessed' (per
      device), 'memory': {'argument', 'output', 'alias', 'temp',
      'generated_code', 'xla_peak', 'peak'} in bytes per device (None where the backend
      does not say), 'num_devices', 'batch_size'}.
    """
    cost = _first(compiled.cost_analysis())
    flops = float(cost.get("flops", 0.0)) * num_devices
    report = {"flops_per_step": flops, "flops_per_example": flops / max(batch_size, 1),
              "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
              "num_devices": num_devices, "batch_size": batch_size, "memory": None}
    try:
        m = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError):  # some backends do not say
        m = None
    if m is not None:
        mem = {k: int(getattr(m, f"{k}_size_in_bytes", 0)) for k in
               ("argument", "output", "alias", "temp", "generated_code")}
        # Inputs + outputs (donated inputs counted once) + scratch: what the
        # step holds at most. XLA's own heap-simulated peak is taken where it
        # is larger (the CPU backend reports less than its temporaries).
        mem["xla_peak"] = int(getattr(m, "peak_memory_in_bytes", 0) or 0)
        mem["peak"] = max(mem["xla_peak"], mem["argument"] + mem["output"]
                          - mem["alias"] + mem["temp"])
        report["memory"] = mem
    return report


def describe(report: dict) -> str:
    """One log line of a `compiled_report`."""
    text = (f"{report['flops_per_step'] / 1e9:.1f} GFLOP/step "
            f"({report['flops_per_example'] / 1e9:.2f} GFLOP/example)")
    mem = report.get("memory")
    if mem:
        text += (f"; per device: arguments {mem['argument'] / GIB:.2f} GiB, "
                 f"temporaries {mem['temp'] / GIB:.2f} GiB, peak "
                 f"{mem['peak'] / GIB:.2f} GiB")
    return text


class StepTrace:
    """Captures a `jax.profiler` trace of steps [start, start + num) into
    `log_dir` (process 0 only; the other hosts would write the same
    timeline of their own devices, which is rarely wanted).

    Call `before(step)` before running a step and `after(step, result)`
    after it; `after` blocks on `result` when the trace ends so that the
    trace holds the whole device work of the last step. `num` = 0 disables it.
    """

    def __init__(self, log_dir: str, start: int, num: int):
        self.log_dir, self.start, self.stop = log_dir, start, start + num
        self.enabled = num > 0 and jax.process_index() == 0
        self.active = False

    def before(self, step: int) -> None:
        if self.enabled and step == self.start and not self.active:
            jax.profiler.start_trace(self.log_dir)
            self.active = True

    def after(self, step: int, result=None) -> None:
        if self.active and step >= self.stop - 1:
            jax.block_until_ready(result)
            jax.profiler.stop_trace()
            self.active = False
            logging.info("Profiler trace of steps %d-%d written to %s.", self.start,
                         step, self.log_dir)

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False


def trace_dir(workdir: str) -> str:
    return os.path.join(workdir, "profile")
