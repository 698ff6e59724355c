"""Stage 2: decoder denoising pretraining (DDeP, Brempong et al. 2022, Sec. 4).

The encoder (frozen: DDeP; trained too: DeP, Sec. 3) takes a noisy image
x~ = sqrt(gamma) x + sqrt(1 - gamma) eps (scaled additive noise, Eq. 5; or
x + sigma eps, Eq. 1); the TransUNet decoder and a 3-channel head are
trained to predict eps (Eq. 6) or x (Eq. 2) with the mean squared error
(`objectives.denoising`). The same objective trains ×Net's decoder
(`model.architecture='xnet'`: the decoder reads the noisy image times the
encoder's re-shaped deepest map; beyond the paper). Every
`image_grid_every` steps and at the end, a grid of clean / noisy /
denoised images is written to WORKDIR/images.

`default_config()` is the paper's run (R50+ViT-B/16, 1x decoder, Sec. 5.1);
`validate(config, num_devices, num_processes)` rejects bad values;
`stage(config, mesh, workdir)` is the `loop.Stage` that `loop.run` trains.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from PIL import Image

from ddep_jax import config_lib, defaults
from ddep_jax.defaults import PAPER_LEARNING_RATE
from ddep_jax.evaluation import visualize
from ddep_jax.data import pipeline
from ddep_jax.models.transunet import build_model
from ddep_jax.objectives import denoising
from ddep_jax.trainers import loop

DATA_SOURCES = ("tfds", "embedded", "folder")


default_config = defaults.ddep
"""The stage's defaults (`ddep_jax.defaults`: no JAX at import, so configs/
build and check their values without it)."""


def validate(config, num_devices: int, num_processes: int = 1) -> None:
    """Rejects unknown keys and invalid values of a stage-2 config.

    Raises:
      ValueError: the first problem found, as 'config.<key>=<value> is invalid:
        <why>' or 'config.<key> is not a known key'.
    """
    require = config_lib.require
    config_lib.check_keys(config, default_config())
    d = config.denoising
    require(d.noise_type in denoising.NOISE_TYPES, "denoising.noise_type",
            d.noise_type, f"expected one of {denoising.NOISE_TYPES}")
    require(d.target in denoising.TARGETS, "denoising.target", d.target,
            f"expected one of {denoising.TARGETS}")
    require(d.sigma >= 0, "denoising.sigma", d.sigma, "must be >= 0")
    require(config.optimizer.learning_rate > 0, "optimizer.learning_rate",
            config.optimizer.learning_rate, "must be > 0 (the paper's: "
            f"{PAPER_LEARNING_RATE} by decoder width, Sec. 5.1)")
    if d.sigma_range:
        low_high = tuple(d.sigma_range)
        require(len(low_high) == 2 and 0 <= low_high[0] < low_high[1],
                "denoising.sigma_range", low_high,
                "need (low, high) with 0 <= low < high")
    if d.gamma_range:
        low_high = tuple(d.gamma_range)
        require(len(low_high) == 2 and 0 <= low_high[0] < low_high[1] <= 1,
                "denoising.gamma_range", low_high,
                "need (low, high) with 0 <= low < high <= 1 (Table 4: (0.9, 0.95))")
        require(not d.sigma_range, "denoising.sigma_range", tuple(d.sigma_range),
                "set sigma_range or gamma_range, not both")
    require(config.model.clean_noise_level >= 0, "model.clean_noise_level",
            config.model.clean_noise_level, "must be >= 0")
    config_lib.validate_model(config.model)
    require(tuple(config.frozen) in ((), ("encoder",)), "frozen", tuple(config.frozen),
            "only 'encoder' may be frozen in stage 2 (() trains it too: DeP)")
    validate_source(config.data)
    config_lib.validate_crop_area("data.crop_area_range", config.data.crop_area_range)
    config_lib.validate_run(config, num_devices, num_processes)
    require(config.image_grid_every >= 0, "image_grid_every",
            config.image_grid_every, ">= 0 (0: no image grids)")


def require_transunet(config) -> None:
    """The pretext tasks (rotation, MoCo) train the TransUNet's decoder: on
    ×Net only denoising is built (`configs/ddep_camvid.py:arch=xnet`); its
    classifier-pretrained decoder comes from stage 1
    (`configs/finetune_camvid.py`)."""
    config_lib.require(config_lib.architecture(config.model) == "transunet",
                       "model.architecture", config_lib.architecture(config.model),
                       f"the {config.stage} pretext task trains the TransUNet; "
                       "×Net's decoder is pretrained by classification (stage 1) "
                       "or by denoising (stage 'ddep')")


def denoising_run_name(config) -> str:
    """What a denoising run is: 'DDeP' (encoder frozen), 'DeP' (the whole
    model denoised from a random initialisation, Sec. 3), or, for the whole
    model denoised from a pretrained encoder (`init.checkpoint`), a name of
    its own: that is not the paper's DeP."""
    if "encoder" in tuple(config.frozen):
        return "DDeP"
    if config.init.checkpoint:
        return "Whole-model denoising from a pretrained encoder (not DeP)"
    return "DeP"


