"""Stage 3: semantic-segmentation fine-tuning and evaluation (DDeP Sec. 5.1).

`finetune_and_evaluate(config, workdir)` is the whole job: labelled subset ->
model with a `num_classes` head -> initial weights (scratch, an encoder
checkpoint, or a stage-2 encoder + decoder) -> jitted, sharded, donated step
(pixel-wise softmax cross-entropy ignoring void) -> periodic and final
evaluation (global mIoU) -> Orbax checkpoints; a killed run resumes exactly.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from ddep_jax import checkpointing, config_lib, handover, loop, optim, writers
from ddep_jax.data import label_fractions, seg_datasets, seg_pipeline
from ddep_jax.evaluation import evaluator
from ddep_jax.models.transunet import build_model
from ddep_jax.sharding import make_mesh, sharded_train_state, state_shardings

INIT_COLLECTIONS = {"scratch": (), "encoder": ("encoder",),
                    "pretrained": ("encoder", "decoder")}
"""Collections each `init.mode` reads from its checkpoint; the head is new."""


def segmentation_loss(logits: jax.Array, labels: jax.Array,
                      ignore_label: int = seg_datasets.IGNORE_LABEL,
                      normaliser: jax.Array | None = None):
    """Pixel-wise softmax cross-entropy, mean over non-void pixels.

    Args:
      logits: float [B, H, W, C] (any float dtype; the loss is float32).
      labels: int [B, H, W], class ids or `ignore_label`.
      normaliser: divide the summed loss by this instead of these labels'
        own non-void count: a micro-batch passes the full batch's count, so
        the micro-batch losses sum to the full batch's mean.

    Returns:
      (loss scalar float32, number of counted pixels int32).
    """
    valid = labels != ignore_label
    safe = jnp.where(valid, labels, 0).astype(jnp.int32)
    ce = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), safe)
    count = valid.sum()
    denominator = count if normaliser is None else normaliser
    return jnp.sum(ce * valid) / jnp.maximum(denominator, 1), count


def model_config_for(config, num_classes: int) -> ml_collections.ConfigDict:
    """`config.model` with `num_outputs` set to the dataset's classes if 0."""
    m = ml_collections.ConfigDict(config.model.to_dict())
    if not m.num_outputs:
        m.num_outputs = num_classes
    return m


def build_finetuning(config, num_classes: int, num_steps: int, mesh, key):
    """Model, optimizer (everything trained: Adam(W) + warm-up + cosine) and
    the shape-first train state {'step', 'params', 'opt_state'} with its
    shardings. Returns (model, tx, schedule, abstract_state, state_sharding,
    jitted init)."""
    model = build_model(model_config_for(config, num_classes))
    h, w = config.model.encoder.image_size
    tx, schedule, abstract, shardings, init = sharded_train_state(
        model, (jnp.zeros((1, h, w, 3), jnp.float32),), config, num_steps, mesh, key)
    return model, tx, schedule, abstract, shardings, init


def make_finetune_step(model, tx, schedule, grad_accum_steps: int = 1,
                       param_shardings=None):
    """state, uint8 images [B, H, W, 3], uint8 labels [B, H, W], key -> state,
    metrics {'loss', 'pixel_accuracy', 'learning_rate', 'grad_norm'}.

    With `grad_accum_steps` k > 1 the batch runs as k micro-batches whose
    losses are normalised by the whole batch's non-void pixel count, so the
    update equals the one of the whole batch (`optim.accumulate_gradients`;
    with dropout the micro-batches draw their own masks; the running gradient
    sum is kept in `param_shardings` where given).
    """

    def step_fn(state, images, labels, base_key):
        params = state["params"]
        k_dropout = jax.random.fold_in(base_key, state["step"])
        labels = labels.astype(jnp.int32)
        count = jnp.sum(labels != seg_datasets.IGNORE_LABEL)

        def loss_fn(p, batch, index):
            x = batch["images"].astype(jnp.float32) / 127.5 - 1.0
            key = k_dropout if grad_accum_steps == 1 else jax.random.fold_in(
                k_dropout, index)
            logits = model.apply({"params": p}, x, train=True, rngs={"dropout": key})
            loss, _ = segmentation_loss(logits, batch["labels"], normaliser=count)
            correct = jnp.sum((jnp.argmax(logits, -1) == batch["labels"])
                              & (batch["labels"] != seg_datasets.IGNORE_LABEL))
            return loss, correct

        (loss, correct), grads = optim.accumulate_gradients(
            loss_fn, params, {"images": images, "labels": labels}, grad_accum_steps,
            param_shardings)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {"step": state["step"] + 1,
                     "params": optax.apply_updates(params, updates),
                     "opt_state": opt_state}
        metrics = {"loss": loss,
                   "pixel_accuracy": correct / jnp.maximum(count, 1),
                   "learning_rate": schedule(state["step"]),
                   "grad_norm": optax.tree.norm(grads)}
        return new_state, metrics

    return step_fn


