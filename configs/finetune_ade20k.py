"""Stage 3 on ADE20K (150 classes, 0 -> void), the paper's protocol (Sec. 5.1, Fig. 7).

Crops 512x512 with the 3x decoder by default; evaluation multi-scale (0.5,
0.75, 1.0, 1.25, 1.5, 1.75) + flip. Prepare the dataset first
(docs/DATASETS.md).

  python -m ddep_jax.main \\
      --config=configs/finetune_ade20k.py:init=pretrained,ckpt=DDEP_WORKDIR,fraction=1% \\
      --workdir=DIR

Arguments: init (scratch | encoder | pretrained), ckpt, fraction ('1%',
'5%', '10%', '20%', '100%'), seed, decoder (1 or 3), steps.
"""

from ddep_jax.config_lib import finetune_config, parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, init="pretrained", ckpt="", fraction="100%", seed=0,
                    decoder=3, steps=40000)
    c = finetune_config()
    c.seed = arg.seed
    c.init.mode = arg.init
    c.init.checkpoint = arg.ckpt
    c.model.decoder_multiplier = arg.decoder
    c.data.name = "ade20k"
    c.data.label_fraction = arg.fraction
    c.data.crop_size = (512, 512)
    c.eval.mode = "multiscale"
    c.eval.size_multiple = 128  # images of many sizes: fewer compilations
    c.eval.split = "validation"
    c.eval.final_splits = ()
    c.eval.every_steps = 5000
    c.batch_size = 16
    c.total_steps = arg.steps
    c.optimizer.learning_rate = 1e-4
    c.optimizer.weight_decay = 1e-4
    c.optimizer.warmup_steps = 500
    return c
