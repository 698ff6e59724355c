"""Stage 2, another objective: patch-level rotation prediction (SSL4DP dense
pretext task; `objectives.rotation`).

Unlabeled images (the DDeP stage's sources and crops) -> every square patch
rotated by a random multiple of 90 degrees -> the TransUNet with a 4-channel
head predicts each pixel's patch angle (pixel-level 4-way cross-entropy).
The encoder is frozen (`frozen=('encoder',)`, as DDeP), trained with the
decoder (`frozen=()`), or trained at a fraction of the learning rate
(`optimizer.lr_multipliers='encoder=0.01'`, the draft's 1/100). Stage 3 then
fine-tunes from its encoder + decoder (`init.mode=pretrained`), the head
being new, exactly as from a DDeP checkpoint.

`default_config()`, `validate(config, num_devices, num_processes)` and
`stage(config, mesh, workdir)` (the `loop.Stage` that `loop.run` trains).
"""

from __future__ import annotations

import jax

from ddep_jax import config_lib, defaults
from ddep_jax.models import to_float_images
from ddep_jax.models.transunet import build_model
from ddep_jax.objectives import rotation
from ddep_jax.trainers import ddep, loop


default_config = defaults.rotation
"""The stage's defaults (`ddep_jax.defaults`: no JAX at import, so configs/
build and check their values without it)."""


def validate(config, num_devices: int, num_processes: int = 1) -> None:
    """Rejects unknown keys and invalid values of a rotation-pretext config.

    Raises:
      ValueError: 'config.<key>=<value> is invalid: <why>' or 'config.<key>
        is not a known key'.
    """
    require = config_lib.require
    ddep.validate_pretext_run(config, default_config(), num_devices, num_processes)
    m = config.model
    require(m.num_outputs == rotation.NUM_ANGLES, "model.num_outputs", m.num_outputs,
            f"the rotation head predicts {rotation.NUM_ANGLES} angles")
    h, w = m.encoder.image_size
    p = config.pretext.patch_size
    require(p > 0 and h % p == 0 and w % p == 0, "pretext.patch_size", p,
            f"must be > 0 and divide the input size {h}x{w}")


def make_prepare(config):
    """(batch {'image': uint8 [B, H, W, 3]}, key) -> ({'image': float32 [B, H,
    W, 3] in [-1, 1] with rotated patches, 'label': int32 [B, H, W] angles},
    {}, dropout key). The rotation is applied to the uint8 pixels (exact)."""
    patch = config.pretext.patch_size

    def prepare(batch, key):
        k_angles, k_dropout = jax.random.split(key)
        images = batch["image"]
        angles = rotation.sample_angles(k_angles, images.shape[0], images.shape[1:3],
                                        patch)
        rotated = rotation.rotate_patches(images, angles, patch)
        return ({"image": to_float_images(rotated),
                 "label": rotation.angle_label_map(angles, patch)}, {}, k_dropout)

    return prepare


def make_loss_fn(config, model):
    """(params, {'image', 'label'}, key, context) -> (cross-entropy, {'pixel_accuracy'});
    a frozen encoder runs in inference mode (as in DDeP)."""
    frozen_encoder = "encoder" in tuple(config.frozen)

    def loss_fn(params, batch, key, context):
        del context
        variables = {"params": params}
        if frozen_encoder:
            features = model.apply(variables, batch["image"], train=False,
                                   method=model.encode)
            logits = model.apply(variables, features, method=model.decode)
        else:
            logits = model.apply(variables, batch["image"], train=True,
                                 rngs={"dropout": key})
        loss, accuracy = rotation.rotation_loss(logits, batch["label"])
        return loss, {"pixel_accuracy": accuracy}

    return loss_fn


def stage(config, mesh, workdir: str | None = None, *, data: bool = True) -> loop.Stage:
    """The rotation-pretext stage of `config` (`data=False`: no dataset)."""
    del mesh
    model = build_model(config.model)
    return ddep.pretext_stage(
        config, "rotation", model, data=data, workdir=workdir,
        loss_fn=make_loss_fn(config, model), prepare=make_prepare(config),
        describe=lambda m: (f"loss {m['loss']:.4f} | pixel acc "
                            f"{m['pixel_accuracy']:.3f} | lr {m['learning_rate']:.3g}"),
        summary=f"patch rotation ({config.pretext.patch_size}px patches)")
