"""The harness's plan: which runs a grid holds, in which order they run,
what state each is in and what each cost (or will cost, estimated from the
recorded runs). `GridPlan` is a mix-in of `label_efficiency.Harness`: it
reads `self.recipe`, `self.seed_override`, `self.only`, `self.results` and
`self.pretraining_records`."""

from __future__ import annotations

import fnmatch
import os
from typing import Sequence

from etils import epath

from ddep_jax.common import writers
from ddep_jax.experiments.recipe import FinetuneRun


class GridPlan:
    """Runs, order, status and cost of a recipe's grid (see `Harness`)."""

    def seeds_of(self, row, fraction: str) -> int:
        """How many seeds `row` runs at `fraction`: the recipe's count
        (`Recipe.seeds_of`), which --seeds replaces wherever it is not 0."""
        n = self.recipe.seeds_of(row, fraction)
        return self.seed_override.get(fraction, n) if n > 0 else 0

    def finetune_runs(self) -> list[FinetuneRun]:
        """Every fine-tuning run of the grid, seed-major (each cell gets its
        first seed before any cell gets its second), lowest fraction first."""
        counts = {(r.key, f): self.seeds_of(r, f)
                  for r in self.recipe.rows for f in self.recipe.fractions}
        runs = []
        for seed in range(max(counts.values(), default=0)):
            for fraction in self.recipe.fractions:
                runs.extend(FinetuneRun(r.key, fraction, seed) for r in self.recipe.rows
                            if seed < counts[(r.key, fraction)])
        return runs

    def selected(self, run_id: str) -> bool:
        return not self.only or any(fnmatch.fnmatchcase(run_id, p) for p in self.only)

    def _needed_pretrainings(self, runs: Sequence[FinetuneRun]) -> list[str]:
        """Pretraining names to run, dependencies first."""
        wanted = [p.name for p in self.recipe.pretrainings  # named by --only
                  if self.only and self.selected(f"pretrain/{p.name}")]
        done = {self._result_key(r) for r in self.results}
        for run in runs:  # a recorded fine-tuning needs its pretraining no more
            if (run.row, run.fraction, run.seed) not in done:
                wanted += self.recipe.row(run.row).pretrainings
        order: list[str] = []

        def visit(name: str):
            p = self.recipe.pretraining(name)
            if p.init_from:
                visit(p.init_from)
            if name not in order:
                order.append(name)

        for name in wanted:
            visit(name)
        return order

    def plan(self) -> list[tuple[str, str]]:
        """[(run id, status)] of the selected runs in the order they run;
        status 'done', 'started' (a workdir with checkpoints), 'pending', or
        'external' (a pretraining read from --checkpoint, never run here)."""
        runs = [r for r in self.finetune_runs() if self.selected(r.id)]
        out = []
        for name in self._needed_pretrainings(runs):
            external = not self.recipe.pretraining(name).config
            out.append((f"pretrain/{name}", "external" if external
                        else self._status(self.pretrain_dir(name))))
        done = {self._result_key(r) for r in self.results}
        for run in runs:
            key = (run.row, run.fraction, run.seed)
            status = "done" if key in done else self._status(self.finetune_dir(run))
            out.append((run.id, status))
        return out

    def costs(self) -> dict[str, tuple[float, float, bool] | None]:
        """{run id: (CPU seconds, wall seconds, estimated)} for `plan()`'s runs.

        A recorded run gives its own figures (estimated False). An unrecorded
        fine-tuning run is estimated (True) from the recorded runs at its
        fraction (their mean), else from all recorded runs per step times its
        steps, less the share of its steps its newest finished checkpoint
        holds (the resume's compilation and final evaluation not counted).
        Estimates use only records whose CPU time is complete (a run killed
        before its time was counted undercounts). An unrecorded pretraining,
        an external checkpoint, or a run with nothing recorded to go by, is
        None. The wall seconds are as recorded, i.e. under the --jobs the
        records ran at.
        """
        from ddep_jax.checkpoints import store

        def figures(r):
            return r["cpu_seconds"], r.get("wall_seconds") or 0.0

        timed = [r for r in self.results if r.get("cpu_seconds") is not None]
        complete = [r for r in timed if r.get("cpu_seconds_complete") is not False]
        pretrained = {r["name"]: r for r in self.pretraining_records}
        runs = {r.id: r for r in self.finetune_runs()}
        out: dict[str, tuple[float, float, bool] | None] = {}
        for run_id, status in self.plan():
            if run_id.startswith("pretrain/"):
                r = pretrained.get(run_id.split("/", 1)[1])
                out[run_id] = (None if r is None or r.get("cpu_seconds") is None
                               or status == "external" else (*figures(r), False))
                continue
            run = runs[run_id]
            mine = [r for r in timed
                    if self._result_key(r) == (run.row, run.fraction, run.seed)]
            if mine:
                out[run_id] = (*figures(mine[-1]), False)
                continue
            steps = self.recipe.finetune_steps.get(run.fraction) or next(
                (r["steps"] for r in self.results
                 if r["fraction"] == run.fraction and r.get("steps")), None)
            same = [r for r in complete if r["fraction"] == run.fraction]
            counted = [r for r in complete if r.get("steps")]
            if same:
                cpu, wall = (sum(x) / len(same) for x in zip(*map(figures, same)))
            elif steps and counted:
                per_step = steps / sum(r["steps"] for r in counted)
                cpu, wall = (per_step * sum(x) for x in zip(*map(figures, counted)))
            else:
                out[run_id] = None
                continue
            if status == "started" and steps:
                done = max(store.checkpoint_steps(self.finetune_dir(run)), default=0)
                left = 1.0 - min(done / steps, 1.0)
                cpu, wall = cpu * left, wall * left
            out[run_id] = (cpu, wall, True)
        return out

    def _status(self, workdir: str) -> str:
        if writers.read_json(os.path.join(workdir, "done.json")) is not None:
            return "done"
        if epath.Path(workdir, "checkpoints").is_dir():
            return "started"
        return "pending"
