"""What a compiled train step costs, and traces of a few steps.

`compiled_report` reads XLA's cost analysis (FLOPs, bytes accessed) and
memory analysis (per-device argument, output, temporary and peak bytes) of an
ahead-of-time compiled step; the trainers log it once at start-up and write
it to WORKDIR/compile_report.json, and `benchmarks/train_step.py` prints it
with the measured throughput. `StepTrace` captures a `jax.profiler` trace of
steps [start, start + num) into WORKDIR/profile (TensorBoard's profile plugin
or Perfetto read it); `op_breakdown` sums a trace's XLA op events by kind
(`benchmarks/train_step.py --profile_steps`).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re

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


def op_breakdown(log_dir: str, num_steps: int, module: str | None = None) -> list[dict]:
    """XLA op time per step of a `jax.profiler` trace, by kind of op.

    Reads the newest `perfetto_trace.json.gz` under `log_dir` (written by
    `jax.profiler.trace(log_dir, create_perfetto_trace=True)`; Chrome trace
    event format) and sums the durations of its complete ('X') events that
    are one HLO instruction of a compiled program (named as in the optimised
    HLO, e.g. `transpose_copy_fusion.16`, `ynn_fusion.4`, `convolution.3`),
    grouped by the name without its `.N` suffix; each op counts its self
    time (its span less the ops nested in it on its thread: a `while` loop's
    body ops are counted once, not also in the `while`). (xprof's op statistics
    cover accelerator planes only: for a CPU-only trace they are empty.)

    On the CPU backend an op's event is the span of its thunk on the thread
    that ran it; the intra-op work it hands to the other threads of XLA's
    pool (Eigen convolutions) is not under any event, so the column is
    thread time of the ops' own threads, which can sum to less than the
    step's wall time x threads.

    Args:
      log_dir: the trace's directory.
      num_steps: steps the trace holds (the figures are per step).
      module: only the ops of this HLO module (e.g. 'jit_step_fn'); None: all.

    Returns:
      rows {'kind', 'ms_per_step', 'share' (of all op time, 0-1),
      'ops_per_step'}, largest first.

    Raises:
      FileNotFoundError: no perfetto_trace.json.gz under `log_dir`.
    """
    paths = sorted(glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"),
                             recursive=True), key=os.path.getmtime)
    if not paths:
        raise FileNotFoundError(
            f"no perfetto_trace.json.gz under {log_dir}: trace with "
            "jax.profiler.trace(..., create_perfetto_trace=True).")
    with gzip.open(paths[-1], "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    ops = []
    for e in events:
        args = e.get("args") or {}
        if e.get("ph") != "X" or "hlo_op" not in args or (
                module is not None and args.get("hlo_module") != module):
            continue
        ops.append((e.get("pid"), e.get("tid"), float(e["ts"]), float(e.get("dur", 0.0)),
                    re.sub(r"\.\d+$", "", args["hlo_op"])))
    # Self time: an op's span less the ops nested in it on its thread (a
    # `while`, `call` or `conditional` spans the ops of its body).
    ops.sort(key=lambda o: (o[0], o[1], o[2], -o[3]))
    time_us, count = collections.Counter(), collections.Counter()
    stack: list[list] = []  # [thread, end, kind, self time]

    def close(item):
        time_us[item[2]] += item[3]

    for pid, tid, ts, dur, kind in ops:
        while stack and (stack[-1][0] != (pid, tid) or stack[-1][1] <= ts):
            close(stack.pop())
        if stack:
            stack[-1][3] -= min(dur, stack[-1][1] - ts)
        stack.append([(pid, tid), ts + dur, kind, dur])
        count[kind] += 1
    while stack:
        close(stack.pop())
    total = sum(time_us.values()) or 1.0
    return [{"kind": k, "ms_per_step": v / 1e3 / num_steps, "share": v / total,
             "ops_per_step": count[k] / num_steps} for k, v in time_us.most_common()]
