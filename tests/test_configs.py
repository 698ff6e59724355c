"""Every config file loads, validates and builds its model with jax.eval_shape."""

import importlib.util

import jax
import jax.numpy as jnp
import pytest
from conftest import REPO

from ddep_jax import config_lib
from ddep_jax.models.transunet import build_model

CONFIGS = sorted((REPO / "configs").glob("*.py"))
ARGS = {"ddep_imagenet21k.py": [None, "decoder=2", "vit=L,dep", "runlocal"],
        "ddep_camvid.py": [None, "paper"]}


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
    config_lib.validate(config, num_devices=1)
    model = build_model(config.model)
    h, w = config.model.encoder.image_size
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, h, w, 3)))
    assert set(params["params"]) == {"encoder", "decoder", "head"}


def test_paper_config_values():
    c = _load(REPO / "configs" / "ddep_imagenet21k.py").get_config(None)
    assert (c.batch_size, c.num_epochs, tuple(c.model.encoder.image_size)) == (512, 100, (224, 224))
    assert c.denoising.sigma == 0.22 and c.denoising.noise_type == "scaled"
    assert config_lib.learning_rate(c) == 6e-5 and tuple(c.frozen) == ("encoder",)
    c2 = _load(REPO / "configs" / "ddep_imagenet21k.py").get_config("decoder=2")
    assert config_lib.learning_rate(c2) == 1e-4


def test_unknown_config_argument():
    with pytest.raises(ValueError, match="'decodr' is unknown"):
        _load(REPO / "configs" / "ddep_imagenet21k.py").get_config("decodr=2")
