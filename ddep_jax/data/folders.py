"""Your own images as datasets, no builder to write.

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

* **The mmsegmentation layout** (stage 3, ``data.source='mmseg'``;
  mmsegmentation's ``BaseSegDataset`` / ``CustomDataset`` convention)::

      FOLDER/img_dir/{train,val[,test]}/**/<stem><img_suffix>    (default .jpg)
      FOLDER/ann_dir/{train,val[,test]}/**/<stem><seg_map_suffix> (default .png)
      FOLDER/classes.json                                         (optional)

  Label maps are single-channel PNGs (PIL mode ``L``, ``P`` or 16-bit) of
  class ids ``0..C-1``; 255 is ignored. With ``data.reduce_zero_label`` (as
  in mmseg) stored 0 is ignored and ``v`` becomes class ``v - 1``.
  ``classes.json`` names the classes (mmseg's ``{"classes": [names],
  "palette": [[r, g, b], ...]}``, or ``{"classes": [{"id", "name", "rgb"}]}``
  as ``../shared/data/camvid`` has it); without it ``model.num_outputs``
  must give the class count and colours come from matplotlib's colormaps.
  `mmseg_spec` turns the folder into a `SegDatasetSpec` (splits ``train``,
  ``validation`` = ``val``, ``test`` = ``test``, else ``val``), so label
  fractions, the pipeline and the evaluation are those of the built-in
  datasets. Opening a split (`MMSegSplit`) pairs images and label maps by
  stem and reads every file's size from its header: unmatched files and size
  mismatches are errors naming the files; label values are checked when a
  record is decoded (`SegDatasetSpec.map_labels`, naming the file).
"""

from __future__ import annotations

import concurrent.futures
import glob
import hashlib
import json
import os
import re
import threading
from typing import Any

import numpy as np
from absl import logging
from PIL import Image, ImageOps

from ddep_jax import writers

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
"""The image files every reader of this project takes (any case): the image
folders of the datasets and `python -m ddep_jax.predict` alike (PIL decodes
them all)."""


def is_image_file(path: str) -> bool:
    """Whether `path` ends in one of `IMAGE_EXTENSIONS` (any case)."""
    return path.lower().endswith(IMAGE_EXTENSIONS)
"""File extensions an image folder reads (compared lower-case)."""
BAD_IMAGE_MODES = ("skip", "error")
SKIPPED_LIST = "skipped_images.txt"
MANIFEST = "image_folder.json"
MMSEG_SPLITS = {"train": "train", "validation": "val", "test": "test"}
"""Config split name -> mmseg sub-folder ('test' falls back to 'val')."""
_LISTED = 5  # names shown per kind of problem in an error message


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


def read_label(path: str) -> np.ndarray:
    """A label map as an integer array [H, W] of stored class ids.

    Raises:
      BadImageError: unreadable, or not single-channel (an RGB colour label
        map must first be converted to class ids).
    """
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
                raise ValueError(
                    f"mode {im.mode} has {len(im.getbands())} channels; a label "
                    "map must be a single-channel PNG of class ids (mode L or P), "
                    "not a colour rendering")
            return np.asarray(im).astype(np.int32 if im.mode.startswith("I")
                                         else np.uint8)
    except Exception as e:  # pylint: disable=broad-except
        raise BadImageError(f"cannot read label map {path}: {type(e).__name__}: "
                            f"{e}") from e


def _check_folder(root: str, key: str) -> str:
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
    root = _check_folder(root, "data.folder")
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
        self.root = _check_folder(root, "data.folder")
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


# ----------------------------------------------------------------- mmseg layout


def read_classes(path: str) -> dict[str, Any]:
    """A classes.json: {'names': [str], 'colors': [(r, g, b)] or None}.

    Accepted forms: ``{"classes": ["sky", ...], "palette": [[r, g, b], ...]}``
    (mmseg's METAINFO; palette optional) or ``{"classes": [{"id": 0, "name":
    "sky", "rgb": [r, g, b]}, ...]}`` (ids 0..C-1 in order).

    Raises:
      ValueError: unreadable JSON or a malformed entry, naming the file.
    """
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        classes = record["classes"]
        if not isinstance(classes, list) or not classes:
            raise ValueError("'classes' must be a non-empty list")
        if all(isinstance(c, str) for c in classes):
            names, colors = list(classes), record.get("palette")
        else:
            names, colors = [], []
            for i, c in enumerate(classes):
                if int(c.get("id", i)) != i:
                    raise ValueError(f"class entry {i} has id {c['id']}; ids must "
                                     "be 0..C-1 in order")
                names.append(str(c["name"]))
                colors.append(c.get("rgb") or c.get("color"))
            if any(c is None for c in colors):
                colors = None
        if colors is not None:
            colors = [tuple(int(v) for v in c) for c in colors]
            if len(colors) != len(names) or any(
                    len(c) != 3 or not all(0 <= v <= 255 for v in c) for c in colors):
                raise ValueError(f"{len(colors)} palette entries for {len(names)} "
                                 "classes, or an entry is not [r, g, b] in 0..255")
        return {"names": names, "colors": colors}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(
            f"cannot read the class list {path}: {type(e).__name__}: {e}. Expected "
            '{"classes": ["name", ...], "palette": [[r, g, b], ...]} or '
            '{"classes": [{"id": 0, "name": ..., "rgb": [r, g, b]}, ...]}.') from e


