"""Patch-level rotation prediction (SSL4DP pretext task) on CamVid's training
images (labels unused), sized for a 2-core CPU: the other stage-2 objective
the label-efficiency harness compares with DDeP.

Prepare the dataset once (reads ../shared/data/camvid):
  python -m ddep_jax.data.prepare --dataset=camvid --manual_dir=../shared/data/camvid
then
  python -m ddep_jax.main --config=configs/rotation_camvid.py:ckpt=workdirs/cifar10 \\
      --workdir=workdirs/rotation_camvid

The model, crops and schedule are configs/ddep_camvid.py's; each 32x32 patch
of a 96x96 crop (a 3x3 grid) is rotated by 0/90/180/270 degrees and the
encoder-decoder predicts the angle at every pixel.

Arguments (comma-separated k=v):
  steps    training steps (batch 16)
  ckpt     the stage-1 encoder (a configs/classify_cifar10.py workdir); '' keeps
           the random initialisation
  patch    patch side in pixels (divides 96)
  arch     hybrid | r50unet (the paper's Table 7 ResNet-50 U-Net)
  encoder  frozen | train | slow: frozen (as DDeP), trained at the decoder's
           rate, or at 1/100 of it (the draft's option)
"""

from ddep_jax import defaults
from ddep_jax.config_lib import parse_arg
from ddep_jax.recipes import cpu_camvid_pretraining, set_encoder_training


def get_config(arg=None):
    arg = parse_arg(arg, steps=400, ckpt="", patch=32, encoder="frozen", arch="hybrid")
    c = cpu_camvid_pretraining(defaults.rotation(), steps=arg.steps,
                               ckpt=arg.ckpt, arch=arg.arch)
    c.pretext.patch_size = arg.patch
    set_encoder_training(c, arg.encoder)
    return c
