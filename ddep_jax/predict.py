r"""Segment your own images with a fine-tuned (stage-3) checkpoint.

  python -m ddep_jax.predict --workdir=FINETUNE_WORKDIR --images=IMAGES \
      --output_dir=OUT [--mode=whole|sliding|cityscapes|multiscale] [--step=-1] \
      [--size_multiple=128]

IMAGES is a folder (its image files, not recursive), one or more image files,
or glob patterns (``'photos/*.png'``, ``'photos/**/*.jpg'`` recursive; quote
them so the shell leaves them alone), several separated by commas. Image files
are those ending in ``.jpg/.jpeg/.png/.bmp/.webp/.tif/.tiff`` (any case); a
named file or folder that is missing or not an image is an error naming it,
files a pattern or folder matches that are not images are skipped, and the
list is de-duplicated and sorted. An empty list is an error (naming IMAGES and
the suffixes) before the checkpoint is loaded and before OUT is created.

Each image, of any size, is segmented at its own resolution with the run's
protocol and preprocessing (``config.data.base_scale``), and three PNGs are
written per image to OUT (created when the first one is written):

* ``<stem>_labels.png``: 8-bit class ids (the dataset's ids, [H, W]);
* ``<stem>_mask.png``: the ids in the dataset's palette, RGB [H, W, 3];
* ``<stem>_overlay.png``: the palette blended over the image (alpha 0.5).

Where two images share a stem it is ``<stem>_<ext>`` (``a.jpg``, ``a.png``),
and where they share the file name too (``x/a.png``, ``y/a.png``), their paths
below the common folder joined by ``_`` (``x_a_png``).

Compilations: the model is compiled once per input shape, so every model input
(the image after the base_scale resize, or each window / scale of the
protocol) is padded at the bottom/right, as in evaluation (with 0.0, mid grey),
up to a multiple of ``--size_multiple``, and the prediction is cropped back:
the outputs have each image's own size. The default (0) is the run's
``config.eval.size_multiple`` (16 unless the config says otherwise), so that
predict computes exactly what evaluation does; a coarser multiple such as
``--size_multiple=128`` lets images of similar sizes share one compiled
function (much fewer compilations on photos of many sizes), but as the model
(attention, group norm) sees the padding, its predictions can differ
slightly from evaluation's. Memory grows with the image area (times
the largest scale in 'multiscale' mode): for very large photos use
``--mode=sliding`` or resize them first.

A file that cannot be read as an image is reported by name at the end (exit
status 1); the other images are still segmented and nothing written is lost.
A progress bar is shown when stderr is a terminal.
"""

from __future__ import annotations

import glob
import os
import sys
from typing import Any

import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from PIL import Image
from tqdm import tqdm

from ddep_jax.evaluation import visualize
from ddep_jax.data.folders import IMAGE_EXTENSIONS, is_image_file
from ddep_jax.evaluation import evaluator
from ddep_jax.evaluation.inference import EVAL_MODES
from ddep_jax.evaluation.segmentation import load_finetuned
from ddep_jax.models import to_float_images

IMAGE_SUFFIXES = IMAGE_EXTENSIONS  # the image folders' set: one set of image files
DEFAULT_SIZE_MULTIPLE = 0  # 0: the run's config.eval.size_multiple


def list_images(images: str) -> list[str]:
    """The image paths `images` names (see the module docstring): a folder,
    files or glob patterns, comma-separated; de-duplicated, sorted.

    Raises:
      SystemExit: (one line) a named path is missing or not an image file, or
        nothing names an image (the message names `images` and the suffixes).
    """
    suffixes = "/".join(IMAGE_SUFFIXES)
    # A single existing path is taken whole (its name may contain a comma).
    parts = [images] if os.path.exists(images) else [
        p.strip() for p in images.split(",") if p.strip()]
    found: dict[str, str] = {}  # absolute path -> path as found
    missing, not_images = [], []
    for part in parts:
        if os.path.isdir(part):
            matches = [os.path.join(part, f) for f in os.listdir(part)]
        elif os.path.isfile(part):
            if not is_image_file(part):
                not_images.append(part)
            matches = [part]
        elif glob.has_magic(part):
            matches = glob.glob(part, recursive=True)
        else:
            missing.append(part)
            matches = []
        for m in matches:
            if os.path.isfile(m) and is_image_file(m):
                found.setdefault(os.path.abspath(m), os.path.normpath(m))
    if missing:
        raise SystemExit(f"--images: no such file or folder: {', '.join(missing)}")
    if not_images:
        raise SystemExit(f"--images: not image files (expected {suffixes}): "
                         f"{', '.join(not_images)}")
    if not found:
        raise SystemExit(f"--images={images!r}: no image files ({suffixes}) found.")
    return sorted(found.values())


def output_stems(paths: list[str]) -> list[str]:
    """Unique output name stems of `paths` (see the module docstring)."""
    names = [os.path.basename(p) for p in paths]
    stems = [os.path.splitext(n)[0] for n in names]
    common = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    out = []
    for path, name, stem in zip(paths, names, stems):
        if stems.count(stem) == 1:
            out.append(stem)
        elif names.count(name) == 1:  # a.jpg, a.png
            out.append(f"{stem}_{os.path.splitext(name)[1][1:].lower()}")
        else:  # x/a.png, y/a.png
            rel = os.path.relpath(os.path.abspath(path), common)
            out.append(rel.replace(os.sep, "_").replace(".", "_"))
    seen: dict[str, int] = {}
    for i, s in enumerate(out):  # a last resort: never overwrite an output
        seen[s] = seen.get(s, 0) + 1
        if seen[s] > 1:
            out[i] = f"{s}_{seen[s]}"
    return out


