"""Scale-out: gradient accumulation, bfloat16 compute, sharding rules by
parameter path, multi-host start-up, several processes, preemption, the
compile report and the profiler trace."""

import json
import os
import socket
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import pytest
from conftest import (COMPILE_FAST_FLAGS, REPO, TINY_OVERRIDES,
                      default_config as _default_config, flags as _flags, stage_step,
                      subprocess_env as _subprocess_env, tiny_config,
                      tiny_finetune_config)
from jax.sharding import NamedSharding, PartitionSpec as P

import dataclasses

from ddep_jax.checkpoints import store
from ddep_jax.parallel import distributed, sharding
from ddep_jax.training import optim
from ddep_jax.models import to_float_images
from ddep_jax.objectives.segmentation import segmentation_loss
from ddep_jax.trainers import ddep, finetune, loop
from ddep_jax.parallel.sharding import make_mesh


def _adam_moments(state):
    """Adam's first moments of the trained collections: after one step they
    are (1 - b1) x the gradient, so comparing them compares gradients."""
    return jax.device_get(_find_mu(state["opt_state"]))


def _find_mu(opt_state):
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "mu"))
             if hasattr(s, "mu")]
    assert len(found) == 1, found
    return found[0].mu


def _assert_gradients_close(got, want):
    """Equal up to float32 summation order: 1e-4 relative, or 1e-5 of the
    largest gradient entry where entries cancel to near zero."""
    scale = max(np.abs(b).max() for b in jax.tree.leaves(want))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


def _images(n, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), np.uint8)


def _ddep_step_on_8(config, images):
    """One DDeP step on the 8-device mesh from the seed's initial state."""
    _, ts, step = stage_step(config, 8)
    batch = NamedSharding(make_mesh(8), P("data"))
    state, metrics = step(ts.init(jax.random.key(0)),
                          {"image": jax.device_put(images, batch)}, jax.random.key(1))
    return state, jax.device_get(metrics)


def test_gradient_accumulation_over_4_equals_one_batch_4x_larger():
    """DDeP on 8 devices: batch 32 as 4 micro-batches of 8 gives the loss and
    gradient of one batch of 32 (same noise: drawn for the whole batch)."""
    images = _images(32)
    big, m_big = _ddep_step_on_8(tiny_config(batch_size=32, **{"mesh.data": 8}),
                                 images)
    acc, m_acc = _ddep_step_on_8(tiny_config(batch_size=32, grad_accum_steps=4,
                                             **{"mesh.data": 8}), images)
    # float32 sums in another order: the losses agree to ~1e-6 (1.07e-6
    # printed with the tests' unoptimised XLA backend).
    np.testing.assert_allclose(m_acc["loss"], m_big["loss"], rtol=3e-6)
    np.testing.assert_allclose(m_acc["grad_norm"], m_big["grad_norm"], rtol=1e-5)
    _assert_gradients_close(_adam_moments(acc), _adam_moments(big))


class _PixelClassifier(nn.Module):
    """A per-pixel linear classifier with dropout: the stage-3 step's model
    interface (apply(variables, x, train=..., rngs=...)) at no compile cost."""

    @nn.compact
    def __call__(self, x, *, train=False):
        x = nn.Dropout(0.0, deterministic=not train)(x)
        return nn.Conv(11, (3, 3), name="head")(x)


