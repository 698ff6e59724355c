"""Recipes the config files under `configs/` share (importable from anywhere,
so a config file needs no path set-up): the CPU-sized CamVid model and the
paper's fine-tuning protocol."""

from __future__ import annotations

import ml_collections

from ddep_jax import defaults
from ddep_jax.config_lib import parse_arg


ARCHITECTURES = ("hybrid", "r50unet", "xnet")
"""The configs' `arch` argument: 'hybrid' (the TransUNet: Hybrid-ViT encoder
+ UNet decoder, the paper's main model), 'r50unet' (the paper's Table 7
model: a standard U-Net on a plain ResNet-50, stages (3, 4, 6, 3), no ViT) or
'xnet' (×Net, `models.xnet`: the hybrid encoder, a plain ResNet classifier
backbone as the decoder; in the stage-1 configs, 'xnet' trains that
decoder's classifier)."""


def set_architecture(m: ml_collections.ConfigDict, arch: str) -> ml_collections.ConfigDict:
    """Switches `m` (a `config.model`) to `arch` in place: 'r50unet' sets the
    encoder to the plain ResNet-50 (`vit_size='none'`, `resnet_layers=(3, 4,
    6, 3)`; root width and groups unchanged); 'hybrid' changes nothing.

    Raises:
      ValueError: an unknown `arch`.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"config argument arch={arch!r}: expected one of {ARCHITECTURES}.")
    if arch == "r50unet":
        m.encoder.update(vit_size="none", resnet_layers=(3, 4, 6, 3))
    if arch == "xnet":  # the decoder: the paper-scale ResNet-50 classifier's backbone
        m.architecture = "xnet"
        m.xnet.update(decoder_layers=(3, 4, 6, 3), decoder_width=64, pyramid_width=256)
    return m


def xnet_decoder_classifier(m: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Turns the ×Net `config.model` `m` into the stage-1 classifier whose
    backbone is its decoder (a plain ResNet of `m.xnet.decoder_layers` and
    `decoder_width`; `models.classifier` reads `m.encoder`), so that the
    classifier's `encoder` collection loads as ×Net's `decoder` leaf for leaf.
    Updates `m` in place and returns it."""
    m.encoder.update(vit_size="none", resnet_layers=tuple(m.xnet.decoder_layers),
                     resnet_width=m.xnet.decoder_width)
    m.architecture = "transunet"
    return m


def cpu_camvid_model(m: ml_collections.ConfigDict,
                     arch: str = "hybrid") -> ml_collections.ConfigDict:
    """The CPU-sized model of the CamVid configs and of every CPU protocol of
    the label-efficiency harness (the one place that defines it; stages 1-3
    must match to hand weights over). 'hybrid': R(1,1,1) hybrid with the R50
    root width 64 + ViT-nano, 96x96 inputs, a narrow 5-block decoder of
    widths (128, 96, 64, 32, 16) at 1/16 ... 1/1 (narrow at full resolution,
    as TransUNet's (..., 64, 16): at 64 channels the last two blocks cost
    most of the step). 'r50unet': the plain ResNet-50 (root width 64) U-Net
    with decoder widths (256, 128, 64, 32, 16) from its 1/32 map. 'xnet': the
    hybrid encoder above with a plain ResNet decoder of stages (1, 1, 1, 1)
    and root width 64 (ResNet-50's (3, 4, 6, 3) shrunk as the hybrid's (3, 4,
    9) is to (1, 1, 1): a ResNet-50 decoder would cost several times the
    TransUNet's step), Post Feature Pyramid width 64. Updates `m` (a
    `config.model`) in place and returns it."""
    m.encoder.update(vit_size="nano", resnet_layers=(1, 1, 1), resnet_width=64,
                     image_size=(96, 96), num_groups=16)
    m.decoder_widths = (128, 96, 64, 32, 16)
    m.decoder_num_groups = 16
    if arch == "r50unet":
        m.decoder_widths = (256, 128, 64, 32, 16)
    set_architecture(m, arch)
    if arch == "xnet":
        m.xnet.update(decoder_layers=(1, 1, 1, 1), decoder_width=64, pyramid_width=64)
    return m


