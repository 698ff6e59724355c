"""DDeP on the embedded real photographs (scikit-image), small enough for a CPU.

The README's first command; needs no dataset preparation and no network:
  python -m ddep_jax.main --config=configs/ddep_default.py --workdir=workdirs/default
Arguments: steps (default 200), seed.

A small R(1,1,1)+ViT-mu hybrid (root width 64 as in R50) and a narrow decoder, 64x64 crops, frozen
(randomly initialised) encoder, scaled noise with sigma = 0.22 (Eq. 5), eps
target (Eq. 6).
"""

from ddep_jax.config_lib import parse_arg
from ddep_jax.trainers import ddep


def get_config(arg=None):
    arg = parse_arg(arg, steps=200, seed=0)
    c = ddep.default_config()
    c.seed = arg.seed
    c.model.encoder.update(vit_size="mu", resnet_layers=(1, 1, 1), resnet_width=64,
                           image_size=(64, 64), num_groups=16)
    c.model.decoder_widths = (128, 64, 64, 32, 32)
    c.model.decoder_num_groups = 8
    c.data.source = "embedded"
    c.data.name = "embedded"  # what config.json should say (the name is not read)
    c.data.crop_area_range = (0.05, 1.0)
    c.data.num_threads = 2
    c.batch_size = 8
    c.total_steps = arg.steps
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 20
    c.log_every = 20
    c.checkpoint_every = 100
    c.image_grid_every = 100
    return c