def default_colors(n: int) -> list[tuple[int, int, int]]:
    """n distinct RGB colours: matplotlib's tab20 (n <= 20) or turbo."""
    from matplotlib import colormaps

    cmap = colormaps["tab20"] if n <= 20 else colormaps["turbo"].resampled(n)
    values = cmap(np.arange(n) if n <= 20 else np.linspace(0, 1, n))
    return [tuple(int(round(255 * v)) for v in rgba[:3]) for rgba in values]


def mmseg_splits(root: str) -> dict[str, str]:
    """Config split -> folder under img_dir/ of the splits present."""
    present = {d for d in ("train", "val", "test")
               if os.path.isdir(os.path.join(root, "img_dir", d))}
    splits = {k: v for k, v in MMSEG_SPLITS.items() if v in present}
    if "test" not in splits and "val" in present:
        splits["test"] = "val"
    return splits


def mmseg_spec(data_config, num_outputs: int = 0):
    """The `SegDatasetSpec` of the mmseg folder `data_config.folder`.

    Args:
      data_config: `config.data` of a stage-3 config (folder, img_suffix,
        seg_map_suffix, reduce_zero_label, classes_file).
      num_outputs: `config.model.num_outputs`; the class count when there is
        no classes.json (0 there is an error).

    Raises:
      FileNotFoundError: no such folder, or no img_dir/ and ann_dir/ in it.
      ValueError: an unreadable classes.json, or neither it nor a class count.
    """
    from ddep_jax.data.seg_spec import SegDatasetSpec

    root = _check_folder(data_config.folder, "data.folder")
    for sub in ("img_dir", "ann_dir"):
        if not os.path.isdir(os.path.join(root, sub)):
            raise FileNotFoundError(
                f"config.data.folder={root!r} has no {sub}/: the mmsegmentation "
                "layout is img_dir/{train,val}/ (images) and ann_dir/{train,val}/ "
                "(label PNGs of class ids) with matching file stems.")
    classes_file = data_config.classes_file or os.path.join(root, "classes.json")
    if os.path.exists(classes_file):
        classes = read_classes(classes_file)
        names, colors = classes["names"], classes["colors"]
    elif data_config.classes_file:
        raise FileNotFoundError(f"config.data.classes_file={classes_file!r} not found.")
    elif num_outputs > 0:
        names, colors = [f"class_{i}" for i in range(num_outputs)], None
    else:
        raise ValueError(
            f"{classes_file} not found: write it ({{\"classes\": [names]}}) or set "
            "config.model.num_outputs to the number of classes.")
    if not 0 < len(names) <= 255:
        raise ValueError(f"{classes_file if os.path.exists(classes_file) else root}: "
                         f"{len(names)} classes; class ids are 0..254 (255 is void).")
    return SegDatasetSpec(
        name=os.path.basename(root.rstrip(os.sep)), tfds_name="", folder=root,
        num_classes=len(names), class_names=tuple(names),
        class_colors=tuple(colors or default_colors(len(names))),
        label_key="segmentation_mask", splits=mmseg_splits(root),
        img_suffix=data_config.img_suffix,
        seg_map_suffix=data_config.seg_map_suffix,
        reduce_zero_label=bool(data_config.reduce_zero_label))


def _stems(folder: str, suffix: str) -> dict[str, str]:
    """{relative path without suffix: relative path} of the files ending in
    `suffix` under `folder`."""
    out = {}
    for p in glob.glob(os.path.join(glob.escape(folder), "**", "*" + suffix),
                       recursive=True):
        if os.path.isfile(p):
            rel = os.path.relpath(p, folder)
            out[rel[:-len(suffix)]] = rel
    return out


def _listing(names) -> str:
    names = sorted(names)
    more = f" and {len(names) - _LISTED} more" if len(names) > _LISTED else ""
    return ", ".join(names[:_LISTED]) + more


