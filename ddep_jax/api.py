"""The Python API: what a user calls from a script or a notebook.

    from ddep_jax import api

    config = api.load_config("configs/ddep_default.py", "steps=50")
    api.train(config, "workdirs/ddep")                  # any stage, by its config
    ft = api.load_config("configs/finetune_camvid.py",
                         "init=pretrained,ckpt=workdirs/ddep,fraction=1/30",
                         {"data.source": "mmseg", "data.folder": "FOLDER"})
    result = api.train(ft, "workdirs/ft")               # result["eval"]: mIoU reports
    seg = api.load_segmenter("workdirs/ft")
    labels = seg.segment(image)                         # uint8 [H, W] class ids
    Image.fromarray(seg.overlay(image, labels)).save("overlay.png")

Each function is a thin, documented entry to the machinery the command line
uses (`loop.run`, `config_lib`, `evaluation`), so a script and `python -m
ddep_jax.main` compute the same thing. `examples/quickstart.py` runs all of
it on real images (the embedded photographs, CamVid when present) and is
executed by the tests.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp
import ml_collections
import numpy as np

from ddep_jax import config_lib
from ddep_jax.evaluation import visualize
from ddep_jax.data.seg_datasets import SegDatasetSpec


def load_config(path: str, arg: str | None = None,
                overrides: Mapping[str, Any] | None = None
                ) -> ml_collections.ConfigDict:
    """A stage config as `--config=PATH:ARG --config.KEY=VALUE ...` gives it.

    Args:
      path: a config file (`configs/*.py`, relative to the working folder or
        absolute).
      arg: the file's comma-separated `k=v` argument (e.g. "steps=50").
      overrides: dotted keys -> values ({"data.folder": "/data/mine"}).

    Raises:
      FileNotFoundError: no such file.
      ValueError: a rejected argument, or an unknown override key (named).
    """
    return config_lib.load_config(path, arg, dict(overrides or {}))


def train(config: ml_collections.ConfigDict, workdir: str, **kwargs) -> dict[str, Any]:
    """Runs the stage `config.stage` in `workdir` (resuming what is there),
    exactly as `python -m ddep_jax.main` does (`trainers.loop.run`).

    Returns:
      {'step', 'loss', 'history': [(step, loss)], 'state', 'eval': {split:
      report with 'miou', 'per_class_iou', 'pixel_accuracy', ...} (stage 3),
      'preempted', 'already_finished'}.

    Raises:
      ValueError: an invalid config (naming the key) or a workdir that holds
        another run; the errors of `loop.run`.
    """
    from ddep_jax.trainers import loop

    return loop.run(config, workdir, **kwargs)


@dataclasses.dataclass
class Segmenter:
    """A fine-tuned (stage-3) model, ready to segment images.

    Attributes:
      config: the run's config (config.json of the workdir).
      spec: the dataset's `SegDatasetSpec` (class names, palette).
      model, params: the Flax module and its host-local parameters.
      step: the checkpoint's step.
    """

    config: ml_collections.ConfigDict
    spec: SegDatasetSpec
    model: Any
    params: Any
    step: int
    _logits_fn: Any = None

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.spec.class_names

    def probabilities(self, image: np.ndarray) -> np.ndarray:
        """Class probabilities of one image with the run's evaluation protocol
        (`config.eval.mode`, its `data.base_scale` resize; the input padded to
        `eval.size_multiple` and the output cropped back).

        Args:
          image: uint8 [H, W, 3] RGB, any size.

        Returns:
          float32 [H, W, num_classes].

        Raises:
          ValueError: not an [H, W, 3] image.
        """
        from ddep_jax.evaluation import evaluator
        from ddep_jax.models import to_float_images

        image = np.asarray(image)
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}.")
        if self._logits_fn is None:
            self._logits_fn = evaluator.make_logits_fn(self.model, self.params)
        mode, kwargs = evaluator.protocol(self.config.eval, self.config.data.base_scale)
        probs = evaluator.predict_at_base_scale(
            self._logits_fn, to_float_images(image.astype(np.uint8)),
            self.spec.num_classes, mode, **kwargs)
        return np.asarray(probs, np.float32)

    def segment(self, image: np.ndarray) -> np.ndarray:
        """Class ids of one image: uint8 [H, W] (argmax of `probabilities`)."""
        return np.asarray(jnp.argmax(self.probabilities(image), -1), np.uint8)

    def colorize(self, labels: np.ndarray) -> np.ndarray:
        """Class ids [H, W] in the dataset's palette: uint8 [H, W, 3]."""
        return visualize.colorize(np.asarray(labels), self.spec.palette())

    def overlay(self, image: np.ndarray, labels: np.ndarray,
                alpha: float = 0.5) -> np.ndarray:
        """The palette-coloured labels blended over the image: uint8 [H, W, 3]."""
        return visualize.overlay(np.asarray(image), self.colorize(labels), alpha)


def load_segmenter(workdir: str, step: int = -1, mode: str | None = None) -> Segmenter:
    """The fine-tuned model of a stage-3 workdir.

    Args:
      workdir: a fine-tuning workdir (config.json and checkpoints/).
      step: the checkpoint (-1: the latest).
      mode: an evaluation protocol overriding the run's (`EVAL_MODES`:
        'whole', 'sliding', 'cityscapes', 'multiscale').

    Raises:
      FileNotFoundError: no config.json or checkpoint in `workdir`.
      ValueError: not a fine-tuning workdir, a checkpoint that does not match
        its model (mismatches listed), an unknown `mode`.
    """
    from ddep_jax.evaluation.inference import EVAL_MODES
    from ddep_jax.evaluation.segmentation import load_finetuned

    if mode is not None and mode not in EVAL_MODES:
        raise ValueError(f"mode={mode!r}: expected one of {EVAL_MODES}.")
    run = load_finetuned(workdir, step)
    if mode is not None:
        run["config"].eval.mode = mode
    return Segmenter(config=run["config"], spec=run["spec"], model=run["model"],
                     params=run["params"], step=run["step"])


def evaluate(workdir: str, split: str = "test", *, step: int = -1,
             max_images: int = 0, out_dir: str | None = None) -> dict[str, Any]:
    """Scores a fine-tuned workdir on a split of its dataset with its
    evaluation protocol, as `python -m ddep_jax.evaluate` does.

    Returns:
      The report ('miou', 'per_class_iou', 'pixel_accuracy' in [0, 1],
      'num_images', 'num_pixels', ...); also written to OUT_DIR/<split>.json
      (default WORKDIR/eval_api).

    `split` is a split name of the dataset (TFDS slicing such as
    'test[:10]' works for prepared datasets), as ``--split`` takes it.

    Raises:
      ValueError: a split the dataset lacks (naming its splits); the errors
        of `load_segmenter`.
    """
    import os

    from ddep_jax.evaluate import check_split
    from ddep_jax.evaluation.segmentation import run_evaluation

    seg = load_segmenter(workdir, step)
    return run_evaluation(seg.config, seg.spec, seg.model, seg.params,
                          check_split(seg.spec, split),
                          out_dir or os.path.join(workdir, "eval_api"), seg.step,
                          name=split, max_images=max_images)
