r"""Standalone evaluation of a fine-tuned (stage-3) checkpoint.

  python -m ddep_jax.evaluate --workdir=FINETUNE_WORKDIR [--split=test] \
      [--mode=whole|sliding|cityscapes|multiscale] [--step=-1] \
      [--output_dir=DIR] [--num_visualize=8] [--data_dir=...]

Reads the run's config.json and its checkpoint (every parameter checked for
path, shape and dtype), segments every image of the split with the chosen
protocol, and writes to --output_dir (default WORKDIR/eval_standalone):

* ``<split>_<mode>_<step>.json``: mIoU over the global confusion matrix,
  per-class IoU (``null`` for classes absent from prediction and ground
  truth, listed in ``excluded_classes``), pixel accuracy, the protocol;
* ``<split>_<mode>_<step>/NNNNN.png``: image | prediction | ground truth |
  overlay, in the dataset's palette, for the first --num_visualize images.
"""

from __future__ import annotations

import os

from absl import app, flags, logging

from ddep_jax.evaluation import metrics
from ddep_jax.evaluation.inference import EVAL_MODES
from ddep_jax.evaluation.segmentation import load_finetuned, run_evaluation


_WORKDIR = flags.DEFINE_string("workdir", None, "Fine-tuning workdir.", required=True)
_SPLIT = flags.DEFINE_string("split", "test", "Split: train, validation or test.")
_MODE = flags.DEFINE_enum("mode", None, EVAL_MODES, "Protocol (default: the run's "
                          "config.eval.mode).")
_STEP = flags.DEFINE_integer("step", -1, "Checkpoint step (-1 = latest).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Output folder (default "
                                  "WORKDIR/eval_standalone).")
_NUM_VISUALIZE = flags.DEFINE_integer("num_visualize", 8, "Images to render.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir (default: the "
                                "run's config.data.data_dir).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    run = load_finetuned(_WORKDIR.value, _STEP.value)
    config, spec = run["config"], run["spec"]
    if _MODE.value:
        config.eval.mode = _MODE.value
    if _DATA_DIR.value is not None:
        config.data.data_dir = _DATA_DIR.value
    out_dir = _OUTPUT_DIR.value or os.path.join(_WORKDIR.value, "eval_standalone")
    name = f"{_SPLIT.value}_{config.eval.mode}_{run['step']:08d}"
    result = run_evaluation(config, spec, run["model"], run["params"], _SPLIT.value,
                            out_dir, run["step"], name=name,
                            num_visualize=_NUM_VISUALIZE.value,
                            extra={"checkpoint": run["checkpoint"]})
    mode = result["mode"]
    print(metrics.format_table(result, spec.class_names))
    print(f"{spec.name} {_SPLIT.value} ({mode}, step {run['step']}): mIoU "
          f"{100 * result['miou']:.2f}%, pixel accuracy "
          f"{100 * result['pixel_accuracy']:.2f}% -> {out_dir}/{name}.json")


if __name__ == "__main__":
    app.run(main)