def record_names(records, spec, indices) -> list[str] | None:
    """File names of the chosen records (None if the source cannot say)."""
    name_of = getattr(records, "record_name", None)
    if name_of is None or not spec.id_key:
        return None
    return [name_of(int(i), spec.id_key) for i in indices]


def labelled_subset(config, spec, records, workdir: str) -> np.ndarray:
    """Chooses (or, on resume, re-derives and checks) the labelled subset and
    writes WORKDIR/labelled_subset.json.

    Raises:
      ValueError: the workdir already holds a different subset (a resumed run
        whose label fraction or seed changed): use a new workdir.
    """
    seed = config.data.subset_seed if config.data.subset_seed >= 0 else config.seed
    indices = label_fractions.select_subset(len(records), config.data.label_fraction,
                                            seed)
    path = os.path.join(workdir, "labelled_subset.json")
    old = writers.read_json(path)
    if old is not None:
        if (old["indices"] != indices.tolist() or old["num_examples"] != len(records)
                or old["dataset"] != spec.name
                or old["split"] != config.data.train_split):
            raise ValueError(
                f"{path} records a different labelled subset ({old['num_labelled']} "
                f"of {old['num_examples']} {old['dataset']} {old['split']}, fraction {old['label_fraction']!r}, seed "
                f"{old['seed']}) than config.data.label_fraction="
                f"{config.data.label_fraction!r} with seed {seed} gives: fine-tune "
                "into a new workdir.")
        return indices
    if jax.process_index() == 0:
        label_fractions.write_subset(
            path, dataset=spec.name, split=config.data.train_split,
            amount=config.data.label_fraction, seed=seed, num_examples=len(records),
            indices=indices, ids=record_names(records, spec, indices))
    return indices


def open_split(config, spec, split: str):
    """The TFDS records of a split (split names go through `spec.splits`)."""
    from ddep_jax.data.tfds_sources import load_data_source

    return load_data_source(spec.tfds_name, spec.splits.get(split, split),
                            config.data.data_dir or None)


def initial_state(config, workdir, init_fn, key, tx, abstract, state_sharding):
    """A fresh train state with the collections of `config.init` restored, and
    its provenance written to WORKDIR/init.json (`handover.initialise`)."""
    del abstract  # the fresh state's params give the shapes
    return handover.initialise(
        init_fn(key), tx, state_sharding, config.init.checkpoint,
        INIT_COLLECTIONS[config.init.mode], workdir, step=config.init.step,
        record={"mode": config.init.mode}, pos_grid=handover.token_grid(config.model))


def host_local_params(params):
    """Parameters every host can run on its own devices: unchanged on one host;
    on several, gathered (FSDP shards included) and placed on a local device,
    because each host segments different images."""
    if jax.process_count() == 1:
        return params
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(params, tiled=True)
    return jax.device_put(gathered, jax.local_devices()[0])


