"""The label-efficiency harness: the paper's Figure 6 / Table 6 protocol as
one resumable command.

  python -m ddep_jax.experiments.label_efficiency --recipe=camvid_cpu --out=DIR \\
      [--only=PATTERN,...] [--list] [--summary_only] [--data_dir=...] \\
      [--checkpoint=NAME=PATH] [--jobs=N]

`--recipe` is a name in `ddep_jax.experiments.protocols.RECIPES`, or a
`Recipe` of your own as `path/to/file.py:NAME` or `package.module:NAME`.

`--jobs=N` runs up to N runs at once, each in its own process pinned to its
share of this process's CPUs (`os.sched_getaffinity`), a run starting as soon
as the runs it reads are finished. On CPU this runs a grid faster: at the CPU
recipes' shapes XLA CPU gains little from a second core (camvid_cpu's
fine-tuning trained 1.41 steps/s on one core alone and 1.47 each with two
runs side by side), so two one-core runs finish more runs an hour than one
two-core run (README, "Parallel on CPU").
The workers' output goes to OUT/logs/<run id, '/' -> '_'>.log.

A recipe (`ddep_jax.experiments.protocols`) names
- the pretraining runs its rows need, each run once into OUT/pretrain/<name>
  and shared by every row that uses it (stage 1 "supervised", stage 2 "ddep"
  with that encoder frozen, "dep" denoising the whole model from scratch;
  a paper recipe takes the public ImageNet-21k encoder as an external
  checkpoint, `--checkpoint=supervised=PATH`);
- the rows (initialisations: No pretraining, Supervised, DeP, DDeP, and any
  other method through the same `Row` interface), the label fractions and the
  seeds per fraction; each (row, fraction, seed) is one fine-tuning run into
  OUT/finetune/<row>/<fraction>/s<seed>. The seed sets the labelled subset,
  the initialisation and the data order together (the paper's repeated runs
  with new labelled subsets, Sec. 5.1), so two rows with the same seed see
  the same labelled images.

Resumable: a run with a line in OUT/results.jsonl (or a finished workdir) is
read, not redone; an interrupted run resumes from its last checkpoint
(`loop.run`); `--only` restricts an invocation to some runs (fnmatch
patterns over the run ids `pretrain/<name>` and
`finetune/<row>/<fraction>/s<seed>`; the pretraining runs a selected
fine-tuning needs are run first), so a grid can be spread over invocations or
machines sharing OUT. A SIGTERM stops the running stage at a checkpoint and
the harness with exit status 75 (`loop.PREEMPTED_EXIT_CODE`).

Writes, after every finished run:
- OUT/results.jsonl: one line per fine-tuning run (`RESULT_KEYS`);
- OUT/pretraining.jsonl: one line per pretraining run (its cost and figures);
- OUT/summary.md: mean +- std per cell, each row's difference against
  Supervised, No pretraining and DeP with a 95% confidence interval over
  seeds (`stats.difference`), the sensitivity check per fraction (each
  effect over No pretraining against twice the pooled seed std; the
  criterion is read at the lowest), per-class IoU per fraction and the CPU
  hours;
- OUT/label_efficiency.png (and _ablations.png for a recipe's second table):
  mIoU against labelled images on a log axis, one line per row with a +- 1
  std band (the paper's Fig. 6), drawn with matplotlib;
- OUT/training_loss.png (and _ablations.png): each row's fine-tuning loss
  against steps, mean over seeds, one panel per label fraction.
"""

from __future__ import annotations

import fnmatch
import os
import pathlib
import importlib
import importlib.util
import resource
import shlex
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import jax
from absl import logging
from etils import epath

from ddep_jax import config_lib, writers
from ddep_jax.experiments.provenance import (  # noqa: F401  (re-exported)
    code_commit, config_hash, machine_fingerprint, pin_cpus, provenance,
    use_compilation_cache, usable_cpus)
from ddep_jax.experiments.recipe import (  # noqa: F401  (re-exported)
    FinetuneRun, Pretraining, Recipe, Row, fraction_slug)
from ddep_jax.experiments.records import (  # noqa: F401  (re-exported)
    COST_FILE, CURVE_POINTS, RESULT_KEYS, WORKER_RECORD, HarnessRecords, _config_name,
    _final_figures, _is_main, _list_text, loss_curve)
from ddep_jax.experiments.workers import ParallelRuns

REPO_CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"
"""The repository's configs/ folder (recipes name files in it)."""




