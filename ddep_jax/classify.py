"""Stage 1: supervised encoder pretraining as an image classifier.

The paper's encoder is an ImageNet-21k-pretrained Hybrid-ViT (DDeP Sec. 2,
5.1). `classify_and_evaluate(config, workdir)` trains `HybridViTClassifier`
(the TransUNet encoder + a pooled linear head) with softmax or sigmoid
cross-entropy and label smoothing, Adam(W) + warm-up + cosine decay,
inception crop + flip, and reports top-1 / top-5 accuracy. Its checkpoint's
`encoder` collection is what stage 2 (`config.init.checkpoint` of a DDeP
config) and stage 3 (`init.mode='encoder'`) read.
"""

from __future__ import annotations

import math
import os
import time

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from ddep_jax import checkpointing, config_lib, handover, loop, optim, writers
from ddep_jax.data import class_datasets, pipeline
from ddep_jax.models.classifier import build_classifier
from ddep_jax.sharding import sharded_train_state
from ddep_jax.train import to_float_images


def classification_loss(logits: jax.Array, labels: jax.Array, loss_type: str,
                        label_smoothing: float = 0.0) -> jax.Array:
    """Mean classification loss over the batch.

    Args:
      logits: float [B, C].
      labels: int [B] in [0, C).
      loss_type: 'softmax' (cross-entropy over classes) or 'sigmoid' (binary
        cross-entropy per class, summed over classes: big_vision's
        ``sigmoid_xent`` for ImageNet-21k).
      label_smoothing: s: targets (1 - s) * one_hot + s / C (Szegedy et al.
        2016, `optax.smooth_labels`).

    Returns:
      float32 scalar.
    """
    logits = logits.astype(jnp.float32)
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    if loss_type == "softmax":
        return jnp.mean(optax.softmax_cross_entropy(logits, targets))
    if loss_type == "sigmoid":
        return jnp.mean(jnp.sum(optax.sigmoid_binary_cross_entropy(logits, targets),
                                axis=-1))
    raise ValueError(f"loss type {loss_type!r}: expected one of "
                     f"{config_lib.CLASSIFY_LOSSES}.")


class CheckLabel:
    """Passes a record through after checking 0 <= label < num_classes.

    Raises:
      ValueError: naming the dataset, split, record file name and value.
    """

    def __init__(self, num_classes: int, where: str):
        self.num_classes, self.where = num_classes, where

    def __call__(self, example: dict) -> dict:
        label = int(example["label"])
        if not 0 <= label < self.num_classes:
            name = example.get("file_name", b"?")
            name = name.decode() if isinstance(name, bytes) else name
            raise ValueError(f"{self.where} record {name!r} has label {label}, "
                             f"outside [0, {self.num_classes}).")
        return example


class EvalPreprocess:
    """Record -> {'image': uint8 [h, w, 3] (resize + centre crop), 'label'}."""

    def __init__(self, size, crop_fraction: float, check: CheckLabel):
        self.size, self.crop_fraction, self.check = tuple(size), crop_fraction, check

    def __call__(self, example: dict) -> dict:
        example = self.check(example)
        return {"image": pipeline.resize_centre_crop(example["image"], self.size,
                                                     self.crop_fraction),
                "label": np.int32(example["label"])}


def open_split(config, spec, split: str):
    from ddep_jax.data.tfds_sources import load_data_source

    return load_data_source(spec.tfds_name, split, config.data.data_dir or None)


def num_classes_of(spec, records) -> int:
    """The prepared dataset's class count (its ClassLabel), else the spec's."""
    info = getattr(records, "dataset_info", None)
    try:
        return int(info.features["label"].num_classes)
    except (AttributeError, KeyError, TypeError):
        return spec.num_classes


def make_train_step(model, tx, schedule, loss_type: str, label_smoothing: float,
                    grad_accum_steps: int = 1, param_shardings=None):
    """state, uint8 images [B, H, W, 3], int labels [B], key -> state, metrics
    {'loss', 'accuracy' (top-1 on the augmented batch), 'learning_rate',
    'grad_norm'}. `grad_accum_steps` > 1 runs the batch as that many
    micro-batches with one update (`optim.accumulate_gradients`; the running
    gradient sum kept in `param_shardings` where given)."""
    k = grad_accum_steps

    def step_fn(state, images, labels, base_key):
        params = state["params"]
        k_dropout = jax.random.fold_in(base_key, state["step"])

        def loss_fn(p, batch, index):
            key = k_dropout if k == 1 else jax.random.fold_in(k_dropout, index)
            logits = model.apply({"params": p}, to_float_images(batch["images"]),
                                 train=True, rngs={"dropout": key})
            loss = classification_loss(logits, batch["labels"], loss_type,
                                       label_smoothing)
            hits = jnp.mean(jnp.argmax(logits, -1) == batch["labels"])
            return loss / k, hits / k

        (loss, accuracy), grads = optim.accumulate_gradients(
            loss_fn, params, {"images": images, "labels": labels}, k, param_shardings)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {"step": state["step"] + 1,
                     "params": optax.apply_updates(params, updates),
                     "opt_state": opt_state}
        metrics = {"loss": loss, "accuracy": accuracy,
                   "learning_rate": schedule(state["step"]),
                   "grad_norm": optax.tree.norm(grads)}
        return new_state, metrics

    return step_fn


