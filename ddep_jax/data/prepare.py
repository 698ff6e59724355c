r"""Prepares a ddep_jax TFDS dataset from manually downloaded files.

Usage::

  python -m ddep_jax.data.prepare --dataset=camvid \
      --manual_dir=/path/to/camvid [--data_dir=/path/to/tensorflow_datasets]
  python -m ddep_jax.data.prepare --dataset=imagenet21k \
      --manual_dir=/path/to/winter21 [--data_dir=...]
  python -m ddep_jax.data.prepare --folder=DIR --layout=images|mmseg --name=NAME \
      [--glob='**/*'] [--reduce_zero_label] [--data_dir=...]

The last form prepares your own folder (`ddep_jax.data.folders`: an image
folder for stage 2, the mmsegmentation layout for stage 3) as dataset NAME,
read afterwards with ``data.source='tfds' data.name=NAME``
(`ddep_jax.data.builders.folders`).

``--data_dir`` defaults to ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``.
The dataset is written in ``array_record`` format (random access, read by
``ddep_jax.data.tfds_sources.load_data_source`` without TensorFlow) to
``<data_dir>/<dataset>/<version>/``. Preparing an already prepared dataset is
a no-op. See docs/DATASETS.md for where to get the manual files.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence

import tensorflow_datasets as tfds
from absl import app
from absl import flags
from absl import logging

from ddep_jax.data import builders
from ddep_jax.data.tfds_sources import default_data_dir

DATASETS = {
    "camvid": builders.camvid.Camvid,
    "cifar10_jpeg": builders.cifar10_jpeg.Cifar10Jpeg,
    "imagenet21k": builders.imagenet21k.Imagenet21k,
    # TFDS's own builder (ILSVRC-2012); it reads the tars with tf.io.gfile, so
    # building it needs TensorFlow: pip install -e '.[prepare]'.
    "imagenet2012": None,
    "cityscapes_seg": builders.cityscapes.CityscapesSeg,
    "ade20k": builders.ade20k.Ade20k,
    "pascal_context": builders.pascal_context.PascalContext,
}
"""Datasets this CLI prepares: TFDS name -> builder class (None: TFDS's own)."""


def prepare(
    dataset: str,
    manual_dir: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
) -> tfds.core.DatasetBuilder:
    """Builds ``dataset`` from ``manual_dir`` into ``data_dir`` (array_record).

    Args:
      dataset: one of ``DATASETS`` (``'camvid'``, ``'cifar10_jpeg'``,
        ``'imagenet21k'``, ...).
      manual_dir: directory with the manually downloaded files (layouts in each
        builder's ``MANUAL_DOWNLOAD_INSTRUCTIONS`` and docs/DATASETS.md).
      data_dir: TFDS data directory; ``None`` means ``$TFDS_DATA_DIR`` or
        ``~/tensorflow_datasets``.

    Returns:
      The prepared builder (``builder.info.splits[...].num_examples``,
      ``builder.data_dir``).

    Raises:
      ValueError: unknown ``dataset``; or invalid source files (raised by the
        builder, naming the offending file).
      FileNotFoundError: ``manual_dir`` does not exist or does not hold the
        expected files (the message includes the download instructions).
    """
    if dataset not in DATASETS:
        raise ValueError(
            f"Unknown dataset {dataset!r}; expected one of {sorted(DATASETS)}."
        )
    manual_dir = os.path.abspath(os.path.expanduser(os.fspath(manual_dir)))
    if not os.path.isdir(manual_dir) or not os.listdir(manual_dir):
        problem = "is empty" if os.path.isdir(manual_dir) else "is not a directory"
        raise FileNotFoundError(
            f"--manual_dir={manual_dir!r} {problem}. {dataset} must be "
            "downloaded manually:\n"
            + textwrap.dedent((DATASETS[dataset] or tfds.builder_cls(dataset))
                              .MANUAL_DOWNLOAD_INSTRUCTIONS)
        )
    data_dir = os.path.abspath(
        os.path.expanduser(
            os.fspath(data_dir) if data_dir is not None else default_data_dir()
        )
    )
    builder = tfds.builder(dataset, data_dir=data_dir, file_format="array_record")
    download_config = tfds.download.DownloadConfig(
        manual_dir=manual_dir,
        try_download_gcs=False,
        compute_stats=tfds.download.ComputeStatsMode.SKIP,
    )
    builder.download_and_prepare(download_config=download_config)
    return builder


def prepare_folder(folder: str, layout: str, name: str,
                   data_dir: str | os.PathLike | None = None, *, glob: str = "**/*",
                   bad_images: str = "skip", img_suffix: str = ".jpg",
                   seg_map_suffix: str = ".png", reduce_zero_label: bool = False,
                   classes_file: str = "", num_classes: int = 0
                   ) -> tfds.core.DatasetBuilder:
    """Prepares an own folder as the TFDS dataset `name` (array_record).

    Args:
      folder: an image folder (`layout='images'`) or an mmseg-layout folder
        (`'mmseg'`), as `ddep_jax.data.folders` reads them.
      layout: 'images' | 'mmseg'.
      name: the dataset's name (snake_case), `data.name` of the configs.
      data_dir: TFDS data directory (default $TFDS_DATA_DIR or
        ~/tensorflow_datasets).
      glob, bad_images: the image folder's selection and what to do with
        undecodable files ('skip' | 'error').
      img_suffix, seg_map_suffix, reduce_zero_label, classes_file,
        num_classes: the mmseg folder's options (`data.*` of stage 3;
        num_classes stands in for a missing classes.json).

    Raises:
      ValueError, FileNotFoundError: a bad name or layout; the folder readers'
        errors (unpaired files, size mismatches, bad label values, an
        unreadable image with bad_images='error'), naming the files.
    """
    import ml_collections

    from ddep_jax.data import mmseg
    from ddep_jax.data.builders import folders as folder_builders

    data_dir = os.path.abspath(os.path.expanduser(
        os.fspath(data_dir) if data_dir is not None else default_data_dir()))
    folder = os.path.abspath(os.path.expanduser(folder))
    spec = None
    if layout == "mmseg":
        spec = mmseg.mmseg_spec(ml_collections.ConfigDict({
            "folder": folder, "img_suffix": img_suffix,
            "seg_map_suffix": seg_map_suffix, "reduce_zero_label": reduce_zero_label,
            "classes_file": classes_file}), num_classes)
    cls = folder_builders.builder_class(name, layout, folder=folder, glob=glob,
                                        bad_images=bad_images, spec=spec)
    builder = cls(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP))
    if spec is not None:
        folder_builders.write_spec(spec, builder.data_dir)
    return builder


