"""Segmentation evaluation of a stage-3 model: one split with the config's
test-time protocol (`evaluator.protocol`), its JSON report and PNGs, and
loading a fine-tuned model back from its workdir (`evaluate`, `predict`)."""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from ddep_jax.checkpoints import partial
from ddep_jax.common import writers
from ddep_jax.data import seg_datasets, seg_pipeline
from ddep_jax.evaluation import evaluator
from ddep_jax.models import COLLECTIONS
from ddep_jax.models.transunet import build_model
from ddep_jax.parallel.sharding import make_mesh, state_shardings


def host_local_params(params):
    """Parameters every host can run on its own devices: unchanged on one host;
    on several, gathered (FSDP shards included) and placed on a local device,
    because each host segments different images."""
    if jax.process_count() == 1:
        return params
    from jax.experimental import multihost_utils  # only needed on several hosts

    gathered = multihost_utils.process_allgather(params, tiled=True)
    return jax.device_put(gathered, jax.local_devices()[0])


def run_evaluation(config, spec, model, params, split: str, out_dir: str, step: int,
                   *, name: str | None = None, max_images: int = 0,
                   num_visualize: int = 0, extra: dict | None = None) -> dict:
    """Evaluates `params` on `split` with `config.eval`'s protocol.

    Writes OUT_DIR/<name>.json (default name ``<split>_<step>``; `extra`
    entries are added to it) and prediction PNGs in OUT_DIR/<name>/.

    Returns:
      The report: 'dataset', 'split', 'step', 'mode', 'protocol', 'seconds'
      and `evaluator.evaluate`'s figures ('miou', 'pixel_accuracy' in [0, 1],
      'per_class_iou', 'num_images', ...).

    Raises:
      FileNotFoundError: the dataset is not prepared.
      ValueError: an invalid label value (naming the record).
    """
    records = seg_datasets.open_split(spec, split, config.data.data_dir)
    source = seg_pipeline.SegmentationSource(records, spec, split=split)
    mode, kwargs = evaluator.protocol(config.eval, config.data.base_scale)
    name = name or f"{split}_{step:08d}"
    t0 = time.perf_counter()
    result = evaluator.evaluate(
        evaluator.make_logits_fn(model, host_local_params(params)), source, spec,
        mode, kwargs, max_images=max_images,
        visualize_dir=os.path.join(out_dir, name),
        num_visualize=num_visualize, process_index=jax.process_index(),
        process_count=jax.process_count())
    report = {"dataset": spec.name, "split": split, "step": step, "mode": mode,
              "protocol": {k: list(v) if isinstance(v, tuple) else v
                           for k, v in kwargs.items()},
              "seconds": round(time.perf_counter() - t0, 1), **(extra or {}),
              **result}
    if jax.process_index() == 0:
        writers.write_json(os.path.join(out_dir, name + ".json"), report)
    logging.info("eval %s step %d: mIoU %.4f, pixel acc %.4f (%d images, %s, "
                 "%.0fs)", split, step, result["miou"], result["pixel_accuracy"],
                 result["num_images"], mode, report["seconds"])
    return report


def load_finetuned(workdir: str, step: int = -1) -> dict[str, Any]:
    """A fine-tuned model and its parameters, from a stage-3 workdir.

    Returns:
      {'config', 'spec', 'model', 'params', 'step', 'checkpoint'}.

    Raises:
      FileNotFoundError: no config.json or no checkpoint in `workdir`.
      ValueError: not a stage-3 workdir, or its checkpoint does not match the
        config's model (every mismatch listed).
    """
    path = os.path.join(workdir, "config.json")
    record = writers.read_json(path)
    if record is None:
        raise FileNotFoundError(f"{path} not found: --workdir must be a fine-tuning "
                                "workdir written by python -m ddep_jax.main.")
    config = ml_collections.ConfigDict(record)
    if config.get("stage") != "finetune":
        raise ValueError(f"{path} is a config.stage={config.get('stage')!r} run; "
                         "evaluate/predict need a fine-tuning ('finetune') workdir.")
    spec = seg_datasets.spec_for(config.data, config.model.num_outputs)
    model = build_model(config.model, spec.num_classes)
    h, w = config.model.encoder.image_size
    abstract = jax.eval_shape(model.init, jax.random.key(0),
                              jnp.zeros((1, h, w, 3), jnp.float32))["params"]
    shardings = state_shardings(abstract, make_mesh(1), "replicated", 1)
    params, provenance = partial.restore_collections(
        workdir, tuple(c for c in COLLECTIONS if c in abstract), abstract, shardings,
        step)
    return {"config": config, "spec": spec, "model": model, "params": params,
            "step": provenance["step"], "checkpoint": provenance["checkpoint"]}
