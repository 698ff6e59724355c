"""Running a grid in this process, one run after another: each pretraining
(dependencies first) and each fine-tuning cell through `loop.run`, timed
(CPU and wall seconds per invocation, WORKDIR/harness_cost.json), its
record written as soon as it finishes; a failed run is recorded and the
others go on. `SerialRuns` is a mix-in of `label_efficiency.Harness`;
`workers.ParallelRuns` runs the same runs in worker processes."""

from __future__ import annotations

import os
import resource
import sys
import time
from typing import Mapping

import jax
from absl import logging

from ddep_jax.common import writers
from ddep_jax.parallel import distributed
from ddep_jax.experiments.provenance import provenance, use_compilation_cache
from ddep_jax.experiments.recipe import FinetuneRun
from ddep_jax.experiments.records import (COST_FILE, WORKER_RECORD, _config_name,
                                          _final_figures, _is_main, loss_curve)


class Failed(Exception):
    """A run of the harness raised one of the project's named errors."""


class Stopped(Exception):
    """A signal stopped a run at a checkpoint (`loop.run` returned preempted)."""


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class SerialRuns:
    """Runs the selected runs here, one after another (see `Harness`)."""

    def run(self) -> int:
        """Runs every selected run not yet finished, writing the outputs
        after each. Returns the exit status: 0, 1 if a run failed (the
        others still ran; OUT/failures.jsonl names it and the error) or
        `loop.PREEMPTED_EXIT_CODE` when a signal stopped a run."""
        from ddep_jax.trainers import loop

        use_compilation_cache(self.out)
        if self.jobs > 1:
            if jax.default_backend() != "cpu" or jax.process_count() > 1:
                raise ValueError(
                    f"jobs={self.jobs} splits this host's CPUs between worker "
                    f"processes; here JAX runs on {jax.default_backend()} with "
                    f"{jax.process_count()} process(es): run the harness with jobs=1.")
            return self.run_parallel()
        runs = [r for r in self.finetune_runs() if self.selected(r.id)]
        broken: set[str] = set()
        try:
            for name in self._needed_pretrainings(runs):
                p = self.recipe.pretraining(name)
                if p.init_from in broken or (p.init_from and not self._finished(p.init_from)):
                    broken.add(name)
                    continue
                if self.worker and not self.selected(f"pretrain/{name}"):
                    # A worker runs its own run only: the parent ran the
                    # chain first, and a pretraining not finished fails it.
                    if not self._finished(name):
                        broken.add(name)
                    continue
                if not p.config:
                    continue  # external: pretrain_dir checks it was given
                try:
                    self._run_pretraining(name)
                except Failed:
                    broken.add(name)
            for run in runs:
                row = self.recipe.row(run.row)
                failed = [p for p in row.pretrainings if p in broken]
                if failed:
                    self._fail(run.id, f"its pretraining {failed[0]!r} did not finish")
                    continue
                try:
                    self._run_finetune(run)
                except Failed:
                    pass
        except Stopped:
            self.write_outputs()
            return loop.PREEMPTED_EXIT_CODE
        self.write_outputs()
        return 1 if self.failures else 0

    # ------------------------------------------------------------ parallel
    def _finished(self, name: str) -> bool:
        p = self.recipe.pretraining(name)
        return not p.config or self._status(self.pretrain_dir(name)) == "done"

    def _timed_run(self, run_id: str, config, workdir: str) -> dict:
        """loop.run with the CPU / wall seconds of this invocation added to
        WORKDIR/harness_cost.json; named errors become `Failed`."""
        cost_path = os.path.join(workdir, COST_FILE)
        cost = writers.read_json(cost_path) or {"invocations": []}
        entry = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "ended": None,
                 "cpu_seconds": 0.0, "wall_seconds": 0.0}
        cost["invocations"].append(entry)
        if _is_main():
            writers.makedirs(workdir)
            writers.write_json(cost_path, cost)
        logging.info("label_efficiency: %s -> %s", run_id, workdir)
        print(f"[{time.strftime('%H:%M:%S')}] {run_id}: running in {workdir}", flush=True)
        cpu0, wall0 = _cpu_seconds(), time.perf_counter()
        try:
            result = self.run_fn(config, workdir)
            ended = "preempted" if result.get("preempted") else (
                "already_finished" if result.get("already_finished") else "finished")
        except Exception as e:  # noqa: BLE001
            if jax.process_count() > 1 and not distributed.is_project_error(e):
                # Another process of the grid died mid-run: stop every
                # survivor loudly (a rerun of the same command on every
                # host skips the finished runs and resumes this one).
                distributed.exit_lost_process(e)
            if not isinstance(e, (ValueError, FileNotFoundError, FloatingPointError,
                                  RuntimeError)):
                raise
            result, ended = None, f"error: {e}"
        # Several hosts: process 0's done.json and records of this run are
        # written before any process decides what to run next.
        distributed.barrier(f"ddep_jax harness: {run_id} ended")
        entry.update(ended=ended, cpu_seconds=round(_cpu_seconds() - cpu0, 1),
                     wall_seconds=round(time.perf_counter() - wall0, 1))
        if _is_main():
            writers.write_json(cost_path, cost)
        if result is None:
            self._fail(run_id, ended[len("error: "):])
            raise Failed(run_id)
        if result.get("preempted"):
            raise Stopped(f"{run_id} stopped by a signal at step {result['step']}")
        return cost

    @staticmethod
    def _cost_totals(cost: Mapping) -> tuple[float, float, bool]:
        inv = cost.get("invocations", [])
        return (round(sum(i["cpu_seconds"] for i in inv), 1),
                round(sum(i["wall_seconds"] for i in inv), 1),
                all(i["ended"] is not None for i in inv))

    def _run_pretraining(self, name: str) -> None:
        workdir = self.pretrain_dir(name)
        earlier = [r for r in self.pretraining_records if r["name"] == name]
        if earlier and self._status(workdir) == "done":
            return
        # Recorded but its workdir is gone (results.jsonl / pretraining.jsonl
        # carried to a new machine): the fine-tunings still to run need the
        # checkpoint, so it runs again; the earlier records are kept in the
        # new one ("earlier") to show whether the rerun reproduced them.
        config = self.pretraining_config(name)
        cost = self._timed_run(f"pretrain/{name}", config, workdir)
        cpu, wall, complete = self._cost_totals(cost)
        done = writers.read_json(os.path.join(workdir, "done.json")) or {}
        p = self.recipe.pretraining(name)
        record = {"recipe": self.recipe.name, "name": name, "description": p.description,
                  "config": _config_name(p.config, p.arg),
                  "stage": config.stage, "steps": done.get("step"),
                  "final": _final_figures(workdir, done), "cpu_seconds": cpu,
                  "cpu_seconds_complete": complete, "wall_seconds": wall,
                  "workdir": os.path.relpath(workdir, self.out)
                  if not writers.is_remote(workdir) else workdir,
                  "init_checkpoint": str(config.init.checkpoint),
                  **provenance(config, self.out)}
        if earlier:
            record["earlier"] = [{k: r.get(k) for k in ("steps", "final", "cpu_seconds")}
                                 for r in earlier]
            if any(e["final"] != record["final"] for e in record["earlier"]):
                print(f"  pretrain/{name}: the rerun's figures {record['final']} differ "
                      f"from the recorded {[e['final'] for e in record['earlier']]}",
                      flush=True)
        if self.worker:
            self._write_worker_record(workdir, "pretraining", record)
            return
        self._add_pretraining_record(record)
        print(f"  pretrain/{name}: done ({cpu / 60:.1f} CPU min)", flush=True)

    @staticmethod
    def _write_worker_record(workdir: str, kind: str, record: Mapping) -> None:
        if _is_main():
            writers.write_json(os.path.join(workdir, WORKER_RECORD),
                               {"kind": kind, "record": record})

    def _run_finetune(self, run: FinetuneRun) -> None:
        key = (run.row, run.fraction, run.seed)
        if key in {self._result_key(r) for r in self.results}:
            return
        workdir = self.finetune_dir(run)
        config = self.finetune_config(run)
        cost = self._timed_run(run.id, config, workdir)
        cpu, wall, complete = self._cost_totals(cost)
        record = self._read_result(run, workdir, config)
        record.update(cpu_seconds=cpu, cpu_seconds_complete=complete, wall_seconds=wall)
        if self.worker:
            self._write_worker_record(workdir, "finetune", record)
            return
        self._add_result(record)
        self.write_outputs()
        print(f"  {run.id}: {self.recipe.metric_split} mIoU {100 * record['miou']:.2f} "
              f"({cpu / 60:.1f} CPU min)", flush=True)

    def _read_result(self, run: FinetuneRun, workdir: str, config) -> dict:
        split, steps = self.recipe.metric_split, config.total_steps
        path = os.path.join(workdir, "eval", f"{split}_{steps:08d}.json")
        report = writers.read_json(path)
        if report is None:
            raise Failed(self._fail(run.id, f"{path} is missing after the run finished"))
        subset = writers.read_json(os.path.join(workdir, "labelled_subset.json")) or {}
        return {"recipe": self.recipe.name, "row": run.row,
                "row_name": self.recipe.row(run.row).name, "fraction": run.fraction,
                "labelled_images": subset.get("num_labelled"), "seed": run.seed,
                "miou": report["miou"], "per_class_iou": report.get("per_class"),
                "pixel_accuracy": report["pixel_accuracy"], "split": split,
                "steps": steps, "cpu_seconds": None, "cpu_seconds_complete": None,
                "wall_seconds": None,
                "workdir": os.path.relpath(workdir, self.out)
                if not writers.is_remote(workdir) else workdir,
                "init_checkpoint": str(config.init.checkpoint),
                "train_loss": loss_curve(workdir), **provenance(config, self.out)}

    def _fail(self, run_id: str, why: str) -> str:
        self.failures.append({"run": run_id, "error": why,
                              "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
        print(f"  {run_id}: FAILED: {why}", file=sys.stderr, flush=True)
        if _is_main() and not self.worker:  # a worker's parent records it
            self._write_jsonl("failures.jsonl",
                              self._read_jsonl("failures.jsonl") + self.failures[-1:])
        return run_id
