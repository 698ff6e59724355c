"""Test set-up: 8 simulated CPU devices (set before JAX initialises) and
shared tiny configs."""

import os
import pathlib

# The tests' programs run a few steps of tiny models: compiling them costs
# far more than running them, so LLVM's backend optimisation is turned down
# (a cold tiny fine-tuning run 44.6 s -> 35.6 s, the fast-path accuracy test
# 80 s -> 60 s on 2 cores); children (subprocess tests) inherit the flags.
COMPILE_FAST_FLAGS = ("--xla_backend_optimization_level=0"
                      " --xla_llvm_disable_expensive_passes=true")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8 "
                           + COMPILE_FAST_FLAGS).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import atexit  # noqa: E402
import io  # noqa: E402
import shutil  # noqa: E402
import tarfile  # noqa: E402
import tempfile  # noqa: E402

import chex  # noqa: E402
import jax  # noqa: E402
import pytest  # noqa: E402

# Many tests build the same tiny models, and every loop.run call
# re-jits its init and step: XLA's persistent compilation cache (in a fresh
# temporary folder, removed at exit) turns the repeats into
# cache hits; a tiny TransUNet's init alone takes ~30 s to compile on 2 cores.
# One folder for the whole session: pytest-xdist's controller makes it and
# its worker processes (started after this module ran there) inherit it
# through the environment, so a program one worker compiled is a hit for the
# other; the process that made it removes it at exit.
_XLA_CACHE = os.environ.get("DDEP_JAX_TEST_XLA_CACHE", "")
if not _XLA_CACHE:
    _XLA_CACHE = tempfile.mkdtemp(prefix="ddep_jax_test_xla_cache_")
    os.environ["DDEP_JAX_TEST_XLA_CACHE"] = _XLA_CACHE
    atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _XLA_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
# JAX's default partitionable threefry (sharded random bits without
# communication, what TPU pods want) makes XLA CPU compile a model's init
# ~3x slower (a tiny TransUNet's: 13.9 s -> 4.7 s without it); the tests run
# the classic threefry, whose values are as independent of the sharding.
jax.config.update("jax_threefry_partitionable", False)

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def apply_overrides(config, overrides: dict):
    """Sets dotted keys ('model.encoder.vit_size') of a ConfigDict in place
    (`config_lib.apply_overrides`: an unknown key is an error)."""
    from ddep_jax import config_lib

    return config_lib.apply_overrides(config, overrides)


def tiny_config(**overrides):
    """A DDeP config small enough for a unit test on 2 CPU cores."""
    from ddep_jax.trainers import ddep

    c = ddep.default_config()
    c.model.encoder.update(vit_size="mu", resnet_layers=(1, 1, 1), resnet_width=8,
                           image_size=(32, 32), num_groups=4)
    c.model.decoder_widths = (32, 16, 16, 8, 8)
    c.model.decoder_num_groups = 4
    c.data.source = "embedded"
    c.data.num_threads = 1
    c.data.prefetch = 1
    c.data.cache = "none"  # a few steps read fewer images than the source holds
    c.batch_size = 8
    c.total_steps = 4
    c.optimizer.learning_rate = 1e-3
    c.mesh.data = 1
    c.log_every = 1
    c.checkpoint_every = 2
    c.image_grid_every = 0  # no denoise grids (a compile each) unless asked
    c.image_grid_size = 2
    return apply_overrides(c, overrides)


def assert_resumes_bit_for_bit(config, tmp_path, stop: int = 2) -> dict:
    """Runs `config` straight into tmp_path/straight and, into
    tmp_path/resumed, up to `stop` then resumed to the end: the loss history
    and the final train state must be equal bit for bit. Returns the
    straight run's result."""
    from ddep_jax.trainers import loop

    straight = loop.run(config, str(tmp_path / "straight"))
    first = loop.run(config, str(tmp_path / "resumed"), stop_after_step=stop)
    resumed = loop.run(config, str(tmp_path / "resumed"))
    assert first["history"] + resumed["history"] == straight["history"]
    chex.assert_trees_all_equal(jax.device_get(resumed["state"]),
                                jax.device_get(straight["state"]))
    return straight


def stage_step(config, mesh_devices: int = 1, num_steps: int = 10, seed: int = 0):
    """(the config's `loop.Stage` without data, its `loop.TrainState`, the
    loop's jitted train step (state donated) on a `mesh_devices` mesh)."""
    from ddep_jax.parallel.sharding import make_mesh
    from ddep_jax.trainers import loop

    mesh = make_mesh(mesh_devices)
    stage = loop.trainer(config.stage).stage(config, mesh, data=False)
    ts = loop.build_state(stage, config, num_steps, mesh, jax.random.key(seed))
    return stage, ts, loop.jit_train_step(stage, ts, config, mesh)


TINY_OVERRIDES = {
    "model.encoder.vit_size": "mu", "model.encoder.resnet_width": 8,
    "model.encoder.image_size": (32, 32), "model.encoder.num_groups": 4,
    "model.decoder_widths": (32, 16, 16, 8, 8), "model.decoder_num_groups": 4,
    "data.num_threads": 1, "data.prefetch": 1, "data.cache": "none", "log_every": 1,
    "image_grid_every": 0, "image_grid_size": 2,
}


def flags(overrides: dict) -> list[str]:
    """--config.<key>=<value> command-line overrides."""
    def text(v):
        return f"({','.join(map(str, v))})" if isinstance(v, tuple) else str(v)
    return [f"--config.{k}={text(v)}" for k, v in overrides.items()]


