"""Stage 3: semantic-segmentation fine-tuning and evaluation (DDeP Sec. 5.1).

A labelled subset of the training split (`config.data.label_fraction`,
chosen by `data.subset_seed`, written to WORKDIR/labelled_subset.json) ->
TransUNet with a `num_classes` head -> initial weights (`init.mode`: scratch,
an encoder checkpoint, or a stage-2 encoder + decoder) -> pixel-wise softmax
cross-entropy ignoring void (`objectives.segmentation`; `loss.class_weighting`
'median_frequency' weights it by the labelled subset's class frequencies,
written to WORKDIR/class_weights.json) -> periodic and final
evaluation with the paper's test-time protocols (global mIoU,
`evaluation.segmentation`) written to WORKDIR/eval.

`default_config()`, `validate(config, num_devices, num_processes)` and
`stage(config, mesh, workdir)` (the `loop.Stage` that `loop.run` trains).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from PIL import Image

from ddep_jax import config_lib, defaults
from ddep_jax.common import writers
from ddep_jax.data import label_fractions, seg_datasets, seg_pipeline
from ddep_jax.data.seg_datasets import IGNORE_LABEL
from ddep_jax.evaluation.inference import EVAL_MODES
from ddep_jax.evaluation.segmentation import run_evaluation
from ddep_jax.models import to_float_images
from ddep_jax.models.transunet import build_model
from ddep_jax.objectives.segmentation import (CLASS_WEIGHTINGS, class_frequencies,
                                              correct_pixels, median_frequency_weights,
                                              segmentation_loss)
from ddep_jax.trainers import loop

INIT_COLLECTIONS = {"scratch": (), "encoder": ("encoder",),
                    "pretrained": ("encoder", "decoder")}
"""Stage-3 initialisations (the paper's rows) and the collections each reads
from `init.checkpoint`: no pretraining; the encoder of a checkpoint with a
random decoder ("Supervised"); encoder and decoder of a stage-2 DDeP/DeP
checkpoint. The head is always new."""
INIT_MODES = tuple(INIT_COLLECTIONS)


def init_collections(config) -> tuple[str, ...]:
    """The collections `config.init.mode` reads from `init.checkpoint`
    (`INIT_COLLECTIONS`); ×Net's 'pretrained' (a stage-2 denoising run of
    ×Net) also reads its `neck`, the Re-shapes that run trained with the
    decoder: only the head is new, as the TransUNet's."""
    names = INIT_COLLECTIONS[config.init.mode]
    if config.init.mode == "pretrained" and config_lib.architecture(config.model) == "xnet":
        names += ("neck",)
    return names


DATA_SOURCES = ("tfds", "mmseg")


default_config = defaults.finetune
"""The stage's defaults (`ddep_jax.defaults`: no JAX at import, so configs/
build and check their values without it)."""


