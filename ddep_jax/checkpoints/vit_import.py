"""Imports the public ViT `.npz` checkpoints into our encoder (`HybridViT`).

Source format: google-research/vision_transformer (`vit_jax/checkpoint.py`
`load`/`load_pretrained`, `vit_jax/models_vit.py`, `vit_jax/models_resnet.py`),
e.g. `gs://vit_models/imagenet21k/R50+ViT-B_16.npz`, `ViT-B_16.npz`,
`ViT-L_16.npz`. An `.npz` holds the model's parameters as float32 arrays under
flat '/'-joined keys; what differs from our Linen layout
(`ddep_jax.models.hybrid_vit`):

- Pre-Linen files (the original release) number an encoder block's children
  with one counter for all of them: LayerNorm_0, MultiHeadDotProductAttention_1,
  LayerNorm_2, MlpBlock_3 (Linen: LayerNorm_0, MultiHeadDotProductAttention_0,
  LayerNorm_1, MlpBlock_0; upstream converts with flax's `convert_pre_linen`).
- GroupNorm scale/bias may be stored as [1, 1, 1, C] (ours [C]; upstream
  `_fix_groupnorm` squeezes them, flax issue 1721).
- `Transformer/posembed_input/pos_embedding` is [1, 1 + N, D] with the class
  token's row first (classifier='token'); we have no class token, so the row
  is dropped, and the sqrt(N) x sqrt(N) grid is resampled to ours
  (image_size // 16 per side) when it differs, with
  `hybrid_vit.resize_pos_embedding`, the same function the model uses for
  other input sizes; it computes what upstream fine-tuning (`load_pretrained`)
  and TransUNet's `load_from` compute, scipy.ndimage.zoom(order=1): linear,
  aligned corners, no antialiasing.
- GroupNorm's group count is not in any shape: every public hybrid checkpoint
  (R50+ViT-B/16 and the other R+ViT files) has a ResNet stem whose
  GroupNorms use 32 groups (flax's default, upstream `models_resnet`), so
  an import into a hybrid encoder with `model.encoder.num_groups` != 32 is
  refused (it would load and compute wrong features).
- `cls`, `head/*` and `pre_logits/*` are the classifier's, not the encoder's:
  they are skipped and listed in the report.
- StdConv kernels are stored raw in both (standardised at use), so they are
  copied as they are.

CLI (only `config.model` is used; the output is read by stage 3 with
`init.mode='encoder'`, or by anything calling
`partial.restore_collections(OUTPUT, ['encoder'], ...)`):

  python -m ddep_jax.checkpoints.vit_import --npz=imagenet21k/R50+ViT-B_16.npz \\
      --config=configs/ddep_imagenet21k.py --output=DIR
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import zipfile
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from ddep_jax.common import writers
from ddep_jax.models import hybrid_vit
from ddep_jax.models.hybrid_vit import VIT_SIZES
from ddep_jax.models.transunet import build_model
from ddep_jax.common.tree_paths import path_str

POS_EMBEDDING = "Transformer/posembed_input/pos_embedding"

# Encoder-block children: Linen name -> pre-Linen name.
_PRE_LINEN_BLOCK = {
    "LayerNorm_0": "LayerNorm_0",
    "MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
    "LayerNorm_1": "LayerNorm_2",
    "MlpBlock_0": "MlpBlock_3",
}
_BLOCK_CHILD = re.compile(r"^(Transformer/encoderblock_\d+/)([^/]+)(/.*)$")
_PRE_LINEN_ONLY = re.compile(
    r"^Transformer/encoderblock_\d+/(MultiHeadDotProductAttention_1|LayerNorm_2|"
    r"MlpBlock_3)/")
_LINEN_ONLY = re.compile(
    r"^Transformer/encoderblock_\d+/(MultiHeadDotProductAttention_0|LayerNorm_1|"
    r"MlpBlock_0)/")
_GROUPNORM = re.compile(r"(^|/)gn(\d+|_root|_proj)/(scale|bias)$")
# GroupNorm groups of every public checkpoint's ResNet stem (upstream
# `models_resnet`: nn.GroupNorm() with flax's default num_groups=32).
UPSTREAM_NUM_GROUPS = 32
# Parameters of the upstream classifier, not of the encoder.
_CLASSIFIER = re.compile(r"^(cls|head/.*|pre_logits/.*)$")


def load_npz(path: str) -> dict[str, np.ndarray]:
    """Reads every array of an upstream `.npz` checkpoint.

    Args:
      path: local file (e.g. `imagenet21k/R50+ViT-B_16.npz`).

    Returns:
      {'/'-joined key: array} (float32 upstream), e.g.
      'Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel'.

    Raises:
      FileNotFoundError: `path` does not exist (the message names it).
      ValueError: `path` is not a readable `.npz` (truncated download, pickle,
        another format); the message names it.
    """
    path = writers.absolute(path)  # local, or gs://... (etils.epath)
    if not epath.Path(path).is_file():
        raise FileNotFoundError(f"ViT checkpoint {path!r} does not exist (download "
                                "e.g. gs://vit_models/imagenet21k/R50+ViT-B_16.npz).")
    try:
        with epath.Path(path).open("rb") as f:
            data = np.load(io.BytesIO(f.read()), allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("it holds a single .npy array, not an .npz archive")
        with data:
            return {key: np.asarray(data[key]) for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"cannot read ViT checkpoint {path!r} as an .npz "
                         f"archive: {e}") from e


def detect_naming(flat: Mapping[str, Any]) -> str:
    """'pre-linen' or 'linen', from the names of the encoder blocks' children.

    Raises:
      ValueError: both schemes occur in `flat`.
    """
    pre = any(_PRE_LINEN_ONLY.match(k) for k in flat)
    linen = any(_LINEN_ONLY.match(k) for k in flat)
    if pre and linen:
        raise ValueError("checkpoint mixes pre-Linen (MultiHeadDotProductAttention_1,"
                         " LayerNorm_2, MlpBlock_3) and Linen (..._0, LayerNorm_1) "
                         "encoder-block names.")
    return "pre-linen" if pre else "linen"


def describe_checkpoint(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The architecture an upstream checkpoint's shapes imply, for reports and
    error messages: {'resnet_layers' (units per stage, [] without ResNet),
    'resnet_width', 'patch' ([kh, kw] of `embedding`), 'hidden_size',
    'num_layers', 'num_heads', 'mlp_dim', 'vit_size' (our `VIT_SIZES` name or
    None)}; entries the file lacks are None."""

    units: dict[int, int] = {}
    blocks: set[int] = set()
    num_heads = mlp_dim = None
    for key, value in flat.items():
        m = re.match(r"^block(\d+)/unit(\d+)/", key)
        if m:
            units[int(m[1])] = max(units.get(int(m[1]), 0), int(m[2]))
        m = re.match(r"^Transformer/encoderblock_(\d+)/([^/]+)/", key)
        if m:
            blocks.add(int(m[1]))
            if key.endswith("/query/kernel") and value.ndim == 3:
                num_heads = int(value.shape[1])
            if re.search(r"/MlpBlock_\d+/Dense_0/kernel$", key) and value.ndim == 2:
                mlp_dim = int(value.shape[1])
    emb = flat.get("embedding/kernel")
    root = flat.get("conv_root/kernel")
    arch = {
        "resnet_layers": [units[b] for b in sorted(units)],
        "resnet_width": int(root.shape[-1]) if root is not None else None,
        "patch": [int(d) for d in emb.shape[:2]] if emb is not None else None,
        "hidden_size": int(emb.shape[-1]) if emb is not None else None,
        "num_layers": len(blocks) or None, "num_heads": num_heads, "mlp_dim": mlp_dim,
    }
    arch["vit_size"] = next(
        (name for name, size in VIT_SIZES.items()
         if all(arch[k] == v for k, v in size.items())), None)
    return arch