def default_config(**overrides):
    """The README's first config (configs/ddep_default.py) at the tiny sizes."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ddep_default",
                                                  REPO / "configs" / "ddep_default.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return apply_overrides(module.get_config(), {**TINY_OVERRIDES, **overrides})


def subprocess_env(**extra) -> dict:
    """The environment of a child run: the session's XLA compilation cache
    (conftest), so that a rerun of the same program compiles nothing."""
    return {**os.environ, "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1",
            "JAX_THREEFRY_PARTITIONABLE": "0", **extra}


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
    from ddep_jax.trainers import finetune

    c = finetune.default_config()
    ref = tiny_config()
    c.model.update(ref.model.to_dict())
    c.model.num_outputs = 0
    c.data.name = "camvid"
    c.data.crop_size = (32, 32)
    c.data.base_scale = 0.25
    c.data.scale_range = (0.75, 1.25)
    c.data.num_threads = 1
    c.data.prefetch = 1
    c.data.cache = "none"  # decoding up front is slower for a few steps
    c.data.label_fraction = "1/30"
    c.eval.split = "validation"
    c.eval.final_splits = ()
    c.eval.num_visualize = 2
    c.eval.final_max_images = 16  # the first 16 validation images
    c.batch_size = 8
    c.total_steps = 2
    c.optimizer.learning_rate = 1e-3
    c.mesh.data = 1
    c.log_every = 1
    c.checkpoint_every = 1
    return apply_overrides(c, overrides)


def assert_hands_over_to_finetuning(workdir: str, params: dict, data_dir: str,
                                    tmp_path) -> None:
    """A stage-3 state initialised (init.mode pretrained) from the stage-2
    run `workdir` holds its encoder and decoder exactly: `params`, that
    run's final parameters (host arrays); the head is new."""
    import chex

    from ddep_jax.checkpoints import handover
    from ddep_jax.parallel.sharding import make_mesh
    from ddep_jax.trainers import finetune, loop

    ft = tiny_finetune_config(**{"data.data_dir": data_dir})
    mesh, key = make_mesh(1), jax.random.key(0)
    ts = loop.build_state(finetune.stage(ft, mesh, data=False), ft, 10, mesh, key)
    (tmp_path / "ft").mkdir()
    restored = jax.device_get(handover.initialise(
        ts.init(key), ts.tx, ts.sharding, workdir,
        finetune.INIT_COLLECTIONS["pretrained"], str(tmp_path / "ft"),
        record={"mode": "pretrained"}, pos_grid=handover.token_grid(ft.model)))
    for collection in ("encoder", "decoder"):
        chex.assert_trees_all_equal(restored["params"][collection], params[collection])


def tiny_classify_config(data_dir, **overrides):
    """A stage-1 config with the `tiny_config` encoder on the CIFAR-10 subset
    of `cifar_subset` (prepared in `data_dir`), 32x32, batch 8."""
    from ddep_jax.trainers import classify

    c = classify.default_config()
    c.model.encoder.update(tiny_config().model.encoder.to_dict())
    c.data.update(name="cifar10", data_dir=data_dir, image_size=(32, 32),
                  eval_crop_fraction=1.0, num_threads=1, prefetch=1, cache="none")
    c.eval.update(splits=("test",), batch_size=32)
    c.update(batch_size=8, total_steps=2, log_every=1, checkpoint_every=1)
    c.optimizer.update(learning_rate=1e-3, warmup_steps=0)
    c.mesh.data = 1
    return apply_overrides(c, overrides)


PER_CLASS = 8


def _write_tar(path, members: dict[str, bytes]):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="session")
def cifar_subset(tmp_path_factory):
    """(manual_dir, data_dir, {split: {member: bytes}}): 8 real test images per
    class as `train.tar.gz`, the next 8 as a `test/` folder, prepared once."""
    archive = SHARED_DATA / "cifar10" / "test.tar.gz"
    if not archive.is_file():
        pytest.skip(f"CIFAR-10 not found at {archive}: put the shared data beside "
                    "the repo (../shared/data/cifar10) to run real-data tests.")
    from ddep_jax.data import prepare
    from ddep_jax.data.builders import cifar10_jpeg

    picked = {"train": {}, "test": {}}
    counts = dict.fromkeys(cifar10_jpeg.CLASS_NAMES, 0)
    with tarfile.open(archive) as tar:
        for member in tar:
            cls = member.name.split("/")[0]
            if not member.isfile() or counts[cls] >= 2 * PER_CLASS:
                continue
            split = "train" if counts[cls] < PER_CLASS else "test"
            picked[split][member.name] = tar.extractfile(member).read()
            counts[cls] += 1
    manual = tmp_path_factory.mktemp("cifar_manual")
    _write_tar(manual / "train.tar.gz", picked["train"])
    for name, data in picked["test"].items():
        (manual / "test" / name).parent.mkdir(parents=True, exist_ok=True)
        (manual / "test" / name).write_bytes(data)
    data_dir = tmp_path_factory.mktemp("cifar_tfds")
    prepare.prepare("cifar10_jpeg", manual, data_dir)
    return manual, str(data_dir), picked


def read_tensorboard(folder) -> dict:
    """{tag: [(step, kind)]} of the TensorBoard event files in `folder`
    (kind: 'scalar', 'image' or 'text'), read with tensorboardX's protos
    from the TFRecord framing (8-byte length, 4-byte CRC, data, 4-byte CRC)."""
    import struct

    from tensorboardX.proto import event_pb2

    tags: dict = {}
    for path in sorted(pathlib.Path(folder).glob("events*")):
        data = path.read_bytes()
        offset = 0
        while offset + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                kind = ("image" if value.HasField("image") else
                        "text" if value.metadata.plugin_data.plugin_name == "text"
                        else "scalar")
                tags.setdefault(value.tag, []).append((event.step, kind))
    return tags
