"""Stage 1: supervised encoder pretraining as an image classifier.

The paper's encoder is an ImageNet-21k-pretrained Hybrid-ViT (DDeP Sec. 2,
5.1). This stage trains `HybridViTClassifier` (the TransUNet encoder + a
pooled linear head) with softmax or sigmoid cross-entropy and label smoothing
(`objectives.classification`), Adam(W) + warm-up + cosine decay, inception
crop + flip, and reports top-1 / top-5 accuracy (`evaluation.classification`)
to WORKDIR/eval/<split>_<step>.json. Its checkpoint's `encoder` collection is
what stage 2 (`config.init.checkpoint`) and stage 3 (`init.mode='encoder'`)
read.

`default_config()`, `validate(config, num_devices, num_processes)` and
`stage(config, mesh, workdir)` (the `loop.Stage` that `loop.run` trains).
"""

from __future__ import annotations

import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ddep_jax import config_lib, defaults
from ddep_jax.common import writers
from ddep_jax.data import class_datasets, pipeline
from ddep_jax.evaluation import classification as evaluation
from ddep_jax.models import to_float_images
from ddep_jax.models.classifier import build_classifier
from ddep_jax.objectives.classification import LOSS_TYPES, classification_loss
from ddep_jax.trainers import loop


default_config = defaults.classify
"""The stage's defaults (`ddep_jax.defaults`: no JAX at import, so configs/
build and check their values without it)."""


def validate(config, num_devices: int, num_processes: int = 1) -> None:
    """Rejects unknown keys and invalid values of a stage-1 config.

    Raises:
      ValueError: 'config.<key>=<value> is invalid: <why>' or 'config.<key> is
        not a known key'.
    """
    require = config_lib.require
    config_lib.check_keys(config, default_config())
    config_lib.validate_model(config.model)
    require(config.data.name in class_datasets.names(), "data.name",
            config.data.name, f"expected one of {class_datasets.names()}")
    config_lib.validate_classes_and_splits(
        config, class_datasets.get_spec(config.data.name),
        [("data.train_split", config.data.train_split),
         *[("eval.splits", s) for s in config.eval.splits]])
    config_lib.validate_size("data.image_size", config.data.image_size)
    config_lib.validate_crop_area("data.crop_area_range", config.data.crop_area_range)
    require(0 < config.data.eval_crop_fraction <= 1, "data.eval_crop_fraction",
            config.data.eval_crop_fraction, "need 0 < f <= 1")
    require(config.loss.type in LOSS_TYPES, "loss.type", config.loss.type,
            f"expected one of {LOSS_TYPES}")
    require(0 <= config.loss.label_smoothing < 1, "loss.label_smoothing",
            config.loss.label_smoothing, "need 0 <= s < 1")
    require(config.optimizer.learning_rate > 0, "optimizer.learning_rate",
            config.optimizer.learning_rate, "must be > 0")
    require(config.eval.batch_size > 0 and config.eval.batch_size % num_devices == 0,
            "eval.batch_size", config.eval.batch_size,
            f"must be > 0 and divisible by the {num_devices} devices")
    for key in ("every_steps", "max_examples"):
        require(config.eval[key] >= 0, f"eval.{key}", config.eval[key], ">= 0")
    config_lib.validate_run(config, num_devices, num_processes)


def make_loss_fn(config, model):
    """(params, {'image': uint8, 'label': int32}, key, context) -> (mean
    cross-entropy, {'accuracy': top-1 on the augmented batch})."""
    loss_type, smoothing = config.loss.type, config.loss.label_smoothing

    def loss_fn(params, batch, key, context):
        del context
        logits = model.apply({"params": params}, to_float_images(batch["image"]),
                             train=True, rngs={"dropout": key})
        loss = classification_loss(logits, batch["label"], loss_type, smoothing)
        hits = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        return loss, {"accuracy": hits}

    return loss_fn


