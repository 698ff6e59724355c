"""Reading manually downloaded dataset files from folders, zips and tars.

Shared by the segmentation builders (``cityscapes_seg``, ``ade20k``,
``pascal_context``), whose upstream releases are archives that the builders
read in place (no extraction) or, equally, the folders those archives extract
to.

* `ManualFiles` gives uniform read access to the files of a folder, a zip or a
  tar (optionally gzip/bz2/xz compressed) by POSIX path relative to the folder
  or archive root, e.g. ``'leftImg8bit/train/aachen/aachen_000000_000019_
  leftImg8bit.png'``.
* `rgb_image_bytes` and `label_image` validate one image / label file and
  return what a TFDS ``Image`` feature stores (bytes already in the declared
  encoding, so TFDS never needs TensorFlow to encode).

Everything here is NumPy/PIL only.
"""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

JPEG_QUALITY = 95
"""JPEG quality used when an image has to be re-encoded (non-RGB sources)."""

_GZIP_MAGIC = b"\x1f\x8b"
_BZIP2_MAGIC = b"BZh"
_XZ_MAGIC = b"\xfd7zXZ\x00"


class ManualFiles:
    """Read-only files of a folder, a zip or a tar, by relative POSIX path.

    Args:
      location: a directory, a ``.zip`` file or a tar file (``.tar``,
        ``.tar.gz``/``.tgz``, ``.tar.bz2``, ``.tar.xz``).

    Attributes:
      location: the path given.
      kind: ``'folder'``, ``'zip'`` or ``'tar'``.
      compressed: ``True`` for a compressed tar, whose members can only be
        read efficiently in archive order (see `iter_read`).

    Raises:
      FileNotFoundError: ``location`` does not exist.
      ValueError: ``location`` is a file that is neither a zip nor a tar.
    """

    def __init__(self, location: str | os.PathLike):
        self.location = Path(location)
        self.compressed = False
        self._zip: zipfile.ZipFile | None = None
        self._tar: tarfile.TarFile | None = None
        self._members: dict[str, tarfile.TarInfo] | None = None
        self._names: list[str] | None = None
        if self.location.is_dir():
            self.kind = "folder"
        elif not self.location.exists():
            raise FileNotFoundError(f"{self.location} does not exist.")
        elif zipfile.is_zipfile(self.location):
            self.kind = "zip"
            self._zip = zipfile.ZipFile(self.location)
        elif tarfile.is_tarfile(self.location):
            self.kind = "tar"
            with open(self.location, "rb") as f:
                magic = f.read(6)
            self.compressed = magic.startswith((_GZIP_MAGIC, _BZIP2_MAGIC, _XZ_MAGIC))
            self._tar = tarfile.open(self.location, "r:*")
        else:
            raise ValueError(
                f"{self.location} is neither a folder nor a zip or tar archive."
            )

    def __enter__(self) -> ManualFiles:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Closes an open archive (a folder needs no closing)."""
        if self._zip is not None:
            self._zip.close()
        if self._tar is not None:
            self._tar.close()

    def __repr__(self) -> str:
        return f"ManualFiles({os.fspath(self.location)!r}, kind={self.kind!r})"

    def names(self) -> list[str]:
        """Sorted relative POSIX paths of all regular files.

        For a compressed tar the first call decompresses the whole archive
        once to list it.
        """
        if self._names is None:
            if self.kind == "folder":
                names = [
                    p.relative_to(self.location).as_posix()
                    for p in self.location.rglob("*")
                    if p.is_file()
                ]
            elif self.kind == "zip":
                names = [n for n in self._zip.namelist() if not n.endswith("/")]
            else:
                self._members = {
                    m.name.removeprefix("./"): m
                    for m in self._tar.getmembers()
                    if m.isfile()
                }
                names = list(self._members)
            self._names = sorted(names)
        return self._names

    def list(self, prefix: str) -> list[str]:
        """Sorted relative paths of the files under folder ``prefix``.

        ``prefix`` is a relative POSIX folder path, with or without the
        trailing ``/`` (``''`` lists everything).
        """
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        if self.kind == "folder":
            base = self.location / prefix
            if not base.is_dir():
                return []
            return sorted(
                p.relative_to(self.location).as_posix()
                for p in base.rglob("*")
                if p.is_file()
            )
        return [n for n in self.names() if n.startswith(prefix)]

    def exists(self, name: str) -> bool:
        """Whether file ``name`` exists."""
        if self.kind == "folder":
            return (self.location / name).is_file()
        if self.kind == "zip":
            try:
                self._zip.getinfo(name)
            except KeyError:
                return False
            return True
        self.names()
        return name in self._members

    def is_dir(self, name: str) -> bool:
        """Whether some file lies under folder ``name``."""
        if self.kind == "folder":
            return (self.location / name).is_dir()
        return bool(self.list(name))

    def read(self, name: str) -> bytes:
        """The bytes of file ``name``.

        Raises:
          FileNotFoundError: no such file (the message names the archive).
        """
        if self.kind == "folder":
            path = self.location / name
            if not path.is_file():
                raise FileNotFoundError(f"{path} does not exist.")
            return path.read_bytes()
        if self.kind == "zip":
            try:
                return self._zip.read(name)
            except KeyError:
                raise FileNotFoundError(
                    f"{name} not found in {self.location}."
                ) from None
        self.names()
        member = self._members.get(name)
        if member is None:
            raise FileNotFoundError(f"{name} not found in {self.location}.")
        with self._tar.extractfile(member) as f:
            return f.read()

    def iter_read(self, names: Iterable[str]) -> Iterator[tuple[str, bytes]]:
        """Yields ``(name, bytes)`` for each of ``names``.

        Tar members are read in archive order (one forward pass, also for a
        compressed tar); folders and zips in the order given.
        """
        names = list(names)
        if self.kind == "tar":
            self.names()
            names.sort(key=lambda n: self._members[n].offset_data
                       if n in self._members else -1)
        for name in names:
            yield name, self.read(name)

    def describe(self, name: str) -> str:
        """A human-readable location of file ``name`` for messages."""
        if self.kind == "folder":
            return os.fspath(self.location / name)
        return f"{name} (in {os.fspath(self.location)})"


def rgb_image_bytes(data: bytes, fmt: str, where: str) -> tuple[bytes, tuple[int, int]]:
    """Validates an image and returns it as RGB bytes in format ``fmt``.

    Only the header is decoded when the image already is an RGB ``fmt``;
    anything else (greyscale, palette, RGBA, CMYK, another format) is decoded,
    converted with ``Image.convert('RGB')`` and re-encoded (PNG lossless,
    JPEG at quality `JPEG_QUALITY`).

    Args:
      data: the encoded image file.
      fmt: ``'JPEG'`` or ``'PNG'``, the encoding of the TFDS feature.
      where: file description used in error messages.

    Returns:
      ``(bytes, (width, height))``; ``bytes is data`` when stored unchanged.

    Raises:
      ValueError: PIL cannot read the image (naming ``where``).
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            size = im.size
            if im.format == fmt and im.mode == "RGB":
                return data, size
            out = io.BytesIO()
            options = {"quality": JPEG_QUALITY} if fmt == "JPEG" else {}
            im.convert("RGB").save(out, fmt, **options)
            return out.getvalue(), size
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"Cannot read image {where}: {e}") from e