@pytest.mark.parametrize("class_weights", [None, "median_frequency"])
def test_fine_tuning_accumulation_weights_micro_batches_by_valid_pixels(class_weights):
    """Stage 3: micro-batches with different numbers of void pixels still
    give the mean over all valid pixels of the whole batch (with class
    weights: the weighted mean, normalised by the whole batch's weight)."""
    model = _PixelClassifier()
    images = _images(8, size=16)
    labels = np.random.default_rng(1).integers(0, 11, (8, 16, 16)).astype(np.uint8)
    labels[0] = 255  # micro-batch 0 (examples 0 and 4) is mostly void
    labels[4, :10] = 255
    params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
    schedule = optim.make_schedule(1e-3, 10)
    tx, _ = optim.make_optimizer(params, (), schedule)
    state = {"step": jnp.int32(0), "params": params, "opt_state": tx.init(params)}
    # The stage-3 Stage with this model in place of the TransUNet.
    weights = None
    if class_weights:
        weights = np.linspace(0.2, 3.0, 11).astype(np.float32)
    stage = dataclasses.replace(
        finetune.stage(tiny_finetune_config(), make_mesh(1), data=False),
        model=model, loss_fn=finetune.make_loss_fn(model, weights),
        prepare=finetune.make_prepare(weights))
    results = {}
    for k in (1, 4):
        step = jax.jit(loop.make_train_step(stage, tx, schedule, k))
        new_state, metrics = step(state, {"image": images, "label": labels},
                                  jax.random.key(1))
        results[k] = (jax.device_get(metrics), _adam_moments(new_state))
    np.testing.assert_allclose(results[4][0]["loss"], results[1][0]["loss"], rtol=1e-6)
    # ... and that is the (weighted) mean over the whole batch's pixels.
    logits = model.apply({"params": params}, to_float_images(jnp.asarray(images)))
    expected, _ = segmentation_loss(
        logits, jnp.asarray(labels, jnp.int32),
        class_weights=None if weights is None else jnp.asarray(weights))
    np.testing.assert_allclose(results[1][0]["loss"], float(expected), rtol=1e-5)
    np.testing.assert_allclose(results[4][0]["pixel_accuracy"],
                               results[1][0]["pixel_accuracy"], rtol=1e-6)
    _assert_gradients_close(results[4][1], results[1][1])


def test_microbatches_are_strided_so_device_blocks_stay_local():
    x = jnp.arange(16)
    micro = optim.split_microbatches(x, 4)
    np.testing.assert_array_equal(micro[1], [1, 5, 9, 13])
    with pytest.raises(ValueError, match="not divisible into 3"):
        optim.split_microbatches(x, 3)


