"""Your own images as datasets, no builder to write: image folders.

Two layouts, read with PIL (JPEG, PNG, WebP; EXIF orientation applied;
greyscale, palette and RGBA images converted to RGB):

* **An image folder** (stage 2: DDeP, DeP, the pretext tasks;
  ``data.source='folder'``): every file under ``data.folder`` matching the
  glob ``data.glob`` (default ``'**/*'``: recursive) with an image extension
  (`IMAGE_EXTENSIONS`, any case), in sorted order, any size. `ImageFolderSource`
  is a random-access ``{'image', 'file_name'}`` source read through the same
  grain pipeline as the TFDS sources (shuffle, crops, checkpointed iterator
  state). A file that cannot be decoded is skipped (``data.bad_images=
  'skip'``: counted in the log and listed in ``WORKDIR/skipped_images.txt``)
  or stops the run naming it (``'error'``). ``WORKDIR/image_folder.json``
  records the file list's length and hash, so that a resumed run refuses a
  folder whose files changed (the data order would no longer be the one the
  checkpoint was written with).

* **The mmsegmentation layout** (stage 3, ``data.source='mmseg'``):
  `ddep_jax.data.mmseg`, built on this module's readers.
"""

from __future__ import annotations

import glob
import hashlib
import os
import threading
from typing import Any

import numpy as np
from absl import logging
from PIL import Image, ImageOps

from ddep_jax.common import writers

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
"""The image files every reader of this project takes (any case): the image
folders of the datasets and `python -m ddep_jax.predict` alike (PIL decodes
them all)."""


def is_image_file(path: str) -> bool:
    """Whether `path` ends in one of `IMAGE_EXTENSIONS` (any case)."""
    return path.lower().endswith(IMAGE_EXTENSIONS)


BAD_IMAGE_MODES = ("skip", "error")
SKIPPED_LIST = "skipped_images.txt"
MANIFEST = "image_folder.json"
NAMES_LISTED = 5  # names shown per kind of problem in an error message


class BadImageError(ValueError):
    """An image file cannot be decoded; the message names it."""


def read_image(path: str) -> np.ndarray:
    """An image file as uint8 [H, W, 3] RGB (EXIF orientation applied).

    Raises:
      BadImageError: the file is missing, truncated or not an image PIL
        decodes; the message names the file and PIL's error.
    """
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode.startswith("I"):  # 16-bit (or int32) greyscale: to 8 bits
                wide = np.asarray(im).astype(np.int64)
                shift = 8 if wide.max(initial=0) < 2**16 else 24
                im = Image.fromarray(np.clip(wide >> shift, 0, 255).astype(np.uint8))
            if im.mode != "RGB":
                im = im.convert("RGBA" if "A" in im.getbands() or im.mode == "P"
                                else "RGB").convert("RGB")
            return np.asarray(im, dtype=np.uint8)
    except Exception as e:  # pylint: disable=broad-except
        raise BadImageError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


def check_folder(root: str, key: str) -> str:
    if not root:
        raise ValueError(f"config.{key} is empty: set it to the dataset's folder.")
    if writers.is_remote(root):
        raise ValueError(
            f"config.{key}={root!r}: folders are read in place from a local disk "
            "only. Prepare it as a dataset (python -m ddep_jax.data.prepare "
            "--folder=<local copy> --name=NAME --data_dir=gs://...) and read it "
            "by name (data.source='tfds', data.name=NAME).")
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"config.{key}={root!r}: no such folder.")
    return root


def list_images(root: str, pattern: str = "**/*",
                extensions=IMAGE_EXTENSIONS) -> list[str]:
    """Image files under `root` matching glob `pattern` (`**` recurses), as
    sorted paths relative to `root`.

    Raises:
      FileNotFoundError: `root` is not a folder.
      ValueError: nothing matches (names the folder, glob and extensions).
    """
    root = check_folder(root, "data.folder")
    extensions = tuple(e.lower() for e in extensions)
    files = sorted(
        os.path.relpath(p, root)
        for p in glob.glob(os.path.join(glob.escape(root), pattern), recursive=True)
        if p.lower().endswith(extensions) and os.path.isfile(p))
    if not files:
        raise ValueError(f"no image files in config.data.folder={root!r} match "
                         f"config.data.glob={pattern!r} with an extension in "
                         f"{extensions}.")
    return files


