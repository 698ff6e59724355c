"""`--jobs=N`: the label-efficiency harness's runs as worker processes, each
pinned to its own CPUs, a run starting once the runs it reads have finished;
the parent alone writes OUT's records. A mixin of
`label_efficiency.Harness`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

from etils import epath

from ddep_jax.common import writers
from ddep_jax.experiments.records import WORKER_RECORD

class ParallelRuns:
    """The parallel half of `label_efficiency.Harness`."""

    def _tasks(self) -> list[tuple[str, list[str]]]:
        """[(run id, the run ids it waits for)] of the selected runs still to
        do, in the serial order: pretrainings (those recorded with a finished
        workdir are done) then fine-tunings not in results.jsonl."""
        runs = [r for r in self.finetune_runs() if self.selected(r.id)]
        recorded = {r["name"] for r in self.pretraining_records}
        todo: list[tuple[str, list[str]]] = []
        ids = set()
        def chain(name: str) -> list[str]:  # the tasks among name and its sources
            out = []
            while name:
                if f"pretrain/{name}" in ids:
                    out.insert(0, f"pretrain/{name}")
                name = self.recipe.pretraining(name).init_from
            return out

        for name in self._needed_pretrainings(runs):
            p = self.recipe.pretraining(name)
            if not p.config or (name in recorded and self._finished(name)):
                continue
            todo.append((f"pretrain/{name}", chain(p.init_from)))
            ids.add(f"pretrain/{name}")
        done = {self._result_key(r) for r in self.results}
        for run in runs:
            if (run.row, run.fraction, run.seed) in done:
                continue
            todo.append((run.id, [t for p in self.recipe.row(run.row).pretrainings
                                  for t in chain(p)]))
        return todo

    def _worker_command(self, run_id: str) -> list[str]:
        cmd = [sys.executable, "-m", "ddep_jax.experiments.label_efficiency",
               f"--recipe={self.recipe_spec}", f"--out={self.out}", f"--only={run_id}",
               "--worker", "--distributed=no", f"--cpus_per_run={self.cpus_per_run}"]
        if self.data_dir:
            cmd.append(f"--data_dir={self.data_dir}")
        cmd += [f"--checkpoint={k}={v}" for k, v in self.checkpoints.items()]
        if self.seed_override:
            cmd.append("--seeds=" + ",".join(f"{f}:{n}" for f, n in
                                             self.seed_override.items()))
        return cmd

    def run_parallel(self) -> int:
        """`run` with up to `jobs` runs at once, each a worker process
        (`python -m ddep_jax.experiments.label_efficiency --worker
        --only=<run id>`) pinned to its share of this process's CPUs; a run
        starts once the pretraining it reads has finished. The parent alone
        writes OUT's records and outputs, after each run. A SIGTERM or
        Ctrl-C is passed to the workers, which stop at a checkpoint; then
        the exit status is 75 as in `run`. A worker that fails fails its run
        (and the runs reading it), the others go on; its output is in
        OUT/logs/<run id, '/' -> '_'>.log.

        Returns: 0, 1 if a run failed, or `loop.PREEMPTED_EXIT_CODE`."""
        from ddep_jax.trainers import loop

        if hasattr(os, "sched_getaffinity"):
            cpus = sorted(os.sched_getaffinity(0))
            n = self.cpus_per_run
            if n:  # every run on the same number of CPUs: the same numbers
                groups = [cpus[i * n:(i + 1) * n]
                          for i in range(min(self.jobs, len(cpus) // n))]
            else:
                groups = [cpus[i::self.jobs] for i in range(min(self.jobs, len(cpus)))]
            if not groups:
                raise ValueError(f"cpus_per_run={n}: this process may use only "
                                 f"{len(cpus)} CPU(s).")
        else:  # no pinning here (e.g. macOS): N unpinned workers
            groups = [[] for _ in range(self.jobs)]
        pending = self._tasks()
        done: set[str] = set()
        failed: set[str] = set()
        running: dict[str, tuple[subprocess.Popen, int, Any]] = {}
        stopping = []
        previous = {}

        def on_signal(signum, frame):
            stopping.append(signum)
            for proc, _, _ in running.values():
                proc.send_signal(signal.SIGTERM)

        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
        log_dir = os.path.join(self.out, "logs")
        try:
            while pending or running:
                free = [g for g in range(len(groups))
                        if g not in {slot for _, slot, _ in running.values()}]
                for run_id, deps in list(pending):
                    if stopping or not free:
                        break
                    if any(d in failed for d in deps):
                        pending.remove((run_id, deps))
                        failed.add(run_id)
                        self._fail(run_id, f"the run it reads ({', '.join(deps)}) "
                                           "did not finish")
                        continue
                    if not all(d in done for d in deps):
                        continue
                    pending.remove((run_id, deps))
                    slot = free.pop(0)
                    cpu_set = groups[slot]
                    log = None
                    if not writers.is_remote(self.out):
                        os.makedirs(log_dir, exist_ok=True)
                        log = open(os.path.join(log_dir, run_id.replace("/", "_") + ".log"),
                                   "ab")
                    cpu_list = ",".join(map(str, cpu_set))
                    print(f"[{time.strftime('%H:%M:%S')}] {run_id}: running"
                          + (f" on CPU {cpu_list}" if cpu_list else ""), flush=True)
                    # The worker pins itself (--cpus) before JAX starts its
                    # threads: no preexec_fn, so no fork of this threaded process.
                    proc = subprocess.Popen(
                        self._worker_command(run_id)
                        + ([f"--cpus={cpu_list}"] if cpu_list else []),
                        stdout=log, stderr=log, stdin=subprocess.DEVNULL)
                    running[run_id] = (proc, slot, log)
                    if stopping:  # a signal since the check above
                        proc.send_signal(signal.SIGTERM)
                if not running:
                    if not stopping:  # (cannot happen: a task waits on one before it)
                        for run_id, deps in pending:
                            self._fail(run_id, f"it waits on {deps}, which never ran")
                    break
                time.sleep(0.5)
                for run_id, (proc, slot, log) in list(running.items()):
                    code = proc.poll()
                    if code is None:
                        continue
                    del running[run_id]
                    if log is not None:
                        log.close()
                    where = (f"; see {os.path.join(log_dir, run_id.replace('/', '_'))}"
                             ".log" if log is not None else "")
                    if self._collect(run_id):  # a record: the run finished
                        done.add(run_id)
                    elif code == loop.PREEMPTED_EXIT_CODE or (stopping and code != 0):
                        pending.insert(0, (run_id, []))  # stopped; resumes later
                    else:
                        failed.add(run_id)
                        self._fail(run_id, f"its worker exited with status {code} "
                                           f"and left no {WORKER_RECORD}{where}")
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for proc, _, log in running.values():  # an error here: no orphans
                proc.terminate()
                proc.wait()
                if log is not None:
                    log.close()
        self.write_outputs()
        if stopping:
            return loop.PREEMPTED_EXIT_CODE
        return 1 if self.failures else 0

    def _collect(self, run_id: str) -> bool:
        """Moves a finished worker's record into OUT's files (False: it left
        none)."""
        if run_id.startswith("pretrain/"):
            workdir = self.pretrain_dir(run_id[len("pretrain/"):])
        else:
            run = next(r for r in self.finetune_runs() if r.id == run_id)
            workdir = self.finetune_dir(run)
        path = os.path.join(workdir, WORKER_RECORD)
        item = writers.read_json(path)
        if item is None:
            return False
        record = item["record"]
        if item["kind"] == "pretraining":
            self._add_pretraining_record(record)
            print(f"  {run_id}: done ({record['cpu_seconds'] / 60:.1f} CPU min)",
                  flush=True)
        else:
            self._add_result(record)
            print(f"  {run_id}: {self.recipe.metric_split} mIoU "
                  f"{100 * record['miou']:.2f} ({record['cpu_seconds'] / 60:.1f} CPU min)",
                  flush=True)
        epath.Path(path).unlink()  # now in OUT's records
        self.write_outputs()
        return True