def upstream_key(path: str, naming: str) -> str:
    """The `.npz` key holding our parameter `path` (e.g.
    'Transformer/encoderblock_3/MlpBlock_0/Dense_1/bias') in scheme `naming`."""
    if naming == "pre-linen":
        m = _BLOCK_CHILD.match(path)
        if m and m.group(2) in _PRE_LINEN_BLOCK:
            return m.group(1) + _PRE_LINEN_BLOCK[m.group(2)] + m.group(3)
    return path


def _square_side(n: int) -> int | None:
    side = math.isqrt(n)
    return side if side * side == n and n > 0 else None


def _pos_embedding(array: np.ndarray, want_shape: tuple[int, ...], has_cls: bool,
                   target_grid: tuple[int, int] | None, key: str):
    """Drops the class-token row and resamples the grid: returns (array, info)
    or (None, problem)."""

    if array.ndim != 3 or array.shape[0] != 1 or len(want_shape) != 3:
        return None, (f"shape {key}: checkpoint {array.shape} vs model {want_shape} "
                      "(expected [1, tokens, D])")
    if array.shape[2] != want_shape[2]:
        return None, (f"shape {key}: checkpoint {array.shape} vs model {want_shape} "
                      "(hidden size differs)")
    n = array.shape[1]
    # classifier='token' files hold the class token's row first; 'gap' ones not.
    drop_cls = has_cls or (_square_side(n) is None and n > 1
                           and _square_side(n - 1) is not None)
    grid_rows = array[:, 1:] if drop_cls else array
    side = _square_side(grid_rows.shape[1])
    if side is None:
        return None, (f"shape {key}: checkpoint {array.shape} has "
                      f"{grid_rows.shape[1]} grid tokens (after "
                      f"{'dropping' if drop_cls else 'keeping'} the class-token "
                      "row), not a square grid")
    old_grid = (side, side)
    if target_grid is None:
        target_side = _square_side(want_shape[1])
        if target_side is None:
            return None, (f"shape {key}: model {want_shape} is not a square grid; "
                          "pass target_grid=(h, w)")
        target_grid = (target_side, target_side)
    target_grid = tuple(int(g) for g in target_grid)
    if target_grid[0] * target_grid[1] != want_shape[1]:
        return None, (f"shape {key}: target_grid {target_grid} does not match the "
                      f"model's {want_shape[1]} tokens")
    resized = np.asarray(hybrid_vit.resize_pos_embedding(
        grid_rows.astype(np.float32), old_grid, target_grid))
    info = {"from_grid": list(old_grid), "to_grid": list(target_grid),
            "resampled": old_grid != target_grid, "cls_row_dropped": bool(drop_cls),
            "checkpoint_shape": list(array.shape)}
    return resized, info


