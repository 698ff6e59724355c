"""What the one loop is driven by: `Stage` (a stage or pretraining objective
as data: its model, init inputs, frozen and handed-over collections, data,
and the functions the loop calls), `RunContext` (what host-side hooks get)
and `TrainState` (the optimizer and the shape-first sharded train state)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import ml_collections
import numpy as np
import optax


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
