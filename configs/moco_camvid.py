"""MoCo on the encoder-decoder (SSL4DP's contrastive pretext tasks) on
CamVid's training images (labels unused), sized for a 2-core CPU: the
other stage-2 objectives the label-efficiency harness compares with DDeP.

Prepare the dataset once (reads ../shared/data/camvid):
  python -m ddep_jax.data.prepare --dataset=camvid --manual_dir=../shared/data/camvid
then
  python -m ddep_jax.main --config=configs/moco_camvid.py:ckpt=workdirs/cifar10 \\
      --workdir=workdirs/moco_camvid

The model and schedule are configs/ddep_camvid.py's. Two 96x96 views, both
cropped from the whole frame (CamVid's 360x480 frames at half resolution,
180x240, as fine-tuning sees them; MoCo v2 augmentation); the queries from
the trained network, the keys from its momentum copy, InfoNCE against a
queue; keys of the query's own image are not negatives, nor (patch levels)
key patches overlapping the query patch by more than `overlap`.

Arguments (comma-separated k=v):
  steps     training steps (batch 16)
  ckpt      the stage-1 encoder (a configs/classify_cifar10.py workdir); '' keeps
            the random initialisation
  variant   image | patch | patch_decoder (`models.contrastive.VARIANTS`)
  encoder   frozen | train | slow: frozen (as DDeP; not for patch), trained at
            the decoder's rate, or at 1/100 of it (the draft's option)
  momentum  of the key encoder (MoCo v2: 0.999 over ~10^6 steps; 0.99 here,
            for runs of ~10^3 steps)
  queue     negatives (MoCo v2: 65536; here 4096, ~256 batches of images)
  overlap   pretext.negative_max_overlap (default 0.25; 1.0 keeps overlapping
            patches as negatives, the draft read literally)
  same_image  exclude keys of the query's own image from the negatives
            (default True; False: the older runs' behaviour)
  arch      hybrid | r50unet (the paper's Table 7 ResNet-50 U-Net)
"""

from ddep_jax import defaults
from ddep_jax.config_lib import parse_arg
from ddep_jax.recipes import cpu_camvid_pretraining, set_encoder_training


def get_config(arg=None):
    arg = parse_arg(arg, steps=400, ckpt="", variant="image", encoder="frozen",
                    momentum=0.99, queue=4096, arch="hybrid", overlap=0.25,
                    same_image=True)
    c = cpu_camvid_pretraining(defaults.moco(), steps=arg.steps,
                               ckpt=arg.ckpt, arch=arg.arch)
    c.pretext.variant = arg.variant
    c.pretext.momentum = arg.momentum
    c.pretext.queue_size = arg.queue
    c.pretext.hidden = 512
    c.pretext.frame_size = (180, 240)
    c.pretext.negative_max_overlap = arg.overlap
    c.pretext.exclude_same_image = arg.same_image
    set_encoder_training(c, arg.encoder)
    return c
