"""Every config file loads, validates and builds its model with jax.eval_shape."""

import importlib.util

import jax
import jax.numpy as jnp
import pytest
from conftest import REPO

from ddep_jax import config_lib

from ddep_jax.trainers import ddep, loop
from ddep_jax.data import class_datasets, seg_datasets
from ddep_jax.models.classifier import build_classifier
from ddep_jax.models.transunet import build_model

CONFIGS = sorted((REPO / "configs").glob("*.py"))
ARGS = {"ddep_imagenet21k.py": [None, "decoder=2", "vit=L,dep", "runlocal",
                                "decoder=3,dtype=bfloat16,accum=8"],
        "ddep_camvid.py": [None, "paper"],
        "finetune_camvid.py": [None, "paper", "init=pretrained,ckpt=x,fraction=1/30"],
        "finetune_cityscapes.py": ["ckpt=x", "decoder=2,fraction=1/8,ckpt=x",
                                   "ckpt=x,decoder=3,dtype=bfloat16,accum=4"],
        "finetune_ade20k.py": ["ckpt=x", "init=scratch,decoder=1,fraction=1%"],
        "finetune_pascal_context.py": ["ckpt=x", "init=encoder,ckpt=x,fraction=5%"],
        "classify_cifar10.py": [None, "steps=10,batch=64"],
        "classify_imagenet21k.py": [None, "vit=L,dtype=bfloat16,accum=4"],
        "classify_imagenet2012.py": [None, "ckpt=x"],
        "ddep_default.py": [None, "steps=20,seed=1"]}


def _load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path,arg", [(p, a) for p in CONFIGS
                                      for a in ARGS.get(p.name, [None])],
                         ids=lambda v: getattr(v, "name", str(v)))
def test_config_builds(path, arg):
    config = _load(path).get_config(arg)
    h, w = config.model.encoder.image_size
    loop.trainer(config.stage).validate(config, num_devices=1)
    if config.stage == "classify":
        spec = class_datasets.get_spec(config.data.name)
        model = build_classifier(config.model, spec.num_classes)
        params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, h, w, 3)))
        assert params["params"]["head"]["kernel"].shape[-1] == spec.num_classes
        return
    if config.stage == "finetune":
        model = build_model(config.model, seg_datasets.get_spec(config.data.name).num_classes)
    else:
        model = build_model(config.model)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, h, w, 3)))
    assert set(params["params"]) == {"encoder", "decoder", "head"}


def test_paper_config_values():
    c = _load(REPO / "configs" / "ddep_imagenet21k.py").get_config(None)
    assert (c.batch_size, c.num_epochs, tuple(c.model.encoder.image_size)) == (512, 100, (224, 224))
    assert c.denoising.sigma == 0.22 and c.denoising.noise_type == "scaled"
    assert ddep.learning_rate(c) == 6e-5 and tuple(c.frozen) == ("encoder",)
    c2 = _load(REPO / "configs" / "ddep_imagenet21k.py").get_config("decoder=2")
    assert ddep.learning_rate(c2) == 1e-4


def test_unknown_config_argument():
    with pytest.raises(ValueError, match="'decodr' is unknown"):
        _load(REPO / "configs" / "ddep_imagenet21k.py").get_config("decodr=2")


def test_camvid_stages_share_the_model():
    """Stage-2 checkpoints of ddep_camvid.py hand over to finetune_camvid.py."""
    stage2 = _load(REPO / "configs" / "ddep_camvid.py").get_config(None)
    ft = _load(REPO / "configs" / "finetune_camvid.py").get_config(None)
    a, b = stage2.model.to_dict(), ft.model.to_dict()
    a.pop("num_outputs"), b.pop("num_outputs")
    assert a == b
    # ... and stage 1 (CIFAR-10) trains the very encoder they take over.
    cls = _load(REPO / "configs" / "classify_cifar10.py").get_config(None)
    assert cls.model.encoder.to_dict() == stage2.model.encoder.to_dict()
    assert cls.model.dtype == stage2.model.dtype


def test_paper_finetune_protocols():
    city = _load(REPO / "configs" / "finetune_cityscapes.py").get_config("ckpt=x")
    assert tuple(city.data.crop_size) == (1024, 1024) and city.eval.mode == "cityscapes"
    for name in ("finetune_ade20k.py", "finetune_pascal_context.py"):
        c = _load(REPO / "configs" / name).get_config("ckpt=x")
        assert tuple(c.data.crop_size) == (512, 512) and c.eval.mode == "multiscale"
        assert tuple(c.eval.scales) == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
        assert c.model.decoder_multiplier == 3