def run_evaluation(config, spec, model, params, split: str, out_dir: str, step: int,
                   *, name: str | None = None, max_images: int = 0,
                   num_visualize: int = 0, extra: dict | None = None) -> dict:
    """Evaluates `params` on `split` with `config.eval`'s protocol, writes
    OUT_DIR/<name>.json (default name ``<split>_<step>``; `extra` entries are
    added to it) and prediction PNGs in OUT_DIR/<name>/, and returns the
    report."""
    records = open_split(config, spec, split)
    source = seg_pipeline.SegmentationSource(records, spec, split=split)
    mode, kwargs = evaluator.protocol(config.eval, config.data.base_scale)
    name = name or f"{split}_{step:08d}"
    t0 = time.perf_counter()
    result = evaluator.evaluate(
        evaluator.make_logits_fn(model, host_local_params(params)), source, spec,
        mode, kwargs, max_images=max_images,
        visualize_dir=os.path.join(out_dir, name),
        num_visualize=num_visualize, process_index=jax.process_index(),
        process_count=jax.process_count())
    report = {"dataset": spec.name, "split": split, "step": step, "mode": mode,
              "protocol": {k: list(v) if isinstance(v, tuple) else v
                           for k, v in kwargs.items()},
              "seconds": round(time.perf_counter() - t0, 1), **(extra or {}),
              **result}
    if jax.process_index() == 0:
        writers.write_json(os.path.join(out_dir, name + ".json"), report)
    logging.info("eval %s step %d: mIoU %.4f, pixel acc %.4f (%d images, %s, "
                 "%.0fs)", split, step, result["miou"], result["pixel_accuracy"],
                 result["num_images"], mode, report["seconds"])
    return report


def finetune_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                          stop_after_step: int | None = None) -> dict:
    """Runs (or resumes) stage-3 fine-tuning in `workdir`, then evaluates.

    Writes: config.json, labelled_subset.json, init.json (where the initial
    weights came from: checkpoint path and step), metrics.jsonl,
    tensorboard/, checkpoints/<step>/, eval/<split>_<step>.json (+ PNGs).

    Returns:
      {'step', 'loss', 'history', 'state', 'eval': {split: report},
      'preempted' (a SIGTERM stopped it after saving 'step'; no evaluation)}.

    Raises:
      ValueError: invalid config (naming the key), a checkpoint that does not
        match the model (listing every mismatch), an invalid label in the data
        (naming the record and value), or a workdir with another labelled
        subset.
      FileNotFoundError: dataset not prepared or checkpoint not found.
      FloatingPointError: non-finite loss (naming the step).
    """
    mesh = loop.start_run(config, workdir, config_lib.validate_finetune)

    spec = seg_datasets.get_spec(config.data.name)
    records = open_split(config, spec, config.data.train_split)
    indices = labelled_subset(config, spec, records, workdir)
    train_source = seg_pipeline.SegmentationSource(
        records, spec, indices, split=config.data.train_split)
    num_steps = loop.total_steps(config, len(train_source))
    init_key, train_key = jax.random.split(jax.random.key(config.seed))
    model, tx, schedule, abstract, state_sharding, init_fn = build_finetuning(
        config, spec.num_classes, num_steps, mesh, init_key)

    batch_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    dataset = seg_pipeline.make_seg_train_dataset(
        train_source, crop_size=tuple(config.data.crop_size),
        batch_size=config.batch_size // jax.process_count(), seed=config.seed,
        scale_range=tuple(config.data.scale_range),
        base_scale=config.data.base_scale, flip=config.data.flip,
        process_index=jax.process_index(), process_count=jax.process_count(),
        num_threads=config.data.num_threads, prefetch=config.data.prefetch)
    data_iter = iter(dataset)

    manager = checkpointing.make_manager(workdir, config.keep_checkpoints)
    state, _ = checkpointing.restore_latest(manager, abstract, state_sharding,
                                            data_iter)
    if state is None:
        state = initial_state(config, workdir, init_fn, init_key, tx, abstract,
                              state_sharding)

    b, (h, w) = config.batch_size, config.data.crop_size
    train_step = loop.compile_step(
        jax.jit(make_finetune_step(model, tx, schedule, config.grad_accum_steps,
                                   state_sharding["params"]),
                in_shardings=(state_sharding, batch_sharding, batch_sharding,
                              replicated),
                out_shardings=(state_sharding, replicated), donate_argnums=(0,)),
        (state, jax.ShapeDtypeStruct((b, h, w, 3), jnp.uint8, sharding=batch_sharding),
         jax.ShapeDtypeStruct((b, h, w), jnp.uint8, sharding=batch_sharding),
         train_key), workdir, b, mesh.size)
    writer = writers.MetricWriter(workdir)
    eval_dir = os.path.join(workdir, "eval")
    start = int(jax.device_get(state["step"]))
    last_step = min(num_steps, stop_after_step or num_steps)
    logging.info("Fine-tuning %s on %d labelled %s images (%s), steps %d..%d of %d.",
                 spec.name, len(train_source), config.data.train_split,
                 config.data.label_fraction, start + 1, last_step, num_steps)
    log = loop.MetricLog(writer, manager, start, num_steps, lambda m: (
        f"loss {m['loss']:.4f} | pixel acc {m['pixel_accuracy']:.3f} | "
        f"lr {m['learning_rate']:.3g}"))

    preempted = False
    with loop.guarded(config, workdir, manager, writer, log) as control:
        for step in range(start + 1, last_step + 1):
            control.before(step)
            batch = next(data_iter)
            images = jax.make_array_from_process_local_data(batch_sharding, batch["image"])
            labels = jax.make_array_from_process_local_data(batch_sharding, batch["label"])
            state, metrics = train_step(state, images, labels, train_key)
            preempted = control.after(step, metrics, last_step, state, data_iter)
            if preempted:
                last_step = step
                break
            if (config.eval.every_steps and step % config.eval.every_steps == 0
                    and step != num_steps):
                report = run_evaluation(config, spec, model, state["params"],
                                        config.eval.split, eval_dir, step,
                                        max_images=config.eval.max_images)
                writer.write_scalars(step, {f"{config.eval.split}/miou": report["miou"],
                                            f"{config.eval.split}/pixel_accuracy":
                                                report["pixel_accuracy"]})
                log.restart_clock(step)

    manager.wait_until_finished()
    manager.close()
    reports = {}
    if last_step == num_steps and not preempted:  # else: after the resume
        splits = {}  # one evaluation per distinct TFDS split
        for split in [config.eval.split, *config.eval.final_splits]:
            splits.setdefault(spec.splits.get(split, split), split)
        for split in splits.values():
            reports[split] = run_evaluation(
                config, spec, model, state["params"], split, eval_dir, num_steps,
                num_visualize=config.eval.num_visualize)
            writer.write_scalars(num_steps, {f"{split}/miou": reports[split]["miou"]})
    writer.close()
    return {"step": last_step, "loss": log.last_loss, "history": log.history,
            "state": state, "eval": reports, "preempted": preempted}