def make_evaluate(config, spec, model, num_classes: int, mesh):
    """The stage's `evaluate` hook: top-1 / top-5 on `eval.splits[0]` (the
    first `eval.max_examples`) periodically, on every split at the end;
    WORKDIR/eval/<split>_<step>.json and `<split>/top1`, `<split>/top5`
    scalars."""
    eval_step = jax.jit(evaluation.make_eval_step(model), out_shardings=(
        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())))

    def one(run: loop.RunContext, params, split: str, step: int, max_examples=0):
        report = evaluation.evaluate(config, spec, num_classes, eval_step, params,
                                     split, mesh, max_examples=max_examples)
        report["step"] = step
        if jax.process_index() == 0:
            writers.write_json(os.path.join(run.workdir, "eval",
                                            f"{split}_{step:08d}.json"), report)
        run.writer.write_scalars(step, {f"{split}/top1": report["top1"],
                                        f"{split}/top5": report["top5"]})
        logging.info("eval %s step %d: top-1 %.4f, top-5 %.4f (%d images, %.0fs)",
                     split, step, report["top1"], report["top5"],
                     report["num_examples"], report["seconds"])
        return report

    def evaluate(run, params, step: int, final: bool) -> dict:
        if not final:
            split = config.eval.splits[0]
            return {split: one(run, params, split, step, config.eval.max_examples)}
        return {split: one(run, params, split, step) for split in config.eval.splits}

    return evaluate


def stage(config, mesh, workdir: str | None = None, *, data: bool = True) -> loop.Stage:
    """The classifier stage of `config` (`data=False`: no dataset is opened;
    the class count is then `model.num_outputs` or the spec's)."""
    del workdir
    spec = class_datasets.get_spec(config.data.name)
    records = dataset = None
    num_classes = config.model.num_outputs or spec.num_classes
    if data:
        records = class_datasets.open_split(spec, config.data.train_split,
                                            config.data.data_dir)
        num_classes = config.model.num_outputs or class_datasets.num_classes_of(
            spec, records)
        checked = grain.MapDataset.source(records).map(class_datasets.CheckLabel(
            num_classes, f"{spec.tfds_name} {config.data.train_split}"))
        dataset = pipeline.make_train_dataset(
            checked, image_size=tuple(config.data.image_size),
            batch_size=config.batch_size // jax.process_count(), seed=config.seed,
            process_index=jax.process_index(), process_count=jax.process_count(),
            area_range=config.data.crop_area_range,
            aspect_range=config.data.crop_aspect_range, flip=config.data.flip,
            keep=("label",), **config_lib.data_loading(config.data))
    model = build_classifier(config.model, num_classes, config.model.head_bias_init)
    eh, ew = config.model.encoder.image_size
    b, (h, w) = config.batch_size, config.data.image_size
    return loop.Stage(
        name="classify",
        model=model,
        init_inputs=(jnp.zeros((1, eh, ew, 3), jnp.float32),),
        loss_fn=make_loss_fn(config, model),
        peak_lr=config.optimizer.learning_rate,
        init_collections=("encoder",),
        init_record={"dataset": spec.name, "num_classes": num_classes},
        batch_spec={"image": jax.ShapeDtypeStruct((b, h, w, 3), jnp.uint8),
                    "label": jax.ShapeDtypeStruct((b,), jnp.int32)},
        example_batch=lambda rng: {
            "image": rng.randint(0, 256, (b, h, w, 3)).astype(np.uint8),
            "label": rng.randint(0, num_classes, (b,)).astype(np.int32)},
        dataset=dataset,
        num_examples=len(records) if records is not None else 0,
        describe=lambda m: (f"loss {m['loss']:.4f} | train acc {m['accuracy']:.3f} | "
                            f"lr {m['learning_rate']:.3g}"),
        summary=(f"Classifier pretraining on {spec.name} ("
                 f"{len(records) if records is not None else '?'} "
                 f"{config.data.train_split} images, {num_classes} classes)"),
        evaluate=make_evaluate(config, spec, model, num_classes, mesh) if data else None,
        eval_every=config.eval.every_steps,
    )
