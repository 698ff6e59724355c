"""Stage 2, another objective: MoCo on the encoder-decoder (SSL4DP's
encoder-decoder MoCo, patch-level MoCo and patch-level encoder-decoder MoCo;
`objectives.moco`, `models.contrastive`).

Unlabeled images (the DDeP stage's sources, each whole frame resized to
`pretext.frame_size` with its source index) -> two augmented views of each,
both cropped from the whole frame (MoCo v2's crops, flips, colour jitter,
grayscale, blur, with their geometry kept) -> the trained network embeds the
first view (the queries), its momentum copy the second (the keys) -> InfoNCE
against the positive key and a queue of earlier keys, leaving out of the
negatives the keys of the query's own image (`pretext.exclude_same_image`)
and, at the patch levels, the key patches overlapping the query patch's
region (`pretext.negative_max_overlap`; `objectives.moco.negative_exclusions`). `pretext.variant` picks what an embedding
describes (`models.contrastive.VARIANTS`): the whole image from the
decoder's output, or the cells of the encoder's token grid (positives
matched through the two crops), or the same cells of the decoder's output.

The momentum encoder (a copy of every trained collection), the queue, the
image id of each queued key and the queue's pointer are the loop's extra
train state (`loop.Stage.extra_state`):
sharded like the parameters, checkpointed and resumed with them. The
encoder is frozen (`frozen=('encoder',)`, as DDeP; not for `patch`, which
trains nothing else but the head), trained, or trained at a fraction of the
learning rate (`optimizer.lr_multipliers='encoder=0.01'`, the draft's 1/100).
Stage 3 fine-tunes from the encoder + decoder (`init.mode=pretrained`; the
encoder only for `patch`), the projection head being dropped.

`default_config()`, `validate(config, num_devices, num_processes)` and
`stage(config, mesh, workdir)` (the `loop.Stage` that `loop.run` trains).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ddep_jax import config_lib, defaults
from ddep_jax.data import pipeline
from ddep_jax.models.contrastive import VARIANTS, ContrastiveTransUNet
from ddep_jax.models.transunet import conv_of, encoder_kwargs
from ddep_jax.objectives import moco
from ddep_jax.trainers import ddep, loop


default_config = defaults.moco
"""The stage's defaults (`ddep_jax.defaults`: no JAX at import, so configs/
build and check their values without it)."""


def grid(config) -> tuple[int, int]:
    """The patch grid of an embedding: (1, 1) for `image`, else the token
    grid (input / 16 for the hybrid, / 32 for the plain ResNet)."""
    if config.pretext.variant == "image":
        return 1, 1
    m = config_lib.input_multiple(config.model)
    h, w = config.model.encoder.image_size
    return h // m, w // m


def validate(config, num_devices: int, num_processes: int = 1) -> None:
    """Rejects unknown keys and invalid values of a MoCo-pretext config.

    Raises:
      ValueError: 'config.<key>=<value> is invalid: <why>' or 'config.<key>
        is not a known key'.
    """
    require = config_lib.require
    ddep.validate_pretext_run(config, default_config(), num_devices, num_processes)
    m, p = config.model, config.pretext
    require(p.variant in VARIANTS, "pretext.variant", p.variant,
            f"expected one of {VARIANTS}")
    require(m.num_outputs > 0, "model.num_outputs", m.num_outputs,
            "the embedding size must be > 0 (MoCo v2: 128)")
    require(0 <= p.momentum < 1, "pretext.momentum", p.momentum, "must be in [0, 1)")
    require(p.temperature > 0, "pretext.temperature", p.temperature, "must be > 0")
    require(p.hidden > 0, "pretext.hidden", p.hidden, "must be > 0")
    gh, gw = grid(config)
    keys = config.batch_size * gh * gw
    require(p.queue_size >= keys, "pretext.queue_size", p.queue_size,
            f"must hold one batch's {keys} keys (batch {config.batch_size} x "
            f"{gh * gw} embeddings)")
    config_lib.validate_crop_area("pretext.crop_area_range", p.crop_area_range)
    frame = tuple(p.frame_size)
    require(len(frame) == 2 and all(int(v) > 0 for v in frame), "pretext.frame_size",
            frame, "need (height, width) in pixels, both > 0")
    require(0 <= p.negative_max_overlap <= 1, "pretext.negative_max_overlap",
            p.negative_max_overlap, "must be in [0, 1] (1: no patch is excluded)")
    require(not (p.variant == "patch" and config.frozen), "frozen",
            tuple(config.frozen), "pretext.variant='patch' embeds the encoder's "
            "tokens: with the encoder frozen only the head would train")


def build_model(config) -> ContrastiveTransUNet:
    """The TransUNet of `config.model` with the projection head of
    `config.pretext`."""
    m = config.model
    return ContrastiveTransUNet(
        encoder_kwargs=encoder_kwargs(m.encoder),
        decoder_multiplier=m.decoder_multiplier,
        decoder_widths=tuple(m.decoder_widths) if m.decoder_widths else None,
        num_outputs=m.num_outputs, decoder_num_groups=m.decoder_num_groups,
        dtype=jnp.dtype(m.dtype), conv=conv_of(m),
        variant=config.pretext.variant, hidden=config.pretext.hidden)


def make_prepare(config):
    """(batch {'image': uint8 [B, h, w, 3] whole frames, 'image_id': int32
    [B]}, key) -> ({'query', 'key_view': float32 [B, H, W, 3] in [-1, 1],
    'image_id', and for the patch variants 'positive': int32 [B, N] (the key
    patch of each query patch), 'valid': bool [B, N], 'overlap': float32
    [B, N, N] (each query patch's region against each key patch's,
    `moco.overlap_coefficient`)}, {}, dropout key)."""
    hw = tuple(config.model.encoder.image_size)
    cells = grid(config)
    area = tuple(config.pretext.crop_area_range)

    def prepare(batch, key):
        k_views, k_photo, k_dropout = jax.random.split(key, 3)
        images = batch["image"]
        boxes, flips = moco.sample_views(k_views, images.shape[0], images.shape[1:3],
                                         area=area)
        views = moco.render_views(k_photo, images, boxes, flips, hw)
        out = {"query": views[0], "key_view": views[1],
               "image_id": batch[pipeline.IMAGE_ID]}
        if config.pretext.variant != "image":
            out["positive"], out["valid"] = moco.match_patches(
                boxes[:, 0], flips[:, 0], boxes[:, 1], flips[:, 1], hw, cells)
            out["overlap"] = moco.overlap_coefficient(
                moco.patch_regions(boxes[:, 0], flips[:, 0], cells),
                moco.patch_regions(boxes[:, 1], flips[:, 1], cells))
        return out, {}, k_dropout

    return prepare


def make_extra_state(config, model):
    """(params, key) -> {'momentum': a copy of params (the key encoder),
    'queue': float32 [K, dim] random unit vectors, 'queue_ids': int32 [K]
    `moco.NO_IMAGE`, 'pointer': int32 0}."""
    def extra_state(params, key):
        size = config.pretext.queue_size
        return {"momentum": jax.tree.map(jnp.array, params),
                "queue": moco.initial_queue(key, size, config.model.num_outputs),
                "queue_ids": jnp.full((size,), moco.NO_IMAGE, jnp.int32),
                "pointer": jnp.zeros((), jnp.int32)}

    return extra_state


def make_update_extra(config, model):
    """The step's MoCo bookkeeping before the loss: momentum update of the
    key encoder with the current parameters, the keys of the second views
    (no gradient) into the batch ('key_embedding' [B, N, dim]), the queue
    and its image ids before this batch into the context ('queue',
    'queue_ids'), this batch's keys and their images' ids enqueued."""
    m = config.pretext.momentum

    def update_extra(extra, params, batch, context):
        momentum = moco.momentum_update(extra["momentum"], params, m)
        keys = jax.lax.stop_gradient(model.apply({"params": momentum},
                                                 batch["key_view"], train=False))
        flat = keys.reshape(-1, keys.shape[-1])
        ids = jnp.repeat(batch["image_id"], keys.shape[1])
        queue, pointer = moco.enqueue(extra["queue"], extra["pointer"], flat)
        queue_ids = moco.enqueue_ids(extra["queue_ids"], extra["pointer"], ids)
        return ({"momentum": momentum, "queue": queue, "queue_ids": queue_ids,
                 "pointer": pointer},
                {**batch, "key_embedding": keys},
                {**context, "queue": extra["queue"], "queue_ids": extra["queue_ids"]})

    return update_extra


def make_loss_fn(config, model):
    """(params, micro-batch, key, context) -> (InfoNCE loss, {'contrastive_accuracy',
    'matched_patches', 'excluded_negatives'}); a frozen encoder runs in
    inference mode. The negatives leave out `moco.negative_exclusions`
    (`excluded_negatives`: how many per query, mean over the queries)."""
    train = "encoder" not in tuple(config.frozen)
    p = config.pretext
    temperature = p.temperature
    image_level = p.variant == "image"

    def loss_fn(params, batch, key, context):
        q = model.apply({"params": params}, batch["query"], train=train,
                        rngs={"dropout": key} if train else None)
        k = batch["key_embedding"]
        b, n, d = q.shape
        exclude_queue, exclude_keys = moco.negative_exclusions(
            batch["image_id"], context["queue_ids"], n,
            None if image_level else batch["overlap"], p.negative_max_overlap,
            p.exclude_same_image)
        if image_level:
            loss, accuracy = moco.info_nce(q[:, 0], k[:, 0], jnp.arange(b),
                                           context["queue"], temperature,
                                           exclude_queue=exclude_queue)
            matched = jnp.ones((), jnp.float32)
            excluded = jnp.mean(jnp.sum(exclude_queue, axis=1).astype(jnp.float32))
        else:
            positive = (jnp.arange(b)[:, None] * n + batch["positive"]).reshape(-1)
            loss, accuracy = moco.info_nce(
                q.reshape(b * n, d), k.reshape(b * n, d), positive,
                context["queue"], temperature, batch["valid"].reshape(-1),
                batch_negatives=True, exclude_queue=exclude_queue,
                exclude_keys=exclude_keys)
            matched = jnp.mean(batch["valid"].astype(jnp.float32))
            not_positive = jnp.arange(b * n)[None, :] != positive[:, None]
            excluded = jnp.mean((jnp.sum(exclude_queue, axis=1) + jnp.sum(
                exclude_keys & not_positive, axis=1)).astype(jnp.float32))
        return loss, {"contrastive_accuracy": accuracy, "matched_patches": matched,
                      "excluded_negatives": excluded}

    return loss_fn


def stage(config, mesh, workdir: str | None = None, *, data: bool = True) -> loop.Stage:
    """The MoCo-pretext stage of `config` (`data=False`: no dataset)."""
    del mesh
    model = build_model(config)
    p = config.pretext
    return ddep.pretext_stage(
        config, "moco", model, data=data, workdir=workdir,
        frame_size=tuple(p.frame_size), image_ids=True,
        loss_fn=make_loss_fn(config, model), prepare=make_prepare(config),
        extra_state=make_extra_state(config, model),
        update_extra=make_update_extra(config, model),
        describe=lambda m: (f"loss {m['loss']:.4f} | contrastive acc "
                            f"{m['contrastive_accuracy']:.3f} | matched "
                            f"{m['matched_patches']:.2f} | excluded negatives "
                            f"{m['excluded_negatives']:.1f} | lr "
                            f"{m['learning_rate']:.3g}"),
        summary=(f"MoCo ({p.variant}, momentum {p.momentum}, T {p.temperature}, "
                 f"queue {p.queue_size}, views from {tuple(p.frame_size)} frames, "
                 f"same-image negatives {'excluded' if p.exclude_same_image else 'kept'}"
                 + ("" if p.variant == "image" else
                    f", overlap > {p.negative_max_overlap} excluded") + ")"))