def test_bfloat16_step_computes_in_bf16_and_keeps_float32_state():
    config = tiny_config(**{"model.dtype": "bfloat16"})
    _, ts, step = stage_step(config)
    state = ts.init(jax.random.key(0))
    images = {"image": _images(8)}
    lowered = step.lower(state, images, jax.random.key(1))
    hlo = lowered.as_text()
    assert "bf16" in hlo and "stablehlo.convolution" in hlo
    state, metrics = lowered.compile()(state, images, jax.random.key(1))
    floats = [x for x in jax.tree.leaves((state["params"], state["opt_state"]))
              if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and {x.dtype for x in floats} == {jnp.dtype(jnp.float32)}
    assert metrics["loss"].dtype == jnp.float32
    # The same step in float32 gives nearly the same loss (bf16 has 8 bits of
    # mantissa; the loss, the norms' statistics and the softmax stay float32).
    ref = tiny_config()
    _, t32, step32 = stage_step(ref)
    _, m32 = step32(t32.init(jax.random.key(0)), images, jax.random.key(1))
    np.testing.assert_allclose(float(metrics["loss"]), float(m32["loss"]), rtol=0.02)


def test_sharding_rules_by_parameter_path():
    config = tiny_config(**{"mesh.data": 8, "mesh.param_sharding": "fsdp",
                            "mesh.fsdp_min_size": 64})
    config.mesh.sharding_rules = (("^encoder/", "replicated"),
                                  ("^decoder/block0/conv1/conv/kernel$", "dim=-2"))
    _, t, _ = stage_step(config, 8)
    specs = jax.tree.map(lambda s: s.spec, t.sharding)
    params = specs["params"]
    assert set(jax.tree.leaves(params["encoder"],
                               is_leaf=lambda x: isinstance(x, P))) == {P()}
    assert params["decoder"]["block0"]["conv1"]["conv"]["kernel"] == P(
        None, None, "data", None)
    # Default rule 'fsdp': the largest divisible dimension.
    assert params["decoder"]["block1"]["conv1"]["conv"]["kernel"] == P(
        None, None, "data", None)
    assert specs["step"] == P()
    # Adam's moments follow their parameter's rule.
    mu = _find_mu(t.sharding["opt_state"])
    assert mu["decoder"]["block0"]["conv1"]["conv"]["kernel"].spec == P(
        None, None, "data", None)
    with pytest.raises(ValueError, match=r"'dim=7' for decoder/block0/conv1/conv/kernel"):
        sharding.state_shardings(t.abstract, make_mesh(8), "fsdp", 64,
                                 (("^decoder/block0/conv1/conv/kernel$", "dim=7"),))


@pytest.mark.parametrize("key,value,message", [
    ("grad_accum_steps", 3, r"config.batch_size=8 is invalid: must be divisible by "
                            r"the 1 devices x grad_accum_steps=3"),
    ("grad_accum_steps", 0, r"config.grad_accum_steps=0 is invalid"),
    ("mesh.sharding_rules", (("^encoder/", "halves"),), r"config.mesh.sharding_rules"),
    ("model.dtype", "float16", r"config.model.dtype='float16' is invalid"),
])
def test_scale_out_options_are_validated(key, value, message):
    with pytest.raises(ValueError, match=message):
        ddep.validate(tiny_config(**{key: value}), 1)


@pytest.mark.parametrize("mode,coordinator,env,expected", [
    ("auto", None, {}, False),
    ("auto", None, {"SLURM_NTASKS": "1"}, False),
    ("auto", None, {"SLURM_NTASKS": "4"}, True),
    ("auto", None, {"OMPI_COMM_WORLD_SIZE": "2"}, True),
    ("auto", None, {"TPU_WORKER_HOSTNAMES": "10.0.0.2"}, False),
    ("auto", None, {"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}, True),
    ("auto", "10.0.0.2:1234", {}, True),
    ("yes", None, {}, True),
    ("no", None, {"SLURM_NTASKS": "4"}, False),
])
def test_distributed_initialised_only_for_several_processes(mode, coordinator, env,
                                                            expected):
    assert distributed.should_initialize(mode, coordinator, env) is expected


def test_distributed_flag_errors_name_the_flags():
    with pytest.raises(ValueError, match="--distributed=no contradicts"):
        distributed.should_initialize("no", "h:1", {})
    with pytest.raises(ValueError, match="needs --num_processes and --process_id"):
        distributed.initialize("auto", "localhost:1", env={})


# ----------------------------------------------------------------------------
# Whole runs: several processes, preemption.
# ----------------------------------------------------------------------------
# The tiny model of `tiny_config`, on the embedded photographs, as overrides of
# configs/ddep_default.py (the subprocesses cannot import the test fixtures).
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_of_four_devices_train_like_one_of_eight(tmp_path):
    """Two hosts (processes) with 4 CPU devices each and jax.distributed:
    each host feeds its own shard of the data, process 0 alone writes the
    run's files, both save their data-iterator state, and the first step's
    loss equals the one of a single 8-device process fed the same global
    batch (host 0's examples on devices 0-3, host 1's on 4-7)."""
    from ddep_jax.data import pipeline

    workdir = tmp_path / "work"
    # The image grid (a jitted call on arrays that span both hosts) included.
    overrides = {"total_steps": 2, "batch_size": 8, "image_grid_every": 2}
    env = _subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=4 "
                          + COMPILE_FAST_FLAGS,
                          JAX_PLATFORMS="cpu")
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "ddep_jax.main", "--config=configs/ddep_default.py",
         f"--workdir={workdir}", f"--coordinator_address=localhost:{port}",
         "--num_processes=2", f"--process_id={i}",
         *_flags({**TINY_OVERRIDES, **overrides})],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for i, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i}:\n{out[-3000:]}"
    assert "process 1 of 2, 4 local / 8 global devices" in outputs[1]
    lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    # Each step written once (by process 0).
    assert [l["step"] for l in lines if "loss" in l] == [1, 2], outputs[0][-6000:]
    assert sorted(os.listdir(workdir / "images")) == ["denoise_00000002.png"]
    iter_files = sorted(os.listdir(workdir / "checkpoints" / "2" / "data_iter"))
    assert any("process_0" in f for f in iter_files), iter_files
    assert any("process_1" in f for f in iter_files), iter_files

    config = _default_config(**overrides)
    h, w = config.model.encoder.image_size
    source = ddep.make_source(config.data)
    host_batches = [next(iter(pipeline.make_train_dataset(
        source, image_size=(h, w), batch_size=4, seed=config.seed, process_index=i,
        process_count=2, area_range=config.data.crop_area_range,
        aspect_range=config.data.crop_aspect_range, flip=config.data.flip,
        num_threads=1, prefetch=1)))["image"] for i in range(2)]
    init_key, train_key, _ = jax.random.split(jax.random.key(config.seed), 3)
    mesh = make_mesh(8)
    _, t, step = stage_step(config, 8, num_steps=2)
    _, metrics = step(t.init(init_key), {"image": jax.device_put(
        np.concatenate(host_batches), NamedSharding(mesh, P("data")))}, train_key)
    np.testing.assert_allclose(lines[0]["loss"], float(metrics["loss"]), rtol=1e-5)