def unlabeled_image_fields(config, source, dataset, *, frame_size=None,
                           image_ids: bool = False) -> dict:
    """The `loop.Stage` fields every stage-2 objective on unlabeled images
    shares (DDeP / DeP, rotation, MoCo): the init input float32 [1, H, W, 3],
    `config.frozen`, the encoder read from `init.checkpoint`, the batch spec
    and a random example batch of uint8 [B, h, w, 3] ((h, w) = `frame_size`,
    else the encoder's input size; with `image_ids` also 'image_id' int32
    [B]), the dataset and its length (0 without one)."""
    h, w = config.model.encoder.image_size
    fh, fw = frame_size or (h, w)
    b = config.batch_size
    spec = {"image": jax.ShapeDtypeStruct((b, fh, fw, 3), jnp.uint8)}
    if image_ids:
        spec[pipeline.IMAGE_ID] = jax.ShapeDtypeStruct((b,), jnp.int32)

    def example_batch(rng):
        batch = {"image": rng.randint(0, 256, (b, fh, fw, 3)).astype(np.uint8)}
        if image_ids:
            batch[pipeline.IMAGE_ID] = rng.randint(0, 4 * b, (b,)).astype(np.int32)
        return batch

    return dict(
        init_inputs=(jnp.zeros((1, h, w, 3), jnp.float32),),
        frozen=tuple(config.frozen),
        init_collections=("encoder",),
        batch_spec=spec,
        example_batch=example_batch,
        dataset=dataset,
        num_examples=len(source) if source is not None else 0)


def pretext_stage(config, name: str, model, *, data: bool, describe, summary: str,
                  workdir: str | None = None, frame_size=None, image_ids: bool = False,
                  **fields) -> loop.Stage:
    """The `loop.Stage` of a stage-2 pretext objective (`rotation`, `moco`):
    `unlabeled_image_fields` on the unlabeled images of `config.data` (the
    encoder-sized crops, or with `frame_size` the whole frames at that size,
    with `image_ids` their source indices), the configured learning rate,
    plus the objective's own `fields` (loss_fn, prepare, ...). `summary` is
    followed by ' on <data> images, encoder frozen|trained'."""
    source, dataset = (make_unlabeled_data(config, workdir, frame_size=frame_size,
                                           image_ids=image_ids)
                       if data else (None, None))
    frozen = tuple(config.frozen)
    return loop.Stage(
        name=name,
        model=model,
        **unlabeled_image_fields(config, source, dataset, frame_size=frame_size,
                                 image_ids=image_ids),
        peak_lr=config.optimizer.learning_rate,
        keys=("init", "train"),
        describe=describe,
        summary=(f"{summary} on {images_name(config.data)} images, encoder "
                 f"{'frozen' if 'encoder' in frozen else 'trained'}"),
        **fields)


def validate_pretext_run(config, defaults, num_devices: int,
                         num_processes: int = 1) -> None:
    """What the other stage-2 objectives (`rotation`, `moco`) check alike:
    no key unknown to `defaults` (the stage's default config), the model, no
    noise conditioning (a pretext task has no noise level), the encoder
    frozen or not (a slower encoder is `optimizer.lr_multipliers`), a
    positive learning rate, the unlabeled-image source and its crops, the
    run options.

    Raises:
      ValueError: naming the key and value.
    """
    require = config_lib.require
    config_lib.check_keys(config, defaults)
    config_lib.validate_model(config.model)
    require_transunet(config)
    require(not config.model.noise_conditioning, "model.noise_conditioning", True,
            f"the {config.stage} pretext task has no noise level")
    require(tuple(config.frozen) in ((), ("encoder",)), "frozen", tuple(config.frozen),
            "('encoder',) or () (optimizer.lr_multipliers slows it instead)")
    require(config.optimizer.learning_rate > 0, "optimizer.learning_rate",
            config.optimizer.learning_rate, "must be > 0")
    validate_source(config.data)
    config_lib.validate_crop_area("data.crop_area_range", config.data.crop_area_range)
    config_lib.validate_run(config, num_devices, num_processes)