def check_size_multiple(size_multiple: int) -> int:
    """`size_multiple` as an int (0: the run's); ValueError unless 0 or a
    positive multiple of 16."""
    if size_multiple == 0:
        return 0
    if int(size_multiple) != size_multiple or size_multiple < 16 or size_multiple % 16:
        raise ValueError(f"size_multiple must be a positive multiple of 16 (the patch "
                         f"grid), got {size_multiple}.")
    return int(size_multiple)


def segment_images(run: dict[str, Any], paths: list[str], output_dir: str, *,
                   mode: str | None = None,
                   size_multiple: int = DEFAULT_SIZE_MULTIPLE) -> dict[str, str]:
    """Segments the images `paths` with a `load_finetuned` run.

    `mode` (default: the run's) and `size_multiple` override the run's
    ``config.eval.mode`` / ``size_multiple`` (in place).

    Returns:
      ``{path: error message}`` of the files that could not be read.
    """
    config, spec = run["config"], run["spec"]
    if mode:
        config.eval.mode = mode
    if check_size_multiple(size_multiple):
        config.eval.size_multiple = int(size_multiple)
    protocol_mode, kwargs = evaluator.protocol(config.eval, config.data.base_scale)
    logits_fn = evaluator.make_logits_fn(run["model"], run["params"])
    palette = spec.palette()
    failed = {}
    written = 0
    bar = tqdm(list(zip(paths, output_stems(paths))), unit="image",
               disable=not sys.stderr.isatty())
    for path, name in bar:
        try:
            with Image.open(path) as im:
                image = np.asarray(im.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as e:
            failed[path] = f"{type(e).__name__}: {e}"
            logging.error("Cannot read %s: %s", path, e)
            continue
        probs = evaluator.predict_at_base_scale(
            logits_fn, to_float_images(image), spec.num_classes,
            protocol_mode, **kwargs)
        labels = np.asarray(jnp.argmax(probs, -1), np.uint8)
        os.makedirs(output_dir, exist_ok=True)
        stem = os.path.join(output_dir, name)
        colour = visualize.colorize(labels, palette)
        Image.fromarray(labels).save(stem + "_labels.png")
        Image.fromarray(colour).save(stem + "_mask.png")
        Image.fromarray(visualize.overlay(image, colour)).save(stem + "_overlay.png")
        written += 1
        if bar.disable:
            logging.info("%s (%dx%d) -> %s_{labels,mask,overlay}.png", path,
                         image.shape[1], image.shape[0], stem)
    bar.close()
    logging.info("Segmented %d of %d images into %s (%s, size multiple %d).",
                 written, len(paths), output_dir, protocol_mode,
                 config.eval.size_multiple)
    return failed


def segment_folder(workdir: str, images: str, output_dir: str, *,
                   mode: str | None = None, step: int = -1,
                   size_multiple: int = DEFAULT_SIZE_MULTIPLE) -> dict[str, str]:
    """Segments the images `images` names (a folder, files or globs; see the
    module docstring) with the checkpoint of `workdir`.

    The images are listed (and `size_multiple` checked) before the checkpoint
    is loaded.

    Returns:
      ``{path: error message}`` of the files that could not be read (empty
      when all succeeded).

    Raises:
      SystemExit: `images` names a missing or non-image path, or no image.
      ValueError: `size_multiple` is not a positive multiple of 16.
    """
    paths = list_images(images)
    check_size_multiple(size_multiple)
    run = load_finetuned(workdir, step)
    return segment_images(run, paths, output_dir, mode=mode,
                          size_multiple=size_multiple)


def define_flags() -> None:
    """The command line's flags, defined only when the module runs as a
    program (or a test asks), so that it can be imported beside other
    entry points that define flags of the same names."""
    flags.DEFINE_string("workdir", None, "Fine-tuning workdir.", required=True)
    flags.DEFINE_string(
        "images", None, "A folder, image files or glob patterns ('dir/*.png', "
        "'dir/**/*.jpg'), comma-separated.", required=True)
    flags.DEFINE_string("output_dir", None, "Output folder.", required=True)
    flags.DEFINE_enum("mode", None, EVAL_MODES, "Protocol (default: the run's "
        "config.eval.mode).")
    flags.DEFINE_integer("step", -1, "Checkpoint step (-1 = latest).")
    flags.DEFINE_integer(
        "size_multiple", DEFAULT_SIZE_MULTIPLE, "Pad model inputs to multiples of this "
        "(a positive multiple of 16; 0: the run's config.eval.size_multiple, exactly "
        "evaluation's): coarser = fewer compilations, slightly different predictions.")
    flags.register_validator("size_multiple", lambda v: v == 0 or (v >= 16 and v % 16 == 0),
        message="--size_multiple must be 0 or a positive multiple of 16.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    failed = segment_folder(flags.FLAGS.workdir, flags.FLAGS.images, flags.FLAGS.output_dir,
                            mode=flags.FLAGS.mode, step=flags.FLAGS.step,
                            size_multiple=flags.FLAGS.size_multiple)
    if failed:
        raise SystemExit("could not read these files (the others were written):\n  "
                         + "\n  ".join(f"{p}: {m}" for p, m in failed.items()))


if __name__ == "__main__":
    define_flags()
    app.run(main)