def _flag_value(value) -> str:
    """A config value as `--config.KEY=` takes it (tuples as (a,b,...))."""
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(_flag_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)


def _recipe_signature(recipe: "Recipe") -> tuple:
    """What must agree between a parent harness's recipe and its workers'."""
    def name(config):
        return getattr(config, "__qualname__", config)

    return (recipe.name, name(recipe.finetune_config), recipe.finetune_arg,
            tuple((r.key, r.init, r.pretraining, r.decoder_pretraining)
                  for r in recipe.rows),
            tuple((p.name, name(p.config), p.arg, p.init_from) for p in recipe.pretrainings),
            tuple(recipe.fractions), dict(recipe.finetune_steps))


def load_recipe(spec: str) -> "Recipe":
    """The recipe named `spec`: a name in `protocols.RECIPES`, or a `Recipe`
    object given as 'path/to/file.py:NAME' or 'package.module:NAME'.

    Raises:
      ValueError: an unknown name, a file or module that does not load, or
        an attribute that is missing or not a `Recipe`.
    """
    from ddep_jax.experiments import protocols

    if ":" not in spec:
        if spec.endswith(".py"):
            raise ValueError(f"--recipe={spec!r}: name the Recipe in the file too, "
                             f"as {spec}:NAME.")
        return protocols.get(spec)
    source, _, attr = spec.rpartition(":")
    try:
        if source.endswith(".py"):
            if not os.path.isfile(source):
                raise ValueError(f"--recipe={spec!r}: {source} is not a file.")
            name = "_ddep_recipe_" + pathlib.Path(source).stem
            module_spec = importlib.util.spec_from_file_location(name, source)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(source)
    except ValueError:
        raise
    except Exception as e:  # an ImportError, or any error the file raises
        raise ValueError(f"--recipe={spec!r}: cannot import {source!r} "
                         f"({type(e).__name__}: {e}).") from None
    recipe = getattr(module, attr, None)
    if not isinstance(recipe, Recipe):
        raise ValueError(f"--recipe={spec!r}: {source} has no Recipe called {attr!r} "
                         f"(found {type(recipe).__name__}).")
    return recipe


class Failed(Exception):
    """A run of the harness raised one of the project's named errors."""


