r"""Export a fine-tuned (stage-3) model for use outside this project.

  python -m ddep_jax.export --workdir=FINETUNE_WORKDIR --output=OUT \
      [--step=-1] [--size=H,W] [--format=safetensors,jax_export]

Writes to OUT (created; existing files of these names are replaced)
``model.json`` and ``MODEL_CARD.md``, and per ``--format`` (a comma list of
`FORMATS`, or 'all'; default ``safetensors,jax_export``):

* ``params.safetensors`` (format ``safetensors``): every parameter of the checkpoint, float32 as
  trained, named by its Flax path joined with '/' (``encoder/block1/unit1/
  conv1/kernel``; convolution kernels [kh, kw, in, out], dense kernels [in,
  out], Flax's layouts). Safetensors (Hugging Face) reads in any framework:
  ``safetensors.numpy.load_file(path)``; `load_params` rebuilds the nested
  dict that ``model.apply({'params': ...})`` takes.
* ``model.json``: what the parameters mean: ``config.model`` (rebuild the
  module with ``transunet.build_model(ConfigDict(model), num_classes)``),
  the dataset's class names and colours, the ignore label, the input
  convention, the base scale of the training images, the checkpoint it
  came from, and the exported function's signature.
* ``inference.jax_export`` (format ``jax_export``): the inference function
  serialized with ``jax.export`` (StableHLO, with the parameters embedded): uint8 images
  [b, H, W, 3] (RGB, b any batch size, H x W the exported size) ->
  float32 logits [b, H, W, num_classes]. Reload without this package:
  ``jax.export.deserialize(bytearray(open(path, 'rb').read())).call(images)``
  (`load_exported`); deserializing needs ``flatbuffers`` besides jax.
  Platforms: the one it was exported on (CPU here), and those named by
  ``--platforms``.
* ``model.onnx`` (format ``onnx``): the same function as an ONNX model
  (opset `onnx_export.DEFAULT_OPSET`, ``--onnx_opset``): input ``images``
  uint8 [b, H, W, 3] with a dynamic batch axis b, output ``logits``
  float32 [b, H, W, C]; the class names, palette and input convention in
  its metadata_props. Converted by jax2onnx (``pip install -e '.[onnx]'``);
  runs with onnxruntime alone (docs/onnx.md; `ddep_jax.checkpoints.onnx_export` says
  which ops needed rewriting).
* ``MODEL_CARD.md``: data (dataset, label fraction, labelled images,
  seed), training (steps, batch, learning rate, crops, initialisation),
  metrics of the final evaluations (mIoU, pixel accuracy, per-class IoU),
  and the pretraining lineage from init.json.

The input size (``--size``, default the run's training crop) must be a
multiple of 16 (32 for the plain-ResNet U-Net); export the size your images
have after the run's ``data.base_scale`` resize (CamVid at 0.5: 180 x 240,
padded to 192,240), or resize / pad them to the exported size, as
`predict` and evaluation pad to ``eval.size_multiple``.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from etils import epath

from ddep_jax import config_lib
from ddep_jax.checkpoints import handover
from ddep_jax.common import writers
from ddep_jax.evaluation.segmentation import load_finetuned
from ddep_jax.models import to_float_images

PARAMS_FILE = "params.safetensors"
MODEL_FILE = "model.json"
EXPORTED_FILE = "inference.jax_export"
ONNX_FILE = "model.onnx"
CARD_FILE = "MODEL_CARD.md"
FORMATS = ("safetensors", "jax_export", "onnx")
"""What `export` can write (besides model.json and the card, always)."""
DEFAULT_FORMATS = ("safetensors", "jax_export")


def parse_formats(values) -> tuple[str, ...]:
    """--format values (a list or a comma string; 'all') -> FORMATS entries,
    in `FORMATS` order.

    Raises:
      ValueError: an unknown or no format.
    """
    if isinstance(values, str):
        values = values.split(",")
    names = {v.strip() for v in values if v.strip()}
    if "all" in names:
        names = set(FORMATS) | (names - {"all"})
    unknown = sorted(names - set(FORMATS))
    if unknown or not names:
        raise ValueError(f"--format={','.join(values)}: expected a comma list of "
                         f"{', '.join(FORMATS)} (or all).")
    return tuple(f for f in FORMATS if f in names)


def flatten_params(params) -> dict[str, np.ndarray]:
    """Nested parameter dict -> {'a/b/kernel': numpy array}."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        out["/".join(str(k.key) for k in path)] = np.asarray(jax.device_get(leaf))
    return out


