"""Stage 1 on ImageNet-1k (TFDS `imagenet2012`): R50+ViT-B/16 classifier.

ViT's from-scratch ImageNet recipe (Dosovitskiy et al. 2021, Table 3): Adam
with decoupled weight decay 0.3, batch 4096, 300 epochs, lr 3e-3 with 10k
warm-up steps then decay, dropout 0.1, 224x224 inception crops + flip; softmax
cross-entropy with label smoothing 0.1. Evaluation: top-1 on the 50,000
validation images (resize to 256, centre crop 224).

TFDS's `imagenet2012` needs ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar
in its manual directory (docs/DATASETS.md), then:
  python -m ddep_jax.data.prepare --dataset=imagenet2012 --manual_dir=<DIR>
  python -m ddep_jax.main --config=configs/classify_imagenet2012.py --workdir=DIR
`:ckpt=PATH` starts from a pretrained encoder (e.g. an ImageNet-21k stage-1
workdir or a converted .npz) and fine-tunes it on ImageNet-1k.
Arguments: vit (B | L), epochs, ckpt.
"""

from ddep_jax import defaults
from ddep_jax.config_lib import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, vit="B", epochs=300.0, ckpt="")
    c = defaults.classify()
    c.model.encoder.vit_size = arg.vit
    c.model.encoder.dropout_rate = 0.1
    c.init.checkpoint = arg.ckpt
    c.data.name = "imagenet2012"
    c.data.image_size = (224, 224)
    c.loss.type = "softmax"
    c.loss.label_smoothing = 0.1
    c.eval.splits = ("validation",)
    c.eval.every_steps = 5000
    c.eval.batch_size = 1024
    c.batch_size = 4096
    c.num_epochs = arg.epochs
    c.optimizer.learning_rate = 3e-3
    c.optimizer.warmup_steps = 10000
    c.optimizer.weight_decay = 0.3
    c.optimizer.grad_clip_norm = 1.0
    c.checkpoint_every = 2000
    return c
