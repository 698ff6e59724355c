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
import ml_collections
import numpy as np
from absl import logging

from ddep_jax import config_lib, writers
from ddep_jax.data import class_datasets, pipeline
from ddep_jax.evaluation import classification as evaluation
from ddep_jax.models import to_float_images
from ddep_jax.models.classifier import build_classifier
from ddep_jax.objectives.classification import LOSS_TYPES, classification_loss
from ddep_jax.trainers import loop


def default_config() -> ml_collections.ConfigDict:
    """Stage-1 defaults: supervised Hybrid-ViT classifier pretraining.

    ViT/big_vision recipe (Dosovitskiy et al. 2021, Sec. 4.1 and App. B.1):
    Adam(W), linear warm-up then cosine decay, inception crop + flip, label
    smoothing; `loss.type` 'sigmoid' is the usual choice for ImageNet-21k.
    `model.encoder` is the encoder that stage 2 and 3 take over, so it must
    equal theirs; `data.image_size` is the training resolution (the position
    embedding is learned for `model.encoder.image_size` and resampled to it).
    """
    c = ml_collections.ConfigDict()
    c.stage = "classify"
    c.seed = 0
    c.model = config_lib.model_config()
    c.model.num_outputs = 0  # 0: the dataset's number of classes
    c.model.head_bias_init = 0.0  # big_vision: -10 with sigmoid on ImageNet-21k

    # Optional initial encoder (e.g. converted from a public .npz, to continue
    # on another dataset); '' trains from scratch.
    c.init = ml_collections.ConfigDict()
    c.init.checkpoint = ""
    c.init.step = -1

    c.data = ml_collections.ConfigDict()
    c.data.name = "cifar10"  # a name in ddep_jax.data.class_datasets
    c.data.data_dir = ""  # '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.data.train_split = "train"
    c.data.image_size = (224, 224)  # training and evaluation input (H, W)
    c.data.crop_area_range = (0.08, 1.0)  # inception crop (Szegedy et al. 2015)
    c.data.crop_aspect_range = (3 / 4, 4 / 3)
    c.data.flip = True
    c.data.eval_crop_fraction = 0.875  # eval: resize to size/f, centre crop size
    config_lib.add_data_loading(c.data)

    c.loss = ml_collections.ConfigDict()
    c.loss.type = "softmax"  # LOSS_TYPES
    c.loss.label_smoothing = 0.0

    c.eval = ml_collections.ConfigDict()
    c.eval.splits = ("validation",)  # top-1 accuracy at the end
    c.eval.every_steps = 0  # also every N steps on the first split; 0: end only
    c.eval.batch_size = 256
    c.eval.max_examples = 0  # periodic evaluation on the first N; 0 = all

    c.batch_size = 4096
    c.num_epochs = 90.0
    c.total_steps = 0  # > 0 overrides num_epochs

    c.optimizer = config_lib.optimizer_config(learning_rate=1e-3)
    c.optimizer.warmup_steps = 10000
    c.optimizer.weight_decay = 0.03
    c.optimizer.grad_clip_norm = 1.0
    return config_lib.add_run_options(c)


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