def unflatten_params(flat: dict[str, np.ndarray]) -> dict:
    """{'a/b/kernel': array} -> the nested dict Flax takes."""
    out: dict = {}
    for name, value in flat.items():
        node = out
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def load_params(path: str) -> dict:
    """The nested parameters of a ``params.safetensors`` (numpy arrays).

    Raises:
      FileNotFoundError: no such file.
    """
    from safetensors.numpy import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: an export's {PARAMS_FILE} "
                                "(python -m ddep_jax.export).")
    return unflatten_params(load_file(path))


def load_exported(path: str) -> Callable[[Any], jax.Array]:
    """The exported inference function of ``inference.jax_export``:
    uint8 [b, H, W, 3] -> float32 logits [b, H, W, C]."""
    with open(path, "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    return exported.call


def default_size(run: dict) -> tuple[int, int]:
    """The run's training crop (config.data.crop_size), a valid model input."""
    h, w = run["config"].data.crop_size
    return int(h), int(w)


def parse_size(text: str) -> tuple[int, int] | None:
    """'H,W' -> (H, W); '' -> None.

    Raises:
      ValueError: not two positive integers.
    """
    if not text:
        return None
    try:
        h, w = (int(s) for s in text.split(","))
    except ValueError:
        raise ValueError(f"--size={text!r}: expected H,W (two integers, e.g. "
                         "192,240).") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"--size={text!r}: both sides must be > 0.")
    return h, w


def _card(run: dict, workdir: str, size, files: dict) -> str:
    config, spec = run["config"], run["spec"]
    subset = writers.read_json(os.path.join(workdir, "labelled_subset.json")) or {}
    done = writers.read_json(os.path.join(workdir, "done.json")) or {}
    where = (f"the mmseg folder {spec.folder}" if spec.folder else spec.name)
    lines = [f"# TransUNet fine-tuned on {spec.name}", "",
             f"Exported from `{workdir}` (checkpoint step {run['step']}) by "
             "`python -m ddep_jax.export`.", "", "## Data", "",
             f"- dataset: {where}, split {subset.get('split', 'train')}"]
    if subset:
        lines.append(f"- label fraction: {subset.get('label_fraction')} "
                     f"({subset.get('num_labelled')} of {subset.get('num_examples')} "
                     f"labelled images), subset seed {subset.get('seed')}")
    lines += [f"- classes ({spec.num_classes}): {', '.join(spec.class_names)}",
              f"- images resized by data.base_scale={config.data.base_scale}; "
              f"crops {tuple(config.data.crop_size)} in training", "",
              "## Training", "",
              f"- steps: {done.get('step', run['step'])}, batch "
              f"{config.batch_size}, seed {config.seed}",
              f"- optimizer: learning rate {config.optimizer.learning_rate}, "
              f"weight decay {config.optimizer.get('weight_decay')}",
              f"- initialisation: init.mode={config.init.mode}"
              + (f" from `{config.init.checkpoint}`" if config.init.checkpoint else ""),
              f"- model: encoder {config.model.encoder.vit_size} / ResNet "
              f"{tuple(config.model.encoder.resnet_layers)} x "
              f"{config.model.encoder.resnet_width}, decoder "
              f"{tuple(config.model.decoder_widths) or config.model.decoder_multiplier}",
              "", "## Metrics", ""]
    evals = done.get("eval", {})
    if not evals:
        lines.append("No final evaluation recorded (done.json).")
    for split, summary in evals.items():
        lines.append(f"- {split}: mIoU {100 * summary['miou']:.2f}, pixel accuracy "
                     f"{100 * summary['pixel_accuracy']:.2f} ({summary.get('num_images')} "
                     f"images, {summary.get('mode')})")
        report = writers.read_json(os.path.join(
            workdir, "eval", f"{split}_{done['step']:08d}.json"))
        if report and report.get("per_class_iou"):
            cells = ", ".join(f"{n} {'-' if v is None else f'{100 * v:.1f}'}"
                              for n, v in zip(spec.class_names, report["per_class_iou"]))
            lines.append(f"  per-class IoU: {cells}")
    lines += ["", "## Lineage (newest first, from init.json)", ""]
    for record in handover.lineage(workdir):
        lines.append(f"- stage {record.get('stage')}"
                     + (f", mode {record['mode']}" if "mode" in record else "")
                     + f": {record.get('collections') or 'nothing'} from "
                     f"`{record.get('checkpoint', '-')}`, new {record.get('new')}")
    lines += ["", "## Files", ""]
    lines += [f"- `{name}`: {what}" for name, what in files.items()]
    lines += ["", f"Inference input: uint8 RGB [b, {size[0]}, {size[1]}, 3]; output: "
              f"float32 logits [b, {size[0]}, {size[1]}, {spec.num_classes}] "
              "(argmax over the last axis gives the class ids).", ""]
    return "\n".join(lines)


