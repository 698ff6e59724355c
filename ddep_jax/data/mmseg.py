"""Your own labelled data in place: the mmsegmentation folder layout.

The mmsegmentation layout (stage 3, ``data.source='mmseg'``;
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

Images are decoded by `folders.read_image` (EXIF orientation, RGB), as in an
image folder.
"""

from __future__ import annotations

import concurrent.futures
import glob
import json
import os
import re
from typing import Any

import numpy as np
from PIL import Image

from ddep_jax.data.folders import NAMES_LISTED, BadImageError, check_folder, read_image

MMSEG_SPLITS = {"train": "train", "validation": "val", "test": "test"}
"""Config split name -> mmseg sub-folder ('test' falls back to 'val')."""


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

    root = check_folder(data_config.folder, "data.folder")
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
    more = f" and {len(names) - NAMES_LISTED} more" if len(names) > NAMES_LISTED else ""
    return ", ".join(names[:NAMES_LISTED]) + more


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
