"""The DDeP trainer: frozen encoder, exact resume, device-count invariance,
bad input, and the entry point."""

import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, read_tensorboard, tiny_config

from ddep_jax.training import optim
from ddep_jax.trainers import ddep, loop
from ddep_jax.parallel.sharding import make_mesh


def _setup(config, mesh_devices=1):
    """(initial state, jitted step of the loop) for the DDeP stage of `config`."""
    mesh = make_mesh(mesh_devices)
    stage = ddep.stage(config, mesh, data=False)
    ts = loop.build_state(stage, config, 10, mesh, jax.random.key(0))
    return ts.init(jax.random.key(0)), jax.jit(loop.make_train_step(
        stage, ts.tx, ts.schedule))


def _images(step, n=8):
    """A train batch of the DDeP stage: {'image': uint8 [n, 32, 32, 3]}."""
    return {"image": jax.random.randint(jax.random.key(100 + step), (n, 32, 32, 3),
                                        0, 256, jnp.int32).astype(jnp.uint8)}


def test_ddep_steps_keep_encoder_bit_identical_and_train_decoder():
    state, step_fn = _setup(tiny_config())
    before = jax.device_get(state["params"])
    for i in range(3):
        state, metrics = step_fn(state, _images(i), jax.random.key(1))
    after = jax.device_get(state["params"])
    chex.assert_trees_all_equal(after["encoder"], before["encoder"])
    for name in ("decoder", "head"):
        changed = jax.tree.map(lambda a, b: not np.array_equal(a, b),
                               after[name], before[name])
        assert all(jax.tree.leaves(changed)), f"some {name} leaves did not train"
    # set_to_zero keeps no Adam moments for the frozen encoder.
    labels = optim.param_labels(before, optim.freeze_rules(("encoder",)))
    assert set(jax.tree.leaves(labels["encoder"])) == {optim.FROZEN}
    assert np.isfinite(metrics["loss"])


def test_dep_trains_encoder_too():
    state, step_fn = _setup(tiny_config(frozen=()))
    before = jax.device_get(state["params"]["encoder"])
    state, _ = step_fn(state, _images(0), jax.random.key(1))
    after = jax.device_get(state["params"]["encoder"])
    assert not np.array_equal(before["conv_root"]["kernel"], after["conv_root"]["kernel"])


def test_frozen_step_computes_no_encoder_gradient():
    """Autodiff emits no encoder backward pass for the frozen step: its program
    has the encoder's forward convolutions only, the DeP step's has more."""
    counts = {}
    for frozen in [("encoder",), ()]:
        state, step_fn = _setup(tiny_config(frozen=frozen))
        text = step_fn.lower(state, _images(0), jax.random.key(1)).as_text()
        counts[frozen] = text.count("stablehlo.convolution")
    # Encoder: root + 3 units x 3 convs + 3 projections + patch embedding = 14
    # forward convs; the DeP step adds their input and kernel gradients.
    assert counts[()] - counts[("encoder",)] >= 14


def test_unlisted_parameter_is_rejected():
    params = {"encoder": {"w": 1}, "decoder": {"w": 1}, "extra": {"w": 1}}
    with pytest.raises(ValueError, match="extra/w"):
        optim.param_labels(params, optim.freeze_rules(("encoder",)))


def _leaves_equal(a, b):
    chex.assert_trees_all_equal(jax.device_get(a), jax.device_get(b))


def test_eight_devices_and_fsdp_match_one_device(tmp_path):
    """Same loss on 1 and 8 devices (replicated and fully sharded state)."""
    assert jax.device_count() == 8
    one = loop.run(tiny_config(total_steps=2), str(tmp_path / "one"))
    eight = tiny_config(total_steps=2, **{"mesh.data": 8})
    replicated = loop.run(eight, str(tmp_path / "eight"))
    eight.mesh.param_sharding = "fsdp"
    eight.mesh.fsdp_min_size = 1024
    fsdp = loop.run(eight, str(tmp_path / "fsdp"))
    for run in (replicated, fsdp):
        np.testing.assert_allclose([l for _, l in run["history"]],
                                   [l for _, l in one["history"]], rtol=1e-5)
        # Adam normalises each update, so a gradient that is ~0 can flip sign
        # between summation orders; two steps move a parameter by at most 2 * lr.
        chex.assert_trees_all_close(jax.device_get(run["state"]["params"]),
                                    jax.device_get(one["state"]["params"]),
                                    rtol=0, atol=2 * 1e-3 + 1e-6)
    assert len(jax.tree.leaves(replicated["state"]["params"])[0].sharding.device_set) == 8

    leaves = jax.tree.leaves(fsdp["state"]["params"])
    largest = max(leaves, key=lambda a: a.size)
    assert "data" in largest.sharding.spec
    dim = list(largest.sharding.spec).index("data")
    assert largest.addressable_shards[0].data.shape[dim] == largest.shape[dim] // 8
    # Adam's moments of that parameter are sharded the same way.
    twins = [m for m in jax.tree.leaves(fsdp["state"]["opt_state"])
             if m.shape == largest.shape]
    assert twins and all(m.sharding.spec == largest.sharding.spec for m in twins)
    small = min(leaves, key=lambda a: a.size)
    assert small.sharding.spec == jax.sharding.PartitionSpec()


