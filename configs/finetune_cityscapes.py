"""Stage 3 on Cityscapes (19 train ids), the paper's protocol (Sec. 5.1, Fig. 6).

Crops 1024x1024, evaluation at the full 1024x2048 in two 1024x1024 halves,
each averaged with its flip. Prepare Cityscapes first (docs/DATASETS.md).

  python -m ddep_jax.main \\
      --config=configs/finetune_cityscapes.py:init=pretrained,ckpt=DDEP_WORKDIR,fraction=1/30 \\
      --workdir=DIR

Arguments: init (scratch | encoder | pretrained), ckpt, fraction ('100%',
'1/4', '1/8', '1/30'), seed, decoder (1 or 2: the 1x / 2x decoder), steps.
"""

from ddep_jax.config_lib import finetune_config, parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, init="pretrained", ckpt="", fraction="100%", seed=0,
                    decoder=1, steps=40000)
    c = finetune_config()
    c.seed = arg.seed
    c.init.mode = arg.init
    c.init.checkpoint = arg.ckpt
    c.model.decoder_multiplier = arg.decoder
    c.data.name = "cityscapes"
    c.data.label_fraction = arg.fraction
    c.data.crop_size = (1024, 1024)
    c.eval.mode = "cityscapes"
    c.eval.split = "validation"
    c.eval.final_splits = ()
    c.eval.every_steps = 5000
    c.batch_size = 16
    c.total_steps = arg.steps
    c.optimizer.learning_rate = 1e-4
    c.optimizer.weight_decay = 1e-4
    c.optimizer.warmup_steps = 500
    return c
