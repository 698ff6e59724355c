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

  validate, workdir, config.json, mesh (`start_run`) -> stage -> optimizer and
  shape-first sharded train state (`build_state`) -> resume from the workdir
  (Orbax state + grain iterator) or initialise with the hand-over
  (`handover.initialise`) -> compile the step ahead of time with its report
  (`compile_step`) -> the `for step` loop (`guarded`: profiler trace, metric
  queue, NaN stop, preemption, log line, checkpoints; periodic evaluation;
  `after_step` hooks) -> final evaluation -> close.

The train step (`make_train_step`) is shared too:

  key = fold_in(train_key, step)
  batch, context, key = stage.prepare(batch, key)
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
import math
import os
import pkgutil
import signal
import threading
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P

from ddep_jax import checkpointing, handover, optim, profiling, writers
import ddep_jax.trainers as trainers_package
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
    keys: tuple[str, ...] = ("init", "train")
    dataset: Any = None
    num_examples: int = 0
    summary: str = ""
    evaluate: Callable | None = None
    eval_every: int = 0
    after_step: Callable | None = None


@dataclasses.dataclass(frozen=True)
class TrainState:
    """The optimizer and the shape-first train state of a stage (`build_state`).

    tx, schedule; abstract ({'step', 'params', 'opt_state'} of
    ShapeDtypeStructs); sharding (NamedSharding tree on the mesh); init
    (jitted key -> state, created directly in those shardings).
    """

    tx: optax.GradientTransformation
    schedule: optax.Schedule
    abstract: dict
    sharding: dict
    init: Callable[[jax.Array], dict]


def build_state(stage: Stage, config, num_steps: int, mesh, key) -> TrainState:
    """The optimizer (`optim.from_config`: Adam(W) + warm-up + cosine, the
    stage's frozen collections set to zero) and the train state's shapes and
    shardings (`sharding.state_shardings` with `config.mesh`'s rules)."""
    params = jax.eval_shape(stage.model.init, key, *stage.init_inputs)["params"]
    tx, schedule = optim.from_config(config.optimizer, params, stage.frozen,
                                     num_steps, stage.peak_lr)

    def init(key):
        params = stage.model.init(key, *stage.init_inputs)["params"]
        return {"step": jnp.zeros((), jnp.int32), "params": params,
                "opt_state": tx.init(params)}

    abstract = jax.eval_shape(init, key)
    m = config.mesh
    shardings = state_shardings(abstract, mesh, m.param_sharding, m.fsdp_min_size,
                                tuple(m.get("sharding_rules", ())))
    return TrainState(tx, schedule, abstract, shardings,
                      jax.jit(init, out_shardings=shardings))


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
        metrics = {"loss": loss, **stage.metrics(aux, context),
                   "learning_rate": schedule(state["step"]),
                   "grad_norm": optax.tree.norm(grads)}
        return new_state, metrics

    return step_fn


def jit_train_step(stage: Stage, state: TrainState, config, mesh):
    """`make_train_step` jitted with the state's shardings, the batch split
    over 'data' and the state donated."""
    batch_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    step = make_train_step(stage, state.tx, state.schedule, config.grad_accum_steps,
                           state.sharding["params"])
    return jax.jit(step, in_shardings=(state.sharding, batch_sharding, replicated),
                   out_shardings=(state.sharding, replicated), donate_argnums=(0,))


def global_batch_spec(stage: Stage, mesh) -> dict:
    """`stage.batch_spec` with the batch sharding over 'data' attached."""
    sharding = NamedSharding(mesh, P("data"))
    return {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding)
            for k, s in stage.batch_spec.items()}