def load_finetuned(workdir: str, step: int = -1) -> dict[str, Any]:
    """A fine-tuned model and its parameters, from a stage-3 workdir.

    Returns:
      {'config', 'spec', 'model', 'params', 'step', 'checkpoint'}.

    Raises:
      FileNotFoundError: no config.json or no checkpoint in `workdir`.
      ValueError: not a stage-3 workdir, or its checkpoint does not match the
        config's model (every mismatch listed).
    """
    path = os.path.join(workdir, "config.json")
    record = writers.read_json(path)
    if record is None:
        raise FileNotFoundError(f"{path} not found: --workdir must be a fine-tuning "
                                "workdir written by python -m ddep_jax.main.")
    config = ml_collections.ConfigDict(record)
    if config.get("stage") != "finetune":
        raise ValueError(f"{path} is a config.stage={config.get('stage')!r} run; "
                         "evaluate/predict need a fine-tuning ('finetune') workdir.")
    spec = seg_datasets.get_spec(config.data.name)
    model = build_model(model_config_for(config, spec.num_classes))
    h, w = config.model.encoder.image_size
    abstract = jax.eval_shape(model.init, jax.random.key(0),
                              jnp.zeros((1, h, w, 3), jnp.float32))["params"]
    shardings = state_shardings(abstract, make_mesh(1), "replicated", 1)
    params, provenance = checkpointing.restore_collections(
        workdir, ("encoder", "decoder", "head"), abstract, shardings, step)
    return {"config": config, "spec": spec, "model": model, "params": params,
            "step": provenance["step"], "checkpoint": provenance["checkpoint"]}
