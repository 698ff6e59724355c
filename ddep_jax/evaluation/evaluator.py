"""Evaluating a segmentation model on a dataset split (global mIoU).

Every image of the split (or of this host's share of it) is segmented with
the configured protocol (at `base_scale` of its size, probabilities resized
back to the label resolution) (`inference.predict`), the
argmax is compared with the label in one confusion matrix over all pixels,
and the matrices of all hosts are summed before the metrics are computed
(DDeP Sec. 5.1: mean IoU over classes).
"""

from __future__ import annotations

import functools
import os
import re
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from ddep_jax.evaluation import visualize
from ddep_jax.data.seg_datasets import SegDatasetSpec
from ddep_jax.evaluation import inference, metrics
from ddep_jax.models import to_float_images


_APPLY_CACHE: dict[int, tuple[Any, Callable]] = {}


def make_logits_fn(model, params) -> Callable[[jax.Array], jax.Array]:
    """float32 [N, h, w, 3] -> logits float32 [N, h, w, C]; the encoder runs in
    inference mode. The jitted apply is made once per model object and takes
    the parameters as an argument, so repeated evaluations (new params) reuse
    its compilations (one per input shape)."""
    entry = _APPLY_CACHE.get(id(model))
    if entry is None or entry[0] is not model:
        entry = (model, jax.jit(
            lambda p, x: model.apply({"params": p}, x, train=False)))
        _APPLY_CACHE[id(model)] = entry
    apply = entry[1]
    return lambda images: apply(params, images)


def protocol(eval_config, base_scale: float = 1.0) -> tuple[str, dict[str, Any]]:
    """(mode, keyword arguments of `predict_at_base_scale`) from `config.eval`.

    `base_scale` (config.data.base_scale) is the resize applied to every image
    in training; evaluation runs at that size too (for 'multiscale' the
    scales are multiplied by it) and the probabilities are always resized
    back to the label resolution.
    """
    mode = eval_config.mode
    multiple = {"size_multiple": int(eval_config.size_multiple)}
    if mode == "whole":
        return mode, {"scale": base_scale, "flip": bool(eval_config.flip), **multiple}
    if mode == "multiscale":
        return mode, {"scales": tuple(s * base_scale for s in eval_config.scales),
                      "flip": True, **multiple}
    kw: dict[str, Any] = {"flip": True, "base_scale": base_scale, **multiple}
    if mode == "sliding":
        kw["window"] = tuple(int(w) for w in eval_config.window)
        if eval_config.stride:
            kw["stride"] = int(eval_config.stride)
    return mode, kw


def predict_at_base_scale(logits_fn, image: jax.Array, num_classes: int, mode: str,
                          base_scale: float = 1.0, **kwargs) -> jax.Array:
    """`inference.predict`, on the image resized by `base_scale` first (for
    the window-based modes), probabilities resized back: float32 [H, W, C]."""
    if base_scale == 1.0:
        return inference.predict(logits_fn, image, num_classes, mode, **kwargs)
    h, w = image.shape[:2]
    size = (max(1, round(h * base_scale)), max(1, round(w * base_scale)))
    small = jax.image.resize(image, (*size, 3), "bilinear")  # antialiased, as PIL
    probs = inference.predict(logits_fn, small, num_classes, mode, **kwargs)
    return jax.image.resize(probs, (h, w, num_classes), "bilinear")


@functools.partial(jax.jit, static_argnums=2)
def _score(probs: jax.Array, label, num_classes: int):
    """argmax labels int32 [H, W] and their confusion matrix int32 [C, C]."""
    prediction = jnp.argmax(probs, axis=-1)
    return prediction, metrics.confusion_matrix(label, prediction, num_classes)