def onnx_metadata(run: dict, size, multiple: int) -> dict:
    """The ONNX model's metadata_props: what a runtime needs besides the
    graph (lists as JSON strings)."""
    config, spec = run["config"], run["spec"]
    return {"format": "ddep_jax fine-tuned TransUNet",
            "num_classes": str(spec.num_classes),
            "class_names": list(spec.class_names),
            "palette": [list(c) for c in spec.class_colors],
            "ignore_label": "255", "dataset": spec.name,
            "to_model": "x / 127.5 - 1 (done inside the graph; feed uint8)",
            "base_scale": str(float(config.data.base_scale)),
            "size": [int(size[0]), int(size[1])], "size_multiple": str(multiple),
            "step": str(run["step"])}


def export(workdir: str, output: str, *, step: int = -1,
           size: tuple[int, int] | None = None,
           platforms: tuple[str, ...] = (),
           formats=DEFAULT_FORMATS, onnx_opset: int | None = None) -> dict[str, str]:
    """Exports the fine-tuned checkpoint of `workdir` into `output`.

    Args:
      workdir: a stage-3 workdir (config.json + checkpoints).
      output: the folder to write (created).
      step: which checkpoint; -1 = the latest.
      size: (H, W) of the exported inference function; None: `default_size`.
      platforms: jax.export platforms (e.g. ('cpu', 'cuda', 'tpu')); () =
        the current backend's.
      formats: which of `FORMATS` to write (`parse_formats`).
      onnx_opset: the ONNX model's opset; None: `onnx_export.DEFAULT_OPSET`.

    Returns:
      The written paths: 'model' and 'card', and per format 'params'
      (safetensors), 'exported' (jax_export), 'onnx'.

    Raises:
      FileNotFoundError / ValueError: as `load_finetuned` (no config.json or
        checkpoint, not a fine-tuning run, a mismatched checkpoint); a size
        that is not a multiple of the model's input multiple; an unknown
        format.
      ImportError: format onnx without jax2onnx / onnx installed.
    """
    formats = parse_formats(formats)
    if "onnx" in formats:
        from ddep_jax.checkpoints import onnx_export

        onnx_export.require_jax2onnx()  # before the checkpoint is read
    run = load_finetuned(workdir, step)
    config, spec, model = run["config"], run["spec"], run["model"]
    size = tuple(size) if size else default_size(run)
    multiple = config_lib.input_multiple(config.model)
    if size[0] % multiple or size[1] % multiple:
        raise ValueError(f"--size={size[0]},{size[1]}: both sides must be multiples "
                         f"of {multiple} (the encoder's patch grid).")
    out = epath.Path(output)
    out.mkdir(parents=True, exist_ok=True)
    names = {"params": PARAMS_FILE, "model": MODEL_FILE, "exported": EXPORTED_FILE,
             "onnx": ONNX_FILE, "card": CARD_FILE}
    keys = ["model", "card"] + [k for k, f in (("params", "safetensors"),
                                               ("exported", "jax_export"),
                                               ("onnx", "onnx")) if f in formats]
    paths = {k: str(out / names[k]) for k in keys}
    params = jax.device_get(run["params"])
    if "params" in paths:
        from safetensors.numpy import save_file

        save_file(flatten_params(params), paths["params"],
                  metadata={"format": "ddep_jax TransUNet parameters, Flax layout",
                            "step": str(run["step"])})

    def infer(images_uint8):
        return model.apply({"params": params}, to_float_images(images_uint8),
                           train=False)

    exported = None
    if "exported" in paths:
        batch = jax.export.symbolic_shape("b")[0]
        spec_in = jax.ShapeDtypeStruct((batch, size[0], size[1], 3), jnp.uint8)
        kwargs = {"platforms": tuple(platforms)} if platforms else {}
        exported = jax.export.export(jax.jit(infer), **kwargs)(spec_in)
        writers.write_bytes(paths["exported"], bytes(exported.serialize()))
    onnx_info = None
    if "onnx" in paths:
        onnx_info = onnx_export.export_onnx(
            onnx_export.export_model(config.model, spec.num_classes), params, size,
            paths["onnx"], metadata=onnx_metadata(run, size, multiple),
            opset=onnx_opset or onnx_export.DEFAULT_OPSET)
        logging.info("ONNX: %s in %.1f s (opset %d; ops %s).", paths["onnx"],
                     onnx_info["seconds"], onnx_info["opset"], ", ".join(onnx_info["ops"]))

    record = {
        "format": "ddep_jax fine-tuned TransUNet",
        "model": config.model.to_dict(),
        "num_classes": spec.num_classes,
        "class_names": list(spec.class_names),
        "class_colors": [list(c) for c in spec.class_colors],
        "ignore_label": 255,
        "input": {"dtype": "uint8", "layout": "NHWC RGB",
                  "to_model": "x / 127.5 - 1 (float32 in [-1, 1])",
                  "base_scale": float(config.data.base_scale),
                  "size_multiple": multiple},
        "source": {"workdir": os.path.abspath(workdir), "step": run["step"],
                   "checkpoint": run["checkpoint"]},
        "formats": list(formats),
    }
    if exported is not None:
        record["exported"] = {"file": EXPORTED_FILE,
                              "input": ["b", size[0], size[1], 3],
                              "output": ["b", size[0], size[1], spec.num_classes],
                              "platforms": list(exported.platforms),
                              "requires": ["jax", "flatbuffers"]}
    if onnx_info is not None:
        record["onnx"] = {"file": ONNX_FILE, "opset": onnx_info["opset"],
                          "input": {"name": onnx_export.INPUT_NAME, "dtype": "uint8",
                                    "shape": ["b", size[0], size[1], 3]},
                          "output": {"name": onnx_export.OUTPUT_NAME,
                                     "dtype": "float32",
                                     "shape": ["b", size[0], size[1], spec.num_classes]},
                          "converter": onnx_info["converter"],
                          "export_seconds": round(onnx_info["seconds"], 2),
                          "requires": ["onnxruntime", "numpy"]}
    writers.write_json(paths["model"], record)
    descriptions = {
        "params": (PARAMS_FILE, "parameters (safetensors, Flax paths and layouts)"),
        "model": (MODEL_FILE, "model config, classes, colours, input convention"),
        "exported": (EXPORTED_FILE, "jax.export StableHLO of uint8 images -> logits "
                     "(reload: jax + flatbuffers)"),
        "onnx": (ONNX_FILE, f"ONNX (opset {onnx_info and onnx_info['opset']}) of uint8 "
                 "images -> logits, dynamic batch (run: onnxruntime + numpy)"),
        "card": (CARD_FILE, "this card")}
    files = dict(descriptions[k] for k in
                 ("params", "model", "exported", "onnx", "card") if k in paths)
    writers.write_bytes(paths["card"], _card(run, workdir, size, files).encode())
    logging.info("Exported %s (step %d) to %s: %s.", workdir, run["step"], output,
                 ", ".join(files))
    return paths


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "A fine-tuning (stage-3) workdir.")
    flags.DEFINE_string("output", None, "The folder to write the export into.")
    flags.DEFINE_integer("step", -1, "Checkpoint step; -1 = the latest.")
    flags.DEFINE_string("size", "", "H,W of the exported inference function "
                        "(default: the run's training crop).")
    flags.DEFINE_list("platforms", [], "jax.export platforms (cpu, cuda, tpu); "
                      "default: this machine's.")
    flags.DEFINE_list("format", list(DEFAULT_FORMATS),
                      f"What to write besides model.json and the card: a comma list "
                      f"of {', '.join(FORMATS)}, or all.")
    flags.DEFINE_integer("onnx_opset", None, "Opset of model.onnx (default "
                         "onnx_export.DEFAULT_OPSET, 18).")
    flags.mark_flags_as_required(["workdir", "output"])


def main(argv):
    del argv
    f = flags.FLAGS
    try:
        size = parse_size(f.size)
        paths = export(f.workdir, f.output, step=f.step, size=size,
                       platforms=tuple(f.platforms), formats=f.format,
                       onnx_opset=f.onnx_opset)
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise app.UsageError(str(e)) from None
    for name, path in paths.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