def test_config_json_kept_when_a_resume_changes_it(tmp_path):
    loop.write_config(tiny_config(), str(tmp_path))
    loop.write_config(tiny_config(), str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["config.json"]
    loop.write_config(tiny_config(seed=3), str(tmp_path))
    assert json.loads((tmp_path / "config.1.json").read_text())["seed"] == 0
    assert json.loads((tmp_path / "config.json").read_text())["seed"] == 3


def test_outputs_written(tmp_path):
    """JSONL metrics, PNG grids, TensorBoard (scalars, the grid, the config)
    and, asked for, an offline Weights & Biases run that a resume continues."""
    config = tiny_config(**{"total_steps": 2, "image_grid_every": 2,
                            "writer.wandb": "ddep_jax_tests"})
    loop.run(config, str(tmp_path), stop_after_step=1)
    loop.run(config, str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["denoising"]["sigma"] == 0.22
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert {"step", "loss", "learning_rate", "steps_per_sec"} <= set(json.loads(lines[-1]))
    assert (tmp_path / "images" / "denoise_00000002.png").is_file()
    tags = read_tensorboard(tmp_path / "tensorboard")
    assert [s for s, _ in tags["loss"]] == [1, 2] and tags["loss"][0][1] == "scalar"
    assert tags["denoise"] == [(2, "image")]
    assert [kind for _, kind in tags["config/text_summary"]] == ["text"]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]

    run_id = json.loads((tmp_path / "wandb_run.json").read_text())["id"]
    runs = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 2  # the first call and its resume: one W&B run id
    records = b"".join((r / f"run-{run_id}.wandb").read_bytes() for r in runs)
    for key in (b"loss", b"learning_rate", b"steps_per_sec", b"denoising"):
        assert key in records, key  # the scalars and the config
    media = list((runs[1] / "files" / "media" / "images").glob("denoise_2_*.png"))
    assert len(media) == 1


def test_wandb_options_checked(tmp_path, monkeypatch):
    import importlib.util

    config = tiny_config(**{"writer.wandb": "p", "writer.wandb_mode": "cloud"})
    with pytest.raises(ValueError, match=r"config.writer.wandb_mode='cloud'"):
        loop.run(config, str(tmp_path / "a"))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(ValueError, match=r"(?s)writer.wandb='p'.*pip install"):
        loop.run(tiny_config(**{"writer.wandb": "p"}), str(tmp_path / "b"))


@pytest.mark.parametrize("key,value,message", [
    ("denoising.sigma", -0.1, r"config.denoising.sigma=-0.1 is invalid"),
    ("batch_size", 12, r"config.batch_size=12 is invalid: must be divisible by the 8"),
    ("denoising.noise_type", "pink", r"config.denoising.noise_type"),
    ("model.encoder.image_size", (30, 30), r"config.model.encoder.image_size"),
    ("frozen", ("decoder",), r"config.frozen"),
])
def test_invalid_values_rejected_before_compiling(tmp_path, key, value, message):
    config = tiny_config(**{key: value, "mesh.data": -1})
    with pytest.raises(ValueError, match=message):
        loop.run(config, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


def test_unknown_key_rejected():
    config = tiny_config()
    with config.unlocked():
        config.denoising.sigmaa = 0.3
    with pytest.raises(ValueError, match="config.denoising.sigmaa is not a known key"):
        ddep.validate(config, 1)


def test_unknown_override_on_command_line_names_key(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "ddep_jax.main", "--config=configs/ddep_default.py",
         f"--workdir={tmp_path}", "--config.denoising.sigmaa=0.3"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "sigmaa" in out.stderr


def test_missing_dataset_names_builder_and_prepare_command(tmp_path):
    config = tiny_config(**{"data.source": "tfds", "data.name": "camvid",
                            "data.data_dir": str(tmp_path / "tfds")})
    with pytest.raises(FileNotFoundError, match=r"(?s)camvid.*ddep_jax.data.prepare --dataset=camvid"):
        loop.run(config, str(tmp_path / "work"))


def test_ddep_on_real_camvid_images(tmp_path, camvid_dir):
    """A few DDeP steps reading CamVid's images through TFDS and grain."""
    from ddep_jax.data import prepare

    prepare.prepare("camvid", camvid_dir, str(tmp_path / "tfds"))
    config = tiny_config(**{"data.source": "tfds", "data.name": "camvid",
                            "data.data_dir": str(tmp_path / "tfds"),
                            "total_steps": 2})
    result = loop.run(config, str(tmp_path / "work"))
    assert result["step"] == 2 and np.isfinite(result["loss"])