def make_eval_step(model):
    """(params, uint8 images [B, H, W, 3], labels [B], valid [B]) -> counts
    {'top1', 'top5', 'count'} summed over the (global) batch."""

    def eval_fn(params, images, labels, valid):
        logits = model.apply({"params": params}, to_float_images(images))
        k = min(5, logits.shape[-1])
        top = jax.lax.top_k(logits, k)[1]
        hit = top == labels[:, None]
        return {"top1": jnp.sum(hit[:, 0] & valid),
                "top5": jnp.sum(jnp.any(hit, axis=-1) & valid),
                "count": jnp.sum(valid)}

    return eval_fn


def evaluate(config, spec, num_classes: int, eval_step, params, split: str, mesh,
             *, max_examples: int = 0) -> dict:
    """Top-1 / top-5 accuracy of `params` on `split` (every host reads its own
    shard; the counts are summed over the global batch, so all hosts agree).

    Returns:
      {'split', 'top1', 'top5', 'num_examples', 'seconds'}.
    """
    t0 = time.perf_counter()
    records = open_split(config, spec, split)
    n = min(len(records), max_examples) if max_examples else len(records)
    pi, pc = jax.process_index(), jax.process_count()
    local_batch = config.eval.batch_size // pc
    num_batches = math.ceil(math.ceil(n / pc) / local_batch)
    check = CheckLabel(num_classes, f"{spec.tfds_name} {split}")
    ds = (grain.MapDataset.source(records)[:n][pi::pc]
          .map(EvalPreprocess(config.data.image_size, config.data.eval_crop_fraction,
                              check))
          .batch(local_batch, drop_remainder=False)
          .to_iter_dataset(grain.ReadOptions(num_threads=config.data.num_threads,
                                             prefetch_buffer_size=config.data.prefetch)))
    sharding = NamedSharding(mesh, P("data"))
    h, w = config.data.image_size
    it = iter(ds)
    totals = {"top1": 0, "top5": 0, "count": 0}
    pending = []
    for _ in range(num_batches):
        batch = next(it, None)
        m = 0 if batch is None else len(batch["label"])
        images = np.zeros((local_batch, h, w, 3), np.uint8)
        labels = np.zeros((local_batch,), np.int32)
        if m:
            images[:m], labels[:m] = batch["image"], batch["label"]
        valid = np.arange(local_batch) < m
        args = [jax.make_array_from_process_local_data(sharding, a)
                for a in (images, labels, valid)]
        pending.append(eval_step(params, *args))
    for counts in jax.device_get(pending):
        for k in totals:
            totals[k] += int(counts[k])
    count = max(totals["count"], 1)
    return {"split": split, "top1": totals["top1"] / count,
            "top5": totals["top5"] / count, "num_examples": totals["count"],
            "seconds": round(time.perf_counter() - t0, 1)}


def build_classification(config, num_classes: int, num_steps: int, mesh, key):
    """Model, optimizer (everything trained) and the sharded train state.
    Returns (model, tx, schedule, abstract_state, state_sharding, jitted init)."""
    model = build_classifier(config.model, num_classes, config.model.head_bias_init)
    h, w = config.model.encoder.image_size
    tx, schedule, abstract, shardings, init = sharded_train_state(
        model, (jnp.zeros((1, h, w, 3), jnp.float32),), config, num_steps, mesh, key)
    return model, tx, schedule, abstract, shardings, init


