"""Stage 3 on Pascal Context (59 classes), the paper's protocol (Sec. 5.1, Table 6).

Crops 512x512 with the 3x decoder by default; evaluation multi-scale (0.5,
0.75, 1.0, 1.25, 1.5, 1.75) + flip. Prepare the dataset first
(docs/DATASETS.md).

  python -m ddep_jax.main \\
      --config=configs/finetune_pascal_context.py:init=pretrained,ckpt=DDEP_WORKDIR,fraction=1% \\
      --workdir=DIR

Arguments: init (scratch | encoder | pretrained), ckpt, fraction ('1%',
'5%', '10%', '20%', '100%'), seed, decoder (1 or 3), steps.
"""

from ddep_jax.recipes import paper_finetune_config


def get_config(arg=None):
    return paper_finetune_config("pascal_context", arg, crop=512, eval_mode="multiscale", decoder=3,
                                 size_multiple=128)