def validate(config, num_devices: int, num_processes: int = 1) -> None:
    """Rejects unknown keys and invalid values of a stage-3 config.

    Raises:
      ValueError: 'config.<key>=<value> is invalid: <why>' or 'config.<key> is
        not a known key'.
    """
    require = config_lib.require
    config_lib.check_keys(config, default_config())
    config_lib.validate_model(config.model)
    require(config.optimizer.learning_rate > 0, "optimizer.learning_rate",
            config.optimizer.learning_rate, "must be > 0 for fine-tuning")
    i = config.init
    require(i.mode in INIT_MODES, "init.mode", i.mode, f"expected one of {INIT_MODES}")
    require(i.mode == "scratch" or bool(i.checkpoint), "init.checkpoint",
            i.checkpoint, f"init.mode={i.mode!r} needs a checkpoint path")
    if i.decoder_checkpoint:
        require("decoder" not in INIT_COLLECTIONS[i.mode], "init.decoder_checkpoint",
                i.decoder_checkpoint, f"init.mode={i.mode!r} already reads the decoder "
                "from init.checkpoint")
        require(i.decoder_collection in ("encoder", "decoder"), "init.decoder_collection",
                i.decoder_collection, "'encoder' (a stage-1 classifier's backbone, for "
                "×Net) or 'decoder' (a stage-2 run's)")
    require(config.data.source in DATA_SOURCES, "data.source", config.data.source,
            f"expected one of {DATA_SOURCES}")
    require(config.loss.class_weighting in CLASS_WEIGHTINGS, "loss.class_weighting",
            config.loss.class_weighting, f"expected one of {CLASS_WEIGHTINGS}")
    try:
        spec = seg_datasets.spec_for(config.data, config.model.num_outputs)
    except (OSError, ValueError) as e:
        key = "data.folder" if config.data.source == "mmseg" else "data.name"
        require(False, key, config.data[key.split(".")[1]], str(e))
    config_lib.validate_classes_and_splits(
        config, spec,
        [("data.train_split", config.data.train_split),
         ("eval.split", config.eval.split),
         *[("eval.final_splits", s) for s in config.eval.final_splits]])
    try:
        label_fractions.parse_amount(config.data.label_fraction)
    except ValueError as e:
        require(False, "data.label_fraction", config.data.label_fraction, str(e))
    multiple = config_lib.input_multiple(config.model)
    config_lib.validate_size("data.crop_size", config.data.crop_size, multiple)
    lo, hi = config.data.scale_range
    require(0 < lo <= hi, "data.scale_range", (lo, hi), "need 0 < low <= high")
    require(config.data.base_scale > 0, "data.base_scale", config.data.base_scale,
            "must be > 0")
    require(config.eval.mode in EVAL_MODES, "eval.mode", config.eval.mode,
            f"expected one of {EVAL_MODES}")
    require(len(config.eval.scales) > 0 and all(s > 0 for s in config.eval.scales),
            "eval.scales", tuple(config.eval.scales), "need positive scales")
    window = tuple(config.eval.window)
    require(len(window) == 2 and min(window) > 0, "eval.window", window,
            "need (H, W) > 0")
    for key in ("every_steps", "stride", "max_images", "final_max_images",
                "num_visualize"):
        require(config.eval[key] >= 0, f"eval.{key}", config.eval[key], ">= 0")
    require(config.eval.size_multiple > 0 and config.eval.size_multiple % multiple == 0,
            "eval.size_multiple", config.eval.size_multiple,
            f"a positive multiple of {multiple} (the encoder's output stride)")
    config_lib.validate_run(config, num_devices, num_processes)


def record_names(records, spec, indices) -> list[str] | None:
    """File names of the chosen records (None if the source cannot say)."""
    name_of = getattr(records, "record_name", None)
    if name_of is None or not spec.id_key:
        return None
    return [name_of(int(i), spec.id_key) for i in indices]


