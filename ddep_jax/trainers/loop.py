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
  state + grain iterator; `store.resume`) or initialise with the
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

import importlib
import os
import pkgutil

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P

from ddep_jax.checkpoints import handover, store
from ddep_jax.common import writers
import ddep_jax.trainers as trainers_package
from ddep_jax.parallel.sharding import make_mesh

from ddep_jax.training.preemption import (  # noqa: F401
    PREEMPTED_EXIT_CODE, GracePeriodOver, Preemption)
from ddep_jax.training.progress import (  # noqa: F401
    MetricLog, StepControl, _format_eta, guarded, itstime, step_trace)
from ddep_jax.training.stage import RunContext, Stage, TrainState  # noqa: F401
from ddep_jax.training.step import (  # noqa: F401
    EXTRA_STATE_FOLD, build_state, compile_step, global_batch_spec, jit_train_step,
    make_train_step)
from ddep_jax.training.workdir import (  # noqa: F401
    DONE_FILE, RESUME_SAFE_KEYS, check_resume, resume_changes, total_steps, write_config)

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
      RuntimeError: another run holds the workdir (its host and pid), or the
        workdir cannot be created or written (a read-only or full disk).
    """
    with Preemption() as preemption:
        module = trainer(config.get("stage", "ddep"))
        num_devices = jax.device_count() if config.mesh.data == -1 else config.mesh.data
        module.validate(config, num_devices, jax.process_count())
        workdir = writers.absolute(workdir)
        created = not epath.Path(workdir).exists()
        writers.make_workdir(workdir)
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

    manager, state, _, _ = store.resume(
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
        """Final evaluation and done.json, once the last step is saved; a
        signal leaves the evaluation `final_eval_grace_seconds`, after which
        the run stops as preempted (a rerun redoes the evaluation)."""
        manager.wait_until_finished()
        manager.close()
        if stage.evaluate is not None:
            logging.info("Final evaluation at step %d.", step)
            grace = config.get("final_eval_grace_seconds", -1)
            try:
                with preemption.grace_period(grace):
                    result["eval"] = stage.evaluate(ctx, state["params"], step, True)
            except GracePeriodOver as e:
                logging.warning("Stopped: %s (final_eval_grace_seconds=%g). The "
                                "checkpoint of step %d is saved in %s; run again on "
                                "this workdir to evaluate it.", e, grace, step, workdir)
                result.update(preempted=True, eval={})
                return
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
            finish(num_steps)  # a signal now: final_eval_grace_seconds
            preempted = result["preempted"]
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
