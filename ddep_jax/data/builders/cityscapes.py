"""Cityscapes (fine annotations, 19 train classes) as a TensorFlow-free TFDS builder.

Registered TFDS name: ``cityscapes_seg``. Registered segmentation spec
(`ddep_jax.data.seg_datasets.get_spec`): ``cityscapes``.

Why not TFDS's own ``cityscapes/semantic_segmentation``
-------------------------------------------------------
TFDS 4.9.10 ships that builder, but it cannot build without TensorFlow: it
lists and checks the manual files with ``tf.io.gfile`` (``ModuleNotFoundError:
No module named 'tensorflow'`` in ``_split_generators``), its ``code_path``
needs the optional ``importlib_resources`` package, and its features have the
fixed shape ``(1024, 2048, ...)``. This builder produces **the same feature
keys and encodings** (``image_id``, ``image_left`` PNG, ``segmentation_label``
PNG ``[H, W, 1]`` of raw label ids), so the ``cityscapes`` spec also reads a
``cityscapes/semantic_segmentation`` dataset built with TensorFlow elsewhere
(use ``tfds_name='cityscapes/semantic_segmentation'``), except that the image
shape is ``(None, None, ...)`` (real data is 1024x2048) and there is no
``test`` split (its labels are not public).

Upstream format
---------------
From https://www.cityscapes-dataset.com/downloads/ (registration required),
package ids 3 and 1:

* ``leftImg8bit_trainvaltest.zip`` (11 GB)::

      leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png

  8-bit RGB PNGs of 2048x1024 pixels.
* ``gtFine_trainvaltest.zip`` (241 MB)::

      gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

  8-bit greyscale PNGs holding the 34 Cityscapes label ids ``0..33`` of
  cityscapesScripts ``labels.py`` (next to ``_color.png``,
  ``_instanceIds.png`` and ``_polygons.json``, which are not used). The
  ``license plate`` label has id ``-1`` and is never drawn into these images
  (its pixels keep the label of the object below, e.g. car), so valid files
  hold values ``0..33`` only.

``manual_dir`` holds the two zips (read in place, nothing extracted) or the
folders ``leftImg8bit/`` and ``gtFine/`` they extract to (each of the two may
be either).

Generated examples
------------------
Splits ``train`` (2975 images, from ``train/``) and ``validation`` (500, from
``val/``); ``test/`` is ignored. Each example, as decoded by
``tfds.data_source`` (NumPy, no TensorFlow):

* ``image_id``: ``bytes`` (TFDS Text), e.g. ``b'aachen_000000_000019'``; also
  the example key.
* ``image_left``: ``uint8 [H, W, 3]`` RGB (stored as PNG; 1024x2048 for the
  real data).
* ``segmentation_label``: ``uint8 [H, W, 1]``, raw label ids ``0..33``
  (stored as PNG). Map them to the 19 train ids with `LABEL_ID_TO_TRAIN_ID`
  (done by the ``cityscapes`` spec's ``label_lut`` when reading).

Checks during generation (PIL only)
-----------------------------------
``ValueError`` naming the offending file(s) for: an image without its label or
a label without its image; image and label sizes that differ; a label that is
not single-channel 8-bit; label values outside ``0..33``; an unreadable
image. A missing zip/folder raises ``FileNotFoundError`` with the download
instructions. Image pixels are not decoded when the PNG already is RGB.
"""

from __future__ import annotations

import os
import re
import textwrap
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from ddep_jax.data import seg_spec
from ddep_jax.data.builders import manual_files

NUM_CLASSES = 19
"""Evaluated classes (train ids ``0..18``)."""

NUM_LABEL_IDS = 34
"""Raw label ids ``0..33`` stored in ``*_gtFine_labelIds.png``."""

IGNORE_LABEL = seg_spec.IGNORE_LABEL

CLASS_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
    "truck", "bus", "train", "motorcycle", "bicycle",
)
"""The 19 evaluated classes in train-id order."""

CLASS_COLORS = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156),
    (190, 153, 153), (153, 153, 153), (250, 170, 30), (220, 220, 0),
    (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100),
    (0, 0, 230), (119, 11, 32),
)
"""Standard Cityscapes colours (cityscapesScripts ``labels.py``), train-id order."""

