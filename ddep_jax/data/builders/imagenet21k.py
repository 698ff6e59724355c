"""ImageNet-21k (winter 2021 release) as a TensorFlow-free TFDS builder.

Registered TFDS name: ``imagenet21k`` (TFDS 4.9.x ships no builder of that
name; importing this module registers it).

Upstream format
---------------
``winter21_whole.tar.gz`` from https://image-net.org (account and accepted
terms of access required): one outer tar holding one ``nXXXXXXXX.tar`` per
WordNet synset (19167 synsets, about 13.15 M images, roughly 1.2 TB), each
holding that synset's images as ``nXXXXXXXX_<id>.JPEG``. A few files are not
what their name says (CMYK or greyscale JPEGs, PNGs named ``.JPEG``); a few
are partially corrupt. There is no official validation split.

The manual directory may hold either form (the extracted form is preferred:
listing it is free and reading it needs no decompression):

* **extracted**: the per-synset tars ``nXXXXXXXX.tar`` directly in
  ``manual_dir`` or in ``manual_dir/winter21_whole/`` (what
  ``tar -xzf winter21_whole.tar.gz`` produces). The per-synset tars are *not*
  extracted further.
* **archive**: ``manual_dir/winter21_whole.tar.gz`` (or ``.tar``) itself. It is
  streamed without extraction, but three sequential passes are needed (list
  synsets, ``train``, ``validation``), each decompressing the whole archive.

Generated examples
------------------
Splits (deterministic, independent of file order and machine):

* ``validation``: every image whose ``file_name`` satisfies
  ``is_validation(file_name)``, i.e.
  ``int.from_bytes(sha256(file_name.encode('utf-8')).digest()[:8], 'big')
  % VALIDATION_MODULUS == 0`` (about 1 % of the images, ~130 k);
* ``train``: all other images.

Each example, as decoded by ``tfds.data_source`` (NumPy, no TensorFlow):

* ``image``: ``uint8 [H, W, 3]`` RGB (stored as JPEG);
* ``label``: ``int64`` scalar (a Python ``int`` from ``tfds.data_source``),
  index into the sorted list of synset ids found in the manual directory
  (``builder.info.features['label'].names``);
* ``file_name``: ``bytes`` (TFDS Text), ``b'<synset>/<member basename>'``,
  e.g. ``b'n01440764/n01440764_10026.JPEG'``; also the example key.

Image handling: RGB baseline/progressive JPEGs are stored byte-for-byte after
a cheap full-stream decode check (PIL draft mode, 1/8 scale). Everything else
(CMYK or greyscale JPEG, PNG/GIF/... whatever the file name says) is decoded
with PIL, converted to RGB and re-encoded as JPEG (quality 95). A partially
corrupt (truncated) image is, when ``Imagenet21k.REPAIR_TRUNCATED_IMAGES`` is
true (default), decoded leniently, re-encoded and logged as a warning; an image
PIL cannot decode at all raises ``ValueError`` naming the synset tar and the
member.

Why one module of ~420 lines: one upstream format (the winter21 archive of
per-synset tars, read in place) and its image repair, a quarter of it this
documentation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import re
import tarfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from PIL import Image, ImageFile

VALIDATION_MODULUS = 100
"""An image is held out for ``validation`` iff its hash mod this is 0."""

NUM_CLASSES_WINTER21 = 19167
"""Number of synsets in the complete winter 2021 release."""

ARCHIVE_NAMES = ("winter21_whole.tar.gz", "winter21_whole.tar")
"""Accepted names of the outer archive inside the manual directory."""

_SYNSET_TAR_RE = re.compile(r"^(n\d{8})\.tar$")
_JPEG_QUALITY = 95
# What PIL raises on unreadable or broken image data.
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    Image.DecompressionBombError,
)

_DESCRIPTION = """\
ImageNet-21k, winter 2021 release (winter21_whole): ~13.15M images of 19167
WordNet synsets. Labels index the sorted synset ids. There is no official
validation split; `validation` holds the ~1% of images whose
sha256(file_name) mod 100 == 0 and `train` the rest.
"""

_CITATION = """\
@inproceedings{deng2009imagenet,
  title={ImageNet: A large-scale hierarchical image database},
  author={Deng, Jia and Dong, Wei and Socher, Richard and Li, Li-Jia and
          Li, Kai and Fei-Fei, Li},
  booktitle={CVPR}, year={2009}
}
@article{russakovsky2015imagenet,
  title={ImageNet Large Scale Visual Recognition Challenge},
  author={Russakovsky, Olga and Deng, Jia and Su, Hao and Krause, Jonathan and
          Satheesh, Sanjeev and Ma, Sean and Huang, Zhiheng and Karpathy,
          Andrej and Khosla, Aditya and Bernstein, Michael and Berg,
          Alexander C. and Fei-Fei, Li},
  journal={IJCV}, volume={115}, number={3}, pages={211--252}, year={2015}
}
"""


def is_validation(file_name: str, modulus: int = VALIDATION_MODULUS) -> bool:
    """Whether ``file_name`` (``'<synset>/<basename>'``) is held out.

    Uses SHA-256 (not Python's salted ``hash``), so the split is the same on
    every machine and run.
    """
    digest = hashlib.sha256(file_name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % modulus == 0


@dataclasses.dataclass(frozen=True)
class Winter21Source:
    """Where the release was found in the manual directory.

    Attributes:
      kind: ``'extracted'`` (per-synset tars on disk) or ``'archive'``.
      synsets: sorted synset ids, e.g. ``('n00004475', ...)``.
      synset_tars: for ``'extracted'``, the tar paths in ``synsets`` order.
      archive: for ``'archive'``, the outer archive path.
    """

    kind: str
    synsets: tuple[str, ...]
    synset_tars: tuple[Path, ...] = ()
    archive: Path | None = None


def find_source(manual_dir: Path) -> Winter21Source:
    """Finds the per-synset tars or the outer archive in ``manual_dir``.

    Raises:
      FileNotFoundError: neither form is present (the message includes the
        manual download instructions).
      ValueError: the archive holds no per-synset tar, or a synset tar appears
        twice.
    """
    manual_dir = Path(manual_dir)
    for folder in (manual_dir, manual_dir / "winter21_whole"):
        if not folder.is_dir():
            continue
        tars = {}
        for p in folder.iterdir():
            m = _SYNSET_TAR_RE.match(p.name)
            if m and p.is_file():
                tars[m.group(1)] = p
        if tars:
            synsets = tuple(sorted(tars))
            return Winter21Source(
                kind="extracted",
                synsets=synsets,
                synset_tars=tuple(tars[s] for s in synsets),
            )
    for name in ARCHIVE_NAMES:
        archive = manual_dir / name
        if archive.is_file():
            return Winter21Source(
                kind="archive", synsets=_list_archive(archive), archive=archive
            )
    raise FileNotFoundError(
        f"No ImageNet-21k winter21 data in manual_dir={os.fspath(manual_dir)!r}:"
        " expected per-synset tars nXXXXXXXX.tar (in it or in its "
        f"winter21_whole/ subfolder) or one of {list(ARCHIVE_NAMES)}.\n"
        + textwrap.dedent(Imagenet21k.MANUAL_DOWNLOAD_INSTRUCTIONS)
    )


def _list_archive(archive: Path) -> tuple[str, ...]:
    """Sorted synset ids of the per-synset tars inside the outer archive."""
    logging.info("Listing synset tars in %s (one pass over the archive).", archive)
    seen: set[str] = set()
    with tarfile.open(archive, mode="r:*") as outer:
        for member in outer:
            m = _SYNSET_TAR_RE.match(os.path.basename(member.name))
            if m and member.isfile():
                if m.group(1) in seen:
                    raise ValueError(
                        f"{archive}: synset tar {member.name} appears twice."
                    )
                seen.add(m.group(1))
    if not seen:
        raise ValueError(f"{archive} holds no per-synset tar nXXXXXXXX.tar.")
    return tuple(sorted(seen))


def iter_synset_tars(
    source: Winter21Source,
) -> Iterator[tuple[str, str, BinaryIO]]:
    """Yields ``(synset, description, fileobj)`` for each per-synset tar.

    ``description`` names the tar for error messages (its path, or
    ``'<archive>:<member>'``). ``fileobj`` is only valid until the next item.
    Nothing is extracted to disk.
    """
    if source.kind == "extracted":
        for synset, path in zip(source.synsets, source.synset_tars):
            with open(path, "rb") as f:
                yield synset, os.fspath(path), f
        return
    with tarfile.open(source.archive, mode="r|*") as outer:
        for member in outer:
            m = _SYNSET_TAR_RE.match(os.path.basename(member.name))
            if not (m and member.isfile()):
                continue
            fobj = outer.extractfile(member)
            yield m.group(1), f"{source.archive}:{member.name}", fobj


def iter_tar_members(
    fileobj: BinaryIO, description: str
) -> Iterator[tuple[str, bytes]]:
    """Streams ``(basename, bytes)`` of the regular files of one synset tar.

    Skips directories and macOS ``._*`` resource files. Reads one member at a
    time.

    Raises:
      ValueError: the synset tar itself is unreadable (names it).
    """
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*") as inner:
            for member in inner:
                basename = os.path.basename(member.name)
                if not member.isfile() or basename.startswith("._"):
                    continue
                f = inner.extractfile(member)
                yield basename, f.read()
    except tarfile.TarError as e:
        raise ValueError(f"Cannot read synset tar {description}: {e}") from e


@contextlib.contextmanager
def _load_truncated_images():
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _rgb_jpeg_bytes(data: bytes, lenient: bool) -> bytes:
    """Returns ``data`` if it is an RGB JPEG that decodes, else RGB JPEG bytes.

    Raises whatever PIL raises for undecodable data (see ``_DECODE_ERRORS``).
    """
    with Image.open(io.BytesIO(data)) as im:
        if not lenient and im.format == "JPEG" and im.mode == "RGB":
            # Decoding at 1/8 scale still walks the whole entropy-coded stream,
            # so truncation and broken markers are caught, at a fraction of the
            # cost of a full decode.
            im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
            return data
        im.load()
        out = io.BytesIO()
        im.convert("RGB").save(out, "JPEG", quality=_JPEG_QUALITY)
        return out.getvalue()


def encode_image(
    data: bytes, member: str, tar_description: str, repair: bool = True
) -> bytes:
    """Validates one image and returns RGB JPEG bytes for the ``image`` feature.

    Args:
      data: the member's bytes (any format PIL reads).
      member: member name, for messages.
      tar_description: the synset tar, for messages.
      repair: if the strict decode fails, retry with
        ``ImageFile.LOAD_TRUNCATED_IMAGES`` and keep the re-encoded result.

    Returns:
      ``data`` itself for decodable RGB JPEGs, else re-encoded RGB JPEG bytes.

    Raises:
      ValueError: PIL cannot decode the image (naming the tar and the member).
    """
    try:
        return _rgb_jpeg_bytes(data, lenient=False)
    except _DECODE_ERRORS as e:
        error = e
    if repair:
        try:
            with _load_truncated_images():
                out = _rgb_jpeg_bytes(data, lenient=True)
        except _DECODE_ERRORS:
            pass
        else:
            logging.warning(
                "Repaired partially corrupt image %s in synset tar %s (%s: %s); "
                "stored the leniently decoded pixels re-encoded as JPEG.",
                member,
                tar_description,
                type(error).__name__,
                error,
            )
            return out
    raise ValueError(
        f"Corrupt image {member!r} in synset tar {tar_description}: "
        f"{type(error).__name__}: {error}"
    ) from error


class Imagenet21k(tfds.core.GeneratorBasedBuilder):
    """ImageNet-21k winter 2021 release (TFDS name ``imagenet21k``)."""

    name = "imagenet21k"
    # TFDS 4.9.x derives `code_path` via the optional `importlib_resources`
    # package for builders outside its own tree; a plain path avoids that.
    code_path = epath.Path(__file__)
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {
        "1.0.0": (
            "Initial release: winter21_whole, labels over the sorted synset ids "
            "found, deterministic sha256-based ~1% validation hold-out."
        ),
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  ImageNet-21k (winter 2021) needs an image-net.org account with accepted
  terms of access (non-commercial research and education only).
  1. Download https://image-net.org/data/winter21_whole.tar.gz (~1.2 TB;
     19167 synsets, one nXXXXXXXX.tar per synset inside).
  2. Either put winter21_whole.tar.gz itself in manual_dir (slow: 3 passes
     over the compressed archive), or, preferred, extract only the outer
     archive so that manual_dir (or manual_dir/winter21_whole/) holds the
     per-synset tars:  tar -xzf winter21_whole.tar.gz -C <manual_dir>
     Do not extract the per-synset tars; they are read as they are.
  3. python -m ddep_jax.data.prepare --dataset=imagenet21k \\
         --manual_dir=<manual_dir> --data_dir=<DATA_DIR>
  Details: docs/DATASETS.md.
  """

    # Truncated images (a few in the release) are decoded leniently, re-encoded
    # and logged instead of aborting a day-long build. Set to False to make any
    # image that PIL cannot decode strictly raise.
    REPAIR_TRUNCATED_IMAGES = True

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(
                        shape=(None, None, 3), encoding_format="jpeg"
                    ),
                    # Names (the sorted synset ids) are set in _split_generators and
                    # saved with the prepared dataset.
                    "label": tfds.features.ClassLabel(),
                    "file_name": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://image-net.org/",
            citation=_CITATION,
            license="ImageNet terms of access (non-commercial research only)",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        source = find_source(Path(dl_manager.manual_dir))
        logging.info(
            "ImageNet-21k: %d synsets (%s form).", len(source.synsets), source.kind
        )
        if len(source.synsets) != NUM_CLASSES_WINTER21:
            logging.warning(
                "ImageNet-21k: found %d synsets, the full winter21 release has %d.",
                len(source.synsets),
                NUM_CLASSES_WINTER21,
            )
        self.info.features["label"].names = list(source.synsets)
        return {
            "train": self._generate_examples(source, validation=False),
            "validation": self._generate_examples(source, validation=True),
        }

    def _generate_examples(
        self, source: Winter21Source, validation: bool
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        label_of = {s: i for i, s in enumerate(source.synsets)}
        for n, (synset, description, fobj) in enumerate(iter_synset_tars(source)):
            if n % 500 == 0:
                logging.info(
                    "ImageNet-21k %s: synset tar %d/%d (%s).",
                    "validation" if validation else "train",
                    n + 1,
                    len(source.synsets),
                    description,
                )
            for basename, data in iter_tar_members(fobj, description):
                file_name = f"{synset}/{basename}"
                if is_validation(file_name) != validation:
                    continue
                image = encode_image(
                    data, basename, description, repair=self.REPAIR_TRUNCATED_IMAGES
                )
                yield (
                    file_name,
                    {
                        "image": image,
                        "label": label_of[synset],
                        "file_name": file_name,
                    },
                )
