"""Config schemas of the stages (DDeP, fine-tuning), defaults and validation.

Every config file under `configs/` starts from `ddep_config()` (stage 2) or
`finetune_config()` (stage 3) and overrides values; `config.stage` tells the
entry point which job to run; the schema (the set of keys) is fixed here, the ConfigDict is locked,
so a misspelt `--config.a.b=v` override fails with the key's name, and
`validate` rejects bad values before anything is compiled.
"""

from __future__ import annotations

import re

import ml_collections

from ddep_jax.objectives.denoising import NOISE_TYPES, TARGETS

COLLECTIONS = ("encoder", "decoder", "head")
# Paper Sec. 5.1: lr 6e-5 for the 1x and 3x decoders, 1e-4 for the 2x decoder.
PAPER_LEARNING_RATE = {1: 6e-5, 2: 1e-4, 3: 6e-5}


def parse_arg(arg: str | None, **defaults):
    """Parses a config argument 'k=v,flag' into a ConfigDict (big_vision style).

    Keys must be among `defaults`; values are converted to the type of the
    default; a bare name sets a bool default to True.

    Raises:
      ValueError: unknown argument name, naming it and the known ones.
    """
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        name, eq, value = item.partition("=")
        if name not in defaults:
            raise ValueError(f"config argument {name!r} is unknown; known: "
                             f"{sorted(defaults)}.")
        default = defaults[name]
        if not eq:
            out[name] = True
        elif isinstance(default, bool):
            out[name] = value.lower() in ("1", "true", "yes")
        else:
            out[name] = type(default)(value)
    return out


def model_config() -> ml_collections.ConfigDict:
    """TransUNet defaults: R50+ViT-B/16 encoder and the 1x decoder (Sec. 2)."""
    m = ml_collections.ConfigDict()
    m.encoder = ml_collections.ConfigDict(dict(
        vit_size="B", resnet_layers=(3, 4, 9), resnet_width=64,
        image_size=(224, 224), num_groups=32, dropout_rate=0.0))
    m.decoder_multiplier = 1
    m.decoder_widths = ()  # empty: 1x widths times the multiplier
    m.decoder_num_groups = 32
    m.num_outputs = 3
    m.noise_conditioning = False
    m.dtype = "float32"
    return m


