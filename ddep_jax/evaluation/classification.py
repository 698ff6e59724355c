"""Top-1 / top-5 accuracy of a stage-1 classifier on a prepared split.

Preprocessing is resize + centre crop (`pipeline.resize_centre_crop`: resize
the shorter side to size / crop_fraction, then crop `size`, as ViT and
big_vision evaluate). Every host reads its own shard of the split; the hit
counts are summed over the global batch, the last batch padded and masked,
so all hosts agree on the result.
"""

from __future__ import annotations

import math
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ddep_jax.data import class_datasets, pipeline
from ddep_jax.models import to_float_images


class EvalPreprocess:
    """Record -> {'image': uint8 [h, w, 3] (resize + centre crop), 'label'}."""

    def __init__(self, size, crop_fraction: float, check: class_datasets.CheckLabel):
        self.size, self.crop_fraction, self.check = tuple(size), crop_fraction, check

    def __call__(self, example: dict) -> dict:
        example = self.check(example)
        return {"image": pipeline.resize_centre_crop(example["image"], self.size,
                                                     self.crop_fraction),
                "label": np.int32(example["label"])}


def make_eval_step(model):
    """(params, uint8 images [B, H, W, 3], labels [B], valid [B]) -> counts
    {'top1', 'top5', 'count'} (int32, summed over the global batch)."""

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
    """Top-1 / top-5 accuracy of `params` on `split`.

    Args:
      config: the stage-1 config (`data.image_size`, `data.eval_crop_fraction`,
        `eval.batch_size`, `data.num_threads`, `data.prefetch`, `data.data_dir`).
      spec: the `ClassDatasetSpec`.
      num_classes: labels must lie in [0, num_classes).
      eval_step: jitted `make_eval_step(model)`.
      params: the classifier's parameters.
      split: a split of `spec`.
      mesh: the device mesh (the batch is split over 'data').
      max_examples: the first N examples only; 0 = all.

    Returns:
      {'split', 'top1', 'top5' (fractions in [0, 1]), 'num_examples',
      'seconds'}.

    Raises:
      ValueError: a label outside [0, num_classes) (naming the record).
    """
    t0 = time.perf_counter()
    records = class_datasets.open_split(spec, split, config.data.data_dir)
    n = min(len(records), max_examples) if max_examples else len(records)
    pi, pc = jax.process_index(), jax.process_count()
    local_batch = config.eval.batch_size // pc
    num_batches = math.ceil(math.ceil(n / pc) / local_batch)
    check = class_datasets.CheckLabel(num_classes, f"{spec.tfds_name} {split}")
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