@pytest.mark.parametrize("name,arg", [
    ("ddep_imagenet21k.py", "decoder=3,dtype=bfloat16,accum=8"),
    ("ddep_imagenet21k.py", "vit=L"),
    ("classify_imagenet21k.py", "vit=L,dtype=bfloat16,accum=4"),
    ("finetune_cityscapes.py", "ckpt=x,decoder=3,dtype=bfloat16,accum=4"),
])
def test_paper_configs_scale_out_arguments(name, arg):
    """Large models shard their state (fsdp); dtype and accum reach the config."""
    config = _load(REPO / "configs" / name).get_config(arg)
    assert config.mesh.param_sharding == "fsdp"
    if "dtype" in arg:
        assert config.model.dtype == "bfloat16"
        assert config.grad_accum_steps in (4, 8)


def test_default_config_takes_its_arguments():
    """configs/ddep_default.py parses its arguments (strictly) like every config."""
    c = _load(REPO / "configs" / "ddep_default.py").get_config("steps=20,seed=1")
    assert (c.total_steps, c.seed, c.data.name) == (20, 1, "embedded")
    with pytest.raises(ValueError, match="'stpes' is unknown"):
        _load(REPO / "configs" / "ddep_default.py").get_config("stpes=20")


def test_dep_starts_from_nothing_pretrained(tmp_path):
    """DeP (Sec. 3) denoises the whole model from a random initialisation:
    the paper config refuses a checkpoint with `dep`, and every recipe's DeP
    pretraining trains the encoder and reads no checkpoint; the whole model
    denoised from an encoder is named otherwise."""
    from ddep_jax.experiments import label_efficiency as le
    from ddep_jax.experiments import protocols
    from ddep_jax.trainers import ddep

    with pytest.raises(ValueError, match="DeP denoises the whole model"):
        config_lib.load_config_file(str(REPO / "configs/ddep_imagenet21k.py"),
                                    "dep,ckpt=/some/encoder")
    assert config_lib.load_config_file(str(REPO / "configs/ddep_imagenet21k.py"),
                                       "dep").init.checkpoint == ""
    for name, recipe in protocols.RECIPES.items():
        if not any(p.name == "dep" for p in recipe.pretrainings):
            continue
        h = le.Harness(recipe, str(tmp_path / name),
                       checkpoints={"supervised": "/ckpt/encoder"})
        config = h.pretraining_config("dep")
        assert config.stage == "ddep" and tuple(config.frozen) == (), name
        assert config.init.checkpoint == "", name
        assert ddep.denoising_run_name(config) == "DeP"
        config.init.checkpoint = "/ckpt/encoder"
        assert "not DeP" in ddep.denoising_run_name(config)


def test_paper_ddep_config_states_the_paper_values():
    """configs/ddep_imagenet21k.py reads alone: every value of the paper's
    run (Sec. 2, 4, 5.1) is set in the file, and no 0 stands for 'the
    paper's value' (a learning rate of 0 is refused)."""
    from ddep_jax.trainers import ddep

    text = (REPO / "configs/ddep_imagenet21k.py").read_text()
    for ref in ("Sec. 2", "Sec. 4", "Sec. 5.1", "Eq. 5", "Eq. 6", "Fig. 5", "Table 4"):
        assert ref in text, ref
    for key in ("noise_type=\"scaled\"", "sigma=0.22", "target=\"eps\"", "batch_size = 512",
                "num_epochs = 100.0", "(1024, 512, 256, 128, 64)", "crop_area_range"):
        assert key in text, key
    c = config_lib.load_config_file(str(REPO / "configs/ddep_imagenet21k.py"), "")
    assert (c.denoising.noise_type, c.denoising.sigma, c.denoising.target) == (
        "scaled", 0.22, "eps")
    assert tuple(c.denoising.sigma_range) == () and tuple(c.denoising.gamma_range) == ()
    assert (c.batch_size, c.num_epochs, c.optimizer.learning_rate) == (512, 100.0, 6e-5)
    assert tuple(c.model.decoder_widths) == (1024, 512, 256, 128, 64)
    assert tuple(c.model.encoder.image_size) == (224, 224)
    c.optimizer.learning_rate = 0.0
    with pytest.raises(ValueError, match="optimizer.learning_rate"):
        ddep.validate(c, 1)
