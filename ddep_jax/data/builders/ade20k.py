"""ADE20K / SceneParse150 (ADEChallengeData2016) as a TensorFlow-free TFDS builder.

Registered TFDS name: ``ade20k``. Registered segmentation spec
(`ddep_jax.data.seg_datasets.get_spec`): ``ade20k``.

Why not TFDS's own ``scene_parse150``
-------------------------------------
TFDS 4.9.10's ``scene_parse150`` has no manual mode: it downloads
``ChallengeData2017/images.tar`` and ``annotations_instance.tar`` from MIT
(its ``_split_generators`` calls ``download_and_extract``) and lists files
with ``tf.io.gfile``, so it needs TensorFlow and network access. It also
reads the 2017 *instance* annotations rather than the 150-class semantic maps
of ``ADEChallengeData2016``, and names the validation images ``test``. So this
builder reads the standard semantic-segmentation release instead, with the
same feature keys and encodings as ``scene_parse150`` (``image`` JPEG,
``annotation`` PNG ``[H, W, 1]``) plus ``file_name``.

Upstream format
---------------
``ADEChallengeData2016.zip`` (923 MB) from the MIT Scene Parsing Benchmark,
http://sceneparsing.csail.mit.edu/ (direct link:
http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip)::

    ADEChallengeData2016/images/training/ADE_train_%08d.jpg        20210 JPEGs
    ADEChallengeData2016/images/validation/ADE_val_%08d.jpg          2000 JPEGs
    ADEChallengeData2016/annotations/training/ADE_train_%08d.png   8-bit PNGs
    ADEChallengeData2016/annotations/validation/ADE_val_%08d.png
    ADEChallengeData2016/objectInfo150.txt, sceneCategories.txt    (not used)

Annotation values: ``0`` = other/unlabelled, ``1..150`` = the classes of
``objectInfo150.txt`` in order (`CLASS_NAMES`). Images vary in size (the
shorter side is mostly 512 or less); a few are greyscale JPEGs.

``manual_dir`` holds the zip (read in place, nothing extracted), or the
extracted ``ADEChallengeData2016/`` folder, or is that folder itself.

Generated examples
------------------
Splits ``train`` (20210, from ``training/``) and ``validation`` (2000, from
``validation/``). Each example, as decoded by ``tfds.data_source``:

* ``image``: ``uint8 [H, W, 3]`` RGB (stored as JPEG; RGB JPEGs byte for byte,
  greyscale/CMYK ones converted to RGB and re-encoded at quality 95).
* ``annotation``: ``uint8 [H, W, 1]``, raw values ``0..150`` (stored as PNG).
  The ``ade20k`` spec maps them when reading: ``0 -> 255`` (ignored),
  ``v -> v - 1`` for ``1..150`` (`RAW_TO_CLASS`).
* ``file_name``: ``bytes`` (TFDS Text), e.g. ``b'ADE_train_00000001.jpg'``.

Example keys are the file stems.

Checks during generation (PIL only)
-----------------------------------
``ValueError`` naming the offending file(s) for: an image without annotation
or vice versa; image and annotation sizes that differ; an annotation that is
not single-channel 8-bit or has values above 150; an unreadable image. A
missing zip/folder raises ``FileNotFoundError`` with the download
instructions.
"""

from __future__ import annotations

import os
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

NUM_CLASSES = 150
"""Evaluated classes (ids ``0..149`` after mapping)."""

IGNORE_LABEL = seg_spec.IGNORE_LABEL

CLASS_NAMES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed",
    "windowpane", "grass", "cabinet", "sidewalk", "person", "earth", "door",
    "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill",
    "bench", "countertop", "stove", "palm", "kitchen island", "computer",
    "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel",
    "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver", "airplane", "dirt track", "apparel", "pole", "land",
    "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage",
    "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name",
    "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board",
    "shower", "radiator", "glass", "clock", "flag",
)
"""The 150 SceneParse classes, ``objectInfo150.txt`` order (first name of each
entry); class ``i`` is stored as raw value ``i + 1``."""

