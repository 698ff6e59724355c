"""The segmentation dataset spec (`SegDatasetSpec`), the void label and the
registry of specs: a leaf module that the dataset builders import to
register their datasets, and that `seg_datasets` reads (the builders never
import `seg_datasets`, which imports them: no import circle).

A spec says where a prepared TFDS dataset keeps its image and label, how raw
label values map to the evaluated class ids (``0..num_classes-1``, everything
else -> ``IGNORE_LABEL`` 255), its split names, class names and palette, and
the paper's crop size (DDeP Sec. 5.1). `SegDatasetSpec.decode` turns one TFDS
record into ``(image uint8 [H, W, 3], label uint8 [H, W])`` and validates it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

IGNORE_LABEL = 255
"""Void label of every dataset after mapping; excluded from loss and metrics."""


@dataclasses.dataclass(frozen=True)
class SegDatasetSpec:
    """How to read one TFDS segmentation dataset.

    Attributes:
      name: key used in ``config.data.name`` (e.g. ``'camvid'``).
      tfds_name: TFDS builder name, with config if any (e.g.
        ``'cityscapes/semantic_segmentation'``).
      num_classes: evaluated classes; mapped labels are ``0..num_classes-1``
        or 255.
      class_names: ``num_classes`` names in id order.
      class_colors: ``num_classes`` RGB triples (0..255) in id order.
      image_key: record key of the uint8 ``[H, W, 3]`` image.
      label_key: record key of the uint8/int ``[H, W]`` or ``[H, W, 1]`` label.
      splits: ``{'train': tfds split, 'validation': ..., 'test': ...}``; a
        dataset without a public test split maps ``'test'`` to its validation.
      label_lut: ``None`` if stored labels are already ``0..C-1`` / 255; else
        an int array ``[K]`` mapping raw value ``v < K`` to ``lut[v]`` (a class
        id or 255). Raw values ``>= K`` are errors.
      crop_size: the paper's fine-tuning crop (pixels, square); informational,
        the configs under configs/ set `data.crop_size`.
      eval_mode: the paper's evaluation protocol for the dataset
        (`ddep_jax.evaluation.inference.EVAL_MODES`); informational, the
        configs set `eval.mode`.
      id_key: record key naming the example (file name) for messages and the
        label-fraction listing; ``None`` if the records have none.
      folder: '' for a prepared TFDS dataset; else the root of an
        mmsegmentation-layout folder read in place (`ddep_jax.data.folders`;
        then `splits` maps to its sub-folders and `tfds_name` is unused).
      img_suffix, seg_map_suffix: the folder's image and label-map file
        endings (mmseg's names).
      reduce_zero_label: mmseg's option: stored 0 is void and every other
        stored value ``v`` is class ``v - 1`` (255 stays void).
    """

    name: str
    tfds_name: str
    num_classes: int
    class_names: tuple[str, ...]
    class_colors: tuple[tuple[int, int, int], ...]
    image_key: str = "image"
    label_key: str = "segmentation_mask"
    splits: Mapping[str, str] = dataclasses.field(default_factory=lambda: {
        "train": "train", "validation": "validation", "test": "test"})
    label_lut: Any = None
    crop_size: int = 512
    eval_mode: str = "whole"
    id_key: str | None = "file_name"
    folder: str = ""
    img_suffix: str = ".jpg"
    seg_map_suffix: str = ".png"
    reduce_zero_label: bool = False

    def __post_init__(self):
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{self.name}: {len(self.class_names)} class names for "
                             f"{self.num_classes} classes.")
        if len(self.class_colors) != self.num_classes:
            raise ValueError(f"{self.name}: {len(self.class_colors)} colours for "
                             f"{self.num_classes} classes.")

    def palette(self) -> np.ndarray:
        """uint8 [256, 3]: colour of every label value (void and unused: black)."""
        p = np.zeros((256, 3), np.uint8)
        p[:self.num_classes] = np.asarray(self.class_colors, np.uint8)
        return p

    def record_id(self, record: Mapping[str, Any], index: int) -> str:
        """A readable name of a record: its file name, else ``#index``."""
        if self.id_key and self.id_key in record:
            v = record[self.id_key]
            return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
        return f"#{index}"

    def map_labels(self, raw: np.ndarray, where: str = "") -> np.ndarray:
        """Raw stored label values -> uint8 class ids / 255.

        Raises:
          ValueError: a value outside ``[0, num_classes)`` that is not void
            (after the LUT), naming `where` and the values.
        """
        raw = np.asarray(raw)
        if self.reduce_zero_label:  # mmseg: 0 -> void, v -> v - 1, 255 stays
            raw = np.where((raw == 0) | (raw == IGNORE_LABEL), IGNORE_LABEL + 1,
                           raw.astype(np.int32)) - 1
        if self.label_lut is not None:
            lut = np.asarray(self.label_lut)
            bad = np.unique(raw[(raw < 0) | (raw >= len(lut))])
            if bad.size:
                raise ValueError(
                    f"{self.name} label {where} has values {bad.tolist()} outside "
                    f"the raw range 0..{len(lut) - 1} of its label mapping.")
            out = lut[raw].astype(np.uint8)
        else:
            out = raw.astype(np.uint8) if raw.dtype != np.uint8 else raw
            bad = np.unique(raw[((raw < 0) | (raw >= self.num_classes))
                                & (raw != IGNORE_LABEL)])
            if bad.size:
                stored = (f"stored values 1..{self.num_classes} and 0 / "
                          f"{IGNORE_LABEL} (void, reduce_zero_label)"
                          if self.reduce_zero_label else
                          f"0..{self.num_classes - 1} and void {IGNORE_LABEL}")
                if self.reduce_zero_label:
                    bad = bad + 1
                raise ValueError(
                    f"{self.name} label {where} has values {bad.tolist()}; valid "
                    f"are {stored}. Re-prepare the dataset or fix the label file.")
        return out

    def decode(self, record: Mapping[str, Any], index: int = -1,
               split: str = "") -> tuple[np.ndarray, np.ndarray]:
        """One TFDS record -> (image uint8 [H, W, 3], label uint8 [H, W]).

        Raises:
          ValueError: image and label sizes differ, or a label value is
            invalid; the message names the dataset, split and record.
        """
        where = f"{self.record_id(record, index)} (split {split!r}, record {index})"
        image = np.asarray(record[self.image_key])
        label = np.asarray(record[self.label_key])
        if label.ndim == 3 and label.shape[-1] == 1:
            label = label[..., 0]
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"{self.name} image {where} has shape {image.shape}; "
                             "expected [H, W, 3].")
        if label.shape != image.shape[:2]:
            raise ValueError(
                f"{self.name} image/label size mismatch in {where}: image "
                f"{image.shape[:2]} vs label {label.shape} (H, W).")
        return image, self.map_labels(label, where)


# name -> zero-argument factory (factories keep builder imports lazy).
FACTORIES: dict[str, Any] = {}


def register(name: str, factory) -> None:
    """Adds a dataset spec factory under `name` (used by builder modules)."""
    FACTORIES[name] = factory