def panel_name(source, i: int, spec: SegDatasetSpec,
               used: set[str] | None = None) -> str:
    """File name (without ``.png``) of image `i`'s panel: the stem of its
    record's `spec.id_key` (file name), e.g. ``'0016E5_08059'`` for
    ``0016E5_08059.jpg`` (``'n01440764/x.JPEG'`` -> ``'x'``; characters other
    than letters, digits, ``._-`` become ``_``), else the index ``'00007'``.
    A name already in `used` gets ``_<index>`` appended; the name is added to
    `used`.

    `source` is a `SegmentationSource` (its records' ``record_name`` reads the
    file name without decoding the images); other sources get the index.
    """
    stem = None
    records = getattr(source, "records", None)
    if spec.id_key and records is not None and hasattr(source, "record_index"):
        j = source.record_index(i)
        name_of = getattr(records, "record_name", None)
        if name_of is not None:
            name = name_of(j, spec.id_key)
            if name != f"#{j}":  # `record_name`'s answer when there is none
                stem = name
        else:
            record = records[j]
            if spec.id_key in record:
                stem = spec.record_id(record, j)
    if stem is not None:
        stem = os.path.splitext(os.path.basename(stem.replace("\\", "/")))[0]
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", stem).lstrip(".")
    name = stem or f"{i:05d}"
    if used is not None:
        if name in used:
            name = f"{name}_{i:05d}"
        used.add(name)
    return name


def evaluate(logits_fn, source, spec: SegDatasetSpec, mode: str,
             kwargs: dict[str, Any], *, max_images: int = 0,
             visualize_dir: str | None = None, num_visualize: int = 0,
             process_index: int = 0, process_count: int = 1) -> dict[str, Any]:
    """Segments a split and returns its metrics.

    Args:
      logits_fn: see `make_logits_fn`.
      source: `SegmentationSource` of the split (``{'image', 'label'}``).
      spec: the dataset's spec (classes, palette).
      mode, kwargs: the protocol (see `protocol`).
      max_images: evaluate the first N images only (0 = all).
      visualize_dir: where to write image | prediction | ground truth |
        overlay PNGs (with a legend of the classes shown) of the first
        `num_visualize` images (host 0 only), each named after its image's
        file (``<stem>.png``, e.g. ``0016E5_08059.png``; `panel_name`).
      process_index, process_count: this host takes every process_count-th
        image; the confusion matrices of all hosts are summed.

    A progress bar over the images is shown on stderr when stderr is a
    terminal (not in logs or redirected output), by host 0 only; it is
    removed when the evaluation ends.

    Returns:
      `metrics.segmentation_metrics` of the global confusion matrix (with
      ``per_class``: {class name: IoU}), plus 'num_images'.
    """
    n = len(source) if max_images <= 0 else min(max_images, len(source))
    total = None
    palette = spec.palette()
    used_names: set[str] = set()
    indices = range(process_index, n, process_count)
    for i in tqdm(indices, total=len(indices), desc=f"eval {spec.name}",
                  unit="image", file=sys.stderr, dynamic_ncols=True, leave=False,
                  disable=not sys.stderr.isatty() or process_index != 0):
        example = source[i]
        image, label = example["image"], example["label"]
        probs = predict_at_base_scale(logits_fn, to_float_images(image),
                                      spec.num_classes, mode, **kwargs)
        prediction, cm = _score(probs, label, spec.num_classes)
        total = metrics.accumulate(total, cm)
        if visualize_dir and process_index == 0 and i < num_visualize:
            name = panel_name(source, i, spec, used_names)
            visualize.save_segmentation_panel(
                os.path.join(visualize_dir, name + ".png"), image,
                np.asarray(prediction, np.uint8), label, palette,
                class_names=spec.class_names)
    if total is None:
        total = np.zeros((spec.num_classes, spec.num_classes), np.int64)
    if process_count > 1:
        from jax.experimental import multihost_utils

        # Gathered as int32 pairs: without jax x64 an int64 array would be
        # narrowed on the way through the devices.
        pairs = np.ascontiguousarray(total, np.int64).view(np.int32)
        gathered = np.asarray(multihost_utils.process_allgather(pairs))
        total = np.ascontiguousarray(gathered).view(np.int64).sum(0)
    result = metrics.segmentation_metrics(total, spec.class_names)
    result["num_images"] = n
    return result
