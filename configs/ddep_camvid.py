"""DDeP on CamVid's training images (labels unused), sized for a 2-core CPU.

Prepare the dataset once (reads ../shared/data/camvid, no TensorFlow needed):
  python -m ddep_jax.data.prepare --dataset=camvid --manual_dir=../shared/data/camvid
then
  python -m ddep_jax.main --config=configs/ddep_camvid.py --workdir=workdirs/ddep_camvid

Small hybrid encoder (R(1,1,1) with the R50 root width 64 + ViT-nano), frozen;
a narrow decoder; 96x96 inception crops; scaled noise, sigma 0.22 (Eq. 5).
`:paper` switches to the R50+ViT-B/16 encoder and the 1x decoder at 224x224.
`:arch=r50unet` trains the paper's Table 7 ResNet-50 U-Net instead;
`:arch=xnet` trains ×Net's decoder (a plain ResNet (1, 1, 1, 1), random
initialisation), its Re-shapes and head by denoising on the frozen hybrid
encoder (beyond the paper; fine-tune it with configs/finetune_camvid.py:
arch=xnet,init=pretrained,ckpt=<this workdir>).
`:ckpt=DIR` takes the frozen encoder from a stage-1 run (e.g. of
configs/classify_cifar10.py, whose encoder is this one) or from a converted
or raw vision_transformer .npz (with `:paper`); without it the encoder is the
random initialisation.
"""

from ddep_jax import defaults
from ddep_jax.config_lib import parse_arg
from ddep_jax.recipes import cpu_camvid_pretraining, set_architecture


def get_config(arg=None):
    arg = parse_arg(arg, paper=False, steps=400, ckpt="", arch="hybrid")
    c = cpu_camvid_pretraining(defaults.ddep(), steps=arg.steps, ckpt=arg.ckpt,
                               arch=arg.arch)
    c.image_grid_every = 100
    if arg.paper:  # the paper's model and batch on CamVid's images
        p = defaults.ddep()
        c.model = p.model
        set_architecture(c.model, arg.arch)
        c.update(batch_size=64, num_epochs=100.0, total_steps=0, log_every=p.log_every,
                 checkpoint_every=p.checkpoint_every, image_grid_every=p.image_grid_every)
        c.optimizer = p.optimizer
    return c
