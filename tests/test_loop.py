"""The one training loop: every stage resumes bit for bit, stages are
dispatched by name, config arguments parse strictly."""

import chex
import jax
import numpy as np
import pytest
from conftest import tiny_classify_config, tiny_config, tiny_finetune_config

from ddep_jax import config_lib
from ddep_jax.trainers import loop


@pytest.fixture
def stage_config(request):
    """A 4-step config of the stage named by the test's parameter, on real
    data where the stage needs a dataset (CIFAR-10 subset, CamVid)."""
    name = request.param
    if name == "ddep":
        return tiny_config(total_steps=4, checkpoint_every=2)
    if name == "classify":
        _, data_dir, _ = request.getfixturevalue("cifar_subset")
        return tiny_classify_config(data_dir, total_steps=4, checkpoint_every=2)
    return tiny_finetune_config(total_steps=4, checkpoint_every=2, **{
        "data.data_dir": request.getfixturevalue("camvid_tfds"),
        "data.label_fraction": "16", "eval.num_visualize": 0,
        "data.base_scale": 0.125})  # small evaluation images: a fast final eval


@pytest.mark.parametrize("stage_config", ["classify", "ddep", "finetune"],
                         indirect=True)
def test_killed_run_resumes_bit_for_bit(stage_config, tmp_path):
    """N straight steps == K steps, a new process's worth of restart (state,
    optimizer and data position from the checkpoint), N - K steps: losses,
    parameters, optimizer state and step counter all bit-identical."""
    straight = loop.run(stage_config, str(tmp_path / "straight"))
    first = loop.run(stage_config, str(tmp_path / "resumed"), stop_after_step=2)
    assert first["step"] == 2 and first["eval"] == {}
    resumed = loop.run(stage_config, str(tmp_path / "resumed"))
    assert [s for s, _ in first["history"]] == [1, 2]
    assert [s for s, _ in resumed["history"]] == [3, 4]
    assert first["history"] + resumed["history"] == straight["history"]
    chex.assert_trees_all_equal(jax.device_get(resumed["state"]),
                                jax.device_get(straight["state"]))
    # The final evaluation ran once the run finished, on the same weights.
    assert resumed["eval"].keys() == straight["eval"].keys()
    for split, report in straight["eval"].items():
        for key in ("top1", "top5", "miou", "pixel_accuracy"):
            if key in report:
                assert resumed["eval"][split][key] == report[key]


def test_unknown_stage_is_named():
    with pytest.raises(ValueError, match=r"config.stage='denoise' is unknown.*'ddep'"):
        loop.trainer("denoise")


@pytest.mark.parametrize("arg,message", [
    ("dep=ture", r"dep='ture' is not a boolean"),
    ("steps=ten", r"steps='ten' is not a int"),
    ("steps", r"'steps' needs a value"),
    ("stepz=3", r"'stepz' is unknown; known: \['dep', 'name', 'steps'\]"),
])
def test_config_arguments_parse_strictly(arg, message):
    with pytest.raises(ValueError, match=message):
        config_lib.parse_arg(arg, dep=False, steps=100, name="x")


def test_config_arguments_convert_types():
    arg = config_lib.parse_arg("dep,steps=7,name=a/b", dep=False, steps=100, name="x")
    assert (arg.dep, arg.steps, arg.name) == (True, 7, "a/b")
    assert config_lib.parse_arg("dep=No", dep=True).dep is False
    assert config_lib.parse_arg(None, dep=True).dep is True


def test_stage_batch_spec_and_example_batch_agree():
    """`example_batch` (benchmarks, tests) gives what the step's spec says."""
    for config in (tiny_config(), tiny_finetune_config()):
        stage = loop.trainer(config.stage).stage(config, None, data=False)
        batch = stage.example_batch(np.random.RandomState(0))
        assert batch.keys() == stage.batch_spec.keys()
        for k, spec in stage.batch_spec.items():
            assert batch[k].shape == spec.shape and batch[k].dtype == spec.dtype


def test_progress_eta_shows_days():
    assert loop._format_eta(59) == "00:00:59"
    assert loop._format_eta(3 * 86400 + 3600 + 61) == "3d 01:01:01"  # no wrap at 24 h


def test_resume_changes_split_into_breaking_and_safe():
    old = {"batch_size": 8, "log_every": 10, "optimizer": {"learning_rate": 1e-3,
                                                           "b1": 0.9},
           "model": {"encoder": {"vit_size": "mu"}}, "eval": {"every_steps": 0}}
    new = {"batch_size": 12, "log_every": 5, "optimizer": {"learning_rate": 1e-4,
                                                           "b1": 0.8},
           "model": {"encoder": {"vit_size": "Ti"}}, "eval": {"every_steps": 50}}
    breaking, safe = loop.resume_changes(old, new)
    assert breaking == ["batch_size: 8 -> 12", "model.encoder.vit_size: 'mu' -> 'Ti'",
                        "optimizer.b1: 0.9 -> 0.8"]
    assert safe == ["eval.every_steps: 0 -> 50", "log_every: 10 -> 5",
                    "optimizer.learning_rate: 0.001 -> 0.0001"]
    # A setting added since the workdir was written (e.g. model.conv) is not a change.
    breaking, safe = loop.resume_changes(old, {**old, "model": {
        "encoder": {"vit_size": "mu"}, "conv": "auto"}})
    assert breaking == [] and safe == ["model.conv: '<absent>' -> 'auto'"]