def _two_processes(workdir, port, overrides, *extra, env):
    return [subprocess.Popen(
        [sys.executable, "-m", "ddep_jax.main", "--config=configs/ddep_default.py",
         f"--workdir={workdir}", f"--coordinator_address=localhost:{port}",
         "--num_processes=2", f"--process_id={i}", *extra,
         *_flags({**TINY_OVERRIDES, **overrides})],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]


def test_a_killed_process_ends_the_others_cleanly_and_a_restart_resumes(tmp_path):
    """kill -9 of process 1 of 2 (2 CPU devices each) mid-run: process 0
    exits with distributed.LOST_PROCESS_EXIT_CODE within the heartbeat
    timeout (plus a margin), printing one line that names what was lost and
    what to do, with no abort or native stack dump; restarting both resumes
    from the last complete checkpoint; SIGTERM to process 1 alone then ends
    both with 75 at one step; a third start finishes, and the final state
    (parameters, optimizer state, step) and every process's data position
    equal those of an uninterrupted 2-process run bit for bit."""
    import signal
    import time

    workdir = tmp_path / "work"
    total = 40  # killed once step 5's checkpoint exists; the SIGTERM comes after the restart
    overrides = {"total_steps": total, "checkpoint_every": 5, "batch_size": 8}
    env = _subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=2 "
                          + COMPILE_FAST_FLAGS, JAX_PLATFORMS="cpu")
    timeout = 10
    procs = _two_processes(workdir, _free_port(), overrides,
                           f"--heartbeat_timeout={timeout}", env=env)
    deadline = time.monotonic() + 400
    while not (workdir / "checkpoints" / "5").is_dir():
        assert time.monotonic() < deadline, "no checkpoint of step 5"
        assert all(p.poll() is None for p in procs)
        time.sleep(0.5)
    procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    out0 = procs[0].communicate(timeout=10 * timeout + 120)[0]
    took = time.monotonic() - killed
    procs[1].communicate()
    assert procs[0].returncode == distributed.LOST_PROCESS_EXIT_CODE, out0[-4000:]
    assert took < 6 * timeout + 60, took
    print(f"survivor exited {procs[0].returncode} {took:.1f} s after the kill")
    assert ("process 1 has not been heard from" in out0
            or "another process has probably stopped" in out0), out0[-3000:]
    assert "Restart every process" in out0
    assert "Fatal Python error" not in out0 and "Aborted" not in out0, out0[-4000:]
    steps = sorted(int(d.name) for d in (workdir / "checkpoints").iterdir()
                   if d.name.isdigit())
    assert steps, "no complete checkpoint left"

    # Restart both with the same command: process 0 resumes at the last
    # complete checkpoint; then SIGTERM to process 1 alone (a preempted host):
    # both agree on a step, checkpoint it and exit 75.
    last = steps[-1]
    procs = _two_processes(workdir, _free_port(), overrides, env=env)
    seen = []
    deadline = time.monotonic() + 400
    while not any("Resumed from" in line for line in seen):
        assert time.monotonic() < deadline and procs[0].poll() is None, "".join(seen)[-3000:]
        seen.append(procs[0].stdout.readline())
    resumed = next(line for line in seen if "Resumed from" in line)
    assert resumed.rstrip().endswith(f"at step {last}."), resumed
    while not any(line.startswith("I") and "step " in line and "|" in line
                  for line in seen[-3:]):
        assert time.monotonic() < deadline and procs[0].poll() is None, "".join(seen)[-3000:]
        seen.append(procs[0].stdout.readline())
    procs[1].send_signal(signal.SIGTERM)
    outs = ["".join(seen) + procs[0].communicate(timeout=120)[0],
            procs[1].communicate(timeout=120)[0]]
    assert [p.returncode for p in procs] == [75, 75], outs[0][-3000:] + outs[1][-3000:]
    preempted = max(int(d.name) for d in (workdir / "checkpoints").iterdir()
                    if d.name.isdigit())
    assert last < preempted < total, (last, preempted)

    # A third start finishes; an uninterrupted run of the same command is
    # the reference.
    reference = tmp_path / "reference"
    for wd in (workdir, reference):
        procs = _two_processes(wd, _free_port(), overrides, env=env)
        outs = [p.communicate(timeout=600)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    final = [store.read_state(str(wd / "checkpoints" / str(total) / "state"))
             for wd in (workdir, reference)]
    chex.assert_trees_all_equal(*final)
    for i in range(2):
        position = [json.loads((wd / "checkpoints" / str(total) / "data_iter" /
                                f"process_{i}-of-2.json").read_text())
                    for wd in (workdir, reference)]
        assert position[0] == position[1], i


def test_the_harness_on_two_hosts_stops_on_a_lost_one_and_a_rerun_skips_what_ended(
        tmp_path, camvid_tfds):
    """Every host runs the same label-efficiency command (2 processes x 2 CPU
    devices, --coordinator_address): process 0 alone writes the records.
    kill -9 of process 1 once the pretraining is recorded: process 0 stops
    with exit 76 and one line (no abort); the same command on both hosts
    then skips the finished pretraining, runs the fine-tuning cell and
    records it once."""
    import signal
    import time

    recipe_file = tmp_path / "tiny.py"
    recipe_file.write_text(
        f"import sys\nsys.path.insert(0, {str(REPO / 'tests')!r})\n"
        "from test_label_efficiency import _tiny_recipe\n"
        f"RECIPE = _tiny_recipe({camvid_tfds!r}, **{{'mesh.data': -1, 'batch_size': 16}})\n")
    out = tmp_path / "grid"
    env = _subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=2 "
                          + COMPILE_FAST_FLAGS, JAX_PLATFORMS="cpu")

    def harness(port):
        return [subprocess.Popen(
            [sys.executable, "-m", "ddep_jax.experiments.label_efficiency",
             f"--recipe={recipe_file}:RECIPE", f"--out={out}",
             "--only=finetune/ddep/1-30/s0",
             f"--coordinator_address=localhost:{port}", "--num_processes=2",
             f"--process_id={i}", "--heartbeat_timeout=10"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True) for i in range(2)]

    procs = harness(_free_port())
    deadline = time.monotonic() + 400
    while not (out / "pretraining.jsonl").exists():
        assert time.monotonic() < deadline, "pretrain/ddep not recorded in time"
        assert all(p.poll() is None for p in procs), procs[0].communicate()[0][-3000:]
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    out0 = procs[0].communicate(timeout=180)[0]
    took = time.monotonic() - killed
    procs[1].communicate()
    assert procs[0].returncode == distributed.LOST_PROCESS_EXIT_CODE, out0[-4000:]
    print(f"surviving harness exited {procs[0].returncode} {took:.1f} s after the kill")
    assert took < 60, took
    assert "Restart every process" in out0, out0[-3000:]
    assert "Fatal Python error" not in out0, out0[-4000:]

    procs = harness(_free_port())
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for i, (p, text) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i}:\n{text[-4000:]}"
    assert "pretrain/ddep: running" not in outs[0], outs[0][-3000:]
    assert "finetune/ddep/1-30/s0: running" in outs[0]
    records = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    assert [r["row"] for r in records] == ["ddep"], records
    assert len((out / "pretraining.jsonl").read_text().splitlines()) == 1
    assert not (out / "failures.jsonl").exists()