_DATASET = None
_MANUAL_DIR = None
_DATA_DIR = None
_FOLDER_FLAGS = {}


def _define_flags() -> None:
    # Defined only when run as a script, so importing this module (tests,
    # notebooks, the trainer) does not add global absl flags.
    global _DATASET, _MANUAL_DIR, _DATA_DIR
    _DATASET = flags.DEFINE_enum(
        "dataset", None, sorted(DATASETS), "Dataset to prepare (or --folder)."
    )
    _MANUAL_DIR = flags.DEFINE_string(
        "manual_dir", None, "Directory with the manually downloaded files."
    )
    _FOLDER_FLAGS.update(
        folder=flags.DEFINE_string("folder", None, "Your own folder to prepare."),
        layout=flags.DEFINE_enum("layout", "images", ["images", "mmseg"],
                                 "--folder's layout."),
        name=flags.DEFINE_string("name", None, "--folder's dataset name."),
        glob=flags.DEFINE_string("glob", "**/*", "images: the files to read."),
        bad_images=flags.DEFINE_enum("bad_images", "skip", ["skip", "error"],
                                     "images: undecodable files."),
        img_suffix=flags.DEFINE_string("img_suffix", ".jpg", "mmseg: image ending."),
        seg_map_suffix=flags.DEFINE_string("seg_map_suffix", ".png",
                                           "mmseg: label-map ending."),
        reduce_zero_label=flags.DEFINE_bool("reduce_zero_label", False,
                                            "mmseg: stored 0 is void, v -> v - 1."),
        classes_file=flags.DEFINE_string("classes_file", "",
                                         "mmseg: default FOLDER/classes.json."),
        num_classes=flags.DEFINE_integer("num_classes", 0,
                                         "mmseg: class count without classes.json."))
    _DATA_DIR = flags.DEFINE_string(
        "data_dir",
        None,
        "TFDS data directory (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).",
    )


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    folder = _FOLDER_FLAGS["folder"].value
    if bool(folder) == bool(_DATASET.value):
        raise app.UsageError("Give either --dataset (with --manual_dir) or --folder "
                             "(with --layout and --name).")
    try:
        if folder:
            if not _FOLDER_FLAGS["name"].value:
                raise app.UsageError("--folder needs --name (the dataset's name).")
            options = {k: f.value for k, f in _FOLDER_FLAGS.items()
                       if k not in ("folder", "layout", "name")}
            builder = prepare_folder(folder, _FOLDER_FLAGS["layout"].value,
                                     _FOLDER_FLAGS["name"].value, _DATA_DIR.value,
                                     **options)
        else:
            if not _MANUAL_DIR.value:
                raise app.UsageError("--dataset needs --manual_dir.")
            builder = prepare(_DATASET.value, _MANUAL_DIR.value, _DATA_DIR.value)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    sizes = ", ".join(
        f"{name}={split.num_examples}"
        for name, split in sorted(builder.info.splits.items())
    )
    logging.info("Prepared %s at %s (%s).", builder.name, builder.data_dir, sizes)
    print(f"Prepared {builder.name} {builder.version} at {builder.data_dir}: {sizes}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
