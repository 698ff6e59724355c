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
  criterion is read at the lowest, where Supervised - No pretraining is
  also held to the encoder's bar, `report.ENCODER_BAR`), per-class IoU per
  fraction and the CPU hours;
- OUT/label_efficiency.png (and _ablations.png for a recipe's second table):
  mIoU against labelled images on a log axis, one line per row with a +- 1
  std band (the paper's Fig. 6), each row's cost beside it (fine-tuning CPU
  s / step, pretraining CPU h), drawn with matplotlib;
- OUT/training_loss.png (and _ablations.png): each row's fine-tuning loss
  against steps, mean over seeds, one panel per label fraction.

This module holds the command and `Harness`, which is built from mix-ins,
one concern each: `plan.GridPlan` (runs, order, status, cost),
`run_configs.RunConfigs` (each run's config and its command),
`runner.SerialRuns` (running here), `workers.ParallelRuns` (--jobs worker
processes) and `records.HarnessRecords` (results.jsonl, pretraining.jsonl,
summary.md and plots through `report`).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pathlib
import sys
from typing import Callable, Mapping, Sequence

from absl import logging

from ddep_jax.experiments.plan import GridPlan
from ddep_jax.experiments.provenance import (  # noqa: F401  (re-exported)
    machine_fingerprint, pin_cpus, usable_cpus, use_compilation_cache)
from ddep_jax.experiments.recipe import (  # noqa: F401  (re-exported)
    FinetuneRun, Pretraining, Recipe, Row)
from ddep_jax.experiments.records import (  # noqa: F401  (re-exported)
    RESULT_KEYS, WORKER_RECORD, HarnessRecords, _list_text, loss_curve)
from ddep_jax.experiments.run_configs import REPO_CONFIGS, RunConfigs
from ddep_jax.experiments.runner import SerialRuns
from ddep_jax.experiments.workers import ParallelRuns


def _recipe_signature(recipe: "Recipe") -> tuple:
    """What must agree between a parent harness's recipe and its workers'."""
    def name(config):
        return getattr(config, "__qualname__", config)

    return (recipe.name, name(recipe.finetune_config), recipe.finetune_arg,
            tuple((r.key, r.init, r.pretraining, r.decoder_pretraining,
                   tuple(sorted(r.seeds.items())), r.arg) for r in recipe.rows),
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


class Harness(GridPlan, RunConfigs, SerialRuns, HarnessRecords, ParallelRuns):
    """Runs (or resumes) a recipe's grid into `out`.

    Args:
      recipe: the protocol.
      out: the output folder (local or gs://); shared by invocations.
      data_dir: `config.data.data_dir` of every run ('' keeps the configs').
      checkpoints: {pretraining name: path} of the external checkpoints.
      only: fnmatch patterns over run ids; empty = every run.
      seeds: per-fraction seed counts replacing the recipe's and the rows'
        (e.g. fewer; a row not run at a fraction stays so).
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
        self.seed_override = dict(seeds or {})  # --seeds: {fraction: count}
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
    parser.add_argument("--coordinator_address", default=None, metavar="HOST:PORT",
                        help="Several hosts without SLURM / MPI / a TPU slice: process "
                        "0's address, as python -m ddep_jax.main takes it.")
    parser.add_argument("--num_processes", type=int, default=None,
                        help="Number of processes (with --coordinator_address).")
    parser.add_argument("--process_id", type=int, default=None,
                        help="This process's index (with --coordinator_address).")
    parser.add_argument("--heartbeat_timeout", type=int, default=100,
                        help="Seconds after which a silent process counts as lost; "
                        "the others stop (exit 76) after half of it.")
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

    from ddep_jax.parallel import distributed

    try:
        several_hosts = not args.worker and distributed.should_initialize(
            args.distributed, args.coordinator_address, os.environ)
    except ValueError as e:
        parser.error(str(e))
    if args.cpus:  # before the first JAX call sizes XLA's thread pool
        pin_cpus([int(c) for c in args.cpus.split(",")])
        print(f"worker pinned to CPUs {sorted(os.sched_getaffinity(0))}", flush=True)
    elif (args.cpus_per_run and args.jobs == 1 and not (args.list or args.summary_only)
          and not several_hosts and hasattr(os, "sched_getaffinity")
          and usable_cpus() > args.cpus_per_run):
        pin_cpus(sorted(os.sched_getaffinity(0))[:args.cpus_per_run])
        print(f"runs pinned to CPUs {sorted(os.sched_getaffinity(0))} "
              f"(--cpus_per_run={args.cpus_per_run})", flush=True)
    try:
        recipe = load_recipe(args.recipe)
    except ValueError as e:
        parser.error(str(e))
    if not (args.list or args.summary_only):
        try:
            initialised = distributed.initialize(
                args.distributed, args.coordinator_address, args.num_processes,
                args.process_id, heartbeat_timeout_seconds=args.heartbeat_timeout)
        except ValueError as e:
            parser.error(str(e))
        if initialised:
            # A lost host ends the others with one line and exit status 76.
            distributed.start_watchdog(max(2.0, args.heartbeat_timeout / 2))
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