def run(config: ml_collections.ConfigDict, workdir: str, *,
        stop_after_step: int | None = None) -> dict:
    """Runs (or resumes) the stage `config.stage` in `workdir`.

    `stop_after_step` ends this call early (with a checkpoint) as a killed or
    preempted run would; calling again on the same workdir continues exactly.
    A SIGTERM does the same at the step it arrives in (`Preemption`).

    Writes: config.json, init.json (where the initial weights came from),
    metrics.jsonl, tensorboard/, compile_report.json, checkpoints/<step>/
    (params, optimizer state, step, data-iterator state), loss_history.json,
    and what the stage's hooks write (eval/*.json, images/*.png).

    Returns:
      {'step': last step run, 'loss': last logged loss, 'history': [(step,
      loss)] of this call, 'state': the final train state (sharded arrays),
      'eval': {split: report} of the final evaluation (empty if none ran),
      'preempted': True if a SIGTERM (or the hosts' preemption sync point)
      stopped the run after saving the checkpoint of 'step'}.

    Raises:
      ValueError: invalid config (before compiling), naming the key; a
        hand-over checkpoint that does not match the model (every mismatch);
        a bad record (naming it).
      FileNotFoundError: dataset not prepared (names the preparation command),
        or no checkpoint at `config.init.checkpoint`.
      FloatingPointError: non-finite loss, naming the step; checkpoints written
        before it are kept.
    """
    module = trainer(config.get("stage", "ddep"))
    mesh = start_run(config, workdir, module.validate)
    stage = module.stage(config, mesh, workdir)
    num_steps = total_steps(config, stage.num_examples)
    keys = dict(zip(stage.keys, jax.random.split(jax.random.key(config.seed),
                                                 len(stage.keys))))
    ts = build_state(stage, config, num_steps, mesh, keys["init"])
    data_iter = iter(stage.dataset)

    manager = checkpointing.make_manager(workdir, config.keep_checkpoints)
    state, _ = checkpointing.restore_latest(manager, ts.abstract, ts.sharding,
                                            data_iter)
    if state is None:
        state = handover.initialise(
            ts.init(keys["init"]), ts.tx, ts.sharding, config.init.checkpoint,
            stage.init_collections, workdir, step=config.init.step,
            record={"stage": stage.name, **stage.init_record},
            pos_grid=handover.token_grid(config.model))

    train_key = keys["train"]
    train_step = compile_step(jit_train_step(stage, ts, config, mesh),
                              (state, global_batch_spec(stage, mesh), train_key),
                              workdir, config.batch_size, mesh.size)
    writer = writers.MetricWriter(workdir)
    ctx = RunContext(config, workdir, mesh, writer, keys, num_steps)
    batch_sharding = NamedSharding(mesh, P("data"))
    start = int(jax.device_get(state["step"]))
    last_step = min(num_steps, stop_after_step or num_steps)
    logging.info("%s: steps %d..%d of %d.", stage.summary or stage.name, start + 1,
                 last_step, num_steps)
    log = MetricLog(writer, manager, start, num_steps, stage.describe)
    preempted = False
    with guarded(config, workdir, manager, writer, log) as control:
        for step in range(start + 1, last_step + 1):
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
            if (stage.evaluate is not None and stage.eval_every
                    and step % stage.eval_every == 0 and step != num_steps):
                stage.evaluate(ctx, state["params"], step, False)
                log.restart_clock(step)

    manager.wait_until_finished()
    manager.close()
    reports = {}
    if stage.evaluate is not None and last_step == num_steps and not preempted:
        reports = stage.evaluate(ctx, state["params"], num_steps, True)
    writer.close()
    if jax.process_index() == 0:
        writers.write_json(os.path.join(workdir, "loss_history.json"), log.history)
    if preempted:
        logging.warning("Preempted: checkpoint of step %d saved in %s; run again on "
                        "this workdir to resume.", last_step, workdir)
    return {"step": last_step, "loss": log.last_loss, "history": log.history,
            "state": state, "eval": reports, "preempted": preempted}


class MetricLog:
    """Metrics of a training loop between step `start` and `num_steps`.

    Args:
      writer: a `writers.MetricWriter`.
      manager: the run's Orbax CheckpointManager (for the NaN message).
      start: the step the loop resumes after (0 for a new run).
      num_steps: the run's last step (for the ETA).
      describe: metrics dict (host values) -> the stage's part of the log
        line, e.g. 'loss 0.6123 | lr 0.001'.
    """

    def __init__(self, writer, manager, start: int, num_steps: int,
                 describe: Callable[[dict], str]):
        self.writer, self.manager, self.num_steps = writer, manager, num_steps
        self.describe = describe
        self.history: list[tuple[int, float]] = []
        self._pending: list[tuple[int, dict]] = []
        self.restart_clock(start)

    def add(self, step: int, metrics: dict) -> None:
        """Queues one step's metrics (device arrays; nothing is fetched)."""
        self._pending.append((step, metrics))

    def flush(self) -> list[tuple[int, dict]]:
        """Fetches the queued metrics and extends the history.

        Raises:
          FloatingPointError: a non-finite loss, naming its step and the last
            checkpoint (saved before it, since `flush` runs before each save).
        """
        fetched = jax.device_get(self._pending)
        self._pending.clear()
        for step, m in fetched:
            if not np.isfinite(m["loss"]):
                self.manager.wait_until_finished()
                raise FloatingPointError(
                    f"non-finite loss ({m['loss']}) at step {step}: stopping. The "
                    f"last good checkpoint is step {self.manager.latest_step()} in "
                    f"{self.manager.directory} (resume from it, e.g. with a lower "
                    "optimizer.learning_rate or optimizer.grad_clip_norm).")
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
        self.writer.write_scalars(s, {**m, "steps_per_sec": rate})
        eta = (self.num_steps - step) / max(rate, 1e-9)
        logging.info("step %d/%d | %s | %.2f steps/s | ETA %s", step, self.num_steps,
                     self.describe(m), rate, time.strftime("%H:%M:%S", time.gmtime(eta)))
        self.restart_clock(step)
        return m

    def restart_clock(self, step: int) -> None:
        """Starts timing steps/s afresh (after an evaluation, say)."""
        self._t0, self._s0 = time.perf_counter(), step

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