def labelled_subset(config, spec, records, workdir: str) -> np.ndarray:
    """Chooses (or, on resume, re-derives and checks) the labelled subset and
    writes WORKDIR/labelled_subset.json.

    Returns:
      int64 [n] record indices.

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
                f"of {old['num_examples']} {old['dataset']} {old['split']}, fraction "
                f"{old['label_fraction']!r}, seed {old['seed']}) than "
                f"config.data.label_fraction={config.data.label_fraction!r} with "
                f"seed {seed} gives: fine-tune into a new workdir.")
        return indices
    if jax.process_index() == 0:
        label_fractions.write_subset(
            path, dataset=spec.name, split=config.data.train_split,
            amount=config.data.label_fraction, seed=seed, num_examples=len(records),
            indices=indices, ids=record_names(records, spec, indices))
    return indices


def labelled_class_weights(config, source, num_classes: int,
                           workdir: str | None) -> np.ndarray | None:
    """The loss's class weights of `config.loss.class_weighting` from the
    labelled subset's label maps (None for 'none'), written with the class
    frequencies to WORKDIR/class_weights.json. Only the labelled images are
    read: at 1/30 the weights are what 13 images say, as a user with 13
    labelled images would compute them.

    Returns:
      float32 [num_classes] or None.
    """
    if config.loss.class_weighting == "none":
        return None
    pixels, image_pixels = class_frequencies(
        (source[i]["label"] for i in range(len(source))), num_classes)
    weights = median_frequency_weights(pixels, image_pixels)
    if workdir and jax.process_index() == 0:
        writers.write_json(os.path.join(workdir, "class_weights.json"), {
            "class_weighting": config.loss.class_weighting,
            "labelled_images": len(source), "pixels": pixels.tolist(),
            "image_pixels": image_pixels.tolist(),
            "weights": [round(float(w), 6) for w in weights]})
    return weights


def make_prepare(class_weights: np.ndarray | None = None):
    """`Stage.prepare`: labels to int32; the batch's non-void pixel count
    (for the pixel accuracy) and the loss's normaliser for every micro-batch
    (that count, or the batch's summed class weight)."""

    def prepare(batch, key):
        labels = batch["label"].astype(jnp.int32)
        valid = labels != IGNORE_LABEL
        count = jnp.sum(valid)
        context = {"count": count, "normaliser": count}
        if class_weights is not None:
            weights = jnp.asarray(class_weights, jnp.float32)
            context["normaliser"] = jnp.sum(
                jnp.where(valid, weights[jnp.where(valid, labels, 0)], 0.0))
        return {"image": batch["image"], "label": labels}, context, key

    return prepare


def make_loss_fn(model, class_weights: np.ndarray | None = None):
    """(params, {'image': uint8, 'label': int32}, key, {'count', 'normaliser'})
    -> (this micro-batch's share of the (class-weighted) mean cross-entropy
    over the batch's non-void pixels, {'correct': correctly classified
    non-void pixels})."""
    weights = None if class_weights is None else jnp.asarray(class_weights, jnp.float32)

    def loss_fn(params, batch, key, context):
        logits = model.apply({"params": params}, to_float_images(batch["image"]),
                             train=True, rngs={"dropout": key})
        loss, _ = segmentation_loss(logits, batch["label"],
                                    normaliser=context["normaliser"],
                                    class_weights=weights)
        return loss, {"correct": correct_pixels(logits, batch["label"])}

    return loss_fn


def metrics(aux, context) -> dict:
    return {"pixel_accuracy": aux["correct"] / jnp.maximum(context["count"], 1)}


def write_panels(writer, folder: str, split: str, step: int) -> None:
    """The evaluation's panel PNGs in `folder` (image | prediction | ground
    truth | overlay, legend) to the metric writer's image tabs as
    '<split>/<image stem>'."""
    folder = epath.Path(folder)  # local or gs://
    if not writer.active or not folder.is_dir():
        return
    for path in sorted(folder.glob("*.png")):
        with path.open("rb") as f, Image.open(f) as im:
            writer.write_image(step, f"{split}/{path.stem}", np.asarray(im.convert("RGB")))


def make_evaluate(config, spec, model):
    """The stage's `evaluate` hook: `eval.split` (the first `eval.max_images`)
    periodically; at the end `eval.split` and `eval.final_splits` (the first
    `eval.final_max_images` of each; 0: all), one
    evaluation per distinct TFDS split, with `eval.num_visualize` PNGs;
    WORKDIR/eval/<split>_<step>.json and `<split>/miou` scalars."""

    def evaluate(run: loop.RunContext, params, step: int, final: bool) -> dict:
        out_dir = os.path.join(run.workdir, "eval")
        if not final:
            split = config.eval.split
            report = run_evaluation(config, spec, model, params, split, out_dir, step,
                                    max_images=config.eval.max_images)
            run.writer.write_scalars(step, {
                f"{split}/miou": report["miou"],
                f"{split}/pixel_accuracy": report["pixel_accuracy"]})
            return {split: report}
        splits = {}  # one evaluation per distinct TFDS split
        for split in [config.eval.split, *config.eval.final_splits]:
            splits.setdefault(spec.splits.get(split, split), split)
        reports = {}
        for split in splits.values():
            reports[split] = run_evaluation(config, spec, model, params, split,
                                            out_dir, step,
                                            num_visualize=config.eval.num_visualize,
                                            max_images=config.eval.get(
                                                "final_max_images", 0))
            run.writer.write_scalars(step, {f"{split}/miou": reports[split]["miou"]})
            write_panels(run.writer, os.path.join(out_dir, f"{split}_{step:08d}"),
                         split, step)
        return reports

    return evaluate


def stage(config, mesh, workdir: str | None = None, *, data: bool = True) -> loop.Stage:
    """The fine-tuning stage of `config` (`data=False`: no dataset is opened
    and no labelled subset chosen)."""
    del mesh  # evaluation runs on host-local parameters
    spec = seg_datasets.spec_for(config.data, config.model.num_outputs)
    model = build_model(config.model, spec.num_classes)
    num_classes = model.num_outputs
    dataset = train_source = None
    class_weights = None
    if config.loss.class_weighting != "none":  # shapes only without data
        class_weights = np.ones(num_classes, np.float32)
    if data:
        records = seg_datasets.open_split(spec, config.data.train_split,
                                          config.data.data_dir)
        indices = labelled_subset(config, spec, records, workdir)
        train_source = seg_pipeline.SegmentationSource(
            records, spec, indices, split=config.data.train_split)
        dataset = seg_pipeline.make_seg_train_dataset(
            train_source, crop_size=tuple(config.data.crop_size),
            batch_size=config.batch_size // jax.process_count(), seed=config.seed,
            scale_range=tuple(config.data.scale_range),
            base_scale=config.data.base_scale, flip=config.data.flip,
            process_index=jax.process_index(), process_count=jax.process_count(),
            **config_lib.data_loading(config.data))
        class_weights = labelled_class_weights(config, train_source, num_classes, workdir)
    eh, ew = config.model.encoder.image_size
    b, (h, w) = config.batch_size, config.data.crop_size

    def example_batch(rng):
        labels = rng.randint(0, num_classes, (b, h, w)).astype(np.uint8)
        labels[rng.random_sample(labels.shape) < 0.05] = IGNORE_LABEL
        return {"image": rng.randint(0, 256, (b, h, w, 3)).astype(np.uint8),
                "label": labels}

    return loop.Stage(
        name="finetune",
        model=model,
        init_inputs=(jnp.zeros((1, eh, ew, 3), jnp.float32),),
        loss_fn=make_loss_fn(model, class_weights),
        prepare=make_prepare(class_weights),
        mean_over_micro=False,
        metrics=metrics,
        peak_lr=config.optimizer.learning_rate,
        init_collections=init_collections(config),
        init_record={"mode": config.init.mode},
        init_sources=((config.init.decoder_checkpoint, config.init.decoder_collection,
                       "decoder"),) if config.init.decoder_checkpoint else (),
        batch_spec={"image": jax.ShapeDtypeStruct((b, h, w, 3), jnp.uint8),
                    "label": jax.ShapeDtypeStruct((b, h, w), jnp.uint8)},
        example_batch=example_batch,
        dataset=dataset,
        num_examples=len(train_source) if train_source is not None else 0,
        describe=lambda m: (f"loss {m['loss']:.4f} | pixel acc "
                            f"{m['pixel_accuracy']:.3f} | lr {m['learning_rate']:.3g}"),
        summary=(f"Fine-tuning {spec.name} on "
                 f"{len(train_source) if train_source is not None else '?'} labelled "
                 f"{config.data.train_split} images ({config.data.label_fraction})"),
        evaluate=make_evaluate(config, spec, model) if data else None,
        eval_every=config.eval.every_steps,
    )