CLASS_COLORS = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3),
    (120, 120, 80), (140, 140, 140), (204, 5, 255), (230, 230, 230),
    (4, 250, 7), (224, 5, 255), (235, 255, 7), (150, 5, 61), (120, 120, 70),
    (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4), (255, 51, 7),
    (204, 70, 3), (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255),
    (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92),
    (112, 9, 255), (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71),
    (255, 41, 10), (7, 255, 255), (224, 255, 8), (102, 8, 255), (255, 61, 6),
    (255, 194, 7), (255, 122, 8), (0, 255, 20), (255, 8, 41), (255, 5, 153),
    (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255),
    (140, 140, 140), (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0),
    (255, 224, 0), (153, 255, 0), (0, 0, 255), (255, 71, 0), (0, 235, 255),
    (0, 173, 255), (31, 0, 255), (11, 200, 200), (255, 82, 0), (0, 255, 245),
    (0, 61, 255), (0, 255, 112), (0, 255, 133), (255, 0, 0), (255, 163, 0),
    (255, 102, 0), (194, 255, 0), (0, 143, 255), (51, 255, 0), (0, 82, 255),
    (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153),
    (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0),
    (255, 0, 20), (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255),
    (255, 0, 204), (0, 255, 194), (0, 255, 82), (0, 10, 255), (0, 112, 255),
    (51, 0, 255), (0, 194, 255), (0, 122, 255), (0, 255, 163), (255, 153, 0),
    (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255), (163, 255, 0),
    (255, 235, 0), (8, 184, 170), (133, 0, 255), (0, 255, 92), (184, 0, 255),
    (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112), (92, 255, 0),
    (0, 224, 255), (112, 224, 255), (70, 184, 160), (163, 0, 255),
    (153, 0, 255), (71, 255, 0), (255, 0, 163), (255, 204, 0), (255, 0, 143),
    (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255), (255, 0, 122),
    (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255),
    (255, 255, 0), (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255),
    (41, 255, 0), (173, 0, 255), (0, 245, 255), (71, 0, 255), (122, 0, 255),
    (0, 255, 184), (0, 92, 255), (184, 255, 0), (0, 133, 255), (255, 214, 0),
    (25, 194, 194), (102, 255, 0), (92, 0, 255),
)
"""The standard ADE20K palette (as in mmsegmentation's ``ADE20KDataset``), in
class order. As upstream, ``road`` and ``skyscraper`` share (140, 140, 140)."""

RAW_TO_CLASS = np.concatenate(
    [[IGNORE_LABEL], np.arange(NUM_CLASSES)]
).astype(np.uint8)
RAW_TO_CLASS.flags.writeable = False
"""uint8 ``[151]`` lookup table: raw value -> class id (``0 -> 255``,
``v -> v - 1``)."""

ROOT = "ADEChallengeData2016"
ZIP_NAME = "ADEChallengeData2016.zip"
SPLIT_DIRS: Mapping[str, str] = {"train": "training", "validation": "validation"}
"""TFDS split -> upstream folder under ``images/`` and ``annotations/``."""

EXPECTED_SPLIT_SIZES: Mapping[str, int] = {"train": 20210, "validation": 2000}
"""Split sizes of the official release (other sizes build, with a warning)."""

_DESCRIPTION = """\
ADE20K scene parsing (SceneParse150, ADEChallengeData2016): 20210 train and
2000 validation images with dense labels for 150 stuff and object classes.
Annotations hold raw values 0 (other, ignored) and 1..150.
"""

_CITATION = """\
@inproceedings{zhou2017scene,
  title={Scene Parsing through ADE20K Dataset},
  author={Zhou, Bolei and Zhao, Hang and Puig, Xavier and Fidler, Sanja and
          Barriuso, Adela and Torralba, Antonio},
  booktitle={Proceedings of the IEEE Conference on Computer Vision and Pattern
             Recognition},
  year={2017}
}
"""


