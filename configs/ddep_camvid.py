"""DDeP on CamVid's training images (labels unused), sized for a 2-core CPU.

Prepare the dataset once (reads ../shared/data/camvid, no TensorFlow needed):
  python -m ddep_jax.data.prepare --dataset=camvid --manual_dir=../shared/data/camvid
then
  python -m ddep_jax.main --config=configs/ddep_camvid.py --workdir=workdirs/ddep_camvid

Small hybrid encoder (R(1,1,1) with the R50 root width 64 + ViT-nano), frozen;
a narrow decoder; 96x96 inception crops; scaled noise, sigma 0.22 (Eq. 5).
`:paper` switches to the R50+ViT-B/16 encoder and the 1x decoder at 224x224.
`:arch=r50unet` trains the paper's Table 7 ResNet-50 U-Net instead.
`:ckpt=DIR` takes the frozen encoder from a stage-1 run (e.g. of
configs/classify_cifar10.py, whose encoder is this one) or from a converted
or raw vision_transformer .npz (with `:paper`); without it the encoder is the
random initialisation.
"""

from ddep_jax.config_lib import parse_arg
from ddep_jax.recipes import cpu_camvid_model, set_architecture
from ddep_jax.trainers import ddep


def get_config(arg=None):
    arg = parse_arg(arg, paper=False, steps=400, ckpt="", arch="hybrid")
    c = ddep.default_config()
    c.data.source = "tfds"
    c.data.name = "camvid"
    c.data.split = "train"
    c.data.crop_area_range = (0.1, 1.0)
    c.data.num_threads = 2
    c.init.checkpoint = arg.ckpt
    if arg.paper:
        c.batch_size = 64
        c.num_epochs = 100.0
        set_architecture(c.model, arg.arch)
    else:
        cpu_camvid_model(c.model, arg.arch)
        c.batch_size = 16
        c.total_steps = arg.steps
        c.optimizer.learning_rate = 1e-3
        c.optimizer.warmup_steps = 20
        c.log_every = 20
        c.checkpoint_every = 100
        c.image_grid_every = 100
    return c
