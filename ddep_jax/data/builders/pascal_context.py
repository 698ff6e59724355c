"""PASCAL-Context, 59-class setting, as a TensorFlow-free TFDS builder.

Registered TFDS name: ``pascal_context`` (TFDS 4.9.x has no builder of that
name). Registered segmentation spec (`ddep_jax.data.seg_datasets.get_spec`):
``pascal_context``.

Upstream format
---------------
Two public downloads (Mottaghi et al., CVPR 2014):

* PASCAL VOC 2010 train/val, ``VOCtrainval_03-May-2010.tar`` (1.3 GB, from
  http://host.robots.ox.ac.uk/pascal/VOC/voc2010/)::

      VOCdevkit/VOC2010/JPEGImages/<id>.jpg              RGB JPEGs
      VOCdevkit/VOC2010/ImageSets/Main/{train,val}.txt   one <id> per line

* the PASCAL-Context annotations ``trainval.tar.gz`` from
  https://cs.stanford.edu/~roozbeh/pascal-context/::

      trainval/<id>.mat     MATLAB file with ``LabelMap``: uint16 [H, W]

  ``LabelMap`` holds the ids ``1..459`` of the full class list (the page's
  ``labels.txt``, lines ``"<id>: <name>"``, alphabetical: ``1: accordion``,
  ``2: aeroplane``, ...) and ``0`` for unlabelled pixels. The page also
  offers ``59_labels.txt`` (lines ``"<n>: <name>"``, the 59 most frequent
  classes, in its own order and with a few different spellings).

The 59-class setting keeps the 59 classes of `CLASSES_59` and ignores every
other pixel ("background", i.e. unlabelled and the other 400 classes). The
class ids are those of the widely used mapping of the PASCAL-in-Detail API
(``_mapping`` of the Detail / mmsegmentation / EncNet converters): the 59
full-list ids sorted ascending, which orders the classes alphabetically
(``aeroplane`` = 0 ... ``wood`` = 58), exactly like mmsegmentation's
``PascalContextDataset59`` after ``reduce_zero_label``.

Splits are VOC2010's ``ImageSets/Main/train.txt`` (4998 images) and
``val.txt`` (5105), the 4998/5105 split of the PASCAL-Context paper. (The
``ImageSets/SegmentationContext`` lists written by mmsegmentation's converter
come from the Detail json and have 4996/5104 images.)

``manual_dir`` holds, in any combination:

* VOC: ``VOCtrainval_03-May-2010.tar`` (read in place), or the extracted
  ``VOCdevkit/VOC2010/`` (or ``VOC2010/``) folder;
* annotations: ``trainval.tar.gz`` (read in place), or the extracted
  ``trainval/`` folder (in ``manual_dir`` or in the ``VOC2010/`` folder);
* optionally ``labels.txt`` and ``59_labels.txt`` (in ``manual_dir``, the
  ``VOC2010/`` folder or the annotation archive). When present they are
  checked against `CLASSES_59`: a ``labels.txt`` naming a different class at
  one of the 59 ids fails the build; a ``59_labels.txt`` with other class
  names logs a warning.

Generated examples
------------------
Splits ``train`` (4998) and ``validation`` (5105); there is no public test
annotation. Each example, as decoded by ``tfds.data_source``:

* ``image``: ``uint8 [H, W, 3]`` RGB (stored as JPEG, byte for byte when the
  source is an RGB JPEG; VOC images are at most 500x500).
* ``segmentation_mask``: ``uint8 [H, W, 1]`` with classes ``0..58`` and 255
  (ignored), already mapped at build time (stored as PNG).
* ``file_name``: ``bytes`` (TFDS Text), e.g. ``b'2008_000002.jpg'``.

Example keys are the image ids.

Checks during generation
------------------------
``ValueError`` naming the offending file for: a listed image or ``.mat`` file
that is missing; a ``.mat`` without a 2-D integer ``LabelMap``; ``LabelMap``
values above 459 (listing them); a ``LabelMap`` whose size differs from the
image's (naming both files and sizes); an unreadable image. Missing VOC or
annotation files raise ``FileNotFoundError`` with the download instructions.

Why one module of ~500 lines: it is one upstream format, read end to end
(two archives in either form, the 59-class table and the .mat label maps,
the label-list checks); a third of it is this documentation and the class
table, and a reader checking the mapping needs them side by side.
"""

from __future__ import annotations