class Stopped(Exception):
    """A signal stopped a run at a checkpoint (`loop.run` returned preempted)."""


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Harness(HarnessRecords, ParallelRuns):
    """Runs (or resumes) a recipe's grid into `out`.

    Args:
      recipe: the protocol.
      out: the output folder (local or gs://); shared by invocations.
      data_dir: `config.data.data_dir` of every run ('' keeps the configs').
      checkpoints: {pretraining name: path} of the external checkpoints.
      only: fnmatch patterns over run ids; empty = every run.
      seeds: per-fraction seed counts replacing the recipe's (e.g. fewer).
      configs_dir: where recipe config names are found (the repository's).
      run_fn: `loop.run` (tests may wrap it).
      jobs: runs at once, each a worker process on its share of the CPUs
        (`run_parallel`); 1 runs them here, one after another.
      recipe_spec: how a worker names the recipe (`load_recipe`); needed for
        jobs > 1 unless the recipe is one of `protocols.RECIPES`.
      worker: this process runs the selected runs for a parent harness:
        their records go to WORKDIR/harness_record.json, not to OUT's files.

    Raises (at construction):
      ValueError: an inconsistent recipe, or an external checkpoint missing
        from `checkpoints` (naming the --checkpoint flag to pass), or jobs > 1
        with a recipe a worker cannot load.
    """

    def __init__(self, recipe: Recipe, out: str, *, data_dir: str = "",
                 checkpoints: Mapping[str, str] | None = None,
                 only: Sequence[str] = (), seeds: Mapping[str, int] | None = None,
                 configs_dir: str | os.PathLike = REPO_CONFIGS,
                 run_fn: Callable | None = None, jobs: int = 1,
                 recipe_spec: str = "", worker: bool = False, cpus_per_run: int = 1):
        recipe.check()
        if jobs < 1:
            raise ValueError(f"jobs={jobs}: need at least 1.")
        if jobs > 1:
            from ddep_jax.experiments import protocols

            if not recipe_spec:
                if protocols.RECIPES.get(recipe.name) is not recipe:
                    raise ValueError(
                        f"jobs={jobs}: the workers load the recipe by name, and "
                        f"{recipe.name!r} is not in protocols.RECIPES: pass recipe_spec="
                        "'path/to/file.py:NAME' (or run with jobs=1).")
                recipe_spec = recipe.name
            elif _recipe_signature(load_recipe(recipe_spec)) != _recipe_signature(recipe):
                raise ValueError(f"jobs={jobs}: recipe_spec={recipe_spec!r} loads another "
                                 f"recipe than {recipe.name!r}, which the workers would run.")
            if run_fn is not None or pathlib.Path(configs_dir) != REPO_CONFIGS:
                raise ValueError(f"jobs={jobs}: workers run loop.run with the repository's "
                                 "configs; run_fn and configs_dir need jobs=1.")
        if cpus_per_run < 0:
            raise ValueError(f"cpus_per_run={cpus_per_run}: need >= 0 (0: share all).")
        self.jobs = jobs
        self.cpus_per_run = cpus_per_run
        self.recipe_spec = recipe_spec
        self.worker = worker
        self.recipe = recipe
        self.out = out
        self.data_dir = data_dir
        self.checkpoints = dict(checkpoints or {})
        self.only = tuple(only)
        self.seeds = dict(recipe.seeds, **(seeds or {}))
        self.configs_dir = pathlib.Path(configs_dir)
        if run_fn is None:
            from ddep_jax.trainers import loop

            run_fn = loop.run
        self.run_fn = run_fn
        self.failures: list[dict] = []
        self.results = self._read_jsonl("results.jsonl")
        stale = [r for r in self.results
                 if r.get("steps") is not None and r["fraction"] in recipe.finetune_steps
                 and r["steps"] != recipe.finetune_steps[r["fraction"]]]
        if stale:
            r = stale[0]
            raise ValueError(
                f"{os.path.join(out, 'results.jsonl')} holds {len(stale)} run(s) of "
                f"another protocol, e.g. {r.get('workdir')} trained {r['steps']} steps "
                f"where recipe {recipe.name!r} now trains "
                f"{recipe.finetune_steps[r['fraction']]} at {r['fraction']}: move those "
                "lines and their workdirs to another OUT (or use a new OUT).")
        self.pretraining_records = self._read_jsonl("pretraining.jsonl")
        for name in self._needed_pretrainings(self.finetune_runs()):
            self.pretrain_dir(name)  # an external checkpoint must be given

    # ------------------------------------------------------------------ plan
    def finetune_runs(self) -> list[FinetuneRun]:
        """Every fine-tuning run of the grid, seed-major (each cell gets its
        first seed before any cell gets its second), lowest fraction first."""
        runs = []
        for seed in range(max(self.seeds[f] for f in self.recipe.fractions)):
            for fraction in self.recipe.fractions:
                if seed < self.seeds[fraction]:
                    runs.extend(FinetuneRun(r.key, fraction, seed) for r in self.recipe.rows)
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
        from ddep_jax import checkpointing

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
                done = max(checkpointing.checkpoint_steps(self.finetune_dir(run)), default=0)
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

    # ---------------------------------------------------------------- paths
    def pretrain_dir(self, name: str) -> str:
        p = self.recipe.pretraining(name)
        if not p.config:
            if name not in self.checkpoints:
                raise ValueError(
                    f"recipe {self.recipe.name!r} reads pretraining {name!r} "
                    f"({p.description}) from an existing checkpoint: pass "
                    f"--checkpoint={name}=PATH.")
            return self.checkpoints[name]
        return os.path.join(self.out, "pretrain", name)

    def finetune_dir(self, run: FinetuneRun) -> str:
        return os.path.join(self.out, run.id)

    # --------------------------------------------------------------- configs
    def _load(self, name, arg: str, *overrides: Mapping[str, Any]):
        data = {"data.data_dir": self.data_dir} if self.data_dir else {}
        if callable(name):
            config = name(arg or None)
            for o in (self.recipe.overrides, *overrides, data):
                config_lib.apply_overrides(config, o)
            return config
        path = name if os.path.isabs(name) else str(self.configs_dir / name)
        return config_lib.load_config(path, arg, self.recipe.overrides, *overrides, data)

    def _pretraining_overrides(self, name: str) -> dict:
        p = self.recipe.pretraining(name)
        o = {**self.recipe.overrides, **p.overrides}
        if p.init_from:
            o["init.checkpoint"] = self.pretrain_dir(p.init_from)
        if self.data_dir:
            o["data.data_dir"] = self.data_dir
        return o

    def pretraining_config(self, name: str):
        p = self.recipe.pretraining(name)
        return self._load(p.config, p.arg, p.overrides, self._pretraining_overrides(name))

    def _finetune_overrides(self, run: FinetuneRun) -> dict:
        """Every key a fine-tuning run sets on its config file's config, in
        order (`finetune_config` applies them, `finetune_command` prints them)."""
        row = self.recipe.row(run.row)
        steps = self.recipe.finetune_steps.get(run.fraction)
        o = {**self.recipe.overrides, **self.recipe.finetune_overrides, **row.overrides}
        if steps:
            o["total_steps"] = steps
        o.update({"seed": run.seed,
                  "data.subset_seed": -1,  # the labelled subset follows the seed
                  "data.label_fraction": run.fraction, "init.mode": row.init,
                  "init.checkpoint": (self.pretrain_dir(row.pretraining)
                                      if row.pretraining else "")})
        if row.decoder_pretraining:
            o["init.decoder_checkpoint"] = self.pretrain_dir(row.decoder_pretraining)
            o["init.decoder_collection"] = "encoder"
        if self.data_dir:
            o["data.data_dir"] = self.data_dir
        base = self._load(self.recipe.finetune_config, self.recipe.finetune_arg,
                          self.recipe.finetune_overrides, row.overrides)
        split = self.recipe.metric_split
        if split != base.eval.split and split not in base.eval.final_splits:
            o["eval.final_splits"] = (*base.eval.final_splits, split)
        return o

    def finetune_config(self, run: FinetuneRun):
        return self._load(self.recipe.finetune_config, self.recipe.finetune_arg,
                          self._finetune_overrides(run))

    def _command(self, config_spec, arg: str, overrides: Mapping[str, Any],
                 workdir: str) -> str:
        """The `python -m ddep_jax.main` command that runs a config with
        `overrides` into `workdir`; OUT's own path is written OUT."""
        if callable(config_spec):
            return (f"(config {getattr(config_spec, '__qualname__', config_spec)} is a "
                    "Python callable, not a file: no command line)")
        path = config_spec
        if not os.path.isabs(path):
            path = os.path.relpath(self.configs_dir / path, REPO_CONFIGS.parent)
        flags = [f"--config={path}" + (f":{arg}" if arg else "")]
        flags += [f"--config.{k}={_flag_value(v)}" for k, v in overrides.items()]
        flags.append(f"--workdir={workdir}")
        text = "python -m ddep_jax.main " + " ".join(shlex.quote(f) for f in flags)
        return text.replace(self.out.rstrip("/") + "/", "OUT/")

    def pretraining_command(self, name: str) -> str:
        """The one command that runs pretraining `name` as the harness does."""
        p = self.recipe.pretraining(name)
        if not p.config:
            return f"(external checkpoint: --checkpoint={name}=PATH)"
        return self._command(p.config, p.arg, self._pretraining_overrides(name),
                             self.pretrain_dir(name))

    def finetune_command(self, run: FinetuneRun) -> str:
        """The one command that runs fine-tuning cell `run` as the harness
        does (after the pretraining runs it reads)."""
        return self._command(self.recipe.finetune_config, self.recipe.finetune_arg,
                             self._finetune_overrides(run), self.finetune_dir(run))

    # -------------------------------------------------------------- running
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
        except (ValueError, FileNotFoundError, FloatingPointError, RuntimeError) as e:
            result, ended = None, f"error: {e}"
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

    # --------------------------------------------------------------- files


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI (see the module docstring); returns the exit status."""
    import argparse

    from ddep_jax.experiments import protocols

    parser = argparse.ArgumentParser(
        prog="python -m ddep_jax.experiments.label_efficiency",
        description="Runs (or resumes) a label-efficiency grid: pretraining runs, "
                    "fine-tuning rows x label fractions x seeds, summary and plot.")
    parser.add_argument("--recipe", required=True,
                        help=f"One of {sorted(protocols.RECIPES)}, or a Recipe of your "
                        "own as path/to/file.py:NAME or package.module:NAME.")
    parser.add_argument("--out", required=True, help="Output folder (resumes).")
    parser.add_argument("--only", default="", help="Comma-separated fnmatch patterns "
                        "over run ids, e.g. 'pretrain/*' or 'finetune/*/1-30/*'.")
    parser.add_argument("--seeds", default="", help="Seeds per fraction replacing "
                        "the recipe's: N (every fraction) or 'FRACTION:N,...'.")
    parser.add_argument("--data_dir", default="", help="config.data.data_dir of "
                        "every run ('' = $TFDS_DATA_DIR or the configs').")
    parser.add_argument("--checkpoint", action="append", default=[],
                        metavar="NAME=PATH", help="An external pretraining checkpoint.")
    parser.add_argument("--distributed", default="auto", choices=["auto", "yes", "no"],
                        help="jax.distributed.initialize() as python -m ddep_jax.main "
                        "does (every host runs the same harness; host 0 writes).")
    parser.add_argument("--jobs", type=int, default=1,
                        help="Runs at once, each a worker process pinned to its share "
                        "of the CPUs (on a 2-core CPU: 2).")
    parser.add_argument("--worker", action="store_true",
                        help="(Internal) run the --only run for a parent harness.")
    parser.add_argument("--cpus", default="",
                        help="(Internal, with --worker) the CPUs to pin this process to.")
    parser.add_argument("--cpus_per_run", type=int, default=1,
                        help="CPUs each run computes on (default 1: every run of a grid "
                        "on the same count, so that a re-run gives the same numbers "
                        "bit for bit; XLA CPU's results depend on it). 0: the old "
                        "behaviour (--jobs=1 uses all CPUs, --jobs=N shares them).")
    parser.add_argument("--list", action="store_true",
                        help="Print the runs, their status and CPU minutes (recorded, or "
                             "'~' estimated from the recorded runs) and what is left; "
                             "run nothing.")
    parser.add_argument("--summary_only", action="store_true",
                        help="Rewrite summary.md and the plots from results.jsonl "
                        "(completing older lines from the runs' workdirs: training loss "
                        "curves, per-class order, into results.jsonl as it is on disk).")
    args = parser.parse_args(argv)

    if args.cpus:  # before the first JAX call sizes XLA's thread pool
        pin_cpus([int(c) for c in args.cpus.split(",")])
        print(f"worker pinned to CPUs {sorted(os.sched_getaffinity(0))}", flush=True)
    elif (args.cpus_per_run and args.jobs == 1 and not (args.list or args.summary_only)
          and hasattr(os, "sched_getaffinity")
          and usable_cpus() > args.cpus_per_run):
        pin_cpus(sorted(os.sched_getaffinity(0))[:args.cpus_per_run])
        print(f"runs pinned to CPUs {sorted(os.sched_getaffinity(0))} "
              f"(--cpus_per_run={args.cpus_per_run})", flush=True)
    try:
        recipe = load_recipe(args.recipe)
    except ValueError as e:
        parser.error(str(e))
    if not (args.list or args.summary_only):
        from ddep_jax import distributed

        distributed.initialize(args.distributed)
    checkpoints = {}
    for item in args.checkpoint:
        name, eq, path = item.partition("=")
        if not eq or not path:
            parser.error(f"--checkpoint={item!r}: expected NAME=PATH")
        checkpoints[name] = path
    seeds = {}
    if args.seeds:
        if ":" not in args.seeds:
            seeds = {f: int(args.seeds) for f in recipe.fractions}
        else:
            for item in args.seeds.split(","):
                fraction, _, n = item.rpartition(":")
                if fraction not in recipe.fractions:
                    parser.error(f"--seeds: {fraction!r} is not one of the recipe's "
                                 f"fractions {list(recipe.fractions)}")
                seeds[fraction] = int(n)
    try:
        harness = Harness(recipe, args.out, data_dir=args.data_dir,
                          checkpoints=checkpoints,
                          only=[p for p in args.only.split(",") if p], seeds=seeds,
                          jobs=args.jobs, recipe_spec=args.recipe, worker=args.worker,
                          cpus_per_run=args.cpus_per_run)
    except ValueError as e:
        parser.error(str(e))
    if args.list:
        print(_list_text(harness), end="")
        return 0
    if args.summary_only:
        filled = harness.fill_from_workdirs()
        if filled:
            print(f"{filled} results lines completed from their workdirs (training loss "
                  "curve, class order)")
        harness.write_outputs()
        print(os.path.join(args.out, "summary.md"))
        return 0
    logging.set_verbosity(logging.WARNING)
    status = harness.run()
    print(f"results: {os.path.join(args.out, 'results.jsonl')} ({len(harness.results)} "
          f"runs); summary: {os.path.join(args.out, 'summary.md')}")
    return status


if __name__ == "__main__":
    # The package's module, not this __main__ copy, so that a recipe file's
    # `Recipe` (imported from the package) is the class `load_recipe` checks.
    from ddep_jax.experiments import label_efficiency

    sys.exit(label_efficiency.main())
