"""Stage 1 at paper scale: R50+ViT-B/16 as an ImageNet-21k classifier.

The recipe of the public ImageNet-21k checkpoints the paper starts from
(Dosovitskiy et al. 2021, Sec. 4.1, App. B.1, Table 3): Adam (b1 0.9, b2
0.999) with decoupled weight decay 0.03, batch 4096, 90 epochs, lr 1e-3 with
10k warm-up steps then decay, 224x224 inception crops + flip, dropout 0.1;
sigmoid cross-entropy with the head bias at -10 (big_vision's ImageNet-21k
setting). Evaluation: top-1 on the held-out 1% validation split.

Prepare ImageNet-21k once (docs/DATASETS.md), then on a TPU slice:
  python -m ddep_jax.main --config=configs/classify_imagenet21k.py --workdir=gs://...
and hand the encoder to stage 2:
  --config=configs/ddep_imagenet21k.py:ckpt=<that workdir>
Arguments: vit (B | L; L shards parameters and Adam state, mesh.param_sharding
'fsdp'), epochs, dtype (float32 | bfloat16 compute; parameters stay float32),
accum (the batch of 4096 as K micro-batches), arch (hybrid | r50unet: the
plain ResNet-50 of the paper's Table 7 U-Net, for configs/ddep_imagenet21k.py:arch=r50unet).
"""

from ddep_jax import defaults
from ddep_jax.config_lib import parse_arg
from ddep_jax.recipes import set_architecture


def get_config(arg=None):
    arg = parse_arg(arg, vit="B", epochs=90.0, dtype="float32", accum=1, arch="hybrid")
    c = defaults.classify()
    c.model.encoder.vit_size = arg.vit
    c.model.encoder.dropout_rate = 0.1
    c.model.head_bias_init = -10.0
    c.data.name = "imagenet21k"
    c.data.image_size = (224, 224)
    c.loss.type = "sigmoid"
    c.eval.splits = ("validation",)
    c.eval.every_steps = 10000
    c.eval.max_examples = 50000
    c.eval.batch_size = 1024
    c.batch_size = 4096
    c.num_epochs = arg.epochs
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 10000
    c.optimizer.weight_decay = 0.03
    c.optimizer.grad_clip_norm = 1.0
    c.checkpoint_every = 2000
    c.model.dtype = arg.dtype
    c.grad_accum_steps = arg.accum
    if arg.vit == "L":
        c.mesh.param_sharding = "fsdp"
    set_architecture(c.model, arg.arch)
    return c