def npz_to_encoder_params(flat: Mapping[str, np.ndarray], abstract_encoder, *,
                          source: str = "<npz>",
                          target_grid: tuple[int, int] | None = None,
                          num_groups: int | None = None):
    """Maps an upstream checkpoint onto our encoder's parameter tree.

    Args:
      flat: `load_npz` output ({'/'-joined upstream key: array}), either naming
        scheme (pre-Linen or Linen).
      abstract_encoder: the encoder sub-tree of the model's params, leaves
        with `.shape`/`.dtype` (ShapeDtypeStruct or arrays), e.g.
        `jax.eval_shape(model.init, key, images)['params']['encoder']`.
      source: the file name, used in the report and in error messages.
      target_grid: (h, w) token grid of our position embedding; None infers a
        square grid from its shape (give it for non-square image sizes).
      num_groups: the encoder's GroupNorm groups (`model.encoder.num_groups`),
        which its parameter shapes do not show; None = not checked. Checked
        only when the encoder has GroupNorm parameters (the hybrid; the plain
        ViT has none).

    Returns:
      (params, report): params is a tree of the same structure as
      `abstract_encoder` with numpy leaves of its shapes and dtypes; report is
      a JSON-able dict {'source', 'naming', 'num_arrays', 'num_params',
      'num_checkpoint_arrays', 'skipped', 'groupnorm_reshaped',
      'pos_embedding': {'from_grid', 'to_grid', 'resampled', 'cls_row_dropped',
      'checkpoint_shape'}, 'architecture' (`describe_checkpoint`)}.

    Raises:
      ValueError: listing every problem at once, naming `source`: a model
        parameter whose upstream key is missing (with that key), a shape
        mismatch (both shapes), a non-floating array, or a checkpoint array the
        model has no place for (other than cls/head/pre_logits, which are
        skipped), e.g. a ResNet unit or encoder block the model lacks; or
        `num_groups` given, not 32, for an encoder with GroupNorm.
    """

    naming = detect_naming(flat)
    has_cls = "cls" in flat
    used: set[str] = set()
    problems: list[str] = []
    report: dict[str, Any] = {"source": source, "naming": naming,
                              "groupnorm_reshaped": 0}

    def convert_leaf(path, leaf):
        ours = path_str(path)
        key = upstream_key(ours, naming)
        want_shape, want_dtype = tuple(leaf.shape), np.dtype(leaf.dtype)
        if key not in flat:
            ours_note = "" if ours == key else f" {ours}"
            problems.append(f"missing {key} (model{ours_note} {want_shape} "
                            f"{want_dtype})")
            return None
        used.add(key)
        array = np.asarray(flat[key])
        if not np.issubdtype(array.dtype, np.floating):
            problems.append(f"dtype {key}: checkpoint {array.dtype} is not floating "
                            f"(model {want_dtype})")
            return None
        if ours == POS_EMBEDDING:
            array, info = _pos_embedding(array, want_shape, has_cls, target_grid, key)
            if array is None:
                problems.append(info)
                return None
            report["pos_embedding"] = info
        elif (_GROUPNORM.search(ours) and len(want_shape) == 1
              and array.shape != want_shape and array.ndim >= 1
              and array.shape[-1] == want_shape[0]
              and all(d == 1 for d in array.shape[:-1])):
            array = array.reshape(want_shape)  # upstream [1, 1, 1, C]
            report["groupnorm_reshaped"] += 1
        if array.shape != want_shape:
            problems.append(f"shape {key}: checkpoint {array.shape} vs model "
                            f"{want_shape} ({ours})")
            return None
        return array.astype(want_dtype)

    has_groupnorm = any(
        _GROUPNORM.search(path_str(path)) for path, _ in
        jax.tree_util.tree_flatten_with_path(abstract_encoder)[0])
    if (num_groups is not None and has_groupnorm
            and int(num_groups) != UPSTREAM_NUM_GROUPS):
        problems.append(
            f"model.encoder.num_groups={num_groups}: the public checkpoints' ResNet "
            f"stems use GroupNorm with {UPSTREAM_NUM_GROUPS} groups (not visible in "
            "the shapes; the arrays would load and compute wrong features); set "
            f"model.encoder.num_groups={UPSTREAM_NUM_GROUPS}")
    params = jax.tree_util.tree_map_with_path(convert_leaf, abstract_encoder)
    unused = sorted(set(flat) - used)
    skipped = [k for k in unused if _CLASSIFIER.match(k)]
    for k in unused:
        if not _CLASSIFIER.match(k):
            problems.append(f"unexpected {k} {tuple(flat[k].shape)}: the checkpoint "
                            "has it, the model has no such parameter")
    architecture = describe_checkpoint(flat)
    if problems:
        raise ValueError(
            f"ViT checkpoint {source} ({naming} names) does not fit the encoder in "
            f"{len(problems)} place(s); the checkpoint's shapes imply "
            f"{json.dumps(architecture)} (compare model.encoder: vit_size, "
            "resnet_layers, resnet_width):\n  " + "\n  ".join(problems))
    leaves = jax.tree.leaves(params)
    report.update(num_arrays=len(leaves), num_params=int(sum(a.size for a in leaves)),
                  num_checkpoint_arrays=len(flat), skipped=skipped,
                  architecture=architecture)
    return params, report