def validate_source(data_config) -> None:
    """`data.source` and, for an image folder, `folder` and `bad_images`
    (the folder's files are listed when the stage opens it)."""
    from ddep_jax.data import folders

    require = config_lib.require
    require(data_config.source in DATA_SOURCES, "data.source", data_config.source,
            f"expected one of {DATA_SOURCES}")
    if data_config.source == "folder":
        require(bool(data_config.folder), "data.folder", data_config.folder,
                "data.source='folder' reads the images of this folder")
        require(data_config.bad_images in folders.BAD_IMAGE_MODES, "data.bad_images",
                data_config.bad_images, f"expected one of {folders.BAD_IMAGE_MODES}")


def images_name(data_config) -> str:
    """What the run trains on, for summaries: the TFDS name, 'embedded', or
    'folder <path>'."""
    return {"tfds": data_config.name, "embedded": "embedded",
            "folder": f"folder {data_config.folder}"}[data_config.source]


def learning_rate(config) -> float:
    """The configured peak learning rate (> 0; the paper's per decoder width
    is `PAPER_LEARNING_RATE`, which the paper configs state)."""
    return config.optimizer.learning_rate


def make_source(data_config, workdir: str | None = None):
    """The random-access image source named by `config.data`. An image folder
    lists the files it skips in WORKDIR/skipped_images.txt and checks (or,
    the first time, writes) WORKDIR/image_folder.json (`folders`)."""
    if data_config.source == "embedded":
        from ddep_jax.data.embedded import EmbeddedImages  # scikit-image's photos

        return EmbeddedImages()
    if data_config.source == "folder":
        from ddep_jax.data import folders

        skipped = None
        if workdir:
            suffix = f".{jax.process_index()}" if jax.process_count() > 1 else ""
            skipped = os.path.join(workdir, folders.SKIPPED_LIST + suffix)
        source = folders.ImageFolderSource(data_config.folder, data_config.glob,
                                           data_config.bad_images, skipped)
        if workdir:
            source.check_manifest(workdir, write=jax.process_index() == 0)
        return source
    from ddep_jax.data.tfds_sources import load_data_source

    return load_data_source(data_config.name, data_config.split,
                            data_config.data_dir or None)


def make_unlabeled_data(config, workdir: str | None = None, *, frame_size=None,
                        image_ids: bool = False):
    """(source, host-local train batches {'image': uint8 [B / hosts, H, W, 3]})
    of `config.data`: inception crops to the encoder's input size and flips
    (`pipeline.make_train_dataset`), this host's shard. Shared by the stage-2
    objectives that train on unlabeled images (DDeP, the pretext tasks).
    `frame_size` (h, w): the whole frames at that size instead of crops (a
    pretext task that crops its own views); `image_ids`: batches carry
    'image_id' int32 [B / hosts] (`pipeline.IMAGE_ID`)."""
    h, w = config.model.encoder.image_size
    source = make_source(config.data, workdir)
    dataset = pipeline.make_train_dataset(
        source, image_size=tuple(frame_size or (h, w)),
        batch_size=config.batch_size // jax.process_count(),
        seed=config.seed, process_index=jax.process_index(),
        process_count=jax.process_count(), area_range=config.data.crop_area_range,
        aspect_range=config.data.crop_aspect_range, flip=config.data.flip,
        skip_missing=config.data.source == "folder",
        crop="full" if frame_size else "random", image_ids=image_ids,
        **config_lib.data_loading(config.data))
    return source, dataset


def make_loss_fn(config, model):
    """(params, {'x', 'eps', 'sigma', 'noisy'}, key, context) -> (MSE, {}).

    With the encoder frozen it runs in inference mode on the noisy images and
    only the decoder and head (×Net: decoder, neck and head) are
    differentiated; with DeP the whole model runs in training mode (dropout
    from `key`)."""
    frozen_encoder = "encoder" in tuple(config.frozen)
    target = config.denoising.target
    conditioning = config.model.noise_conditioning

    def loss_fn(params, batch, key, context):
        del context
        noise_level = batch["sigma"] if conditioning else None
        variables = {"params": params}
        if frozen_encoder:
            features = model.apply(variables, batch["noisy"], train=False,
                                   method=model.encode)
            prediction = model.apply(variables, features, batch["noisy"], noise_level,
                                     method=model.decode_from)
        else:
            prediction = model.apply(variables, batch["noisy"], noise_level,
                                     train=True, rngs={"dropout": key})
        return denoising.denoising_loss(prediction, batch["x"], batch["eps"],
                                        target), {}

    return loss_fn


def make_prepare(config):
    """(batch {'image': uint8}, key) -> ({'x', 'eps', 'sigma', 'noisy'}, {},
    dropout key): the noise of the whole batch is drawn once."""

    def prepare(batch, key):
        k_noise, k_dropout = jax.random.split(key)
        x, eps, sigma, noisy = denoising.corrupt(config.denoising, batch["image"],
                                                 k_noise)
        return {"x": x, "eps": eps, "sigma": sigma, "noisy": noisy}, {}, k_dropout

    return prepare


