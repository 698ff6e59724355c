"""The one training loop of every stage, driven by a `Stage`.

A stage (stage 1 classify, stage 2 DDeP/DeP, stage 3 fine-tuning, or any new
pretraining objective) is data: a `Stage` made by its trainer module
(`ddep_jax.trainers.<config.stage>.stage(config, mesh, workdir)`; the module
name is the stage's name, no registry to edit) holds the model and
its init inputs, the frozen collections, the collections read from
`config.init.checkpoint`, the train dataset and its batch spec, and the
functions the loop calls: `prepare` and `loss_fn` inside the jitted step,
`evaluate` and `after_step` on the host. `run(config, workdir)` does the rest,
the same for all of them:

  signal handlers (`Preemption`) -> validate -> workdir lock -> a resume's
  config checked against config.json (`check_resume`) -> stage ->
  config.json -> optimizer and shape-first sharded train state
  (`build_state`) -> resume from the newest readable checkpoint (Orbax
  state + grain iterator; `checkpointing.resume`) or initialise with the
  hand-over (`handover.initialise`) -> a finished run stops here -> compile
  the step ahead of time with its report (`compile_step`) -> the `for step`
  loop (`guarded`: profiler trace, metric queue, NaN stop, preemption, log
  line, checked checkpoints; periodic evaluation; `after_step` hooks) ->
  final evaluation -> done.json -> close.

The train step (`make_train_step`) is shared too:

  key = fold_in(train_key, step)
  batch, context, key = stage.prepare(batch, key)
  extra, batch, context = stage.update_extra(state['extra'], params, batch,
                                             context)   (stages with extra state)
  (loss, aux), grads = accumulate_gradients(stage.loss_fn over micro-batches,
                                            the trainable collections)
  frozen collections get zero updates (optax.partition's set_to_zero),
  metrics = {'loss', **stage.metrics(aux, context), 'learning_rate',
             'grad_norm'}

Also here: `MetricLog` (metrics queued as device arrays, fetched once per
log, NaN stop, history, progress line with ETA), `Preemption` (SIGTERM or
the hosts' preemption sync point -> checkpoint and `PREEMPTED_EXIT_CODE`),
`compile_step` (FLOPs and per-device memory of the step, logged and written
to WORKDIR/compile_report.json).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import math
import os
import pkgutil
import signal
import sys
import threading
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from absl import logging
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P

from ddep_jax import checkpointing, handover, optim, profiling, writers
from ddep_jax.tree_paths import flatten_dict
import ddep_jax.trainers as trainers_package
from ddep_jax.models import fast_conv
from ddep_jax.sharding import make_mesh, state_shardings

def stage_names() -> list[str]:
    """The stages there are: the modules of `ddep_jax.trainers` other than
    this one (each defines `default_config`, `validate` and `stage`)."""
    return sorted(m.name for m in pkgutil.iter_modules(trainers_package.__path__)
                  if m.name != "loop")


def trainer(name: str):
    """The trainer module of `config.stage` = `name`: `ddep_jax.trainers.<name>`.

    Raises:
      ValueError: no such trainer module, listing the stages there are.
    """
    if name not in stage_names():
        raise ValueError(f"config.stage={name!r} is unknown; expected one of "
                         f"{stage_names()} (stage 1 classify, stage 2 ddep, "
                         "stage 3 finetune): a trainer module in ddep_jax/trainers/.")
    return importlib.import_module(f"ddep_jax.trainers.{name}")


def _identity_prepare(batch, key):
    return batch, {}, key


def _aux_as_metrics(aux, context):
    del context
    return dict(aux)


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What the loop hands a stage's host-side hooks.

    config, workdir, mesh; writer (`writers.MetricWriter`: scalars to
    metrics.jsonl and TensorBoard); keys ({name: PRNG key} of `Stage.keys`);
    num_steps (the run's length).
    """

    config: ml_collections.ConfigDict
    workdir: str
    mesh: jax.sharding.Mesh
    writer: Any
    keys: Mapping[str, jax.Array]
    num_steps: int


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage (or pretraining objective) as the loop sees it.

    Model and state:
      name: the stage's name (logs, init.json).
      model: the Flax module; `model.init(key, *init_inputs)['params']` are
        the parameters, top-level collections of `models.COLLECTIONS`.
      init_inputs: example inputs for `model.init` (shapes only matter).
      peak_lr: the learning-rate schedule's peak.
      frozen: collections that get no gradient and no update.
      init_collections: collections read from `config.init.checkpoint`
        (`handover.initialise`); the others keep their initialisation.
      init_record: extra entries of WORKDIR/init.json.
      init_sources: more collections from other checkpoints, each
        (checkpoint, its collection, the model's collection)
        (`handover.initialise`'s `sources`).
      keys: names of the PRNG streams split from `config.seed`, in order; the
        first two must be 'init' (parameters) and 'train' (the step's key).

    Data (None / 0 when built with `data=False`, e.g. for benchmarks):
      dataset: host-local train batches (a grain IterDataset of dicts,
        checkpointable).
      num_examples: training examples (epochs -> steps).
      batch_spec: {name: jax.ShapeDtypeStruct} of the global train batch the
        step takes; the loop converts those fields of each host batch.
      example_batch: numpy RandomState -> a random global batch of
        `batch_spec` with valid values (benchmarks, tests).

    Step (traced inside jit):
      prepare: (batch, key) -> (batch, context, key): whole-batch work before
        the micro-batches (noise, label casts, counts); `batch` leaves keep
        the leading batch axis (they are split into micro-batches), `context`
        is shared by all micro-batches, `key` is the loss's key.
      loss_fn: (params, micro_batch, key, context) -> (loss, aux dict), with
        params of all collections (the frozen ones are constants).
      mean_over_micro: True if `loss_fn` returns a micro-batch mean (the loop
        divides loss and aux by the number of micro-batches); False if it
        already returns its share of the batch's loss (a sum divided by a
        whole-batch count, say).
      metrics: (aux summed over micro-batches, context) -> metrics dict.

    Host hooks:
      describe: metrics (host values) -> the stage's part of the log line.
      summary: one line saying what is trained on what (logged at start).
      evaluate: (run: RunContext, params, step, final: bool) -> {split:
        report}, or None; called every `eval_every` steps (final=False, not at
        the last step) and once at the end of a finished run (final=True).
      eval_every: steps between periodic evaluations; 0: none.
      after_step: (run, state, batch of global arrays, step) -> None, or None:
        per-step work such as the denoising image grid.

    Extra train state (besides the parameters and the optimizer's; None /
    None for a stage without):
      extra_state: (params, key) -> {name: array}: state the step carries
        and updates without gradients, such as MoCo's momentum (key) encoder
        and queue of negatives. It is built from the initial parameters,
        after the hand-over (a momentum encoder starts as a copy of the
        handed-over one), lives in the train state under 'extra', is sharded
        by the same rules (a leaf path holding a collection name is sharded
        as that parameter; the others are replicated), checkpointed and
        resumed with the rest.
      update_extra: (extra, params, batch, context) -> (extra, batch,
        context): traced in the step after `prepare` and before the loss,
        with the parameters before this step's update (MoCo: the momentum
        rule, the keys, the enqueue); per-example values it adds to `batch`
        are split into micro-batches with the rest.
    """

    name: str
    model: Any
    init_inputs: tuple
    loss_fn: Callable
    peak_lr: float
    batch_spec: Mapping[str, jax.ShapeDtypeStruct]
    example_batch: Callable[[np.random.RandomState], dict]
    describe: Callable[[dict], str]
    prepare: Callable = _identity_prepare
    mean_over_micro: bool = True
    metrics: Callable = _aux_as_metrics
    frozen: tuple[str, ...] = ()
    init_collections: tuple[str, ...] = ()
    init_record: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    init_sources: tuple[tuple[str, str, str], ...] = ()
    keys: tuple[str, ...] = ("init", "train")
    dataset: Any = None
    num_examples: int = 0
    summary: str = ""
    evaluate: Callable | None = None
    eval_every: int = 0
    after_step: Callable | None = None
    extra_state: Callable | None = None
    update_extra: Callable | None = None


@dataclasses.dataclass(frozen=True)
class TrainState:
    """The optimizer and the shape-first train state of a stage (`build_state`).

    tx, schedule; abstract ({'step', 'params', 'opt_state'} of
    ShapeDtypeStructs, and 'extra' for a stage with `extra_state`); sharding
    (NamedSharding tree on the mesh); init (jitted key -> state, created
    directly in those shardings); rederive (jitted (state, key) -> the
    state with its 'extra' rebuilt from its parameters, for a hand-over;
    the identity without extra state).
    """

    tx: optax.GradientTransformation
    schedule: optax.Schedule
    abstract: dict
    sharding: dict
    init: Callable[[jax.Array], dict]
    rederive: Callable[[dict, jax.Array], dict]


def build_state(stage: Stage, config, num_steps: int, mesh, key) -> TrainState:
    """The optimizer (`optim.from_config`: Adam(W) + warm-up + cosine, the
    stage's frozen collections set to zero) and the train state's shapes and
    shardings (`sharding.state_shardings` with `config.mesh`'s rules)."""
    params = jax.eval_shape(stage.model.init, key, *stage.init_inputs)["params"]
    tx, schedule = optim.from_config(config.optimizer, params, stage.frozen,
                                     num_steps, stage.peak_lr)

    def init(key):
        params = stage.model.init(key, *stage.init_inputs)["params"]
        state = {"step": jnp.zeros((), jnp.int32), "params": params,
                 "opt_state": tx.init(params)}
        return rederive(state, key)

    def rederive(state, key):
        if stage.extra_state is None:
            return state
        return {**state, "extra": stage.extra_state(
            state["params"], jax.random.fold_in(key, EXTRA_STATE_FOLD))}

    # The shapes without tracing the model a second time (`init` is traced
    # once more when it is jitted): the optimizer's and extra states' from the
    # parameters' shapes.
    abstract = jax.eval_shape(
        lambda p, k: rederive({"step": jnp.zeros((), jnp.int32), "params": p,
                               "opt_state": tx.init(p)}, k), params, key)
    m = config.mesh
    shardings = state_shardings(abstract, mesh, m.param_sharding, m.fsdp_min_size,
                                tuple(m.get("sharding_rules", ())))
    return TrainState(tx, schedule, abstract, shardings,
                      jax.jit(init, out_shardings=shardings),
                      jax.jit(rederive, out_shardings=shardings))


def itstime(step: int, every: int, last_step: int | None = None) -> bool:
    """Whether a periodic job runs after `step` (1-based): every `every`
    steps (0: never), and at `last_step` when given. The one rule of every
    "every N steps" setting (log_every, checkpoint_every, eval.every_steps,
    image_grid_every)."""
    return bool(every) and step % every == 0 or (last_step is not None
                                                 and step == last_step)


EXTRA_STATE_FOLD = 0x657874
"""The extra state's key is the init key folded with this constant (its
draws, a queue's random start, differ from the parameters')."""


def make_train_step(stage: Stage, tx, schedule, grad_accum_steps: int = 1,
                    param_shardings=None):
    """The update of every stage: (state, batch, key) -> (state, metrics).

    `batch` is {name: global array} of `stage.batch_spec`; `key` the run's
    train key (folded with the step, so every step draws fresh noise and
    dropout). The frozen collections are constants of the differentiated
    function: no gradient (and no backward pass) is computed for them, and
    `optax.partition` gives them `set_to_zero` updates. With
    `grad_accum_steps` k > 1 the prepared batch runs as k strided
    micro-batches with one update (`optim.accumulate_gradients`; the running
    gradient sum kept in `param_shardings` where given), each micro-batch's
    loss key folded with its index.

    Returns:
      The step function (to be jitted with the state donated); metrics
      {'loss', the stage's `metrics`, 'learning_rate', 'grad_norm'}, float32
      scalars.
    """
    frozen, k = tuple(stage.frozen), grad_accum_steps

    def step_fn(state, batch, base_key):
        params = state["params"]
        key = jax.random.fold_in(base_key, state["step"])
        batch, context, key = stage.prepare(batch, key)
        extra = state.get("extra")
        if stage.update_extra is not None:
            extra, batch, context = stage.update_extra(extra, params, batch, context)
        trainable = {c: v for c, v in params.items() if c not in frozen}
        fixed = {c: v for c, v in params.items() if c in frozen}

        def micro_loss(p, micro_batch, index):
            rng = key if k == 1 else jax.random.fold_in(key, index)
            loss, aux = stage.loss_fn({**fixed, **p}, micro_batch, rng, context)
            if stage.mean_over_micro:
                return loss / k, jax.tree.map(lambda a: a / k, aux)
            return loss, aux

        shardings = None if param_shardings is None else {
            c: v for c, v in param_shardings.items() if c not in frozen}
        (loss, aux), grads = optim.accumulate_gradients(micro_loss, trainable, batch, k,
                                                        shardings)
        # Frozen leaves get zero "gradients" that set_to_zero ignores.
        grads = {**grads, **jax.tree.map(jnp.zeros_like, fixed)}
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {"step": state["step"] + 1,
                     "params": optax.apply_updates(params, updates),
                     "opt_state": opt_state}
        if extra is not None:
            new_state["extra"] = extra
        metrics = {"loss": loss, **stage.metrics(aux, context),
                   "learning_rate": schedule(state["step"]),
                   "grad_norm": optax.tree.norm(grads)}
        return new_state, metrics

    return step_fn


def jit_train_step(stage: Stage, state: TrainState, config, mesh):
    """`make_train_step` jitted with the state's shardings, the batch split
    over 'data', the state donated and the compiler options of the model's
    convolution setting (`fast_conv.compiler_options(config.model.conv)`)."""
    batch_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    step = make_train_step(stage, state.tx, state.schedule, config.grad_accum_steps,
                           state.sharding["params"])
    return jax.jit(step, in_shardings=(state.sharding, batch_sharding, replicated),
                   out_shardings=(state.sharding, replicated), donate_argnums=(0,),
                   compiler_options=fast_conv.compiler_options(config.model.conv))


def global_batch_spec(stage: Stage, mesh) -> dict:
    """`stage.batch_spec` with the batch sharding over 'data' attached."""
    sharding = NamedSharding(mesh, P("data"))
    return {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding)
            for k, s in stage.batch_spec.items()}


# ----------------------------------------------------------------------------
# Resuming: which config changes a run survives.
# ----------------------------------------------------------------------------
RESUME_SAFE_KEYS = (
    "log_every", "checkpoint_every", "keep_checkpoints", "image_grid_every",
    "image_grid_size", "eval.", "profile.", "mesh.", "init.", "data.num_threads",
    "data.prefetch", "data.cache", "data.cache_max_mib", "data.data_dir",
    "optimizer.learning_rate", "optimizer.warmup_steps", "optimizer.grad_clip_norm",
    "optimizer.weight_decay", "grad_accum_steps")
"""Config keys (or prefixes, ending in '.') a resumed run may change: how
often it logs, checkpoints, evaluates and draws; the device layout; where the
data lives and how many threads read it; `init.*` (read only by a new run);
and the optimizer settings a diverged run is resumed with (learning rate,
warm-up, clipping, weight decay; the optimizer state that still fits is
kept). `grad_accum_steps` keeps the batch but changes the float summation
order, so the continuation is no longer bit-identical. Every other key
(model, batch size, seed, data, schedule length, objective) defines the run:
a change is refused."""


def resume_changes(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(changes that break the run, changes it survives) between the config
    a workdir was run with (its config.json) and the new one, as
    'key: old -> new' lines (see `RESUME_SAFE_KEYS`; keys present on one side
    only, i.e. settings added or removed by a newer version, are survivable)."""
    a, b = flatten_dict(old), flatten_dict(json.loads(json.dumps(new)))
    breaking, safe = [], []
    for key in sorted(a.keys() | b.keys()):
        if a.get(key, "<absent>") == b.get(key, "<absent>"):
            continue
        line = f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}"
        # A key the workdir's config.json lacks is a setting added since that
        # run was written (its default keeps the old behaviour); one the new
        # config lacks is no longer read.
        ok = key not in a or key not in b or any(
            key == k or (k.endswith(".") and key.startswith(k))
            for k in RESUME_SAFE_KEYS)
        (safe if ok else breaking).append(line)
    return breaking, safe


def check_resume(config, workdir: str) -> None:
    """Compares `config` with the workdir's config.json when the workdir holds
    checkpoints: logs the changes a resume survives, refuses the others.

    Raises:
      ValueError: naming every key whose change would mix two runs, with both
        values, and what to do.
    """
    if not checkpointing.checkpoint_steps(workdir):
        return
    old = writers.read_json(os.path.join(workdir, "config.json"))
    if old is None:
        return
    breaking, safe = resume_changes(old, config.to_dict())
    if breaking:
        raise ValueError(
            f"{workdir} holds checkpoints of a run with another config; resuming "
            "would mix two runs. Changed (config.json -> now):\n  "
            + "\n  ".join(breaking) + "\nUse the old values to resume, or a new "
            "--workdir for the new run. (Keys a resume may change: "
            f"{', '.join(RESUME_SAFE_KEYS)}.)")
    if safe:
        logging.warning("Resuming %s with changed settings: %s.", workdir,
                        "; ".join(safe))


# ----------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------
DONE_FILE = "done.json"
"""WORKDIR/done.json: written when a run has finished its last step and its
final evaluation; a rerun of a finished run reads it and does nothing."""


def run(config: ml_collections.ConfigDict, workdir: str, *,
        stop_after_step: int | None = None) -> dict:
    """Runs (or resumes) the stage `config.stage` in `workdir`.

    `stop_after_step` ends this call early (with a checkpoint) as a killed or
    preempted run would; calling again on the same workdir continues exactly.
    A SIGTERM or a first Ctrl-C (SIGINT), at any time from the start of the
    call to its end, does the same at the step it arrives in (`Preemption`);
    a second Ctrl-C aborts. A rerun of a finished run says so and returns
    (no compile); one killed during its final evaluation redoes it.

    Writes: config.json (once the run is accepted), init.json (where the
    initial weights came from), metrics.jsonl, tensorboard/,
    compile_report.json, checkpoints/<step>/ (params, optimizer state, step,
    data-iterator state), loss_history.json, done.json, run.lock (while it
    runs), and what the stage's hooks write (eval/*.json, images/*.png).

    Returns:
      {'step': last step run, 'loss': last logged loss, 'history': [(step,
      loss)] of this call, 'state': the final train state (sharded arrays),
      'eval': {split: report} of the final evaluation (empty if none ran),
      'preempted': True if a signal stopped the run after saving the
      checkpoint of 'step', 'already_finished': True if the workdir held a
      finished run}.

    Raises:
      ValueError: invalid config (before compiling), naming the key; a
        resume whose config changes the run (naming the keys); a hand-over or
        resumed checkpoint that does not match the model (every mismatch);
        a bad record (naming it).
      FileNotFoundError: dataset not prepared (names the preparation command),
        or no checkpoint at `config.init.checkpoint`.
      FloatingPointError: non-finite loss or parameters, naming the step and
        the last checked checkpoint; the checkpoints that hold the parameters
        which produced it are moved to WORKDIR/poisoned_checkpoints.
      RuntimeError: another run holds the workdir (its host and pid).
    """
    with Preemption() as preemption:
        module = trainer(config.get("stage", "ddep"))
        num_devices = jax.device_count() if config.mesh.data == -1 else config.mesh.data
        module.validate(config, num_devices, jax.process_count())
        workdir = writers.absolute(workdir)
        created = not epath.Path(workdir).exists()
        writers.makedirs(workdir)
        lock = writers.WorkdirLock(workdir).acquire()
        try:
            return _run(module, config, workdir, make_mesh(num_devices), preemption,
                        stop_after_step)
        except BaseException:
            if created:  # a run refused before it wrote anything leaves nothing
                left = {p.name for p in epath.Path(workdir).iterdir()}
                if left <= {"run.lock"}:
                    lock.release()
                    epath.Path(workdir).rmtree()
            raise
        finally:
            lock.release()


def _run(module, config, workdir: str, mesh, preemption: "Preemption",
         stop_after_step: int | None) -> dict:
    check_resume(config, workdir)
    stage = module.stage(config, mesh, workdir)
    num_steps = total_steps(config, stage.num_examples)
    keys = dict(zip(stage.keys, jax.random.split(jax.random.key(config.seed),
                                                 len(stage.keys))))
    ts = build_state(stage, config, num_steps, mesh, keys["init"])
    data_iter = iter(stage.dataset)

    manager, state, _, _ = checkpointing.resume(
        workdir, config.keep_checkpoints, ts.abstract, ts.sharding, data_iter)
    preemption.manager = manager
    if state is None:
        state = handover.initialise(
            ts.init(keys["init"]), ts.tx, ts.sharding, config.init.checkpoint,
            stage.init_collections, workdir, step=config.init.step,
            record={"stage": stage.name, **stage.init_record},
            pos_grid=handover.token_grid(config.model),
            num_groups=config.model.encoder.num_groups, sources=stage.init_sources)
        if stage.extra_state is not None and (config.init.checkpoint
                                              or stage.init_sources):
            state = ts.rederive(state, keys["init"])  # from the handed-over params
    if jax.process_index() == 0:  # the run is accepted: its config is recorded
        write_config(config, workdir)
    start = int(jax.device_get(state["step"]))
    writer = writers.MetricWriter(workdir, resume_step=start,
                                  wandb=writers.wandb_options(config),
                                  config=config.to_dict())
    ctx = RunContext(config, workdir, mesh, writer, keys, num_steps)
    done_path = os.path.join(workdir, DONE_FILE)
    result = {"step": start, "loss": float("nan"), "history": [], "state": state,
              "eval": {}, "preempted": False, "already_finished": False}

    def finish(step: int):
        """Final evaluation and done.json, once the last step is saved."""
        manager.wait_until_finished()
        manager.close()
        if stage.evaluate is not None:
            logging.info("Final evaluation at step %d.", step)
            result["eval"] = stage.evaluate(ctx, state["params"], step, True)
        if jax.process_index() == 0:
            writers.write_json(done_path, {"step": step, "eval": {
                split: {k: v for k, v in report.items()
                        if isinstance(v, (int, float, str))}
                for split, report in result["eval"].items()}})

    if start >= num_steps:
        done = writers.read_json(done_path)
        if done is not None and done.get("step") == num_steps:
            logging.info("%s already finished at step %d (%s): nothing to do; "
                         "python -m ddep_jax.evaluate re-evaluates a checkpoint.",
                         workdir, num_steps, done_path)
            manager.close()
            writer.close()
            history = writers.read_json(os.path.join(workdir, "loss_history.json"))
            result.update(already_finished=True, eval=done.get("eval", {}),
                          loss=history[-1][1] if history else float("nan"))
            return result
        logging.info("%s finished training at step %d but not its final "
                     "evaluation: evaluating now.", workdir, num_steps)
        with guarded(config, workdir, manager, writer, None, preemption):
            finish(num_steps)
        writer.close()
        return result

    train_key = keys["train"]
    logging.info("Compiling the train step (%d devices, global batch %d)...",
                 mesh.size, config.batch_size)
    train_step = compile_step(jit_train_step(stage, ts, config, mesh),
                              (state, global_batch_spec(stage, mesh), train_key),
                              workdir, config.batch_size, mesh.size)
    if jax.process_index() == 0 and start == 0:
        writer.write_text(0, "config", "<pre>" + config.to_json_best_effort(
            indent=2, sort_keys=True) + "</pre>")
    batch_sharding = NamedSharding(mesh, P("data"))
    last_step = min(num_steps, stop_after_step or num_steps)
    logging.info("%s: steps %d..%d of %d.", stage.summary or stage.name, start + 1,
                 last_step, num_steps)
    log = MetricLog(writer, manager, start, num_steps, stage.describe)
    preempted = preemption.reached(start)  # a signal during start-up
    with guarded(config, workdir, manager, writer, log, preemption) as control:
        for step in range(start + 1, last_step + 1):
            if preempted:
                break
            control.before(step)
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                host = next(data_iter)
                batch = {k: jax.make_array_from_process_local_data(
                    batch_sharding, np.asarray(host[k], s.dtype))
                    for k, s in stage.batch_spec.items()}
                state, metrics = train_step(state, batch, train_key)
            if stage.after_step is not None:
                stage.after_step(ctx, state, batch, step)
            preempted = control.after(step, metrics, last_step, state, data_iter)
            if preempted:
                last_step = step
                break
            if (stage.evaluate is not None and itstime(step, stage.eval_every)
                    and step != num_steps):  # the last step's is the final one
                stage.evaluate(ctx, state["params"], step, False)
                log.restart_clock(step)
        result["state"] = state
        if preempted:
            last_step = int(jax.device_get(state["step"]))
            manager.wait_until_finished()
            manager.close()
        elif last_step == num_steps:
            finish(num_steps)  # a signal now lets the evaluation finish
        else:
            manager.wait_until_finished()
            manager.close()
    writer.close()
    if jax.process_index() == 0:
        path = os.path.join(workdir, "loss_history.json")
        earlier = [tuple(h) for h in writers.read_json(path) or [] if h[0] <= start]
        writers.write_json(path, earlier + log.history)
    if preempted:
        logging.warning("Preempted: checkpoint of step %d saved in %s; run again on "
                        "this workdir to resume.", last_step, workdir)
    result.update(step=last_step, loss=log.last_loss, history=log.history,
                  preempted=preempted)
    return result


def _format_eta(seconds: float) -> str:
    """'2d 03:04:05' or '03:04:05' (no wrap at 24 h)."""
    seconds = int(max(seconds, 0))
    days, rest = divmod(seconds, 86400)
    hms = time.strftime("%H:%M:%S", time.gmtime(rest))
    return f"{days}d {hms}" if days else hms


class MetricLog:
    """Metrics of a training loop between step `start` and `num_steps`.

    Args:
      writer: a `writers.MetricWriter`.
      manager: the run's Orbax CheckpointManager (for the NaN message).
      start: the step the loop resumes after (0 for a new run).
      num_steps: the run's last step (for the ETA).
      describe: metrics dict (host values) -> the stage's part of the log
        line, e.g. 'loss 0.6123 | lr 0.001'.

    Each log writes one progress line (also to log files): step, the stage's
    metrics, steps/s (smoothed: an exponential moving average over logs) and
    the ETA with days; on a terminal a tqdm bar shows every step.
    """

    def __init__(self, writer, manager, start: int, num_steps: int,
                 describe: Callable[[dict], str]):
        self.writer, self.manager, self.num_steps = writer, manager, num_steps
        self.describe = describe
        self.history: list[tuple[int, float]] = []
        self._pending: list[tuple[int, dict]] = []
        self._rate = None
        self._bar = tqdm.tqdm(total=num_steps, initial=start, unit="step",
                              dynamic_ncols=True, smoothing=0.1,
                              disable=not sys.stderr.isatty()
                              or jax.process_index() != 0)
        self.restart_clock(start)

    def add(self, step: int, metrics: dict) -> None:
        """Queues one step's metrics (device arrays; nothing is fetched)."""
        self._pending.append((step, metrics))
        self._bar.update(1)

    def flush(self) -> list[tuple[int, dict]]:
        """Fetches the queued metrics and extends the history.

        Raises:
          FloatingPointError: a non-finite loss at step j, naming it. The
            parameters of step j - 1 produced it, so the checkpoints of steps
            >= j - 1 are moved to WORKDIR/poisoned_checkpoints; the message
            names the newest remaining (checked) checkpoint, or says there is
            none.
        """
        fetched = jax.device_get(self._pending)
        self._pending.clear()
        for step, m in fetched:
            if not np.isfinite(m["loss"]):
                moved = checkpointing.set_aside_from(self.manager, step - 1)
                good = self.manager.latest_step()
                where = (f"The last checked checkpoint is step {good} in "
                         f"{self.manager.directory}: a rerun resumes from it"
                         if good is not None else
                         "No checkpoint was saved before it: a rerun starts "
                         "afresh")
                raise FloatingPointError(
                    f"non-finite loss ({m['loss']}) at step {step}: stopping. "
                    + (f"Checkpoints {moved} hold the parameters that produced it "
                       "and were set aside. " if moved else "") + where
                    + "; lower optimizer.learning_rate or set "
                    "optimizer.grad_clip_norm (a resume may change both).")
        self.history.extend((s, float(m["loss"])) for s, m in fetched)
        return fetched

    def log(self, step: int) -> dict:
        """Flushes, writes the newest metrics with steps/s, logs a progress
        line, and returns those metrics."""
        fetched = self.flush()
        if not fetched:
            return {}
        s, m = fetched[-1]
        rate = (step - self._s0) / max(time.perf_counter() - self._t0, 1e-9)
        self._rate = rate if self._rate is None else 0.7 * self._rate + 0.3 * rate
        self.writer.write_scalars(s, {**m, "steps_per_sec": rate})
        eta = (self.num_steps - step) / max(self._rate, 1e-9)
        line = (f"step {step}/{self.num_steps} | {self.describe(m)} | "
                f"{self._rate:.2f} steps/s | ETA {_format_eta(eta)}")
        self._bar.clear()  # the log line goes above the bar (terminals only)
        logging.info(line)
        self._bar.refresh()
        self.restart_clock(step)
        return m

    def restart_clock(self, step: int) -> None:
        """Starts timing steps/s afresh (after an evaluation, say)."""
        self._t0, self._s0 = time.perf_counter(), step

    def close(self) -> None:
        self._bar.close()

    @property
    def last_loss(self) -> float:
        return self.history[-1][1] if self.history else float("nan")


def write_config(config, workdir: str) -> None:
    """Writes WORKDIR/config.json; a different earlier one (a resumed run with
    other overrides) is kept as config.<n>.json rather than overwritten."""
    path = epath.Path(workdir) / "config.json"
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    if path.exists():
        if path.read_text() == text:
            return
        n = 1
        while (epath.Path(workdir) / f"config.{n}.json").exists():
            n += 1
        path.rename(epath.Path(workdir) / f"config.{n}.json")
    writers.write_bytes(str(path), text.encode())


def total_steps(config, num_examples: int) -> int:
    if config.total_steps > 0:
        return int(config.total_steps)
    return int(math.ceil(config.num_epochs * num_examples / config.batch_size))


PREEMPTED_EXIT_CODE = 75
"""Exit status of `python -m ddep_jax.main` after a preemption checkpoint
(EX_TEMPFAIL): run it again on the same workdir to resume."""


class Preemption:
    """Notices that the platform (or the user) wants the machine back.

    A context manager held for the whole of `run`. On one host, handlers for
    SIGTERM (Cloud TPU, GCE spot VMs, SLURM and Kubernetes send it before
    they stop a job) and SIGINT (Ctrl-C) set a flag; a second SIGINT aborts the
    process at once. On several hosts JAX's preemption sync manager
    (started by `jax.distributed.initialize`) catches SIGTERM and
    `manager.reached_preemption(step)` makes every host agree on the same
    step, so that all of them save it (Orbax's preemption checkpointing).
    The loop asks `reached(step)` before the first step and after every
    step; on True it saves that step's checkpoint and stops with
    `PREEMPTED_EXIT_CODE`. A signal during the final evaluation lets it
    finish (a run killed before it ends redoes it when rerun).
    """

    _UNSET = object()

    def __init__(self, manager=None):
        self.manager = manager
        self.signalled = False
        self._previous = {}

    def __enter__(self) -> "Preemption":
        main_thread = threading.current_thread() is threading.main_thread()
        if jax.process_count() == 1 and main_thread:
            for sig in (signal.SIGTERM, signal.SIGINT):
                # None: a handler installed from C; SIG_DFL restores the default.
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _on_signal(self, signum, frame) -> None:
        del frame
        if signum == signal.SIGINT and self.signalled:
            # A second Ctrl-C: abort now, as Ctrl-C does without the handler
            # (an exception raised here could land in a library callback and
            # be swallowed).
            logging.warning("SIGINT again: aborting.")
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
            return
        self.signalled = True
        logging.warning("%s received: saving a checkpoint after this step and "
                        "stopping%s.", signal.Signals(signum).name,
                        " (Ctrl-C again aborts)" if signum == signal.SIGINT else "")

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1 and self.manager is not None:
            return bool(self.manager.reached_preemption(step))
        return self.signalled

    def close(self) -> None:
        """Puts back the handlers that were there before."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous or signal.SIG_DFL)
        self._previous = {}


def compile_step(jitted, args: tuple, workdir: str, batch_size: int,
                 num_devices: int, name: str = "train_step"):
    """Compiles `jitted` for `args` ahead of time (args may be arrays or
    ShapeDtypeStructs with shardings), logs XLA's FLOPs and per-device memory
    (`profiling.compiled_report`) and writes them to
    WORKDIR/compile_report.json (process 0). Returns the compiled step, to be
    called with arrays of exactly those shapes and shardings."""
    t = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    report = profiling.compiled_report(compiled, batch_size, num_devices)
    report["compile_seconds"] = round(time.perf_counter() - t, 2)
    report["device_kind"] = jax.devices()[0].device_kind
    logging.info("Compiled %s in %.1f s on %d x %s: %s", name, report["compile_seconds"],
                 num_devices, report["device_kind"], profiling.describe(report))
    if jax.process_index() == 0:
        writers.write_json(os.path.join(workdir, "compile_report.json"), {name: report})
    return compiled


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


class StepControl:
    """What happens around each step of a training loop (all stages): the
    profiler trace window, queuing the metrics, the preemption check, the
    periodic log line and checkpoint. Made by `guarded`."""

    def __init__(self, config, log: MetricLog, trace, preemption: Preemption):
        self.config, self.log, self.trace, self.preemption = config, log, trace, preemption
        self.manager = preemption.manager
        self._first = True

    def before(self, step: int) -> None:
        self.trace.before(step)

    def after(self, step: int, metrics, last_step: int, state, data_iter) -> bool:
        """Queues `metrics`, logs at the first step, every `log_every` steps
        and at the end, and saves `state` and `data_iter`'s position
        (`checkpointing.save`) every `checkpoint_every` steps, at `last_step`
        and on preemption, after checking the loss of every step so far and
        the parameters to be saved.

        Returns:
          True if the run was preempted: the checkpoint of `step` is saved and
          the loop must stop.

        Raises:
          FloatingPointError: a non-finite loss (see `MetricLog.flush`) or
            non-finite parameters to be saved (nothing is saved).
        """
        self.trace.after(step, metrics)
        self.log.add(step, metrics)
        preempted = self.preemption.reached(step)  # every step, on every host
        if (itstime(step, self.config.log_every, last_step) or preempted
                or self._first):  # the first step shows compile + first step
            self.log.log(step)
            self._first = False
        if itstime(step, self.config.checkpoint_every, last_step) or preempted:
            self.log.flush()  # never save parameters that produced a NaN
            if not bool(_all_finite(state["params"])):
                raise FloatingPointError(
                    f"the parameters after step {step} are not finite although its "
                    "loss was: not saved. Lower optimizer.learning_rate or set "
                    "optimizer.grad_clip_norm and resume from the last checkpoint "
                    f"({self.manager.latest_step()}).")
            checkpointing.save(self.manager, step, state, data_iter)
        return preempted


@contextlib.contextmanager
def guarded(config, workdir: str, manager, writer, log: MetricLog | None,
            preemption: Preemption):
    """The training loop's context: yields a `StepControl` and, however the
    loop ends, stops the profiler trace and the progress bar. When it raises
    (a NaN loss, a bad record, a second Ctrl-C), the checkpoint being written
    is waited for (so that it is complete, not left as a temporary folder)
    and the metric writer closed (buffered metrics on gs:// are kept), and
    the error propagates unchanged."""
    trace = step_trace(config, workdir)
    try:
        yield StepControl(config, log, trace, preemption) if log else None
    except BaseException:
        try:
            manager.wait_until_finished()
            manager.close()
        except Exception as e:  # the original error matters more
            logging.error("While stopping: could not finish the checkpoint being "
                          "written: %s", e)
        writer.close()
        raise
    finally:
        trace.close()
        if log is not None:
            log.close()


def step_trace(config, workdir: str):
    """The `profiling.StepTrace` that `config.profile` asks for."""
    return profiling.StepTrace(profiling.trace_dir(workdir), config.profile.start_step,
                               config.profile.num_steps)
