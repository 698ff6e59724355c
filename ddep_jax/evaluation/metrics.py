"""Semantic-segmentation metrics from a global confusion matrix.

The paper's metric is the mean intersection-over-union over classes (DDeP
Sec. 5.1, "Training details"), computed, as is standard, from one confusion
matrix accumulated over the whole validation set (not a mean of per-image
IoUs).

Workflow::

    total = None
    for images, labels in val_batches:
        preds = ...                                   # int [B, H, W]
        cm = confusion_matrix(labels, preds, num_classes)   # jax int32 [C, C]
        total = accumulate(total, cm)                 # numpy int64 [C, C]
    m = segmentation_metrics(total, class_names)      # JSON-serialisable dict
    print(format_table(m, class_names))

Distributed use: `confusion_matrix` is a sum over pixels, so

* calling it under ``jax.jit`` on a batch sharded over devices (e.g.
  ``NamedSharding(mesh, P('data'))``) returns the global matrix: XLA computes
  per-shard partial matrices and all-reduces them;
* equivalently, per-device matrices (e.g. inside ``shard_map`` / ``pmap``)
  summed with ``jax.lax.psum`` or on the host give the global matrix.

The first form needs a mesh whose axes are ``AxisType.Auto`` (as built by
`ddep_jax.parallel.sharding.make_mesh`); with ``Explicit`` axes (the default of
``jax.make_mesh`` in JAX 0.10) the scatter's output sharding is ambiguous and
JAX raises; use the per-device form there.

One call counts at most ``2**31 - 1`` pixels per cell (int32); sum batches on
the host with `accumulate` (int64), never by adding int32 device matrices over
a whole data set.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddep_jax.data.seg_datasets import IGNORE_LABEL


def confusion_matrix(labels: jax.Array | np.ndarray, predictions: jax.Array | np.ndarray,
                     num_classes: int, ignore_label: int = IGNORE_LABEL) -> jax.Array:
    """Pixel confusion matrix of one batch; jit-able, any (equal) shapes.

    Args:
      labels: integer ground truth of any shape (e.g. uint8 [B, H, W]); values
        ``0..num_classes-1``, or ``ignore_label`` for void pixels.
      predictions: integer predicted class ids, same number of elements as
        `labels` (e.g. the argmax of the logits, int32 [B, H, W]).
      num_classes: C, static (a Python int).
      ignore_label: void value in `labels`; those pixels are not counted.

    Returns:
      jax int32 [C, C]; entry ``[i, j]`` = number of pixels with ground truth
      ``i`` predicted as ``j`` (rows: ground truth, columns: prediction).
      Pixels whose label is `ignore_label` or outside ``[0, C)`` are excluded;
      so are pixels whose prediction is outside ``[0, C)`` (impossible for an
      argmax over C logits).

    Raises:
      ValueError: `labels` and `predictions` differ in size, or
        ``num_classes < 1``.
    """
    num_classes = int(num_classes)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
    labels = jnp.asarray(labels).astype(jnp.int32)
    predictions = jnp.asarray(predictions).astype(jnp.int32)
    if labels.size != predictions.size:
        raise ValueError(f"labels have {labels.size} elements {labels.shape} but "
                         f"predictions {predictions.size} {predictions.shape}; they "
                         "must match pixel for pixel.")
    if labels.shape != predictions.shape:  # e.g. [B, H, W, 1] vs [B, H, W]
        labels = labels.reshape(-1)
        predictions = predictions.reshape(-1)
    valid = ((labels != ignore_label) & (labels >= 0) & (labels < num_classes)
             & (predictions >= 0) & (predictions < num_classes))
    # Invalid pixels get an out-of-range index and are dropped by the scatter.
    index = jnp.where(valid, labels * num_classes + predictions, num_classes * num_classes)
    counts = jnp.zeros((num_classes * num_classes,), jnp.int32).at[index].add(
        1, mode="drop")
    return counts.reshape(num_classes, num_classes)


def accumulate(total: np.ndarray | None, cm: jax.Array | np.ndarray) -> np.ndarray:
    """Host-side running sum of confusion matrices, in int64.

    Args:
      total: the running sum (numpy int64 [C, C]) or ``None`` to start.
      cm: one batch's matrix (jax or numpy, any integer dtype) [C, C].

    Returns:
      numpy int64 [C, C]: ``total + cm`` (a new array; `total` is not modified).

    Raises:
      ValueError: `cm` is not square or its shape differs from `total`'s.
    """
    cm = np.asarray(jax.device_get(cm)).astype(np.int64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be [C, C], got shape {cm.shape}.")
    if total is None:
        return cm
    total = np.asarray(total)
    if total.shape != cm.shape:
        raise ValueError(f"cannot add a confusion matrix of shape {cm.shape} to a "
                         f"running total of shape {total.shape}.")
    return total.astype(np.int64) + cm


def _none_if_nan(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def segmentation_metrics(confusion: np.ndarray,
                         class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """mIoU, per-class IoU, pixel and class accuracy from a confusion matrix.

    For class c with ``TP = cm[c, c]``, ``FN = sum(cm[c, :]) - TP`` (ground
    truth c predicted otherwise) and ``FP = sum(cm[:, c]) - TP``:
    ``IoU_c = TP / (TP + FP + FN)``.

    A class is *present* if it occurs in the ground truth or in the
    predictions (row sum + column sum > 0). Classes absent from both have an
    undefined IoU (0/0): they are *excluded* from the mean and listed in
    ``excluded_classes``. A class that is predicted but never in the ground
    truth has IoU 0 and is included in the mean (the standard convention, e.g.
    mmseg / the Cityscapes scripts), as is a class in the ground truth that is
    never predicted.

    Args:
      confusion: integer [C, C], rows ground truth, columns prediction (e.g.
        from `accumulate`).
      class_names: optional C names, used for ``per_class`` and
        ``excluded_class_names``.

    Returns:
      A JSON-serialisable dict (plain Python floats / ints / lists / None):
        ``miou``: mean IoU over present classes (float in [0, 1]).
        ``per_class_iou``: C floats, ``None`` for excluded classes.
        ``per_class``: ``{class name: IoU or None}`` in id order (only if
          `class_names` given; a name used twice gets `` (id N)`` appended).
        ``pixel_accuracy``: trace / total (float).
        ``mean_class_accuracy``: mean over classes present in the ground truth
          of ``TP / (TP + FN)`` (recall); undefined for the others.
        ``per_class_accuracy``: C floats, ``None`` where the class is absent
          from the ground truth.
        ``present_classes``: indices with row + column sum > 0.
        ``excluded_classes``: indices with row + column sum == 0.
        ``excluded_class_names``: their names (only if `class_names` given).
        ``num_pixels``: counted (non-void) pixels.
        ``num_classes``: C.

    Raises:
      ValueError: `confusion` is not a square 2-D matrix, has negative
        entries, counts no pixels, or `class_names` has the wrong length.
    """
    cm = np.asarray(jax.device_get(confusion))
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be [C, C], got shape {cm.shape}.")
    if (cm < 0).any():
        raise ValueError("confusion matrix has negative entries (int32 overflow? "
                         "sum batches with `accumulate`).")
    num_classes = cm.shape[0]
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for a {num_classes}-class "
                         "confusion matrix.")
    cm = cm.astype(np.float64)
    total = cm.sum()
    if total == 0:
        raise ValueError("confusion matrix counts no pixels (empty evaluation set, or "
                         "every label void).")
    tp = np.diag(cm)
    gt = cm.sum(axis=1)
    pred = cm.sum(axis=0)
    union = gt + pred - tp
    present = (gt + pred) > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(present, tp / union, np.nan)
        acc = np.where(gt > 0, tp / gt, np.nan)
    excluded = [int(c) for c in np.flatnonzero(~present)]
    out: dict[str, Any] = {
        "miou": float(np.mean(iou[present])),
        "per_class_iou": [_none_if_nan(float(v)) for v in iou],
        "pixel_accuracy": float(tp.sum() / total),
        "mean_class_accuracy": float(np.mean(acc[gt > 0])),
        "per_class_accuracy": [_none_if_nan(float(v)) for v in acc],
        "present_classes": [int(c) for c in np.flatnonzero(present)],
        "excluded_classes": excluded,
        "num_pixels": int(round(total)),
        "num_classes": int(num_classes),
    }
    if class_names is not None:
        names = [str(n) for n in class_names]
        repeated = {n for n in names if names.count(n) > 1}
        keys = [f"{n} (id {c})" if n in repeated else n for c, n in enumerate(names)]
        # Right after per_class_iou (dicts, and so the JSON report, keep order).
        items = list(out.items())
        at = [k for k, _ in items].index("per_class_iou") + 1
        items.insert(at, ("per_class", dict(zip(keys, out["per_class_iou"]))))
        out = dict(items)
        out["excluded_class_names"] = [names[c] for c in excluded]
    return out


def format_table(metrics: dict[str, Any], class_names: Sequence[str] | None = None) -> str:
    """Human-readable per-class table of `segmentation_metrics` output.

    Args:
      metrics: the dict returned by `segmentation_metrics`.
      class_names: optional names (default: ``class 0``, ``class 1``, ...).

    Returns:
      A multi-line string: one row per class (IoU and accuracy in %, ``-`` for
      undefined values, excluded classes marked), then the summary lines.

    Raises:
      ValueError: `class_names` length differs from the number of classes.
    """
    ious = metrics["per_class_iou"]
    accs = metrics.get("per_class_accuracy", [None] * len(ious))
    if class_names is None:
        class_names = [f"class {c}" for c in range(len(ious))]
    if len(class_names) != len(ious):
        raise ValueError(f"{len(class_names)} class names for {len(ious)} classes.")
    excluded = set(metrics.get("excluded_classes", []))

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100.0 * v:6.2f}"

    width = max([len("class")] + [len(str(n)) for n in class_names])
    lines = [f"{'id':>3}  {'class':<{width}}  {'IoU %':>6}  {'acc %':>6}",
             "-" * (3 + 2 + width + 2 + 6 + 2 + 6 + 12)]
    for c, name in enumerate(class_names):
        note = "  (excluded: absent)" if c in excluded else ""
        lines.append(f"{c:>3}  {str(name):<{width}}  {pct(ious[c]):>6}  "
                     f"{pct(accs[c]):>6}{note}")
    lines.append("-" * len(lines[1]))
    n_present = len(metrics.get("present_classes", []))
    lines.append(f"mIoU            {pct(metrics['miou'])}  (over {n_present} present "
                 f"of {len(ious)} classes)")
    lines.append(f"pixel accuracy  {pct(metrics['pixel_accuracy'])}")
    lines.append(f"mean class acc  {pct(metrics['mean_class_accuracy'])}")
    lines.append(f"pixels          {metrics['num_pixels']}")
    return "\n".join(lines)
