"""Test set-up: 8 simulated CPU devices (set before JAX initialises) and
shared tiny configs."""

import os
import pathlib

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# Many tests build the same tiny models, and every train_and_evaluate call
# re-jits its init and step: XLA's persistent compilation cache (in a fresh
# temporary folder, removed at exit) turns the repeats into
# cache hits; a tiny TransUNet's init alone takes ~30 s to compile on 2 cores.
_XLA_CACHE = tempfile.mkdtemp(prefix="ddep_jax_test_xla_cache_")
atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _XLA_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def apply_overrides(config, overrides: dict):
    """Sets dotted keys ('model.encoder.vit_size') of a ConfigDict in place."""
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def tiny_config(**overrides):
    """A DDeP config small enough for a unit test on 2 CPU cores."""
    from ddep_jax.config_lib import ddep_config

    c = ddep_config()
    c.model.encoder.update(vit_size="mu", resnet_layers=(1, 1, 1), resnet_width=8,
                           image_size=(32, 32), num_groups=4)
    c.model.decoder_widths = (32, 16, 16, 8, 8)
    c.model.decoder_num_groups = 4
    c.data.source = "embedded"
    c.data.num_threads = 1
    c.data.prefetch = 1
    c.batch_size = 8
    c.total_steps = 4
    c.optimizer.learning_rate = 1e-3
    c.mesh.data = 1
    c.log_every = 1
    c.checkpoint_every = 2
    c.image_grid_every = 0  # no denoise grids (a compile each) unless asked
    c.image_grid_size = 2
    return apply_overrides(c, overrides)


@pytest.fixture
def camvid_dir():
    path = SHARED_DATA / "camvid"
    if not (path / "train" / "images").is_dir():
        pytest.skip(f"CamVid not found at {path}: put the shared data beside the repo "
                    "(../shared/data/camvid) to run real-data tests.")
    return path


@pytest.fixture(scope="session")
def camvid_tfds(tmp_path_factory):
    """TFDS data_dir with CamVid prepared from ../shared/data/camvid (once per
    session); skips when the shared data is absent."""
    path = SHARED_DATA / "camvid"
    if not (path / "train" / "images").is_dir():
        pytest.skip(f"CamVid not found at {path}: put the shared data beside the repo "
                    "(../shared/data/camvid) to run real-data tests.")
    from ddep_jax.data import prepare

    data_dir = tmp_path_factory.mktemp("tfds_camvid_shared")
    prepare.prepare("camvid", path, data_dir)
    return str(data_dir)


def tiny_finetune_config(**overrides):
    """A stage-3 CamVid config with the `tiny_config` model (so a tiny DDeP
    checkpoint hands over), small crops and a quarter-size evaluation."""
    from ddep_jax.config_lib import finetune_config

    c = finetune_config()
    ref = tiny_config()
    c.model.update(ref.model.to_dict())
    c.model.num_outputs = 0
    c.data.name = "camvid"
    c.data.crop_size = (32, 32)
    c.data.base_scale = 0.25
    c.data.scale_range = (0.75, 1.25)
    c.data.num_threads = 1
    c.data.prefetch = 1
    c.data.label_fraction = "1/30"
    c.eval.split = "validation"
    c.eval.final_splits = ()
    c.eval.num_visualize = 2
    c.batch_size = 8
    c.total_steps = 2
    c.optimizer.learning_rate = 1e-3
    c.mesh.data = 1
    c.log_every = 1
    c.checkpoint_every = 1
    return apply_overrides(c, overrides)
