"""Stage 2: decoder denoising pretraining (DDeP, Brempong et al. 2022, Sec. 4).

`train_and_evaluate(config, workdir)` is the whole job and can be called from
a test or a notebook. Sections: mesh -> model and optimizer shapes -> init or
resume (Orbax) -> input pipeline (grain) -> jitted, sharded, donated train
step -> loop with logging, image grids and checkpoints.
"""

from __future__ import annotations

import os
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from ddep_jax import checkpointing, config_lib, handover, loop, optim, visualize, writers
from ddep_jax.sharding import sharded_train_state
from ddep_jax.data import pipeline
from ddep_jax.models.transunet import TransUNet, build_model
from ddep_jax.objectives import denoising


# ----------------------------------------------------------------------------
# Pieces a test can call on their own.
# ----------------------------------------------------------------------------
def make_source(data_config):
    """The random-access image source named by `config.data`."""
    if data_config.source == "embedded":
        from ddep_jax.data.embedded import EmbeddedImages

        return EmbeddedImages()
    from ddep_jax.data.tfds_sources import load_data_source

    return load_data_source(data_config.name, data_config.split,
                            data_config.data_dir or None)


def to_float_images(images_uint8: jax.Array) -> jax.Array:
    """uint8 [B, H, W, 3] -> float32 in [-1, 1] (the ViT input convention)."""
    return images_uint8.astype(jnp.float32) / 127.5 - 1.0


def corrupt(config, images: jax.Array, key: jax.Array):
    """Draws sigma and eps and forms the noisy input (Eq. 1 or Eq. 5).

    Returns (x, eps, sigma [B], noisy), all float32.
    """
    d = config.denoising
    k_sigma, k_eps = jax.random.split(key)
    x = to_float_images(images)
    sigma = denoising.sample_sigma(k_sigma, x.shape[0], d.sigma,
                                   tuple(d.sigma_range) or None)
    eps = jax.random.normal(k_eps, x.shape, jnp.float32)
    return x, eps, sigma, denoising.add_noise(x, eps, sigma, d.noise_type)


def make_train_step(config, model, tx, schedule, param_shardings=None):
    """The DDeP / DeP update: state, uint8 images [B, H, W, 3], key -> state, metrics.

    With 'encoder' frozen, the encoder's parameters are constants of the
    differentiated function, so no encoder gradient (and no backward pass)
    is computed; `optax.partition` gives it `set_to_zero` updates. The noise
    is drawn for the whole batch; with `config.grad_accum_steps` k > 1 the
    batch then runs as k micro-batches (encoder, decoder, loss / k) whose
    gradients are summed into one update (`optim.accumulate_gradients`,
    the running sum kept in `param_shardings` where given).
    """
    frozen = tuple(config.frozen)
    target = config.denoising.target
    conditioning = config.model.noise_conditioning
    k = config.get("grad_accum_steps", 1)

    def step_fn(state, images, base_key):
        params = state["params"]
        key = jax.random.fold_in(base_key, state["step"])
        k_noise, k_dropout = jax.random.split(key)
        x, eps, sigma, noisy = corrupt(config, images, k_noise)
        trainable = {c: v for c, v in params.items() if c not in frozen}
        fixed = {c: v for c, v in params.items() if c in frozen}

        def loss_fn(p, batch, index):
            noise_level = batch["sigma"] if conditioning else None
            variables = {"params": {**fixed, **p}}
            if "encoder" in frozen:
                features = model.apply({"params": fixed}, batch["noisy"], train=False,
                                       method=model.encode)
                prediction = model.apply(variables, features, noise_level,
                                         method=model.decode)
            else:
                rng = k_dropout if k == 1 else jax.random.fold_in(k_dropout, index)
                prediction = model.apply(variables, batch["noisy"], noise_level,
                                         train=True, rngs={"dropout": rng})
            loss = denoising.denoising_loss(prediction, batch["x"], batch["eps"],
                                            target)
            return loss / k, None

        shardings = None if param_shardings is None else {
            c: v for c, v in param_shardings.items() if c not in frozen}
        (loss, _), grads = optim.accumulate_gradients(
            loss_fn, trainable, {"x": x, "eps": eps, "sigma": sigma, "noisy": noisy}, k,
            shardings)
        # Frozen leaves get zero "gradients" that set_to_zero ignores.
        grads = {**grads, **jax.tree.map(jnp.zeros_like, fixed)}
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {
            "step": state["step"] + 1,
            "params": optax.apply_updates(params, updates),
            "opt_state": opt_state,
        }
        metrics = {"loss": loss, "learning_rate": schedule(state["step"]),
                   "grad_norm": optax.tree.norm(grads)}
        return new_state, metrics

    return step_fn


def make_denoise_fn(config, model):
    """(params, uint8 images, key) -> (clean, noisy, denoised) float32 [B, H, W, 3]."""
    d = config.denoising

    def denoise(params, images, key):
        x, _, sigma, noisy = corrupt(config, images, key)
        noise_level = sigma if config.model.noise_conditioning else None
        prediction = model.apply({"params": params}, noisy, noise_level)
        if d.target == "x":
            return x, noisy, prediction
        return x, noisy, denoising.estimate_clean(noisy, prediction, sigma,
                                                  d.noise_type)

    return denoise


class Training(NamedTuple):
    """What a stage-2 run is built from (see `build_training`)."""

    model: TransUNet
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    abstract_state: dict  # jax.ShapeDtypeStruct leaves
    state_sharding: dict  # NamedSharding leaves
    init: Callable[[jax.Array], dict]  # key -> sharded initial state