import io
import os
import re
import textwrap
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from ddep_jax.data import seg_spec
from ddep_jax.data.builders import manual_files

NUM_CLASSES = 59
"""Evaluated classes (ids ``0..58``)."""

NUM_FULL_CLASSES = 459
"""Classes of the full PASCAL-Context list (``LabelMap`` ids ``1..459``)."""

IGNORE_LABEL = seg_spec.IGNORE_LABEL

CLASSES_59: tuple[tuple[int, str], ...] = (
    (2, "aeroplane"), (9, "bag"), (18, "bed"), (19, "bedclothes"),
    (22, "bench"), (23, "bicycle"), (25, "bird"), (31, "boat"), (33, "book"),
    (34, "bottle"), (44, "building"), (45, "bus"), (46, "cabinet"), (59, "car"),
    (65, "cat"), (68, "ceiling"), (72, "chair"), (80, "cloth"),
    (85, "computer"), (98, "cow"), (104, "cup"), (105, "curtain"), (113, "dog"),
    (115, "door"), (144, "fence"), (158, "floor"), (159, "flower"),
    (162, "food"), (187, "grass"), (189, "ground"), (207, "horse"),
    (220, "keyboard"), (232, "light"), (258, "motorbike"), (259, "mountain"),
    (260, "mouse"), (284, "person"), (295, "plate"), (296, "platform"),
    (308, "pottedplant"), (324, "road"), (326, "rock"), (347, "sheep"),
    (349, "shelves"), (354, "sidewalk"), (355, "sign"), (360, "sky"),
    (366, "snow"), (368, "sofa"), (397, "table"), (415, "track"),
    (416, "train"), (420, "tree"), (424, "truck"), (427, "tvmonitor"),
    (440, "wall"), (445, "water"), (454, "window"), (458, "wood"),
)
"""``(full-list id, name)`` of the 59 classes, in class-id order (class ``i``
is ``CLASSES_59[i]``)."""

CLASS_NAMES = tuple(name for _, name in CLASSES_59)
"""The 59 class names in class-id order."""

CLASS_COLORS = manual_files.voc_colormap(NUM_CLASSES + 1)[1:]
"""RGB colour of class ``i``: the PASCAL VOC colour map entry ``i + 1`` (entry
0, black, stays the colour of the ignored background)."""

FULL_TO_59 = np.full(NUM_FULL_CLASSES + 1, IGNORE_LABEL, np.uint8)
FULL_TO_59[[full_id for full_id, _ in CLASSES_59]] = np.arange(NUM_CLASSES)
FULL_TO_59.flags.writeable = False
"""uint8 ``[460]`` lookup table: ``LabelMap`` value ``0..459`` -> class
``0..58`` or 255."""

# Spellings of 59_labels.txt that differ from labels.txt (normalised names).
_59_LABELS_ALIASES = {"diningtable": "table", "bedcloth": "bedclothes",
                      "clothes": "cloth"}

VOC_TAR = "VOCtrainval_03-May-2010.tar"
CONTEXT_TAR = "trainval.tar.gz"
VOC_ROOT = "VOCdevkit/VOC2010"
SPLIT_LISTS: Mapping[str, str] = {
    "train": "ImageSets/Main/train.txt",
    "validation": "ImageSets/Main/val.txt",
}
"""TFDS split -> image-id list, relative to ``VOC2010/``."""

EXPECTED_SPLIT_SIZES: Mapping[str, int] = {"train": 4998, "validation": 5105}
"""Split sizes of the official lists (other sizes build, with a warning)."""

_DESCRIPTION = """\
PASCAL-Context: whole-scene pixel labels for the 10103 PASCAL VOC 2010
train/val images, in the common 59-class setting (the 59 most frequent classes;
all other pixels ignored as 255). Splits: VOC2010 train (4998) / val (5105).
"""

_CITATION = """\
@inproceedings{mottaghi2014role,
  title={The Role of Context for Object Detection and Semantic Segmentation in
         the Wild},
  author={Mottaghi, Roozbeh and Chen, Xianjie and Liu, Xiaobai and Cho,
          Nam-Gyu and Lee, Seong-Whan and Fidler, Sanja and Urtasun, Raquel
          and Yuille, Alan},
  booktitle={IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},
  year={2014}
}
"""


