"""Stage 3 on Cityscapes (19 train ids), the paper's protocol (Sec. 5.1, Fig. 6).

Crops 1024x1024, evaluation at the full 1024x2048 in two 1024x1024 halves,
each averaged with its flip. Prepare Cityscapes first (docs/DATASETS.md).

  python -m ddep_jax.main \\
      --config=configs/finetune_cityscapes.py:init=pretrained,ckpt=DDEP_WORKDIR,fraction=1/30 \\
      --workdir=DIR

Arguments: init (scratch | encoder | pretrained), ckpt, fraction ('100%',
'1/4', '1/8', '1/30'), seed, decoder (1 or 2: the 1x / 2x decoder), steps.
"""

from ddep_jax.recipes import paper_finetune_config


def get_config(arg=None):
    return paper_finetune_config("cityscapes", arg, crop=1024, eval_mode="cityscapes", decoder=1)
