"""Own folders prepared as TFDS ``array_record`` datasets (no TensorFlow).

``python -m ddep_jax.data.prepare --folder=DIR --layout=images|mmseg
--name=NAME [--data_dir=...]`` turns the two layouts of
`ddep_jax.data.folders` into a prepared dataset NAME, read afterwards like
the built-in ones (``data.source='tfds'``, ``data.name=NAME``): one file per
shard instead of many small files, which is what remote storage (gs://) and
multi-host input pipelines want.

* ``images`` (stage 2): split ``train``, ``{'image', 'file_name'}``; every
  image is decoded exactly as the folder source decodes it (RGB, EXIF
  orientation) and stored as PNG, so the prepared records equal the folder's.
  Undecodable files are skipped and logged (``--bad_images=skip``) or stop
  the preparation (``error``).
* ``mmseg`` (stage 3): splits ``train``, ``validation`` and ``test`` (the
  sub-folders ``train``, ``val``, ``test``), ``{'image', 'segmentation_mask'
  (stored values, uint8 [H, W, 1]), 'file_name'}``, paired, size-checked and
  label-checked as the folder reader does; the class names, palette and
  ``reduce_zero_label`` go to ``ddep_seg_spec.json`` beside the records,
  from which `ddep_jax.data.seg_datasets.spec_for` rebuilds the dataset's
  spec.

A builder class is made per NAME (`builder_class`); TFDS reads the prepared
files back without it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from PIL import Image

from ddep_jax.data import folders, mmseg

LAYOUTS = ("images", "mmseg")
SPEC_FILE = "ddep_seg_spec.json"
VERSION = "1.0.0"


def _png(array: np.ndarray) -> io.BytesIO:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    buffer.seek(0)
    return buffer


def _info(builder, what: str, layout: str, **features) -> tfds.core.DatasetInfo:
    """DatasetInfo of a prepared folder: a PNG image, its file name and
    `features`."""
    return tfds.core.DatasetInfo(
        builder=builder,
        description=f"{what}, prepared by python -m ddep_jax.data.prepare "
                    f"--layout={layout}.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            **features, "file_name": tfds.features.Text()}))


class _FolderImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """An image folder (class attributes FOLDER, GLOB, BAD_IMAGES)."""

    VERSION = tfds.core.Version(VERSION)
    code_path = epath.Path(__file__)  # See camvid.py: avoids importlib_resources.
    FOLDER = GLOB = BAD_IMAGES = ""

    def _info(self) -> tfds.core.DatasetInfo:
        return _info(self, f"Images of the folder {self.FOLDER} (glob {self.GLOB!r})",
                     "images")

    def _split_generators(self, dl_manager):
        del dl_manager
        source = folders.ImageFolderSource(self.FOLDER, self.GLOB, self.BAD_IMAGES)
        return {"train": self._generate_examples(source)}

    def _generate_examples(self, source):
        skipped = 0
        for i in range(len(source)):
            record = source[i]
            if record is None:
                skipped += 1
                continue
            yield source.files[i], {"image": _png(record["image"]),
                                    "file_name": source.files[i]}
        if skipped:
            logging.warning("%d undecodable files of %s were skipped (listed above).",
                            skipped, self.FOLDER)


class _FolderMMSeg(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """An mmseg-layout folder (class attribute SPEC: its `SegDatasetSpec`)."""

    VERSION = tfds.core.Version(VERSION)
    code_path = epath.Path(__file__)  # See camvid.py: avoids importlib_resources.
    SPEC = None

    def _info(self) -> tfds.core.DatasetInfo:
        return _info(self, f"The mmseg-layout folder {self.SPEC.folder}", "mmseg",
                     segmentation_mask=tfds.features.Image(shape=(None, None, 1),
                                                           encoding_format="png"))

    def _split_generators(self, dl_manager):
        del dl_manager
        present = set(self.SPEC.splits.values())
        return {split: self._generate_examples(split)
                for split, sub in mmseg.MMSEG_SPLITS.items() if sub in present}

    def _generate_examples(self, split):
        records = mmseg.MMSegSplit(self.SPEC, split)
        for i in range(len(records)):
            record = records[i]
            name = record["file_name"].decode()
            self.SPEC.decode(record, i, split)  # checks sizes and label values
            mask = np.asarray(record["segmentation_mask"])
            yield name, {"image": _png(record["image"]),
                         "segmentation_mask": _png(mask.astype(np.uint8)),
                         "file_name": name}


def builder_class(name: str, layout: str, *, folder: str, glob: str = "**/*",
                  bad_images: str = "skip", spec=None) -> type:
    """A TFDS builder class named `name` for a folder of `layout`.

    Raises:
      ValueError: `name` is not a lower-case snake_case identifier, or an
        unknown layout.
    """
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"--name={name!r}: a dataset name is lower-case letters, "
                         "digits and '_', starting with a letter.")
    if layout not in LAYOUTS:
        raise ValueError(f"--layout={layout!r}: expected one of {LAYOUTS}.")
    camel = "".join(part.title() for part in name.split("_")) + "Folder"
    attributes: dict[str, Any] = {"name": name, "__module__": __name__}
    if layout == "images":
        base = _FolderImages
        attributes.update(FOLDER=folder, GLOB=glob, BAD_IMAGES=bad_images)
    else:
        base = _FolderMMSeg
        attributes["SPEC"] = spec
    # Not registered: TFDS reads the prepared files back without the class.
    return type(camel, (base,), attributes, skip_registration=True)


def write_spec(spec, data_dir: str) -> str:
    """Writes the prepared dataset's class list and label convention
    (DATA_DIR/<name>/<version>/ddep_seg_spec.json); returns the path."""
    record = {"num_classes": spec.num_classes, "class_names": list(spec.class_names),
              "class_colors": [list(c) for c in spec.class_colors],
              "reduce_zero_label": spec.reduce_zero_label,
              "splits": sorted(k for k, v in spec.splits.items()
                               if mmseg.MMSEG_SPLITS[k] == v),  # those prepared
              "source_folder": spec.folder}
    path = os.path.join(data_dir, SPEC_FILE)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    return path


def prepared_spec(name: str, data_dir: str):
    """The `SegDatasetSpec` of a prepared mmseg folder `name` in `data_dir`,
    or None when there is none (any version; the newest is read)."""
    from ddep_jax.data.seg_spec import SegDatasetSpec

    root = os.path.join(data_dir, name)
    if not os.path.isdir(root):
        return None
    versions = sorted(v for v in os.listdir(root)
                      if os.path.isfile(os.path.join(root, v, SPEC_FILE)))
    if not versions:
        return None
    with open(os.path.join(root, versions[-1], SPEC_FILE), encoding="utf-8") as f:
        record = json.load(f)
    splits = {s: s for s in record["splits"]}
    splits.setdefault("test", "validation")
    return dataclasses.replace(
        SegDatasetSpec(name=name, tfds_name=name, num_classes=record["num_classes"],
                       class_names=tuple(record["class_names"]),
                       class_colors=tuple(tuple(c) for c in record["class_colors"]),
                       splits=splits),
        reduce_zero_label=bool(record["reduce_zero_label"]))
