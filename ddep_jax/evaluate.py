r"""Standalone evaluation of a fine-tuned (stage-3) checkpoint.

  python -m ddep_jax.evaluate --workdir=FINETUNE_WORKDIR [--split=test] \
      [--mode=whole|sliding|cityscapes|multiscale] [--base_scale=0.5] \
      [--flip|--noflip] [--step=-1] [--output_dir=DIR] [--num_visualize=8] \
      [--data_dir=...]

Reads the run's config.json and its checkpoint (every parameter checked for
path, shape and dtype), segments every image of the split with the chosen
protocol, and writes to --output_dir (default WORKDIR/eval_standalone):

* ``<split>_<mode>_<step>.json``: mIoU over the global confusion matrix,
  per-class IoU (``per_class_iou``, a list in class-id order, and
  ``per_class``, {class name: IoU}; ``null`` for classes absent from
  prediction and ground truth, listed in ``excluded_classes``), pixel
  accuracy, the protocol;
* ``<split>_<mode>_<step>/<image stem>.png``: image | prediction | ground
  truth | overlay, in the dataset's palette, with a legend of the classes
  shown, for the first --num_visualize images (named after the image file,
  e.g. ``0016E5_08059.png``; by index, ``00007.png``, when the dataset's
  records have no file name).

--split takes the config's split names (``train``, ``validation``, ``test``)
or the dataset's own (TFDS) split names they map to; an unknown name exits
with one line listing them.
"""

from __future__ import annotations

import os
import sys

import ml_collections
from absl import app, flags, logging

from ddep_jax.common import writers
from ddep_jax.data import seg_datasets
from ddep_jax.evaluation import metrics
from ddep_jax.evaluation.inference import EVAL_MODES
from ddep_jax.evaluation.segmentation import load_finetuned, run_evaluation


def define_flags() -> None:
    """The command line's flags, defined only when the module runs as a
    program (or a test asks), so that it can be imported beside other
    entry points that define flags of the same names."""
    flags.DEFINE_string("workdir", None, "Fine-tuning workdir.", required=True)
    flags.DEFINE_string("split", "test", "Split: train, validation or test, or "
        "one of the dataset's own split names.")
    flags.DEFINE_enum("mode", None, EVAL_MODES, "Protocol (default: the run's "
        "config.eval.mode).")
    flags.DEFINE_float("base_scale", None, "Resize every image by this "
        "before segmenting it (default: the run's "
        "config.data.base_scale).")
    flags.DEFINE_boolean("flip", None, "--mode=whole: also average with the "
        "flipped image (default: the run's config.eval.flip; "
        "the other modes always do).")
    flags.DEFINE_integer("step", -1, "Checkpoint step (-1 = latest).")
    flags.DEFINE_string("output_dir", None, "Output folder (default "
        "WORKDIR/eval_standalone).")
    flags.DEFINE_integer("num_visualize", 8, "Images to render.")
    flags.DEFINE_string("data_dir", None, "TFDS data_dir (default: the "
        "run's config.data.data_dir).")



def split_names(spec: seg_datasets.SegDatasetSpec) -> list[str]:
    """The split names --split accepts for `spec`: the config's names (its
    `splits` keys) then the dataset's own names they map to, each once."""
    return list(dict.fromkeys([*spec.splits, *spec.splits.values()]))


def check_split(spec: seg_datasets.SegDatasetSpec, split: str) -> str:
    """The split to evaluate for --split=`split`: `split` itself if `spec`
    has such a split (see `split_names`); with TFDS slicing (``'test[:10]'``)
    the dataset's own name of the split, sliced (``'validation[:10]'`` where
    'test' maps to 'validation').

    Raises:
      ValueError: unknown split; the one-line message lists the names.
    """
    names = split_names(spec)
    base, bracket, rest = split.partition("[")
    if base not in names:
        raise ValueError(f"--split={split!r} is not a split of {spec.name}; its "
                         f"splits are: {', '.join(names)}.")
    if bracket:
        return spec.splits.get(base, base) + bracket + rest
    return split


def _spec_of_workdir(workdir: str) -> seg_datasets.SegDatasetSpec | None:
    """The dataset spec named by WORKDIR/config.json (checked before the
    checkpoint is loaded); None if that cannot be read (load_finetuned says
    why)."""
    try:
        record = writers.read_json(os.path.join(workdir, "config.json"))
        config = ml_collections.ConfigDict(record)
        return seg_datasets.spec_for(config.data, config.model.num_outputs)
    except Exception:  # pylint: disable=broad-except
        return None


def apply_overrides(config, *, mode: str | None = None,
                    base_scale: float | None = None, flip: bool | None = None,
                    data_dir: str | None = None) -> None:
    """Sets the flags that were given on the run's config, in place.

    Raises:
      ValueError: `base_scale` is not > 0.
    """
    if mode:
        config.eval.mode = mode
    if base_scale is not None:
        if not base_scale > 0:
            raise ValueError(f"--base_scale={base_scale} must be > 0.")
        config.data.base_scale = float(base_scale)
    if flip is not None:
        config.eval.flip = bool(flip)
        if config.eval.mode != "whole":
            logging.warning("--flip=%s only applies to --mode=whole; mode %r "
                            "always averages with the flipped image.", flip,
                            config.eval.mode)
    if data_dir is not None:
        config.data.data_dir = data_dir

def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    # Bad flags end in one line, before a (possibly long) checkpoint restore.
    early = _spec_of_workdir(flags.FLAGS.workdir)
    try:
        if early is not None:
            check_split(early, flags.FLAGS.split)
        if flags.FLAGS.base_scale is not None and not flags.FLAGS.base_scale > 0:
            raise ValueError(f"--base_scale={flags.FLAGS.base_scale} must be > 0.")
    except ValueError as e:
        sys.exit(f"error: {e}")
    run = load_finetuned(flags.FLAGS.workdir, flags.FLAGS.step)
    config, spec = run["config"], run["spec"]
    try:
        split = check_split(spec, flags.FLAGS.split)
    except ValueError as e:
        sys.exit(f"error: {e}")
    apply_overrides(config, mode=flags.FLAGS.mode, base_scale=flags.FLAGS.base_scale,
                    flip=flags.FLAGS.flip, data_dir=flags.FLAGS.data_dir)
    out_dir = flags.FLAGS.output_dir or os.path.join(flags.FLAGS.workdir, "eval_standalone")
    name = f"{split}_{config.eval.mode}_{run['step']:08d}"
    result = run_evaluation(config, spec, run["model"], run["params"], split,
                            out_dir, run["step"], name=name,
                            num_visualize=flags.FLAGS.num_visualize,
                            extra={"checkpoint": run["checkpoint"]})
    mode = result["mode"]
    print(metrics.format_table(result, spec.class_names))
    print(f"{spec.name} {split} ({mode}, step {run['step']}): mIoU "
          f"{100 * result['miou']:.2f}%, pixel accuracy "
          f"{100 * result['pixel_accuracy']:.2f}% -> {out_dir}/{name}.json")


if __name__ == "__main__":
    define_flags()
    app.run(main)