def build_training(config, num_steps: int, mesh, key) -> Training:
    """Model, schedule, optimizer (frozen collections from the config) and the
    shape-first train state {'step', 'params', 'opt_state'}: its shapes, its
    shardings on `mesh`, and a jitted init that creates it in place."""
    model = build_model(config.model)
    h, w = config.model.encoder.image_size
    dummy = jnp.zeros((1, h, w, 3), jnp.float32)
    dummy_sigma = jnp.ones((1,), jnp.float32) if config.model.noise_conditioning else None
    tx, schedule, abstract, shardings, init = sharded_train_state(
        model, (dummy, dummy_sigma), config, num_steps, mesh, key,
        frozen=tuple(config.frozen), peak_lr=config_lib.learning_rate(config))
    return Training(model, tx, schedule, abstract, shardings, init)


# ----------------------------------------------------------------------------
# The job.
# ----------------------------------------------------------------------------
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_after_step: int | None = None) -> dict:
    """Runs (or resumes) DDeP pretraining in `workdir`.

    `stop_after_step` ends this call early (with a checkpoint) as a killed or
    preempted run would; calling again on the same workdir continues exactly.
    A SIGTERM does the same at the step it arrives in (`loop.Preemption`).
    Writes compile_report.json (the step's FLOPs and per-device memory) and,
    with `config.profile.num_steps` > 0, a profiler trace in profile/.

    Writes: config.json, init.json (where the encoder came from:
    `config.init.checkpoint`, its step and the source run's own init.json),
    metrics.jsonl, tensorboard/, checkpoints/<step>/ (params, optimizer
    state, step, data-iterator state), images/*.png.

    Returns:
      {'step': last step run, 'loss': last logged loss, 'history': [(step,
      loss)] of this call, 'state': the final train state (sharded arrays),
      'preempted': True if a SIGTERM (or the hosts' preemption sync point)
      stopped the run after saving the checkpoint of 'step'}.

    Raises:
      ValueError: invalid config (before compiling), naming the key; an initial
        encoder checkpoint that does not match the model (every mismatch).
      FileNotFoundError: dataset not prepared (names the preparation command),
        or no checkpoint at `config.init.checkpoint`.
      FloatingPointError: non-finite loss, naming the step; checkpoints written
        before it are kept.
    """
    mesh = loop.start_run(config, workdir, config_lib.validate)
    is_main = jax.process_index() == 0

    source = make_source(config.data)
    num_steps = loop.total_steps(config, len(source))
    init_key, train_key, image_key = jax.random.split(jax.random.key(config.seed), 3)
    model, tx, schedule, abstract, state_sharding, init_fn = build_training(
        config, num_steps, mesh, init_key)
    h, w = config.model.encoder.image_size
    batch_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())

    local_batch = config.batch_size // jax.process_count()
    dataset = pipeline.make_train_dataset(
        source, image_size=(h, w), batch_size=local_batch, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        area_range=config.data.crop_area_range,
        aspect_range=config.data.crop_aspect_range, flip=config.data.flip,
        num_threads=config.data.num_threads, prefetch=config.data.prefetch)
    data_iter = iter(dataset)

    manager = checkpointing.make_manager(workdir, config.keep_checkpoints)
    state, _ = checkpointing.restore_latest(manager, abstract, state_sharding,
                                            data_iter)
    if state is None:
        state = handover.initialise(
            init_fn(init_key), tx, state_sharding, config.init.checkpoint,
            ("encoder",), workdir, step=config.init.step, record={"stage": "ddep"},
            pos_grid=handover.token_grid(config.model))

    train_step = loop.compile_step(
        jax.jit(make_train_step(config, model, tx, schedule, state_sharding["params"]),
                in_shardings=(state_sharding, batch_sharding, replicated),
                out_shardings=(state_sharding, replicated), donate_argnums=(0,)),
        (state, jax.ShapeDtypeStruct((config.batch_size, h, w, 3), jnp.uint8,
                                     sharding=batch_sharding), train_key),
        workdir, config.batch_size, mesh.size)
    # Every host runs it (the arrays span all hosts); process 0 writes the PNG.
    denoise = jax.jit(make_denoise_fn(config, model), out_shardings=replicated)
    writer = writers.MetricWriter(workdir)
    start = int(jax.device_get(state["step"]))
    last_step = min(num_steps, stop_after_step or num_steps)
    log = loop.MetricLog(writer, manager, start, num_steps, lambda m: (
        f"loss {m['loss']:.4f} | lr {m['learning_rate']:.3g}"))
    preempted = False
    with loop.guarded(config, workdir, manager, writer, log) as control:
        for step in range(start + 1, last_step + 1):
            control.before(step)
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                batch = next(data_iter)["image"]
                images = jax.make_array_from_process_local_data(batch_sharding, batch)
                state, metrics = train_step(state, images, train_key)
            every = config.image_grid_every
            if every and (step % every == 0 or step == num_steps):
                n = min(config.image_grid_size, images.shape[0])
                grid = jax.device_get(denoise(state["params"], images[:n],
                                              jax.random.fold_in(image_key, step)))
                if is_main:
                    visualize.save_image_grid(os.path.join(
                        workdir, "images", f"denoise_{step:08d}.png"), grid)
            preempted = control.after(step, metrics, last_step, state, data_iter)
            if preempted:
                last_step = step
                break

    manager.wait_until_finished()
    manager.close()
    writer.close()
    if is_main:
        writers.write_json(os.path.join(workdir, "loss_history.json"), log.history)
    if preempted:
        logging.warning("Preempted: checkpoint of step %d saved in %s; run again on "
                        "this workdir to resume.", last_step, workdir)
    return {"step": last_step, "loss": log.last_loss, "history": log.history,
            "state": state, "preempted": preempted}