def _header_size(path: str) -> tuple[int, int]:
    """(H, W) from the file's header; BadImageError if unreadable."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except Exception as e:  # pylint: disable=broad-except
        raise BadImageError(f"cannot read {path}: {type(e).__name__}: {e}") from e
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def _split_slice(split: str) -> tuple[str, slice]:
    """'val[:10]' -> ('val', slice(None, 10)): TFDS-style integer slicing of
    a folder split (percentages are not supported here).

    Raises:
      ValueError: a bracket that is not [start:stop] of integers.
    """
    base, bracket, rest = split.partition("[")
    if not bracket:
        return split, slice(None)
    match = re.fullmatch(r"(-?\d*):(-?\d*)\]", rest)
    if not match:
        raise ValueError(f"split {split!r}: a folder split takes [start:stop] with "
                         "integers, e.g. 'val[:10]'.")
    start, stop = (int(v) if v else None for v in match.groups())
    return base, slice(start, stop)


class MMSegSplit:
    """Random-access records of one split of an mmseg-layout folder.

    ``source[i]`` is ``{'image': uint8 [H, W, 3], 'segmentation_mask': uint8
    or int32 [H, W] (stored values), 'file_name': bytes}`` (file_name: the
    image's path relative to img_dir/<split>), pairs in sorted stem order;
    `SegDatasetSpec.decode` maps and checks the labels. Picklable.

    Raises:
      FileNotFoundError: the split's folders are missing.
      ValueError: images without a label map or label maps without an image
        (listed), an empty split, or an image whose size differs from its
        label map's (both files and sizes named).
      BadImageError: a file whose header cannot be read, naming it.
    """

    def __init__(self, spec, split: str, num_threads: int = 8, _pairs=None):
        self.spec = spec
        self.split = split
        base, window = _split_slice(split)
        folder = spec.splits.get(base, base)
        self.image_dir = os.path.join(spec.folder, "img_dir", folder)
        self.label_dir = os.path.join(spec.folder, "ann_dir", folder)
        if _pairs is None:
            _pairs = self._pair(num_threads)[window]
        self.pairs = list(_pairs)

    def _pair(self, num_threads: int) -> list[tuple[str, str]]:
        for d in (self.image_dir, self.label_dir):
            if not os.path.isdir(d):
                raise FileNotFoundError(f"split {self.split!r} of the mmseg folder "
                                        f"{self.spec.folder}: {d} is missing.")
        images = _stems(self.image_dir, self.spec.img_suffix)
        labels = _stems(self.label_dir, self.spec.seg_map_suffix)
        problems = []
        if set(images) - set(labels):
            missing = set(images) - set(labels)
            problems.append(f"{len(missing)} images in {self.image_dir} have no "
                            f"label map <stem>{self.spec.seg_map_suffix} in "
                            f"{self.label_dir}: {_listing(images[s] for s in missing)}")
        if set(labels) - set(images):
            extra = set(labels) - set(images)
            problems.append(f"{len(extra)} label maps in {self.label_dir} have no "
                            f"image <stem>{self.spec.img_suffix} in {self.image_dir}: "
                            f"{_listing(labels[s] for s in extra)}")
        if not images and not problems:
            problems.append(f"no *{self.spec.img_suffix} images in {self.image_dir} "
                            "(config.data.img_suffix sets the extension)")
        if problems:
            raise ValueError(f"mmseg folder {self.spec.folder}, split "
                             f"{self.split!r}: " + "; ".join(problems) + ".")
        pairs = [(images[s], labels[s]) for s in sorted(images)]

        def sizes(pair):
            return (_header_size(os.path.join(self.image_dir, pair[0])),
                    _header_size(os.path.join(self.label_dir, pair[1])))

        with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
            checked = list(pool.map(sizes, pairs))
        bad = [f"{i} {si} vs {l} {sl}" for (i, l), (si, sl) in zip(pairs, checked)
               if si != sl]
        if bad:
            raise ValueError(
                f"mmseg folder {self.spec.folder}, split {self.split!r}: {len(bad)} "
                f"images differ in size (H, W) from their label maps: "
                f"{_listing(bad)}.")
        return pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_name, label_name = self.pairs[index]
        return {"image": read_image(os.path.join(self.image_dir, image_name)),
                "segmentation_mask": read_label(os.path.join(self.label_dir,
                                                             label_name)),
                "file_name": image_name.encode()}

    def record_name(self, index: int, key: str = "file_name") -> str:
        del key
        return self.pairs[index][0]

    def __getstate__(self) -> dict[str, Any]:
        return {"spec": self.spec, "split": self.split, "_pairs": self.pairs}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def __repr__(self) -> str:
        return (f"MMSegSplit({self.spec.folder!r}, split={self.split!r}, "
                f"{len(self.pairs)} pairs)")
