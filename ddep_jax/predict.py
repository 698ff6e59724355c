r"""Segment a folder of your own images with a fine-tuned (stage-3) checkpoint.

  python -m ddep_jax.predict --workdir=FINETUNE_WORKDIR --images=FOLDER \
      --output_dir=OUT [--mode=whole|sliding|cityscapes|multiscale] [--step=-1]

Every ``.jpg/.jpeg/.png/.bmp/.webp/.tif/.tiff`` file in FOLDER (not
recursive), of any size, is segmented at its own resolution with the run's
protocol and preprocessing (``config.data.base_scale``), and three PNGs are
written per image to OUT:

* ``<stem>_labels.png``: 8-bit class ids (the dataset's ids, [H, W]);
* ``<stem>_mask.png``: the ids in the dataset's palette, RGB [H, W, 3];
* ``<stem>_overlay.png``: the palette blended over the image (alpha 0.5).

(``<stem>_<ext>_...`` where two files share a stem, e.g. ``a.jpg``, ``a.png``.)
Memory grows with the image area (times the largest scale in 'multiscale'
mode): for very large photos use ``--mode=sliding`` or resize them first.

A file that cannot be read as an image is reported by name at the end (exit
status 1); the other images are still segmented and nothing written is lost.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from PIL import Image

from ddep_jax import visualize
from ddep_jax.evaluation import evaluator
from ddep_jax.evaluation.inference import EVAL_MODES
from ddep_jax.evaluation.segmentation import load_finetuned
from ddep_jax.models import to_float_images

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_images(folder: str) -> list[str]:
    """Sorted image paths in `folder`.

    Raises:
      FileNotFoundError: `folder` is not a directory or holds no image file.
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--images={folder!r} is not a directory.")
    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                   if f.lower().endswith(IMAGE_SUFFIXES))
    if not paths:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in "
                                f"{folder!r}.")
    return paths


def segment_folder(workdir: str, images: str, output_dir: str, *,
                   mode: str | None = None, step: int = -1) -> dict[str, str]:
    """Segments every image in `images` (see the module docstring).

    Returns:
      ``{path: error message}`` of the files that could not be read (empty
      when all succeeded).
    """
    run = load_finetuned(workdir, step)
    config, spec = run["config"], run["spec"]
    if mode:
        config.eval.mode = mode
    protocol_mode, kwargs = evaluator.protocol(config.eval, config.data.base_scale)
    logits_fn = evaluator.make_logits_fn(run["model"], run["params"])
    palette = spec.palette()
    os.makedirs(output_dir, exist_ok=True)
    failed = {}
    paths = list_images(images)
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    for path in paths:
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
        base, ext = os.path.splitext(os.path.basename(path))
        if stems.count(base) > 1:  # a.jpg and a.png: keep both
            base = f"{base}_{ext[1:].lower()}"
        stem = os.path.join(output_dir, base)
        colour = visualize.colorize(labels, palette)
        Image.fromarray(labels).save(stem + "_labels.png")
        Image.fromarray(colour).save(stem + "_mask.png")
        Image.fromarray(visualize.overlay(image, colour)).save(stem + "_overlay.png")
        logging.info("%s (%dx%d) -> %s_{labels,mask,overlay}.png", path,
                     image.shape[1], image.shape[0], stem)
    return failed


_WORKDIR = flags.DEFINE_string("workdir", None, "Fine-tuning workdir.", required=True)
_IMAGES = flags.DEFINE_string("images", None, "Folder of images.", required=True)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Output folder.", required=True)
_MODE = flags.DEFINE_enum("mode", None, EVAL_MODES, "Protocol (default: the run's "
                          "config.eval.mode).")
_STEP = flags.DEFINE_integer("step", -1, "Checkpoint step (-1 = latest).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    failed = segment_folder(_WORKDIR.value, _IMAGES.value, _OUTPUT_DIR.value,
                            mode=_MODE.value, step=_STEP.value)
    if failed:
        raise SystemExit("could not read these files (the others were written):\n  "
                         + "\n  ".join(f"{p}: {m}" for p, m in failed.items()))


if __name__ == "__main__":
    app.run(main)