TRAIN_ID_OF_LABEL_ID: Mapping[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
"""Label id -> train id for the 19 evaluated classes (``labels.py``); every
other label id (void, flat/parking, rail track, guard rail, bridge, tunnel,
polegroup, caravan, trailer, ...) is ignored."""

LABEL_ID_TO_TRAIN_ID = np.full(NUM_LABEL_IDS, IGNORE_LABEL, np.uint8)
LABEL_ID_TO_TRAIN_ID[list(TRAIN_ID_OF_LABEL_ID)] = list(TRAIN_ID_OF_LABEL_ID.values())
LABEL_ID_TO_TRAIN_ID.flags.writeable = False
"""uint8 ``[34]`` lookup table: raw label id -> train id ``0..18`` or 255."""

SPLIT_DIRS: Mapping[str, str] = {"train": "train", "validation": "val"}
"""TFDS split -> upstream split folder (``test`` has no public labels)."""

EXPECTED_SPLIT_SIZES: Mapping[str, int] = {"train": 2975, "validation": 500}
"""Split sizes of the official release (other sizes build, with a warning)."""

IMAGES_ZIP = "leftImg8bit_trainvaltest.zip"
LABELS_ZIP = "gtFine_trainvaltest.zip"
_IMAGE_SUFFIX = "_leftImg8bit.png"
_LABEL_SUFFIX = "_gtFine_labelIds.png"
_IMAGE_RE = re.compile(r"^leftImg8bit/[^/]+/([^/]+)/(\1_[^/]+)_leftImg8bit\.png$")

_DESCRIPTION = """\
Cityscapes street scenes from 50 cities, fine pixel annotations: 2975 train and
500 validation images of 2048x1024 pixels. Labels are the raw Cityscapes label
ids 0..33; the 19 evaluated classes (road ... bicycle) are obtained with the
standard labelId -> trainId mapping, all other ids are ignored (255).
"""

_CITATION = """\
@inproceedings{Cordts2016Cityscapes,
  title={The Cityscapes Dataset for Semantic Urban Scene Understanding},
  author={Cordts, Marius and Omran, Mohamed and Ramos, Sebastian and Rehfeld,
          Timo and Enzweiler, Markus and Benenson, Rodrigo and Franke, Uwe and
          Roth, Stefan and Schiele, Bernt},
  booktitle={Proc. of the IEEE Conference on Computer Vision and Pattern
             Recognition (CVPR)},
  year={2016}
}
"""


class CityscapesSeg(tfds.core.GeneratorBasedBuilder):
    """Cityscapes fine semantic segmentation (TFDS name ``cityscapes_seg``)."""

    name = "cityscapes_seg"
    code_path = epath.Path(__file__)  # See camvid.py: avoids importlib_resources.
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {
        "1.0.0": (
            "Initial release: gtFine train (2975) / validation (500), raw label "
            "ids 0..33, features as TFDS cityscapes/semantic_segmentation."
        ),
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Register at https://www.cityscapes-dataset.com/register/ and download from
  https://www.cityscapes-dataset.com/downloads/ :
    leftImg8bit_trainvaltest.zip   (11 GB, package id 3)
    gtFine_trainvaltest.zip        (241 MB, package id 1)
  Put both zips in `manual_dir` (they are read in place), or their extracted
  folders:
    manual_dir/leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    manual_dir/gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png
  Expected: 2975 train and 500 val image/label pairs (test/ is not used).
  Then run:
    python -m ddep_jax.data.prepare --dataset=cityscapes_seg --manual_dir=<DIR> \\
        --data_dir=<DATA_DIR>
  Details: docs/DATASETS.md.
  """

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "image_id": tfds.features.Text(),
                    "image_left": tfds.features.Image(
                        shape=(None, None, 3), encoding_format="png"
                    ),
                    "segmentation_label": tfds.features.Image(
                        shape=(None, None, 1), encoding_format="png",
                        use_colormap=True,
                    ),
                }
            ),
            supervised_keys=("image_left", "segmentation_label"),
            homepage="https://www.cityscapes-dataset.com",
            citation=_CITATION,
            license=(
                "Cityscapes licence: non-commercial purposes only (research, "
                "teaching, publications, personal experimentation); no "
                "redistribution (https://www.cityscapes-dataset.com/license/)"
            ),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        images, labels = find_sources(Path(dl_manager.manual_dir))
        logging.info("Cityscapes: images from %s, labels from %s.", images, labels)
        generators = {}
        for split, folder in SPLIT_DIRS.items():
            pairs = list_pairs(images, labels, folder)  # Fails early on bad pairing.
            if len(pairs) != EXPECTED_SPLIT_SIZES[split]:
                logging.warning(
                    "Cityscapes %s: %d image/label pairs in %s/, the official "
                    "release has %d.", split, len(pairs), folder,
                    EXPECTED_SPLIT_SIZES[split],
                )
            generators[split] = self._generate_examples(images, labels, pairs)
        return generators

    def _generate_examples(
        self,
        images: manual_files.ManualFiles,
        labels: manual_files.ManualFiles,
        pairs: list[tuple[str, str, str]],
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        for image_id, image_name, label_name in pairs:
            image, label = load_pair(images, image_name, labels, label_name)
            yield image_id, {
                "image_id": image_id,
                "image_left": image,
                "segmentation_label": label,
            }


def find_sources(
    manual_dir: Path,
) -> tuple[manual_files.ManualFiles, manual_files.ManualFiles]:
    """Locates the images and the labels in ``manual_dir``.

    Returns:
      ``(images, labels)``: `ManualFiles` over which the relative paths
      ``leftImg8bit/...`` and ``gtFine/...`` resolve; each is ``manual_dir``
      itself (extracted folder present) or the zip.

    Raises:
      FileNotFoundError: neither the folder nor the zip of one part exists
        (the message includes the download instructions).
    """
    found = []
    for folder, zip_name in (("leftImg8bit", IMAGES_ZIP), ("gtFine", LABELS_ZIP)):
        if (manual_dir / folder).is_dir():
            found.append(manual_files.ManualFiles(manual_dir))
        elif (manual_dir / zip_name).is_file():
            found.append(manual_files.ManualFiles(manual_dir / zip_name))
        else:
            raise FileNotFoundError(
                f"Cityscapes: neither {os.fspath(manual_dir / zip_name)!r} nor the "
                f"folder {os.fspath(manual_dir / folder)!r} exists.\n"
                + textwrap.dedent(CityscapesSeg.MANUAL_DOWNLOAD_INSTRUCTIONS)
            )
    return found[0], found[1]


def list_pairs(
    images: manual_files.ManualFiles, labels: manual_files.ManualFiles, folder: str
) -> list[tuple[str, str, str]]:
    """Pairs the images and labels of one upstream split folder.

    Args:
      images: source of ``leftImg8bit/...`` (see `find_sources`).
      labels: source of ``gtFine/...``.
      folder: ``'train'`` or ``'val'``.

    Returns:
      ``[(image_id, image_path, label_path), ...]`` sorted by image id, with
      paths relative to their source.

    Raises:
      ValueError: an image without its ``_gtFine_labelIds.png`` or a label
        without its image (naming the file and the expected partner), or no
        images in the folder.
    """
    image_paths = {}
    for name in images.list(f"leftImg8bit/{folder}"):
        if name.endswith(_IMAGE_SUFFIX):
            if not (match := _IMAGE_RE.match(name)):
                raise ValueError(
                    f"Unexpected Cityscapes image path {images.describe(name)}; "
                    f"expected leftImg8bit/{folder}/<city>/<city>_<seq>_<frame>"
                    f"{_IMAGE_SUFFIX}."
                )
            image_paths[match.group(2)] = name
    if not image_paths:
        raise ValueError(
            f"No Cityscapes images (*{_IMAGE_SUFFIX}) under leftImg8bit/{folder}/ "
            f"in {images.location}."
        )
    label_paths = {
        name.rsplit("/", 1)[-1].removesuffix(_LABEL_SUFFIX): name
        for name in labels.list(f"gtFine/{folder}")
        if name.endswith(_LABEL_SUFFIX)
    }
    pairs = []
    for image_id in sorted(image_paths):
        image_name = image_paths[image_id]
        city = image_name.split("/")[2]
        expected = f"gtFine/{folder}/{city}/{image_id}{_LABEL_SUFFIX}"
        if label_paths.get(image_id) != expected:
            raise ValueError(
                f"Cityscapes image {images.describe(image_name)} has no label: "
                f"expected {labels.describe(expected)}."
            )
        pairs.append((image_id, image_name, expected))
    if extra := sorted(label_paths.keys() - image_paths.keys()):
        name = label_paths[extra[0]]
        raise ValueError(
            f"Cityscapes label {labels.describe(name)} has no image (expected "
            f"leftImg8bit/{folder}/{name.split('/')[2]}/{extra[0]}{_IMAGE_SUFFIX} "
            f"in {images.location}); {len(extra)} label(s) lack an image."
        )
    return pairs


def load_pair(
    images: manual_files.ManualFiles,
    image_name: str,
    labels: manual_files.ManualFiles,
    label_name: str,
) -> tuple[bytes, bytes]:
    """Validates one image/label pair; returns (RGB PNG bytes, 8-bit PNG bytes).

    Raises:
      ValueError: unreadable image, size mismatch (naming both files and
        sizes as WxH), multi-channel label, or label values outside ``0..33``
        (naming the file and the values).
    """
    image_where = images.describe(image_name)
    label_where = labels.describe(label_name)
    image, image_size = manual_files.rgb_image_bytes(
        images.read(image_name), "PNG", image_where
    )
    values, label = manual_files.label_image(labels.read(label_name), label_where)
    if values.shape != (image_size[1], image_size[0]):
        raise ValueError(
            f"Cityscapes size mismatch: image {image_where} is {image_size[0]}x"
            f"{image_size[1]} (WxH) but label {label_where} is {values.shape[1]}x"
            f"{values.shape[0]}."
        )
    if (bad := np.unique(values[values >= NUM_LABEL_IDS])).size:
        raise ValueError(
            f"Cityscapes label {label_where} has values {bad.tolist()} outside the "
            f"label ids 0..{NUM_LABEL_IDS - 1}; expected a *{_LABEL_SUFFIX} file "
            "(not trainIds or colour labels)."
        )
    return image, label


def _spec() -> seg_spec.SegDatasetSpec:
    return seg_spec.SegDatasetSpec(
        name="cityscapes",
        tfds_name=CityscapesSeg.name,
        num_classes=NUM_CLASSES,
        class_names=CLASS_NAMES,
        class_colors=CLASS_COLORS,
        image_key="image_left",
        label_key="segmentation_label",
        splits={"train": "train", "validation": "validation", "test": "validation"},
        label_lut=tuple(int(v) for v in LABEL_ID_TO_TRAIN_ID),
        crop_size=1024,
        eval_mode="cityscapes",
        id_key="image_id",
    )


seg_spec.register("cityscapes", _spec)