def make_denoise_fn(config, model):
    """(params, uint8 images, key) -> (clean, noisy, denoised) float32 [B, H, W, 3]:
    denoised = (x~ - sqrt(1 - gamma) eps^) / sqrt(gamma) (eps target) or the
    prediction itself (x target)."""
    d = config.denoising

    def denoise(params, images, key):
        x, _, sigma, noisy = denoising.corrupt(d, images, key)
        noise_level = sigma if config.model.noise_conditioning else None
        prediction = model.apply({"params": params}, noisy, noise_level)
        if d.target == "x":
            return x, noisy, prediction
        return x, noisy, denoising.estimate_clean(noisy, prediction, sigma,
                                                  d.noise_type)

    return denoise


def psnr(images: np.ndarray, reference: np.ndarray) -> float:
    """PSNR in dB of float images in [-1, 1] against `reference`, both shown
    as uint8 (`visualize.to_uint8`: clipped), peak 255."""
    diff = (visualize.to_uint8(images).astype(np.float64)
            - visualize.to_uint8(reference).astype(np.float64))
    return float(10 * np.log10(255.0**2 / max(np.mean(diff**2), 1e-10)))


def grid_images(config, source) -> np.ndarray:
    """The fixed images of the denoising grid: the first `image_grid_size`
    images of the training source, resized and centre-cropped to the model's
    input size (an image folder's unreadable files passed over).
    uint8 [n, H, W, 3]."""
    h, w = config.model.encoder.image_size
    images = []
    for i in range(len(source)):
        if len(images) == config.image_grid_size:
            break
        record = source[i]
        if record is not None:
            images.append(pipeline.resize_centre_crop(np.asarray(record["image"]),
                                                      (h, w), 1.0))
    return np.stack(images)


def make_image_grid_hook(config, model, mesh, source):
    """The `after_step` hook of the denoising grid (None when
    `image_grid_every` is 0): every `image_grid_every` steps and at the last
    step, the same images (`grid_images`) with the same noise (the run's
    'images' key) are denoised; WORKDIR/images/denoise_<step>.png gets rows
    'clean', 'noisy <PSNR> dB', 'denoised <PSNR> dB'; the PSNRs are written
    as `denoise/psnr_noisy` and `denoise/psnr_denoised`, the grid to
    TensorBoard. Every host runs the denoiser on the replicated batch;
    process 0 writes."""
    every = config.image_grid_every
    if not every or source is None:
        return None
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    denoise = jax.jit(make_denoise_fn(config, model), out_shardings=replicated)
    images = jax.device_put(grid_images(config, source), replicated)

    def after_step(run: loop.RunContext, state, batch, step: int) -> None:
        del batch
        if not loop.itstime(step, every, run.num_steps):
            return
        clean, noisy, denoised = jax.device_get(
            denoise(state["params"], images, run.keys["images"]))
        scores = {"denoise/psnr_noisy": psnr(noisy, clean),
                  "denoise/psnr_denoised": psnr(denoised, clean)}
        run.writer.write_scalars(step, scores)
        if jax.process_index() == 0:
            path = os.path.join(run.workdir, "images", f"denoise_{step:08d}.png")
            visualize.save_image_grid(path, [clean, noisy, denoised], row_labels=[
                "clean", f"noisy {scores['denoise/psnr_noisy']:.1f} dB",
                f"denoised {scores['denoise/psnr_denoised']:.1f} dB"])
            with epath.Path(path).open("rb") as f:
                run.writer.write_image(step, "denoise", np.asarray(Image.open(f)))

    return after_step


def stage(config, mesh, workdir: str | None = None, *, data: bool = True) -> loop.Stage:
    """The DDeP / DeP stage of `config` (`data=False`: no dataset is opened;
    an image folder writes its file list's record in `workdir`)."""
    model = build_model(config.model)
    source, dataset = make_unlabeled_data(config, workdir) if data else (None, None)
    fields = unlabeled_image_fields(config, source, dataset)
    fields["init_inputs"] += (  # the noise level, float32 [1], or none
        jnp.ones((1,), jnp.float32) if config.model.noise_conditioning else None,)
    d = config.denoising
    return loop.Stage(
        name="ddep",
        model=model,
        **fields,
        loss_fn=make_loss_fn(config, model),
        prepare=make_prepare(config),
        peak_lr=learning_rate(config),
        keys=("init", "train", "images"),
        describe=lambda m: f"loss {m['loss']:.4f} | lr {m['learning_rate']:.3g}",
        summary=(f"{denoising_run_name(config)} on "
                 f"{images_name(config.data)} "
                 f"images ({d.noise_type} noise, sigma {d.sigma}, {d.target} target)"),
        after_step=make_image_grid_hook(config, model, mesh, source),
    )