def cpu_camvid_pretraining(c: ml_collections.ConfigDict, *, steps: int, ckpt: str,
                           arch: str = "hybrid") -> ml_collections.ConfigDict:
    """The stage-2 settings the CPU CamVid pretraining configs share
    (`ddep_camvid.py`, `rotation_camvid.py`, `moco_camvid.py`): CamVid's
    training images (labels unused), inception crops of 10-100% of the area,
    the CPU model of `arch` (`cpu_camvid_model`), batch 16 for `steps` steps,
    Adam lr 1e-3 with 20 warm-up steps, the encoder from `ckpt` ('' =
    random). Updates the stage config `c` in place and returns it."""
    c.data.source = "tfds"
    c.data.name = "camvid"
    c.data.split = "train"
    c.data.crop_area_range = (0.1, 1.0)
    c.data.num_threads = 2
    c.init.checkpoint = ckpt
    num_outputs = c.model.num_outputs
    cpu_camvid_model(c.model, arch)
    c.model.num_outputs = num_outputs  # the objective's head
    c.batch_size = 16
    c.total_steps = steps
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 20
    c.log_every = 20
    c.checkpoint_every = 100
    return c


ENCODER_TRAINING = ("frozen", "train", "slow")


def set_encoder_training(c: ml_collections.ConfigDict, mode: str) -> None:
    """The pretext configs' `encoder=` argument (`ENCODER_TRAINING`): frozen
    (as DDeP), trained at the decoder's rate, or at 1/100 of it (the SSL4DP
    draft's option, `optimizer.lr_multipliers='encoder=0.01'`).

    Raises:
      ValueError: another mode, naming it.
    """
    if mode not in ENCODER_TRAINING:
        raise ValueError(f"config argument encoder={mode!r}: expected one of "
                         f"{ENCODER_TRAINING}.")
    c.frozen = ("encoder",) if mode == "frozen" else ()
    if mode == "slow":
        c.optimizer.lr_multipliers = "encoder=0.01"


def paper_finetune_config(dataset: str, arg: str | None, *, crop: int,
                          eval_mode: str, decoder: int,
                          size_multiple: int = 16) -> ml_collections.ConfigDict:
    """The paper's fine-tuning protocol on `dataset` (Sec. 5.1): crops of
    `crop`, evaluation `eval_mode` on the validation split, batch 16, Adam(W)
    with lr and weight decay 1e-4 (the middle of the swept [1e-5, 3e-4]),
    cosine decay. Config arguments: init, ckpt, fraction, seed, decoder,
    steps, dtype (float32 | bfloat16 compute), accum (micro-batches per
    step), arch (`ARCHITECTURES`: 'r50unet' is the Table 7 ResNet-50 U-Net,
    'xnet' ×Net with a ResNet-50 decoder, both evaluated at multiples of 32),
    decoder_ckpt and product (×Net, `set_xnet_init`); the 3x decoder shards
    parameters and Adam state ('fsdp')."""
    arg = parse_arg(arg, init="pretrained", ckpt="", fraction="100%", seed=0,
                    decoder=decoder, steps=40000, dtype="float32", accum=1,
                    arch="hybrid", decoder_ckpt="", product="residual")
    c = defaults.finetune()
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
    set_architecture(c.model, arg.arch)
    if arg.arch in ("r50unet", "xnet"):
        c.eval.size_multiple = max(32, size_multiple - size_multiple % 32)
    set_xnet_init(c, arg)
    return c


def set_xnet_init(c: ml_collections.ConfigDict, arg) -> None:
    """The fine-tuning configs' ×Net arguments: `decoder_ckpt` (a stage-1
    workdir of the decoder's classifier, e.g. configs/classify_cifar10.py:
    arch=xnet; '' leaves the decoder random: the 'random decoder' row) and
    `product` ('residual' | 'plain'). With arch=xnet, `init` is 'scratch',
    'encoder' (the encoder from `ckpt`) or 'pretrained' (encoder, decoder and
    neck from `ckpt`, a stage-2 denoising run of ×Net,
    configs/ddep_camvid.py:arch=xnet; then no decoder_ckpt).

    Raises:
      ValueError: decoder_ckpt without arch=xnet, or with init=pretrained.
    """
    if arg.arch != "xnet":
        if arg.decoder_ckpt:
            raise ValueError(f"config argument decoder_ckpt={arg.decoder_ckpt!r} is "
                             "×Net's: add arch=xnet.")
        return
    if arg.init == "pretrained" and arg.decoder_ckpt:
        raise ValueError("config arguments arch=xnet,init=pretrained,decoder_ckpt=...: "
                         "init=pretrained reads the decoder from ckpt (a stage-2 "
                         "denoising run of ×Net); a classifier's decoder goes with "
                         "init=encoder.")
    c.model.xnet.product = arg.product
    c.init.decoder_checkpoint = arg.decoder_ckpt
    c.init.decoder_collection = "encoder"