def abstract_encoder_params(model_config):
    """ShapeDtypeStruct tree of the encoder params of `build_model(model_config)`
    (evaluated on one image of `model.encoder.image_size`)."""

    model = build_model(model_config)
    h, w = tuple(model_config.encoder.image_size)
    images = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), images)["params"]["encoder"]


def convert(npz_path: str, model_config, output_dir: str) -> dict:
    """Converts an upstream `.npz` into an encoder checkpoint of our model.

    Args:
      npz_path: upstream checkpoint (see the module docstring).
      model_config: a config's `model` ConfigDict (`config_lib.model_config()`
        schema); its encoder must have the checkpoint's architecture.
      output_dir: new or empty folder; receives `state/` (Orbax PyTree
        `{'params': {'encoder': tree}}`, float arrays of the model's dtypes)
        and `init.json` (the report).

    Returns:
      The report of `npz_to_encoder_params` plus 'output', 'checkpoint' and
      'model' (the model config).

    Raises:
      FileExistsError: `output_dir` exists and is not an empty folder (checked
        first; nothing there is touched).
      FileNotFoundError, ValueError: see `load_npz`, `npz_to_encoder_params`
        (which checks `model_config.encoder.num_groups`).
    """
    output_dir = writers.absolute(output_dir)  # local or gs://
    out = epath.Path(output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output {output_dir!r} exists and is not an empty "
                              "folder; choose a new one (nothing was written).")
    flat = load_npz(npz_path)
    abstract = abstract_encoder_params(model_config)
    h, w = tuple(model_config.encoder.image_size)
    params, report = npz_to_encoder_params(
        flat, abstract, source=writers.absolute(npz_path),
        target_grid=(h // 16, w // 16),
        num_groups=model_config.encoder.num_groups)
    writers.makedirs(output_dir)
    state_dir = os.path.join(output_dir, "state")
    device = jax.local_devices()[0]
    ocp.PyTreeCheckpointer().save(
        state_dir, {"params": {"encoder": jax.device_put(params, device)}})
    report.update(output=output_dir, checkpoint=state_dir,
                  model=model_config.to_dict())
    writers.write_json(os.path.join(output_dir, "init.json"), report)
    return report


def _define_flags():
    """CLI flags, defined only when run as a program, so that the library can
    be imported beside `ddep_jax.main` (which also defines --config)."""
    flags.DEFINE_string("npz", None, "Upstream ViT .npz checkpoint.", required=True)
    config_flags.DEFINE_config_file(
        "config", None, "Any stage config (only config.model is used).",
        lock_config=True)
    flags.DEFINE_string("output", None, "New or empty output folder.", required=True)
    flags.mark_flags_as_required(["config"])
    return flags.FLAGS


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every step of a save
    try:
        report = convert(_FLAGS.npz, _FLAGS.config.model, _FLAGS.output)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        raise SystemExit(f"vit_import: {e}") from None
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    _FLAGS = _define_flags()
    app.run(main)