def label_image(data: bytes, where: str) -> tuple[np.ndarray, bytes]:
    """Decodes a single-channel 8-bit label image.

    Args:
      data: the encoded label file (normally an 8-bit greyscale PNG).
      where: file description used in error messages.

    Returns:
      ``(values, png)``: ``values`` uint8 ``[H, W]`` (the stored values; the
      palette indices of a palette PNG), and an 8-bit greyscale PNG of them
      (``data`` itself when it already is one).

    Raises:
      ValueError: unreadable file, or not single-channel 8-bit (e.g. an RGB
        colour-coded label or a 16-bit PNG), naming ``where``.
    """
    try:
        with Image.open(io.BytesIO(data)) as lb:
            fmt, mode = lb.format, lb.mode
            if mode not in ("L", "P"):
                raise ValueError(
                    f"Label {where} has PIL mode {mode!r}; expected a single-channel "
                    '8-bit PNG of label ids (mode "L"). Colour-coded or 16-bit '
                    "labels are not supported."
                )
            values = np.asarray(lb, dtype=np.uint8)
    except (OSError, SyntaxError) as e:
        raise ValueError(f"Cannot read label {where}: {e}") from e
    if fmt == "PNG" and mode == "L":
        return values, data
    return values, png_bytes(values)


def png_bytes(values: np.ndarray) -> bytes:
    """uint8 ``[H, W]`` array -> 8-bit greyscale PNG bytes (lossless)."""
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(values, np.uint8)).save(out, "PNG")  # mode L
    return out.getvalue()


def voc_colormap(n: int) -> tuple[tuple[int, int, int], ...]:
    """The PASCAL VOC colour map: ``n`` RGB triples for label values ``0..n-1``.

    Value ``i``'s colour spreads the bits of ``i`` over the three channels,
    three bits at a time, from the most significant channel bit down
    (value 1 -> (128, 0, 0), 2 -> (0, 128, 0), 3 -> (128, 128, 0), ...). The
    colours are distinct for ``n <= 256``.
    """
    colors = []
    for i in range(n):
        rgb = [0, 0, 0]
        value = i
        for shift in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= ((value >> channel) & 1) << shift
            value >>= 3
        colors.append(tuple(rgb))
    return tuple(colors)