class PascalContext(tfds.core.GeneratorBasedBuilder):
    """PASCAL-Context 59 classes (TFDS name ``pascal_context``)."""

    name = "pascal_context"
    code_path = epath.Path(__file__)  # See camvid.py: avoids importlib_resources.
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {
        "1.0.0": (
            "Initial release: 59 classes (Detail-API id order) + 255, VOC2010 "
            "train 4998 / val 5105, labels mapped at build time."
        ),
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download into `manual_dir`:
    VOCtrainval_03-May-2010.tar  (1.3 GB) from
      http://host.robots.ox.ac.uk/pascal/VOC/voc2010/
    trainval.tar.gz              (PASCAL-Context annotations) from
      https://cs.stanford.edu/~roozbeh/pascal-context/
    optionally labels.txt and 59_labels.txt from the same page (checked
    against the built-in 59-class mapping).
  Both archives are read in place; extracted folders work too:
    manual_dir/VOCdevkit/VOC2010/JPEGImages/<id>.jpg
    manual_dir/VOCdevkit/VOC2010/ImageSets/Main/{train,val}.txt
    manual_dir/trainval/<id>.mat  (or manual_dir/VOCdevkit/VOC2010/trainval/)
  Expected: 4998 train and 5105 val images, each with a .mat file.
  Then run:
    python -m ddep_jax.data.prepare --dataset=pascal_context --manual_dir=<DIR> \\
        --data_dir=<DATA_DIR>
  Details: docs/DATASETS.md.
  """

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(
                        shape=(None, None, 3), encoding_format="jpeg"
                    ),
                    "segmentation_mask": tfds.features.Image(
                        shape=(None, None, 1), encoding_format="png"
                    ),
                    "file_name": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "segmentation_mask"),
            homepage="https://cs.stanford.edu/~roozbeh/pascal-context/",
            citation=_CITATION,
            license=(
                "Annotations: no licence stated on the PASCAL-Context page "
                "(research use); images: PASCAL VOC 2010, Flickr terms of use"
            ),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = Path(dl_manager.manual_dir)
        voc, voc_prefix = find_voc(manual_dir)
        context, context_prefix = find_context(manual_dir, voc)
        check_label_lists(manual_dir, voc, context)
        generators = {}
        for split, list_name in SPLIT_LISTS.items():
            ids = read_split_list(voc, voc_prefix + list_name)
            if len(ids) != EXPECTED_SPLIT_SIZES[split]:
                logging.warning(
                    "PASCAL-Context %s: %d ids in %s, the official list has %d.",
                    split, len(ids), list_name, EXPECTED_SPLIT_SIZES[split],
                )
            # Fail before writing anything if a listed file is missing.
            for image_id in ids:
                for files, name in (
                    (voc, f"{voc_prefix}JPEGImages/{image_id}.jpg"),
                    (context, f"{context_prefix}{image_id}.mat"),
                ):
                    if not files.exists(name):
                        raise ValueError(
                            f"PASCAL-Context {split}: {files.describe(name)} is "
                            f"missing (image id {image_id!r} is listed in "
                            f"{voc.describe(voc_prefix + list_name)})."
                        )
            generators[split] = self._generate_examples(
                voc, voc_prefix, context, context_prefix, ids
            )
        return generators

    def _generate_examples(
        self,
        voc: manual_files.ManualFiles,
        voc_prefix: str,
        context: manual_files.ManualFiles,
        context_prefix: str,
        ids: list[str],
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        mat_names = [f"{context_prefix}{image_id}.mat" for image_id in ids]
        # Archive order: one forward pass through a compressed trainval.tar.gz.
        for mat_name, mat_data in context.iter_read(mat_names):
            image_id = mat_name.rsplit("/", 1)[-1].removesuffix(".mat")
            image_name = f"{voc_prefix}JPEGImages/{image_id}.jpg"
            image_where = voc.describe(image_name)
            image, size = manual_files.rgb_image_bytes(
                voc.read(image_name), "JPEG", image_where
            )
            classes = map_label_map(
                read_label_map(mat_data, context.describe(mat_name)),
                context.describe(mat_name),
            )
            if classes.shape != (size[1], size[0]):
                raise ValueError(
                    f"PASCAL-Context size mismatch: image {image_where} is "
                    f"{size[0]}x{size[1]} (WxH) but LabelMap of "
                    f"{context.describe(mat_name)} is {classes.shape[1]}x"
                    f"{classes.shape[0]}."
                )
            yield image_id, {
                "image": image,
                "segmentation_mask": manual_files.png_bytes(classes),
                "file_name": f"{image_id}.jpg",
            }


def find_voc(manual_dir: Path) -> tuple[manual_files.ManualFiles, str]:
    """Locates PASCAL VOC 2010 in ``manual_dir``.

    Returns:
      ``(files, prefix)`` with ``prefix + 'JPEGImages/<id>.jpg'`` in ``files``:
      the folder ``VOCdevkit/VOC2010/`` or ``VOC2010/`` (or ``manual_dir``
      itself when it holds ``JPEGImages/``), else the tar.

    Raises:
      FileNotFoundError: not found (the message includes the instructions).
    """
    for folder in (manual_dir / VOC_ROOT, manual_dir / "VOC2010", manual_dir):
        if (folder / "JPEGImages").is_dir():
            return manual_files.ManualFiles(folder), ""
    if (manual_dir / VOC_TAR).is_file():
        return manual_files.ManualFiles(manual_dir / VOC_TAR), f"{VOC_ROOT}/"
    raise FileNotFoundError(
        f"PASCAL-Context: found neither {os.fspath(manual_dir / VOC_TAR)!r} nor "
        f"the folder {os.fspath(manual_dir / VOC_ROOT)!r} with JPEGImages/.\n"
        + textwrap.dedent(PascalContext.MANUAL_DOWNLOAD_INSTRUCTIONS)
    )


def find_context(
    manual_dir: Path, voc: manual_files.ManualFiles
) -> tuple[manual_files.ManualFiles, str]:
    """Locates the ``.mat`` annotations.

    Returns:
      ``(files, prefix)`` with ``prefix + '<id>.mat'`` in ``files``: a
      ``trainval/`` folder in ``manual_dir`` or in the VOC2010 folder, else
      ``trainval.tar.gz``.

    Raises:
      FileNotFoundError: not found (the message includes the instructions).
    """
    if (manual_dir / "trainval").is_dir():
        return manual_files.ManualFiles(manual_dir / "trainval"), ""
    if voc.kind == "folder" and (voc.location / "trainval").is_dir():
        return manual_files.ManualFiles(voc.location / "trainval"), ""
    if (manual_dir / CONTEXT_TAR).is_file():
        return manual_files.ManualFiles(manual_dir / CONTEXT_TAR), "trainval/"
    raise FileNotFoundError(
        f"PASCAL-Context: found neither {os.fspath(manual_dir / CONTEXT_TAR)!r} "
        f"nor a trainval/ folder of .mat files in {os.fspath(manual_dir)!r}.\n"
        + textwrap.dedent(PascalContext.MANUAL_DOWNLOAD_INSTRUCTIONS)
    )


def read_split_list(voc: manual_files.ManualFiles, name: str) -> list[str]:
    """Image ids of a VOC ``ImageSets`` list (one id per line).

    Raises:
      FileNotFoundError: the list is missing.
      ValueError: the list is empty.
    """
    if not voc.exists(name):
        raise FileNotFoundError(
            f"PASCAL-Context split list {voc.describe(name)} is missing; it is part "
            f"of {VOC_TAR}.\n"
            + textwrap.dedent(PascalContext.MANUAL_DOWNLOAD_INSTRUCTIONS)
        )
    ids = [line.split()[0] for line in voc.read(name).decode().splitlines()
           if line.strip()]
    if not ids:
        raise ValueError(f"PASCAL-Context split list {voc.describe(name)} is empty.")
    return ids


def read_label_map(data: bytes, where: str) -> np.ndarray:
    """The ``LabelMap`` of a PASCAL-Context ``.mat`` file.

    Args:
      data: the ``.mat`` file (MATLAB v5, as read by ``scipy.io.loadmat``).
      where: file description used in error messages.

    Returns:
      Integer ``[H, W]`` array of full-list ids (uint16 upstream).

    Raises:
      ValueError: unreadable file, no ``LabelMap``, or not a 2-D integer array.
    """
    try:
        mat = scipy.io.loadmat(io.BytesIO(data), variable_names=["LabelMap"])
    except (ValueError, TypeError, OSError, NotImplementedError) as e:
        raise ValueError(f"Cannot read PASCAL-Context annotation {where}: {e}") from e
    label_map = mat.get("LabelMap")
    if label_map is None:
        raise ValueError(f"PASCAL-Context annotation {where} has no LabelMap variable.")
    label_map = np.asarray(label_map)
    if label_map.ndim != 2 or not np.issubdtype(label_map.dtype, np.integer):
        raise ValueError(
            f"PASCAL-Context LabelMap of {where} has dtype {label_map.dtype} and "
            f"shape {label_map.shape}; expected a 2-D integer array."
        )
    return label_map


def map_label_map(label_map: np.ndarray, where: str) -> np.ndarray:
    """Full-list ids ``0..459`` -> uint8 59-class ids ``0..58`` / 255.

    Raises:
      ValueError: values outside ``0..459``, naming ``where`` and the values.
    """
    bad = np.unique(label_map[(label_map < 0) | (label_map > NUM_FULL_CLASSES)])
    if bad.size:
        raise ValueError(
            f"PASCAL-Context LabelMap of {where} has values {bad.tolist()} outside "
            f"0..{NUM_FULL_CLASSES} (0 = unlabelled, 1..{NUM_FULL_CLASSES} = "
            "labels.txt ids)."
        )
    return FULL_TO_59[label_map]


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _parse_label_list(text: str, where: str) -> dict[int, str]:
    """``"<id>: <name>"`` lines -> ``{id: name}``."""
    out = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        number, sep, name = line.partition(":")
        if not sep or not number.strip().isdigit():
            raise ValueError(f"Unexpected line {line!r} in {where}; expected "
                             "'<id>: <name>'.")
        out[int(number)] = name.strip()
    return out


def check_label_lists(
    manual_dir: Path, voc: manual_files.ManualFiles, context: manual_files.ManualFiles
) -> None:
    """Checks optional ``labels.txt`` / ``59_labels.txt`` against `CLASSES_59`.

    Looks in ``manual_dir``, the VOC2010 and ``trainval/`` folders, and
    anywhere in the annotation archive.

    Raises:
      ValueError: a ``labels.txt`` whose name at one of the 59 ids differs
        from `CLASSES_59` (after lower-casing and dropping non-alphanumerics),
        naming the file and the differences. A ``59_labels.txt`` whose names
        differ only logs a warning (it does not define ids).
    """
    list_names = ("labels.txt", "59_labels.txt")
    candidates: list[tuple[manual_files.ManualFiles, str]] = []
    for files in (manual_files.ManualFiles(manual_dir), voc, context):
        if files.kind == "folder":
            candidates += [(files, n) for n in list_names if files.exists(n)]
        elif files is context:  # Small archive: look for the lists anywhere.
            candidates += [(files, n) for n in files.names()
                           if n.rsplit("/", 1)[-1] in list_names]
    seen = set()
    for files, name in candidates:
        where = files.describe(name)
        if where in seen:
            continue
        seen.add(where)
        entries = _parse_label_list(files.read(name).decode("utf-8", "replace"), where)
        if name.rsplit("/", 1)[-1] == "labels.txt":
            wrong = [
                f"{full_id}: {entries.get(full_id)!r} (expected {expected!r})"
                for full_id, expected in CLASSES_59
                if _normalise(entries.get(full_id, "")) != _normalise(expected)
            ]
            if wrong:
                raise ValueError(
                    f"PASCAL-Context {where} does not match the built-in 59-class "
                    f"mapping at {len(wrong)} id(s): {'; '.join(wrong[:5])}. Is it "
                    "the 459-class labels.txt of the PASCAL-Context release?"
                )
        else:
            names = {_59_LABELS_ALIASES.get(_normalise(n), _normalise(n))
                     for n in entries.values()}
            expected = {_normalise(n) for n in CLASS_NAMES}
            if names != expected:
                logging.warning(
                    "PASCAL-Context %s names differ from the built-in 59 classes: "
                    "extra %s, missing %s.", where, sorted(names - expected),
                    sorted(expected - names),
                )


def _spec() -> seg_spec.SegDatasetSpec:
    return seg_spec.SegDatasetSpec(
        name="pascal_context",
        tfds_name=PascalContext.name,
        num_classes=NUM_CLASSES,
        class_names=CLASS_NAMES,
        class_colors=CLASS_COLORS,
        image_key="image",
        label_key="segmentation_mask",
        splits={"train": "train", "validation": "validation", "test": "validation"},
        label_lut=None,
        crop_size=512,
        eval_mode="multiscale",
        id_key="file_name",
    )


seg_spec.register("pascal_context", _spec)
