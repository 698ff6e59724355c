"""What the stages' configs share: argument parsing, sub-schemas and checks.

Each stage's schema (`default_config()`) and validator (`validate()`) live in
its trainer module (`ddep_jax.trainers.<stage>`); the config files under
`configs/` start from one of them and override values. Here, written once:

- `parse_arg`: a config file's ':k=v,flag' argument, strictly (an unknown
  name or a malformed value is an error naming it);
- `load_config_file` and `apply_overrides`: what `--config=FILE:ARG
  --config.a.b=v` does, for Python callers (the experiment harness);
- the sub-schemas every stage has (`model_config`, `optimizer_config`,
  `mesh_config`, `add_run_options`);
- the checks shared by stages (`check_keys`, `require`, `validate_model`,
  `validate_size`, `validate_crop_area`, `validate_classes_and_splits`,
  `validate_run`), which raise ValueError naming the key.

The ConfigDicts are locked by the entry point, so a misspelt
`--config.a.b=v` override fails with the key's name too.

Why one module of ~440 lines: the parsing, the shared sub-schemas and the
shared checks are one contract (a key added to a sub-schema gets its check
and its parsing beside it), and `defaults` and every config file import
this module alone, which must stay free of JAX at import.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from typing import Any, Mapping

import ml_collections

# No JAX, model or data module at import: configs/ build their values with
# this module alone (fast `--help`, fast errors). The validators below, run
# by the trainers, import the constants they check against.

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parses a config argument 'k=v,flag' into a ConfigDict (big_vision style).

    Keys must be among `defaults`; values are converted to the type of the
    default; a bare name sets a bool default to True; booleans are one of
    true/false, yes/no, on/off, 1/0 (any case).

    Raises:
      ValueError: an unknown argument name (naming it and the known ones), a
        bare name whose default is not a bool, or a value that does not parse
        as the default's type (naming the argument, value and type).
    """
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        name, eq, value = item.partition("=")
        if name not in defaults:
            raise ValueError(f"config argument {name!r} is unknown; known: "
                             f"{sorted(defaults)}.")
        default = defaults[name]
        if not eq:
            if not isinstance(default, bool):
                raise ValueError(f"config argument {name!r} needs a value "
                                 f"({name}=<{type(default).__name__}>).")
            out[name] = True
        elif isinstance(default, bool):
            if value.lower() not in _TRUE + _FALSE:
                raise ValueError(f"config argument {name}={value!r} is not a boolean: "
                                 f"use one of {_TRUE + _FALSE}.")
            out[name] = value.lower() in _TRUE
        else:
            try:
                out[name] = type(default)(value)
            except ValueError:
                raise ValueError(f"config argument {name}={value!r} is not a "
                                 f"{type(default).__name__}.") from None
    return out


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of the config file at `path` (a `configs/*.py`), as
    `--config=PATH:ARG` of the entry point loads it.

    Raises:
      FileNotFoundError: no file at `path`.
      ValueError: the file has no `get_config`, or rejects `arg` (naming it).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} not found.")
    name = "ddep_config_" + re.sub(r"\W", "_", os.path.abspath(path))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path} defines no get_config(arg).")
    return module.get_config(arg or None)