class Ade20k(tfds.core.GeneratorBasedBuilder):
    """ADE20K SceneParse150 (TFDS name ``ade20k``)."""

    name = "ade20k"
    code_path = epath.Path(__file__)  # See camvid.py: avoids importlib_resources.
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {
        "1.0.0": (
            "Initial release: ADEChallengeData2016, train 20210 / validation "
            "2000, raw annotation values 0..150."
        ),
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download ADEChallengeData2016.zip (923 MB) of the MIT Scene Parsing Benchmark
  (http://sceneparsing.csail.mit.edu/):
    wget http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip
  Put the zip in `manual_dir` (it is read in place), or its extracted folder:
    manual_dir/ADEChallengeData2016/images/{training,validation}/ADE_*.jpg
    manual_dir/ADEChallengeData2016/annotations/{training,validation}/ADE_*.png
  (manual_dir may also be the ADEChallengeData2016 folder itself).
  Expected: 20210 training and 2000 validation image/annotation pairs.
  Then run:
    python -m ddep_jax.data.prepare --dataset=ade20k --manual_dir=<DIR> \\
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
                    "annotation": tfds.features.Image(
                        shape=(None, None, 1), encoding_format="png"
                    ),
                    "file_name": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "annotation"),
            homepage="http://sceneparsing.csail.mit.edu/",
            citation=_CITATION,
            license=(
                "BSD 3-Clause (MIT Scene Parsing Benchmark release); see also the "
                "ADE20K terms of use at https://groups.csail.mit.edu/vision/"
                "datasets/ADE20K/"
            ),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        files, prefix = find_source(Path(dl_manager.manual_dir))
        logging.info("ADE20K: reading %s (prefix %r).", files, prefix)
        generators = {}
        for split, folder in SPLIT_DIRS.items():
            pairs = list_pairs(files, prefix, folder)  # Fails early on bad pairing.
            if len(pairs) != EXPECTED_SPLIT_SIZES[split]:
                logging.warning(
                    "ADE20K %s: %d image/annotation pairs in %s/, the official "
                    "release has %d.", split, len(pairs), folder,
                    EXPECTED_SPLIT_SIZES[split],
                )
            generators[split] = self._generate_examples(files, pairs)
        return generators

    def _generate_examples(
        self, files: manual_files.ManualFiles, pairs: list[tuple[str, str, str]]
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        for stem, image_name, label_name in pairs:
            image, annotation = load_pair(files, image_name, label_name)
            yield stem, {
                "image": image,
                "annotation": annotation,
                "file_name": image_name.rsplit("/", 1)[-1],
            }


def find_source(manual_dir: Path) -> tuple[manual_files.ManualFiles, str]:
    """Locates ADEChallengeData2016 in ``manual_dir``.

    Returns:
      ``(files, prefix)`` such that ``prefix + 'images/training/...'`` are
      paths in ``files``: the extracted folder (``manual_dir/
      ADEChallengeData2016/`` or ``manual_dir`` itself) or the zip.

    Raises:
      FileNotFoundError: none of them found (the message includes the download
        instructions).
    """
    if (manual_dir / ROOT / "images").is_dir():
        return manual_files.ManualFiles(manual_dir), f"{ROOT}/"
    if (manual_dir / "images").is_dir() and (manual_dir / "annotations").is_dir():
        return manual_files.ManualFiles(manual_dir), ""
    if (manual_dir / ZIP_NAME).is_file():
        files = manual_files.ManualFiles(manual_dir / ZIP_NAME)
        return files, f"{ROOT}/" if files.is_dir(f"{ROOT}/images") else ""
    raise FileNotFoundError(
        f"ADE20K: found neither {os.fspath(manual_dir / ZIP_NAME)!r} nor the "
        f"folder {os.fspath(manual_dir / ROOT)!r} (with images/ and "
        "annotations/).\n"
        + textwrap.dedent(Ade20k.MANUAL_DOWNLOAD_INSTRUCTIONS)
    )


def list_pairs(
    files: manual_files.ManualFiles, prefix: str, folder: str
) -> list[tuple[str, str, str]]:
    """Pairs the images and annotations of one split folder by file stem.

    Args:
      files, prefix: as returned by `find_source`.
      folder: ``'training'`` or ``'validation'``.

    Returns:
      ``[(stem, image_path, annotation_path), ...]`` sorted by stem.

    Raises:
      ValueError: an image without annotation or vice versa (naming the file
        and the expected partner), or no images in the folder.
    """
    image_dir = f"{prefix}images/{folder}"
    label_dir = f"{prefix}annotations/{folder}"

    def by_stem(directory: str, suffixes: tuple[str, ...]) -> dict[str, str]:
        out = {}
        for name in files.list(directory):
            base = name.rsplit("/", 1)[-1]
            stem, dot, ext = base.rpartition(".")
            if dot and f".{ext.lower()}" in suffixes:
                out[stem] = name
        return out

    images = by_stem(image_dir, (".jpg", ".jpeg"))
    labels = by_stem(label_dir, (".png",))
    if not images:
        raise ValueError(f"No ADE20K images (*.jpg) under {files.describe(image_dir)}.")
    if no_label := sorted(images.keys() - labels.keys()):
        raise ValueError(
            f"ADE20K image {files.describe(images[no_label[0]])} has no annotation "
            f"(expected {files.describe(f'{label_dir}/{no_label[0]}.png')}); "
            f"{len(no_label)} image(s) lack an annotation."
        )
    if no_image := sorted(labels.keys() - images.keys()):
        raise ValueError(
            f"ADE20K annotation {files.describe(labels[no_image[0]])} has no image "
            f"(expected {files.describe(f'{image_dir}/{no_image[0]}.jpg')}); "
            f"{len(no_image)} annotation(s) lack an image."
        )
    return [(stem, images[stem], labels[stem]) for stem in sorted(images)]


def load_pair(
    files: manual_files.ManualFiles, image_name: str, label_name: str
) -> tuple[bytes, bytes]:
    """Validates one pair; returns (RGB JPEG bytes, 8-bit annotation PNG bytes).

    Raises:
      ValueError: unreadable image, size mismatch (naming both files and both
        sizes as WxH), multi-channel annotation, or values above 150 (naming
        the file and the values).
    """
    image_where = files.describe(image_name)
    label_where = files.describe(label_name)
    image, size = manual_files.rgb_image_bytes(files.read(image_name), "JPEG",
                                               image_where)
    values, annotation = manual_files.label_image(files.read(label_name),
                                                  label_where)
    if values.shape != (size[1], size[0]):
        raise ValueError(
            f"ADE20K size mismatch: image {image_where} is {size[0]}x{size[1]} "
            f"(WxH) but annotation {label_where} is {values.shape[1]}x"
            f"{values.shape[0]}."
        )
    if (bad := np.unique(values[values > NUM_CLASSES])).size:
        raise ValueError(
            f"ADE20K annotation {label_where} has values {bad.tolist()} above "
            f"{NUM_CLASSES}; valid are 0 (other) and 1..{NUM_CLASSES}."
        )
    return image, annotation


def _spec() -> seg_spec.SegDatasetSpec:
    return seg_spec.SegDatasetSpec(
        name="ade20k",
        tfds_name=Ade20k.name,
        num_classes=NUM_CLASSES,
        class_names=CLASS_NAMES,
        class_colors=CLASS_COLORS,
        image_key="image",
        label_key="annotation",
        splits={"train": "train", "validation": "validation", "test": "validation"},
        label_lut=tuple(int(v) for v in RAW_TO_CLASS),
        crop_size=512,
        eval_mode="multiscale",
        id_key="file_name",
    )


seg_spec.register("ade20k", _spec)