class ImageFolderSource:
    """Random-access source of the images of a folder.

    ``source[i]`` is ``{'image': uint8 [H, W, 3], 'file_name': bytes (path
    relative to the folder)}``, or None where the file cannot be decoded and
    `bad_images` is 'skip' (the pipeline filters it out; the file is logged
    and added to `skipped_list`). Picklable (the file list travels, the
    decoded images do not).

    Args:
      root: the folder.
      pattern: glob relative to `root` (`list_images`).
      bad_images: 'skip' | 'error' (`BAD_IMAGE_MODES`).
      skipped_list: file to (re)write with the skipped files, one per line;
        None: only log them.

    Raises:
      FileNotFoundError, ValueError: from `list_images`.
      BadImageError (from ``__getitem__``, `bad_images='error'`): names the file.
    """

    def __init__(self, root: str, pattern: str = "**/*", bad_images: str = "skip",
                 skipped_list: str | None = None, _files=None):
        if bad_images not in BAD_IMAGE_MODES:
            raise ValueError(f"config.data.bad_images={bad_images!r}: expected one "
                             f"of {BAD_IMAGE_MODES}.")
        self.root = check_folder(root, "data.folder")
        self.pattern = pattern
        self.bad_images = bad_images
        self.skipped_list = skipped_list
        self.files = list(_files) if _files is not None else list_images(root, pattern)
        self._skipped: set[str] = set()
        if skipped_list and os.path.exists(skipped_list):  # a resumed run's
            with open(skipped_list, encoding="utf-8") as f:
                self._skipped.update(line.rstrip("\n") for line in f if line.strip())
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        name = self.files[index]
        try:
            image = read_image(os.path.join(self.root, name))
        except BadImageError as e:
            if self.bad_images == "error":
                raise BadImageError(
                    f"{e}\n(config.data.bad_images='error'; 'skip' leaves such "
                    "files out and lists them in the workdir.)") from e
            self._skip(name, e)
            return None
        return {"image": image, "file_name": name.encode()}

    def record_name(self, index: int, key: str = "file_name") -> str:
        del key
        return self.files[index]

    @property
    def skipped(self) -> list[str]:
        """The files skipped so far in this process, sorted."""
        with self._lock:
            return sorted(self._skipped)

    def _skip(self, name: str, error: Exception) -> None:
        with self._lock:
            if name in self._skipped:
                return
            self._skipped.add(name)
            listed = sorted(self._skipped)
            if len(listed) >= len(self.files):
                raise BadImageError(
                    f"none of the {len(self.files)} files of the image folder "
                    f"{self.root} (glob {self.pattern!r}) can be decoded; the last: "
                    f"{error}")
            if self.skipped_list:  # under the lock: one writer of the file
                writers.write_bytes(self.skipped_list,
                                    "".join(f"{n}\n" for n in listed).encode())
        logging.warning("image folder %s: skipping %s (%d skipped so far): %s",
                        self.root, name, len(listed), error)

    def manifest(self) -> dict[str, Any]:
        """{'folder', 'glob', 'num_files', 'sha256'} of the file list."""
        digest = hashlib.sha256("\n".join(self.files).encode()).hexdigest()
        return {"folder": self.root, "glob": self.pattern,
                "num_files": len(self.files), "sha256": digest}

    def check_manifest(self, workdir: str, write: bool = True) -> None:
        """Writes WORKDIR/image_folder.json, or, when the workdir holds a
        checkpoint to resume, compares with the one there. On several hosts,
        every host's file list must equal host 0's.

        Raises:
          ValueError: the workdir's checkpointed run read a different file list
            (files added, removed or renamed since), or the hosts see
            different lists: names the counts and the fix.
        """
        import jax

        new = self.manifest()
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.assert_equal(
                np.frombuffer(bytes.fromhex(new["sha256"]), np.uint8),
                fail_message=f"the hosts list different files in {self.root} "
                             f"(this one: {new['num_files']}): give every host "
                             "the same folder.")
        path = os.path.join(workdir, MANIFEST)
        old = writers.read_json(path)
        checkpoints = os.path.join(workdir, "checkpoints")
        resuming = os.path.isdir(checkpoints) and any(
            name.isdigit() for name in os.listdir(checkpoints))
        if old is None or not resuming:
            if write:
                writers.write_json(path, new)
            return
        if (old["num_files"], old["sha256"]) != (new["num_files"], new["sha256"]):
            raise ValueError(
                f"{path}: this workdir's run read {old['num_files']} files of "
                f"{old['folder']!r} (glob {old['glob']!r}); {self.root!r} now has "
                f"{new['num_files']} matching files with a different list, so the "
                "data order would differ from the checkpoint's. Restore the folder, "
                f"or start a new workdir (or delete {path} to go on with the new "
                "list, knowing the resumed stream is not the original one).")

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root, "pattern": self.pattern,
                "bad_images": self.bad_images, "skipped_list": self.skipped_list,
                "_files": self.files}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def __repr__(self) -> str:
        return (f"ImageFolderSource(root={self.root!r}, pattern={self.pattern!r}, "
                f"{len(self.files)} files)")