def load_config(path: str, arg: str | None = None,
                *overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A stage config as `--config=PATH:ARG --config.KEY=VALUE ...` gives it:
    `load_config_file(path, arg)` with each mapping of dotted keys in
    `overrides` applied in turn (`apply_overrides`). The one way every entry
    point, the Python API and the harness load a config.

    Raises:
      FileNotFoundError: no file at `path`.
      ValueError: a rejected argument, or an unknown override key (named).
    """
    config = load_config_file(path, arg)
    for o in overrides:
        apply_overrides(config, o)
    return config


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """Sets dotted keys ('optimizer.learning_rate': 1e-3) of `config` in place,
    as `--config.a.b=v` does; a tuple value replaces a tuple. Returns `config`.

    Raises:
      ValueError: 'config.<key> is not a known key' for a key the config lacks.
    """
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise ValueError(f"config.{key} is not a known key (no '{part}').")
            node = node[part]
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            raise ValueError(f"config.{key} is not a known key.")
        node[leaf] = tuple(value) if isinstance(value, list) else value
    return config


def model_config() -> ml_collections.ConfigDict:
    """TransUNet defaults: R50+ViT-B/16 encoder and the 1x decoder (Sec. 2)."""
    m = ml_collections.ConfigDict()
    # MODEL_ARCHITECTURES: 'transunet' (encoder + UNet decoder with skips, the
    # paper's) or 'xnet' (models.xnet: a pretrained classifier run forward as
    # the decoder, fed the image times the re-shaped deepest encoder map).
    m.architecture = "transunet"
    m.encoder = ml_collections.ConfigDict(dict(
        vit_size="B", resnet_layers=(3, 4, 9), resnet_width=64,
        image_size=(224, 224), num_groups=32, dropout_rate=0.0))
    # ×Net (architecture 'xnet'): the decoder is a plain ResNet-v2 backbone
    # (a stage-1 classifier's, configs/classify_*.py:arch=r50unet) of these
    # stages and root width; the Post Feature Pyramid's Re-shapes output
    # `pyramid_width` channels; `product` is 'residual' (image * (1 + g)) or
    # 'plain' (image * g). Unused by the TransUNet.
    m.xnet = ml_collections.ConfigDict(dict(
        decoder_layers=(3, 4, 6, 3), decoder_width=64, pyramid_width=256,
        product="residual"))
    m.decoder_multiplier = 1
    m.decoder_widths = ()  # empty: 1x widths times the multiplier
    m.decoder_num_groups = 32
    m.num_outputs = 3
    m.noise_conditioning = False
    # The noise level a conditioned decoder is given on clean images
    # (fine-tuning, inference): sigma; 0 embeds as unet_decoder.SIGMA_FLOOR.
    # Set it inside the pretraining's range (e.g. its lowest level): a level
    # it never saw in pretraining is another input distribution.
    m.clean_noise_level = 0.0
    m.dtype = "float32"
    # Stride-1 convolutions (`models.fast_conv.CONV_IMPLS`): 'auto' is the
    # per-tap GEMM kernel gradient on CPU and XLA's convolution elsewhere.
    m.conv = "auto"
    # On CPU, the dots of an 'auto' / 'tap_gemm' step: 'ynn' (YNNPACK's
    # fusions) or 'xla' (`models.fast_conv.CPU_DOT_FUSIONS`: which is faster
    # depends on the shapes and the threads).
    m.cpu_dot_fusion = "ynn"
    return m


def optimizer_config(learning_rate: float = 0.0) -> ml_collections.ConfigDict:
    o = ml_collections.ConfigDict()
    o.learning_rate = learning_rate
    o.warmup_steps = 0
    o.b1 = 0.9
    o.b2 = 0.999
    o.weight_decay = 0.0  # > 0: AdamW (decoupled, scaled by the learning rate)
    o.grad_clip_norm = 0.0  # 0: no clipping
    # 'encoder=0.01': collections trained at a multiple of the learning rate.
    o.lr_multipliers = ""
    return o


def mesh_config() -> ml_collections.ConfigDict:
    """Device mesh and state layout (see `ddep_jax.parallel.sharding`)."""
    m = ml_collections.ConfigDict()
    m.data = -1  # devices on the data axis (all hosts together); -1 = all
    m.param_sharding = "replicated"  # or 'fsdp' (params + Adam state sharded)
    m.fsdp_min_size = 2**14  # leaves with fewer elements stay replicated
    # (regex over parameter paths, spec) pairs tried before `param_sharding`;
    # spec: 'replicated' | 'fsdp' | 'dim=N'. E.g. (('^encoder/', 'replicated'),).
    m.sharding_rules = ()
    return m


def add_data_loading(data: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The input pipeline keys every stage's `config.data` shares (reading
    threads, prefetched batches, the in-memory cache of `data.cache`).
    Returns `data`."""
    data.num_threads = 8
    data.prefetch = 4
    data.cache = "auto"  # data.cache.CACHE_MODES: decoded records held in memory
    data.cache_max_mib = 2048  # 'auto' caches up to this size per host
    return data


def data_loading(data: ml_collections.ConfigDict) -> dict:
    """The `add_data_loading` keys of `data` as keyword arguments of the
    pipelines' `make_*_dataset`."""
    return {"num_threads": data.num_threads, "prefetch": data.prefetch,
            "cache": data.cache, "cache_max_mib": data.cache_max_mib}


def add_run_options(c: ml_collections.ConfigDict, *, log_every: int = 50,
                    checkpoint_every: int = 1000,
                    keep_checkpoints: int = 2) -> ml_collections.ConfigDict:
    """Options every stage shares: the mesh, how often it logs and
    checkpoints, gradient accumulation and profiling. Returns `c`."""
    c.mesh = mesh_config()
    c.log_every = log_every
    c.checkpoint_every = checkpoint_every
    c.keep_checkpoints = keep_checkpoints
    # A SIGTERM / Ctrl-C during the final evaluation leaves it this many
    # seconds to end (exit 0); after them it is stopped and the run exits 75
    # (a rerun evaluates the saved last step). 20 s fits within the notice
    # of a GCE / Cloud TPU spot preemption and SLURM's default KillWait (30 s
    # each); -1: always finish. One host only (Preemption.grace_period).
    c.final_eval_grace_seconds = 20.0
    # The batch of one optimizer step is processed as this many equal
    # micro-batches whose gradients are summed (a batch of 512 on any device
    # count); batch_size must be divisible by devices x grad_accum_steps.
    c.grad_accum_steps = 1
    # jax.profiler trace of steps [start_step, start_step + num_steps) into
    # WORKDIR/profile (TensorBoard's profile plugin, Perfetto); 0 steps: off.
    c.profile = ml_collections.ConfigDict()
    c.profile.start_step = 5
    c.profile.num_steps = 0
    # Metrics always go to WORKDIR/metrics.jsonl and TensorBoard; a W&B
    # project name adds Weights & Biases (the `wandb` extra): 'offline' writes
    # WORKDIR/wandb (no network; `wandb sync` later), 'online' uploads.
    c.writer = ml_collections.ConfigDict()
    c.writer.wandb = ""
    c.writer.wandb_mode = "offline"
    c.writer.wandb_entity = ""
    c.writer.wandb_name = ""  # '' = the workdir's folder name
    return c


def check_keys(config, reference, prefix: str = "") -> None:
    """Raises ValueError for the first key of `config` that `reference` (the
    stage's `default_config()`) does not have, naming it and its siblings."""
    for key in config.keys():
        name = f"{prefix}{key}"
        if key not in reference:
            raise ValueError(f"config.{name} is not a known key; known keys at "
                             f"this level: {sorted(reference.keys())}.")
        if isinstance(reference[key], ml_collections.ConfigDict):
            check_keys(config[key], reference[key], name + ".")


def require(ok: bool, key: str, value, what: str) -> None:
    """Raises ValueError 'config.<key>=<value> is invalid: <what>.' unless ok."""
    if not ok:
        raise ValueError(f"config.{key}={value!r} is invalid: {what}.")


MODEL_ARCHITECTURES = ("transunet", "xnet")


def architecture(model_config) -> str:
    """`model.architecture` ('transunet' where a workdir's config.json
    predates the setting)."""
    return model_config.get("architecture", "transunet")


def input_multiple(model_config) -> int:
    """What input sides must be multiples of: 16 (the ViT patch grid at 1/16),
    32 for the plain ResNet encoder (`vit_size='none'`, output at 1/32) and
    for ×Net (its ResNet decoder's output is at 1/32)."""
    from ddep_jax.models.hybrid_vit import NO_VIT

    if model_config.encoder.vit_size == NO_VIT or architecture(model_config) == "xnet":
        return 32
    return 16


def validate_size(key: str, size, multiple: int = 16) -> None:
    """(H, W) pixels, both positive multiples of `multiple` (16: the ViT
    patch grid; `input_multiple(config.model)`)."""
    size = tuple(size)
    require(len(size) == 2 and all(s > 0 and s % multiple == 0 for s in size), key,
            size, f"need (H, W), multiples of {multiple}")


def validate_crop_area(key: str, area_range) -> None:
    """An inception-crop area range (low, high) with 0 < low <= high <= 1."""
    lo, hi = area_range
    require(0 < lo <= hi <= 1, key, (lo, hi), "need 0 < low <= high <= 1")


def validate_model(m) -> None:
    """Checks `config.model` (decoder, encoder size and stages, dtype, conv)."""
    from ddep_jax.models.fast_conv import CONV_IMPLS, CPU_DOT_FUSIONS
    from ddep_jax.models.hybrid_vit import NO_VIT as VIT_NONE, VIT_SIZES

    require(m.decoder_multiplier in (1, 2, 3), "model.decoder_multiplier",
            m.decoder_multiplier, "the paper's decoders are 1x, 2x or 3x")
    require(not m.decoder_widths or len(m.decoder_widths) == 5,
            "model.decoder_widths", m.decoder_widths, "give 5 widths or none")
    require(m.encoder.vit_size in VIT_SIZES, "model.encoder.vit_size",
            m.encoder.vit_size, f"expected one of {sorted(VIT_SIZES)}")
    validate_size("model.encoder.image_size", m.encoder.image_size, input_multiple(m))
    if m.encoder.vit_size == VIT_NONE:
        require(len(m.encoder.resnet_layers) == 4, "model.encoder.resnet_layers",
                m.encoder.resnet_layers, "vit_size='none' (plain ResNet U-Net) needs "
                "4 stages, e.g. (3, 4, 6, 3) for ResNet-50")
    else:
        require(len(m.encoder.resnet_layers) in (0, 3), "model.encoder.resnet_layers",
                m.encoder.resnet_layers, "need 3 stages (hybrid) or () (plain ViT/16)")
    require(architecture(m) in MODEL_ARCHITECTURES, "model.architecture",
            architecture(m), f"expected one of {MODEL_ARCHITECTURES}")
    if architecture(m) == "xnet":
        x = m.xnet
        require(len(x.decoder_layers) == 4 and min(x.decoder_layers) > 0,
                "model.xnet.decoder_layers", tuple(x.decoder_layers),
                "the ×Net decoder is a plain ResNet of 4 stages, e.g. (3, 4, 6, 3)")
        require(x.decoder_width > 0, "model.xnet.decoder_width", x.decoder_width, "> 0")
        require(x.pyramid_width > 0, "model.xnet.pyramid_width", x.pyramid_width, "> 0")
        require(x.product in ("residual", "plain"), "model.xnet.product", x.product,
                "'residual' (image * (1 + g)) or 'plain' (image * g)")
        require(not m.noise_conditioning, "model.noise_conditioning", True,
                "×Net has no noise-level conditioning")
    require(m.dtype in ("float32", "bfloat16"), "model.dtype", m.dtype,
            "float32 or bfloat16")
    require(m.conv in CONV_IMPLS, "model.conv", m.conv, f"expected one of {CONV_IMPLS}")
    require(m.get("cpu_dot_fusion", "ynn") in CPU_DOT_FUSIONS, "model.cpu_dot_fusion",
            m.get("cpu_dot_fusion"), f"expected one of {CPU_DOT_FUSIONS}")


def validate_classes_and_splits(config, spec, splits) -> None:
    """`model.num_outputs` is 0 or the dataset's class count, and every
    (config key, split) of `splits` names one of the dataset's splits."""
    require(config.model.num_outputs in (0, spec.num_classes), "model.num_outputs",
            config.model.num_outputs,
            f"{spec.name} has {spec.num_classes} classes (0 = that number)")
    for key, split in splits:
        require(split in spec.splits, key, split,
                f"{spec.name} splits are {sorted(spec.splits)}")


def validate_run(config, num_devices: int, num_processes: int) -> None:
    """Checks shared by the stages: batch, steps, optimizer, mesh, profile,
    the input pipeline's threads and cache, and the log / checkpoint periods."""
    import jax
    import numpy as np

    from ddep_jax.data.cache import CACHE_MODES
    from ddep_jax.parallel.sharding import PARAM_SHARDING_MODES, check_spec

    o = config.optimizer
    d = config.data
    require(d.num_threads >= 1, "data.num_threads", d.num_threads, "must be >= 1")
    require(d.prefetch >= 0, "data.prefetch", d.prefetch, "must be >= 0")
    require(d.cache in CACHE_MODES, "data.cache", d.cache,
            f"expected one of {CACHE_MODES}")
    require(d.cache_max_mib >= 0, "data.cache_max_mib", d.cache_max_mib, "must be >= 0")
    require(config.batch_size > 0, "batch_size", config.batch_size, "must be > 0")
    require(config.batch_size % num_devices == 0, "batch_size", config.batch_size,
            f"must be divisible by the {num_devices} devices on the data axis")
    require(config.batch_size % num_processes == 0, "batch_size",
            config.batch_size, f"must be divisible by the {num_processes} hosts")
    from ddep_jax.training import optim

    multipliers = optim.parse_lr_multipliers(o.get("lr_multipliers", ""))
    frozen = tuple(config.get("frozen", ()))
    require(not set(multipliers) & set(frozen), "optimizer.lr_multipliers",
            o.lr_multipliers, f"names frozen collections {sorted(set(multipliers) & set(frozen))}")
    k = config.grad_accum_steps
    require(k >= 1, "grad_accum_steps", k, "must be >= 1")
    require(config.batch_size % (num_devices * k) == 0, "batch_size",
            config.batch_size, f"must be divisible by the {num_devices} devices x "
            f"grad_accum_steps={k} (equal micro-batches on every device)")
    w = config.get("writer")
    if w is not None and w.wandb:
        from ddep_jax.common.writers import WANDB_MODES

        require(w.wandb_mode in WANDB_MODES, "writer.wandb_mode", w.wandb_mode,
                f"expected one of {WANDB_MODES}")
        require(importlib.util.find_spec("wandb") is not None, "writer.wandb",
                w.wandb, "needs the wandb package: pip install 'ddep_jax[wandb]' "
                "(or leave writer.wandb empty)")
    require(config.profile.start_step >= 1 and config.profile.num_steps >= 0,
            "profile", config.profile.to_dict(), "need start_step >= 1 and "
            "num_steps >= 0")
    for rule in config.mesh.sharding_rules:
        ok = isinstance(rule, (tuple, list)) and len(rule) == 2
        if ok:
            try:
                re.compile(rule[0])
                check_spec(rule[1])
            except (re.error, ValueError, TypeError):
                ok = False
        require(ok, "mesh.sharding_rules", rule, "each rule is (regex, spec) with "
                "spec 'replicated', 'fsdp' or 'dim=N'")
    f32_max = float(np.finfo(np.float32).max)
    for key in ("learning_rate", "weight_decay", "grad_clip_norm", "b1", "b2"):
        require(math.isfinite(o[key]) and abs(o[key]) <= f32_max, f"optimizer.{key}",
                o[key], "must be finite and representable in float32 (|x| <= "
                f"{f32_max:.3g})")
    require(config.total_steps > 0 or config.num_epochs > 0, "total_steps",
            config.total_steps, "set total_steps > 0 or num_epochs > 0")
    require(o.learning_rate >= 0, "optimizer.learning_rate", o.learning_rate,
            "must be >= 0")
    require(o.warmup_steps >= 0, "optimizer.warmup_steps", o.warmup_steps, ">= 0")
    require(o.weight_decay >= 0, "optimizer.weight_decay", o.weight_decay, ">= 0")
    require(config.mesh.param_sharding in PARAM_SHARDING_MODES, "mesh.param_sharding",
            config.mesh.param_sharding, f"expected one of {PARAM_SHARDING_MODES}")
    require(config.mesh.data == -1 or 1 <= config.mesh.data <= jax.device_count(),
            "mesh.data", config.mesh.data,
            f"-1 (all) or 1..{jax.device_count()} devices")
    # Several processes: each feeds its own devices, so the mesh spans them all.
    require(jax.process_count() == 1 or config.mesh.data in (-1, jax.device_count()),
            "mesh.data", config.mesh.data,
            f"with {jax.process_count()} processes the mesh must span all "
            f"{jax.device_count()} devices of all hosts: set -1")
    require(config.mesh.fsdp_min_size > 0, "mesh.fsdp_min_size",
            config.mesh.fsdp_min_size, "must be > 0")
    for key in ("log_every", "checkpoint_every", "keep_checkpoints"):
        require(config[key] > 0, key, config[key], "must be > 0")
    grace = config.get("final_eval_grace_seconds", -1)
    require(grace >= 0 or grace == -1, "final_eval_grace_seconds", grace,
            "seconds >= 0, or -1 to let the final evaluation always finish")