def classify_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                          stop_after_step: int | None = None) -> dict:
    """Runs (or resumes) stage-1 classifier training in `workdir`, then
    evaluates top-1 accuracy on `config.eval.splits`.

    Writes: config.json, init.json, metrics.jsonl, tensorboard/,
    checkpoints/<step>/ (state + data-iterator state), eval/<split>_<step>.json.

    Returns:
      {'step', 'loss', 'history', 'state', 'eval': {split: report},
      'preempted' (a SIGTERM stopped it after saving 'step'; no evaluation)}.

    Raises:
      ValueError: invalid config (naming the key), a label outside the class
        range (naming the record), an initial checkpoint that does not match.
      FileNotFoundError: dataset not prepared (with the command) or a missing
        initial checkpoint.
      FloatingPointError: non-finite loss (naming the step).
    """
    mesh = loop.start_run(config, workdir, config_lib.validate_classify)

    spec = class_datasets.get_spec(config.data.name)
    records = open_split(config, spec, config.data.train_split)
    num_classes = config.model.num_outputs or num_classes_of(spec, records)
    num_steps = loop.total_steps(config, len(records))
    init_key, train_key = jax.random.split(jax.random.key(config.seed))
    model, tx, schedule, abstract, state_sharding, init_fn = build_classification(
        config, num_classes, num_steps, mesh, init_key)

    batch_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    checked = grain.MapDataset.source(records).map(
        CheckLabel(num_classes, f"{spec.tfds_name} {config.data.train_split}"))
    dataset = pipeline.make_train_dataset(
        checked, image_size=tuple(config.data.image_size),
        batch_size=config.batch_size // jax.process_count(), seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        area_range=config.data.crop_area_range,
        aspect_range=config.data.crop_aspect_range, flip=config.data.flip,
        keep=("label",), num_threads=config.data.num_threads,
        prefetch=config.data.prefetch)
    data_iter = iter(dataset)

    manager = checkpointing.make_manager(workdir, config.keep_checkpoints)
    state, _ = checkpointing.restore_latest(manager, abstract, state_sharding,
                                            data_iter)
    if state is None:
        state = handover.initialise(
            init_fn(init_key), tx, state_sharding, config.init.checkpoint,
            ("encoder",), workdir, step=config.init.step,
            record={"stage": "classify", "dataset": spec.name,
                    "num_classes": num_classes},
            pos_grid=handover.token_grid(config.model))

    h, w = config.data.image_size
    train_step = loop.compile_step(
        jax.jit(make_train_step(model, tx, schedule, config.loss.type,
                                config.loss.label_smoothing, config.grad_accum_steps,
                                state_sharding["params"]),
                in_shardings=(state_sharding, batch_sharding, batch_sharding,
                              replicated),
                out_shardings=(state_sharding, replicated), donate_argnums=(0,)),
        (state, jax.ShapeDtypeStruct((config.batch_size, h, w, 3), jnp.uint8,
                                     sharding=batch_sharding),
         jax.ShapeDtypeStruct((config.batch_size,), jnp.int32, sharding=batch_sharding),
         train_key), workdir, config.batch_size, mesh.size)
    eval_step = jax.jit(make_eval_step(model),
                        in_shardings=(state_sharding["params"], batch_sharding,
                                      batch_sharding, batch_sharding),
                        out_shardings=replicated)
    writer = writers.MetricWriter(workdir)
    eval_dir = os.path.join(workdir, "eval")
    start = int(jax.device_get(state["step"]))
    last_step = min(num_steps, stop_after_step or num_steps)
    logging.info("Classifier pretraining on %s (%d %s images, %d classes), steps "
                 "%d..%d of %d.", spec.name, len(records), config.data.train_split,
                 num_classes, start + 1, last_step, num_steps)
    log = loop.MetricLog(writer, manager, start, num_steps, lambda m: (
        f"loss {m['loss']:.4f} | train acc {m['accuracy']:.3f} | "
        f"lr {m['learning_rate']:.3g}"))

    def run_eval(split, step, max_examples=0):
        report = evaluate(config, spec, num_classes, eval_step, state["params"],
                          split, mesh, max_examples=max_examples)
        report["step"] = step
        if jax.process_index() == 0:
            writers.write_json(os.path.join(eval_dir, f"{split}_{step:08d}.json"),
                               report)
        writer.write_scalars(step, {f"{split}/top1": report["top1"],
                                    f"{split}/top5": report["top5"]})
        logging.info("eval %s step %d: top-1 %.4f, top-5 %.4f (%d images, %.0fs)",
                     split, step, report["top1"], report["top5"],
                     report["num_examples"], report["seconds"])
        return report

    preempted = False
    with loop.guarded(config, workdir, manager, writer, log) as control:
        for step in range(start + 1, last_step + 1):
            control.before(step)
            batch = next(data_iter)
            images = jax.make_array_from_process_local_data(batch_sharding, batch["image"])
            labels = jax.make_array_from_process_local_data(
                batch_sharding, np.asarray(batch["label"], np.int32))
            state, metrics = train_step(state, images, labels, train_key)
            preempted = control.after(step, metrics, last_step, state, data_iter)
            if preempted:
                last_step = step
                break
            if (config.eval.every_steps and step % config.eval.every_steps == 0
                    and step != num_steps):
                run_eval(config.eval.splits[0], step, config.eval.max_examples)
                log.restart_clock(step)

    manager.wait_until_finished()
    manager.close()
    reports = {}
    if last_step == num_steps and not preempted:  # else: after the resume
        for split in config.eval.splits:
            reports[split] = run_eval(split, num_steps)
    writer.close()
    return {"step": last_step, "loss": log.last_loss, "history": log.history,
            "state": state, "eval": reports, "preempted": preempted}