def cpu_camvid_model(m: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The CPU-sized TransUNet of the CamVid configs (stage 2 and 3 must match
    to hand weights over): R(1,1,1) hybrid with the R50 root width 64 +
    ViT-nano, a narrow 5-block decoder. Updates `m` in place and returns it."""
    m.encoder.update(vit_size="nano", resnet_layers=(1, 1, 1), resnet_width=64,
                     image_size=(96, 96), num_groups=16)
    m.decoder_widths = (128, 96, 64, 64, 64)
    m.decoder_num_groups = 16
    return m


def optimizer_config(learning_rate: float = 0.0) -> ml_collections.ConfigDict:
    o = ml_collections.ConfigDict()
    o.learning_rate = learning_rate
    o.warmup_steps = 0
    o.b1 = 0.9
    o.b2 = 0.999
    o.weight_decay = 0.0  # > 0: AdamW (decoupled, scaled by the learning rate)
    o.grad_clip_norm = 0.0  # 0: no clipping
    return o


def mesh_config() -> ml_collections.ConfigDict:
    """Device mesh and state layout (see `ddep_jax.sharding`)."""
    m = ml_collections.ConfigDict()
    m.data = -1  # devices on the data axis (all hosts together); -1 = all
    m.param_sharding = "replicated"  # or 'fsdp' (params + Adam state sharded)
    m.fsdp_min_size = 2**14  # leaves with fewer elements stay replicated
    # (regex over parameter paths, spec) pairs tried before `param_sharding`;
    # spec: 'replicated' | 'fsdp' | 'dim=N'. E.g. (('^encoder/', 'replicated'),).
    m.sharding_rules = ()
    return m


def add_run_options(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Options every stage shares: gradient accumulation and profiling."""
    # The batch of one optimizer step is processed as this many equal
    # micro-batches whose gradients are summed (a batch of 512 on any device
    # count); batch_size must be divisible by devices x grad_accum_steps.
    c.grad_accum_steps = 1
    # jax.profiler trace of steps [start_step, start_step + num_steps) into
    # WORKDIR/profile (TensorBoard's profile plugin, Perfetto); 0 steps: off.
    c.profile = ml_collections.ConfigDict()
    c.profile.start_step = 5
    c.profile.num_steps = 0
    return c


def ddep_config() -> ml_collections.ConfigDict:
    """Defaults: the paper's DDeP run (R50+ViT-B/16, 1x decoder, Sec. 5.1)."""
    c = ml_collections.ConfigDict()
    c.stage = "ddep"
    c.seed = 0
    c.model = model_config()

    # Denoising objective (Sec. 3-4).
    c.denoising = ml_collections.ConfigDict()
    c.denoising.noise_type = "scaled"  # Eq. 5; 'simple' is Eq. 1
    c.denoising.target = "eps"  # Eq. 6; 'x' is Eq. 2
    c.denoising.sigma = 0.22  # Fig. 5
    c.denoising.sigma_range = ()  # (low, high): sample sigma per example (Table 4)

    # Which top-level collections stay fixed: ('encoder',) is DDeP, () is DeP.
    c.frozen = ("encoder",)

    # The pretrained encoder (stage-1 hand-over): a stage-1 workdir, one of its
    # checkpoints/<step> folders, an Orbax folder written by `python -m
    # ddep_jax.vit_import`, or a vision_transformer .npz; only params/encoder
    # is read, every leaf must match. '' keeps the random initialisation.
    c.init = ml_collections.ConfigDict()
    c.init.checkpoint = ""
    c.init.step = -1  # which checkpoint of a workdir; -1 = the latest

    c.data = ml_collections.ConfigDict()
    c.data.source = "tfds"  # 'tfds' | 'embedded'
    c.data.name = "imagenet21k"
    c.data.split = "train"
    c.data.data_dir = ""  # '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.data.crop_area_range = (0.08, 1.0)  # inception crop (Szegedy et al. 2015)
    c.data.crop_aspect_range = (3 / 4, 4 / 3)
    c.data.flip = True
    c.data.num_threads = 8
    c.data.prefetch = 4

    c.batch_size = 512
    c.num_epochs = 100.0
    c.total_steps = 0  # > 0 overrides num_epochs

    c.optimizer = optimizer_config()
    c.mesh = mesh_config()

    c.log_every = 50
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    c.image_grid_every = 500  # and at the end; 0: no image grids
    c.image_grid_size = 8
    return add_run_options(c)


def _check_keys(config, reference, prefix=""):
    for key in config.keys():
        name = f"{prefix}{key}"
        if key not in reference:
            raise ValueError(f"config.{name} is not a known key; known keys at "
                             f"this level: {sorted(reference.keys())}.")
        if isinstance(reference[key], ml_collections.ConfigDict):
            _check_keys(config[key], reference[key], name + ".")


def _require(ok: bool, key: str, value, what: str):
    if not ok:
        raise ValueError(f"config.{key}={value!r} is invalid: {what}.")


def _validate_model(m) -> None:
    _require(m.decoder_multiplier in (1, 2, 3), "model.decoder_multiplier",
             m.decoder_multiplier, "the paper's decoders are 1x, 2x or 3x")
    _require(not m.decoder_widths or len(m.decoder_widths) == 5,
             "model.decoder_widths", m.decoder_widths, "give 5 widths or none")
    size = tuple(m.encoder.image_size)
    _require(len(size) == 2 and all(s > 0 and s % 16 == 0 for s in size),
             "model.encoder.image_size", size, "need (H, W), multiples of 16")
    _require(len(m.encoder.resnet_layers) in (0, 3), "model.encoder.resnet_layers",
             m.encoder.resnet_layers, "need 3 stages (hybrid) or () (plain ViT/16)")
    from ddep_jax.models.hybrid_vit import VIT_SIZES
    _require(m.encoder.vit_size in VIT_SIZES, "model.encoder.vit_size",
             m.encoder.vit_size, f"expected one of {sorted(VIT_SIZES)}")
    _require(m.dtype in ("float32", "bfloat16"), "model.dtype", m.dtype,
             "float32 or bfloat16")


def _validate_classes_and_splits(config, spec, splits) -> None:
    """`model.num_outputs` is 0 or the dataset's class count, and every
    (config key, split) of `splits` names one of the dataset's splits."""
    _require(config.model.num_outputs in (0, spec.num_classes), "model.num_outputs",
             config.model.num_outputs,
             f"{spec.name} has {spec.num_classes} classes (0 = that number)")
    for key, split in splits:
        _require(split in spec.splits, key, split,
                 f"{spec.name} splits are {sorted(spec.splits)}")


def _validate_run(config, num_devices: int, num_processes: int,
                  periodic: tuple[str, ...]) -> None:
    """Checks shared by the stages: batch, steps, optimizer, mesh, periods."""
    o = config.optimizer
    _require(config.batch_size > 0, "batch_size", config.batch_size, "must be > 0")
    _require(config.batch_size % num_devices == 0, "batch_size", config.batch_size,
             f"must be divisible by the {num_devices} devices on the data axis")
    _require(config.batch_size % num_processes == 0, "batch_size",
             config.batch_size, f"must be divisible by the {num_processes} hosts")
    k = config.grad_accum_steps
    _require(k >= 1, "grad_accum_steps", k, "must be >= 1")
    _require(config.batch_size % (num_devices * k) == 0, "batch_size",
             config.batch_size, f"must be divisible by the {num_devices} devices x "
             f"grad_accum_steps={k} (equal micro-batches on every device)")
    _require(config.profile.start_step >= 1 and config.profile.num_steps >= 0,
             "profile", config.profile.to_dict(), "need start_step >= 1 and "
             "num_steps >= 0")
    from ddep_jax.sharding import check_spec

    for rule in config.mesh.sharding_rules:
        ok = isinstance(rule, (tuple, list)) and len(rule) == 2
        if ok:
            try:
                re.compile(rule[0])
                check_spec(rule[1])
            except (re.error, ValueError, TypeError):
                ok = False
        _require(ok, "mesh.sharding_rules", rule, "each rule is (regex, spec) with "
                 "spec 'replicated', 'fsdp' or 'dim=N'")
    _require(config.total_steps > 0 or config.num_epochs > 0, "total_steps",
             config.total_steps, "set total_steps > 0 or num_epochs > 0")
    _require(o.learning_rate >= 0, "optimizer.learning_rate", o.learning_rate,
             "must be >= 0 (0 picks the paper's value)")
    _require(o.warmup_steps >= 0, "optimizer.warmup_steps", o.warmup_steps, ">= 0")
    _require(o.weight_decay >= 0, "optimizer.weight_decay", o.weight_decay, ">= 0")
    from ddep_jax.sharding import PARAM_SHARDING_MODES

    _require(config.mesh.param_sharding in PARAM_SHARDING_MODES, "mesh.param_sharding",
             config.mesh.param_sharding, f"expected one of {PARAM_SHARDING_MODES}")
    import jax

    _require(config.mesh.data == -1 or 1 <= config.mesh.data <= jax.device_count(),
             "mesh.data", config.mesh.data,
             f"-1 (all) or 1..{jax.device_count()} devices")
    _require(config.mesh.fsdp_min_size > 0, "mesh.fsdp_min_size",
             config.mesh.fsdp_min_size, "must be > 0")
    for key in periodic:
        _require(config[key] > 0, key, config[key], "must be > 0")


def validate(config, num_devices: int, num_processes: int = 1) -> None:
    """Rejects unknown keys and invalid values of a stage-2 config, naming the key.

    Args:
      config: a stage-2 ConfigDict.
      num_devices: global device count on the data axis.
      num_processes: host count.

    Raises:
      ValueError: the first problem found, as 'config.<key>=<value> is invalid:
        <why>' or 'config.<key> is not a known key'.
    """
    _check_keys(config, ddep_config())
    d = config.denoising
    _require(d.noise_type in NOISE_TYPES, "denoising.noise_type", d.noise_type,
             f"expected one of {NOISE_TYPES}")
    _require(d.target in TARGETS, "denoising.target", d.target,
             f"expected one of {TARGETS}")
    _require(d.sigma >= 0, "denoising.sigma", d.sigma, "must be >= 0")
    if d.sigma_range:
        low_high = tuple(d.sigma_range)
        _require(len(low_high) == 2 and 0 <= low_high[0] < low_high[1],
                 "denoising.sigma_range", low_high, "need (low, high) with 0 <= low < high")
    _validate_model(config.model)
    _require(set(config.frozen) <= set(COLLECTIONS) and "head" not in config.frozen
             and "decoder" not in config.frozen, "frozen", tuple(config.frozen),
             "only 'encoder' may be frozen in stage 2 (() trains it too: DeP)")
    _require(config.data.source in ("tfds", "embedded"), "data.source",
             config.data.source, "'tfds' or 'embedded'")
    lo, hi = config.data.crop_area_range
    _require(0 < lo <= hi <= 1, "data.crop_area_range", (lo, hi), "need 0 < low <= high <= 1")
    _validate_run(config, num_devices, num_processes,
                  ("log_every", "checkpoint_every", "keep_checkpoints"))
    _require(config.image_grid_every >= 0, "image_grid_every",
             config.image_grid_every, ">= 0 (0: no image grids)")


def learning_rate(config) -> float:
    """The configured peak learning rate, or the paper's for the decoder width."""
    if config.optimizer.learning_rate > 0:
        return config.optimizer.learning_rate
    return PAPER_LEARNING_RATE[config.model.decoder_multiplier]


CLASSIFY_LOSSES = ("softmax", "sigmoid")


def classify_config() -> ml_collections.ConfigDict:
    """Stage-1 defaults: supervised Hybrid-ViT classifier pretraining.

    ViT/big_vision recipe (Dosovitskiy et al. 2021, Sec. 4.1 and App. B.1):
    Adam(W), linear warm-up then cosine decay, inception crop + flip, label
    smoothing; `loss.type` 'sigmoid' is the usual choice for ImageNet-21k.
    `model.encoder` is the encoder that stage 2 and 3 take over, so it must
    equal theirs; `data.image_size` is the training resolution (the position
    embedding is learned for `model.encoder.image_size` and resampled to it).
    """
    c = ml_collections.ConfigDict()
    c.stage = "classify"
    c.seed = 0
    c.model = model_config()
    c.model.num_outputs = 0  # 0: the dataset's number of classes
    c.model.head_bias_init = 0.0  # big_vision: -10 with sigmoid on ImageNet-21k

    # Optional initial encoder (e.g. converted from a public .npz, to continue
    # on another dataset); '' trains from scratch. See finetune_config.init.
    c.init = ml_collections.ConfigDict()
    c.init.checkpoint = ""
    c.init.step = -1

    c.data = ml_collections.ConfigDict()
    c.data.name = "cifar10"  # a name in ddep_jax.data.class_datasets
    c.data.data_dir = ""  # '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.data.train_split = "train"
    c.data.image_size = (224, 224)  # training and evaluation input (H, W)
    c.data.crop_area_range = (0.08, 1.0)  # inception crop (Szegedy et al. 2015)
    c.data.crop_aspect_range = (3 / 4, 4 / 3)
    c.data.flip = True
    c.data.eval_crop_fraction = 0.875  # eval: resize to size/f, centre crop size
    c.data.num_threads = 8
    c.data.prefetch = 4

    c.loss = ml_collections.ConfigDict()
    c.loss.type = "softmax"  # CLASSIFY_LOSSES
    c.loss.label_smoothing = 0.0

    c.eval = ml_collections.ConfigDict()
    c.eval.splits = ("validation",)  # top-1 accuracy at the end
    c.eval.every_steps = 0  # also every N steps on the first split; 0: end only
    c.eval.batch_size = 256
    c.eval.max_examples = 0  # periodic evaluation on the first N; 0 = all

    c.batch_size = 4096
    c.num_epochs = 90.0
    c.total_steps = 0  # > 0 overrides num_epochs

    c.optimizer = optimizer_config(learning_rate=1e-3)
    c.optimizer.warmup_steps = 10000
    c.optimizer.weight_decay = 0.03
    c.optimizer.grad_clip_norm = 1.0
    c.mesh = mesh_config()

    c.log_every = 50
    c.checkpoint_every = 1000
    c.keep_checkpoints = 2
    return add_run_options(c)


def validate_classify(config, num_devices: int, num_processes: int = 1) -> None:
    """Rejects unknown keys and invalid values of a stage-1 config.

    Raises:
      ValueError: 'config.<key>=<value> is invalid: <why>' or 'config.<key> is
        not a known key'.
    """
    _check_keys(config, classify_config())
    _validate_model(config.model)
    from ddep_jax.data import class_datasets

    _require(config.data.name in class_datasets.names(), "data.name",
             config.data.name, f"expected one of {class_datasets.names()}")
    _validate_classes_and_splits(
        config, class_datasets.get_spec(config.data.name),
        [("data.train_split", config.data.train_split),
         *[("eval.splits", s) for s in config.eval.splits]])
    size = tuple(config.data.image_size)
    _require(len(size) == 2 and all(s > 0 and s % 16 == 0 for s in size),
             "data.image_size", size, "need (H, W), multiples of 16")
    lo, hi = config.data.crop_area_range
    _require(0 < lo <= hi <= 1, "data.crop_area_range", (lo, hi),
             "need 0 < low <= high <= 1")
    _require(0 < config.data.eval_crop_fraction <= 1, "data.eval_crop_fraction",
             config.data.eval_crop_fraction, "need 0 < f <= 1")
    _require(config.loss.type in CLASSIFY_LOSSES, "loss.type", config.loss.type,
             f"expected one of {CLASSIFY_LOSSES}")
    _require(0 <= config.loss.label_smoothing < 1, "loss.label_smoothing",
             config.loss.label_smoothing, "need 0 <= s < 1")
    _require(config.optimizer.learning_rate > 0, "optimizer.learning_rate",
             config.optimizer.learning_rate, "must be > 0")
    _require(config.eval.batch_size > 0 and config.eval.batch_size % num_devices == 0,
             "eval.batch_size", config.eval.batch_size,
             f"must be > 0 and divisible by the {num_devices} devices")
    for key in ("every_steps", "max_examples"):
        _require(config.eval[key] >= 0, f"eval.{key}", config.eval[key], ">= 0")
    _validate_run(config, num_devices, num_processes,
                  ("log_every", "checkpoint_every", "keep_checkpoints"))


INIT_MODES = ("scratch", "encoder", "pretrained")
"""Stage-3 initialisations (the paper's rows): no pretraining; encoder from a
checkpoint with a random decoder ("Supervised"); encoder and decoder from a
stage-2 DDeP/DeP checkpoint."""


def finetune_config() -> ml_collections.ConfigDict:
    """Stage-3 defaults: fine-tune the whole TransUNet (DDeP Sec. 5.1)."""
    c = ml_collections.ConfigDict()
    c.stage = "finetune"
    c.seed = 0
    c.model = model_config()
    c.model.num_outputs = 0  # 0: the dataset's number of classes

    # Where the initial weights come from (INIT_MODES). `checkpoint` is a
    # stage-1/2/3 workdir, one of its checkpoints/<step> folders, or an Orbax
    # state folder; `step` -1 means the latest. The head is always new.
    c.init = ml_collections.ConfigDict()
    c.init.mode = "scratch"
    c.init.checkpoint = ""
    c.init.step = -1

    c.data = ml_collections.ConfigDict()
    c.data.name = "camvid"  # a name in ddep_jax.data.seg_datasets
    c.data.data_dir = ""  # '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.data.train_split = "train"
    c.data.label_fraction = "100%"  # '1%', '1/30', '0.25', or a count '100'
    c.data.subset_seed = -1  # -1: same as `seed`
    c.data.crop_size = (512, 512)
    c.data.scale_range = (0.5, 2.0)  # random scale (times base_scale)
    c.data.base_scale = 1.0  # resize every image by this first (train and eval)
    c.data.flip = True
    c.data.num_threads = 8
    c.data.prefetch = 4

    c.eval = ml_collections.ConfigDict()
    c.eval.mode = "whole"  # ddep_jax.evaluation.inference.EVAL_MODES
    c.eval.scales = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # 'multiscale' (x base_scale)
    c.eval.flip = False  # 'whole': also average with the flipped image
    c.eval.window = (1024, 1024)  # 'sliding' (pixels of the base_scale'd image)
    c.eval.stride = 0  # 'sliding': 0 = the window size
    # Model inputs are padded to multiples of this: 16 is the ViT patch grid;
    # coarser (e.g. 128) means fewer compilations on datasets of many sizes.
    c.eval.size_multiple = 16
    c.eval.split = "validation"  # evaluated every `every_steps` and at the end
    c.eval.final_splits = ("test",)  # evaluated once at the end
    c.eval.every_steps = 0  # 0: only at the end
    c.eval.max_images = 0  # periodic evaluation on the first N images; 0 = all
    c.eval.num_visualize = 4  # colourised PNGs of the first N final-eval images

    c.batch_size = 16
    c.num_epochs = 0.0
    c.total_steps = 10000  # > 0 overrides num_epochs

    c.optimizer = optimizer_config(learning_rate=1e-4)
    c.optimizer.weight_decay = 1e-4
    c.mesh = mesh_config()

    c.log_every = 50
    c.checkpoint_every = 1000
    c.keep_checkpoints = 2
    return add_run_options(c)


def paper_finetune_config(dataset: str, arg: str | None, *, crop: int,
                          eval_mode: str, decoder: int,
                          size_multiple: int = 16) -> ml_collections.ConfigDict:
    """The paper's fine-tuning protocol on `dataset` (Sec. 5.1): crops of
    `crop`, evaluation `eval_mode` on the validation split, batch 16, Adam(W)
    with lr and weight decay 1e-4 (the middle of the swept [1e-5, 3e-4]),
    cosine decay. Config arguments: init, ckpt, fraction, seed, decoder,
    steps, dtype (float32 | bfloat16 compute), accum (micro-batches per
    step); the 3x decoder shards parameters and Adam state ('fsdp')."""
    arg = parse_arg(arg, init="pretrained", ckpt="", fraction="100%", seed=0,
                    decoder=decoder, steps=40000, dtype="float32", accum=1)
    c = finetune_config()
    c.seed = arg.seed
    c.init.mode = arg.init
    c.init.checkpoint = arg.ckpt
    c.model.decoder_multiplier = arg.decoder
    c.data.name = dataset
    c.data.label_fraction = arg.fraction
    c.data.crop_size = (crop, crop)
    c.eval.mode = eval_mode
    c.eval.size_multiple = size_multiple
    c.eval.split = "validation"
    c.eval.final_splits = ()
    c.eval.every_steps = 5000
    c.batch_size = 16
    c.total_steps = arg.steps
    c.optimizer.learning_rate = 1e-4
    c.optimizer.weight_decay = 1e-4
    c.optimizer.warmup_steps = 500
    c.model.dtype = arg.dtype
    c.grad_accum_steps = arg.accum
    if arg.decoder == 3:
        c.mesh.param_sharding = "fsdp"
    return c


def validate_finetune(config, num_devices: int, num_processes: int = 1) -> None:
    """Rejects unknown keys and invalid values of a stage-3 config.

    Raises:
      ValueError: 'config.<key>=<value> is invalid: <why>' or 'config.<key> is
        not a known key'.
    """
    _check_keys(config, finetune_config())
    _validate_model(config.model)
    _require(config.optimizer.learning_rate > 0, "optimizer.learning_rate",
             config.optimizer.learning_rate, "must be > 0 for fine-tuning")
    i = config.init
    _require(i.mode in INIT_MODES, "init.mode", i.mode, f"expected one of {INIT_MODES}")
    _require(i.mode == "scratch" or bool(i.checkpoint), "init.checkpoint",
             i.checkpoint, f"init.mode={i.mode!r} needs a checkpoint path")
    from ddep_jax.data import label_fractions, seg_datasets

    _require(config.data.name in seg_datasets.names(), "data.name", config.data.name,
             f"expected one of {seg_datasets.names()}")
    _validate_classes_and_splits(
        config, seg_datasets.get_spec(config.data.name),
        [("data.train_split", config.data.train_split),
         ("eval.split", config.eval.split),
         *[("eval.final_splits", s) for s in config.eval.final_splits]])
    try:
        label_fractions.parse_amount(config.data.label_fraction)
    except ValueError as e:
        _require(False, "data.label_fraction", config.data.label_fraction, str(e))
    crop = tuple(config.data.crop_size)
    _require(len(crop) == 2 and all(c > 0 and c % 16 == 0 for c in crop),
             "data.crop_size", crop, "need (H, W), multiples of 16")
    lo, hi = config.data.scale_range
    _require(0 < lo <= hi, "data.scale_range", (lo, hi), "need 0 < low <= high")
    _require(config.data.base_scale > 0, "data.base_scale", config.data.base_scale,
             "must be > 0")
    from ddep_jax.evaluation.inference import EVAL_MODES

    _require(config.eval.mode in EVAL_MODES, "eval.mode", config.eval.mode,
             f"expected one of {EVAL_MODES}")
    _require(len(config.eval.scales) > 0 and all(s > 0 for s in config.eval.scales),
             "eval.scales", tuple(config.eval.scales), "need positive scales")
    window = tuple(config.eval.window)
    _require(len(window) == 2 and min(window) > 0, "eval.window", window,
             "need (H, W) > 0")
    for key in ("every_steps", "stride", "max_images", "num_visualize"):
        _require(config.eval[key] >= 0, f"eval.{key}", config.eval[key], ">= 0")
    _require(config.eval.size_multiple > 0 and config.eval.size_multiple % 16 == 0,
             "eval.size_multiple", config.eval.size_multiple,
             "a positive multiple of 16 (the patch grid)")
    _validate_run(config, num_devices, num_processes,
                  ("log_every", "checkpoint_every", "keep_checkpoints"))