def start_run(config, workdir: str, validate) -> jax.sharding.Mesh:
    """The start of every stage's job: `validate(config, num_devices,
    num_processes)` (raises ValueError naming the key, before anything is
    compiled), WORKDIR created, config.json written by process 0 (see
    `write_config`), and the 'data' mesh over `config.mesh.data` devices."""
    num_devices = jax.device_count() if config.mesh.data == -1 else config.mesh.data
    validate(config, num_devices, jax.process_count())
    writers.makedirs(workdir)
    if jax.process_index() == 0:
        write_config(config, workdir)
    return make_mesh(num_devices)


PREEMPTED_EXIT_CODE = 75
"""Exit status of `python -m ddep_jax.main` after a preemption checkpoint
(EX_TEMPFAIL): run it again on the same workdir to resume."""


class Preemption:
    """Notices that the platform wants the machine back.

    On one host a SIGTERM handler sets a flag (Cloud TPU, GCE spot VMs, SLURM
    and Kubernetes send SIGTERM before they stop a job); on several hosts
    JAX's preemption sync manager (started by `jax.distributed.initialize`)
    catches the signal and `manager.reached_preemption(step)` makes every
    host agree on the same step, so that all of them save it (Orbax's
    preemption checkpointing). The trainers ask `reached(step)` after every
    step; on True they save that step's checkpoint and stop with
    `PREEMPTED_EXIT_CODE`.
    """

    _UNSET = object()

    def __init__(self, manager):
        self.manager = manager
        self.signalled = False
        self._previous = self._UNSET
        main_thread = threading.current_thread() is threading.main_thread()
        if jax.process_count() == 1 and main_thread:
            # None: the previous handler was installed from C; SIG_DFL restores
            # the default (terminate) then.
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        del signum, frame
        self.signalled = True
        logging.warning("SIGTERM received: saving a checkpoint after this step "
                        "and stopping.")

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            return bool(self.manager.reached_preemption(step))
        return self.signalled

    def close(self) -> None:
        """Puts back the SIGTERM handler that was there before."""
        if self._previous is not self._UNSET:
            signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)
            self._previous = self._UNSET


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


class StepControl:
    """What happens around each step of a training loop (all three stages):
    the profiler trace window, queuing the metrics, the preemption check,
    the periodic log line and checkpoint. Made by `guarded`."""

    def __init__(self, config, log: MetricLog, trace, preemption: Preemption):
        self.config, self.log, self.trace, self.preemption = config, log, trace, preemption
        self.manager = preemption.manager

    def before(self, step: int) -> None:
        self.trace.before(step)

    def after(self, step: int, metrics, last_step: int, state, data_iter) -> bool:
        """Queues `metrics`, logs every `log_every` steps, saves `state` and
        `data_iter`'s position (`checkpointing.save`) every `checkpoint_every`
        steps, at `last_step` and on preemption.

        Returns:
          True if the run was preempted: the checkpoint of `step` is saved and
          the loop must stop.
        """
        self.trace.after(step, metrics)
        self.log.add(step, metrics)
        preempted = self.preemption.reached(step)  # every step, on every host
        if step % self.config.log_every == 0 or step == last_step or preempted:
            self.log.log(step)
        if step % self.config.checkpoint_every == 0 or step == last_step or preempted:
            self.log.flush()  # never save parameters that produced a NaN
            checkpointing.save(self.manager, step, state, data_iter)
        return preempted


@contextlib.contextmanager
def guarded(config, workdir: str, manager, writer, log: MetricLog):
    """The training loop's context: yields a `StepControl` and, however the
    loop ends, stops the profiler trace and puts back the SIGTERM handler;
    when it raises (a NaN loss, a bad record), the metric writer is closed
    too, so that buffered metrics (gs://) are not lost."""
    preemption = Preemption(manager)
    trace = step_trace(config, workdir)
    try:
        yield StepControl(config, log, trace, preemption)
    except BaseException:
        writer.close()
        raise
    finally:
        trace.close()
        preemption.close()


def step_trace(config, workdir: str):
    """The `profiling.StepTrace` that `config.profile` asks for."""
    return profiling.StepTrace(profiling.trace_dir(workdir), config.profile.start_step,
                               config.profile.num_steps)
