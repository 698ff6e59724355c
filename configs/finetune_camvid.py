"""Stage 3: fine-tune on CamVid (11 classes) and evaluate test-split mIoU.

Prepare CamVid once (reads ../shared/data/camvid, no TensorFlow needed):
  python -m ddep_jax.data.prepare --dataset=camvid --manual_dir=../shared/data/camvid
then, e.g. from the DDeP run of configs/ddep_camvid.py at 1/30 of the labels:
  python -m ddep_jax.main \\
      --config=configs/finetune_camvid.py:init=pretrained,ckpt=workdirs/ddep_camvid,fraction=1/30 \\
      --workdir=workdirs/finetune_camvid_ddep_1-30

Arguments (comma-separated k=v):
  init      scratch | encoder | pretrained (the paper's No pretraining /
            Supervised / DDeP rows); encoder and pretrained need ckpt=
  ckpt      a stage-1/2 workdir (or checkpoints/<step> folder) to read from
  fraction  label fraction of the 367 training images ('1/30' = 13, '100%')
  seed      init, data order and labelled-subset seed
  steps     training steps (batch 8)
  arch      hybrid | r50unet (the paper's Table 7 ResNet-50 U-Net; the
            checkpoint must be of the same arch) | xnet (×Net: the hybrid
            encoder from ckpt with init=encoder, the decoder a stage-1
            classifier's ResNet from decoder_ckpt; or with init=pretrained
            encoder, decoder and Re-shapes from ckpt, a
            configs/ddep_camvid.py:arch=xnet run)
  decoder_ckpt  ×Net's decoder: a configs/classify_cifar10.py:arch=xnet workdir
            ('' = random decoder)
  product   ×Net's image x encoder product: residual (image * (1 + g)) | plain

×Net from two stage-1 workdirs (the hybrid encoder's and the ResNet
decoder's classifiers):
  python -m ddep_jax.main --config=configs/finetune_camvid.py:arch=xnet,init=encoder,ckpt=workdirs/cifar10,decoder_ckpt=workdirs/cifar10_xnet_decoder,fraction=1/30 \\
      --workdir=workdirs/finetune_camvid_xnet_1-30
  paper     the R50+ViT-B/16 + 1x decoder at 360x480 crops, full-resolution
            evaluation (a GPU/TPU run)

The CPU model equals configs/ddep_camvid.py's (so its checkpoints hand over);
images are resized by 0.5 (180x240) for training and evaluation, and the
predicted probabilities are resized back to 360x480 to score every labelled
pixel.
"""

from ddep_jax import defaults
from ddep_jax.config_lib import parse_arg
from ddep_jax.recipes import cpu_camvid_model, set_architecture, set_xnet_init


def get_config(arg=None):
    arg = parse_arg(arg, init="scratch", ckpt="", fraction="100%", seed=0,
                    steps=100, paper=False, arch="hybrid", decoder_ckpt="",
                    product="residual")
    c = defaults.finetune()
    c.seed = arg.seed
    c.init.mode = arg.init
    c.init.checkpoint = arg.ckpt
    c.data.name = "camvid"
    c.data.label_fraction = arg.fraction
    c.data.num_threads = 2
    c.eval.mode = "whole"
    c.eval.split = "validation"
    c.eval.final_splits = ("test",)
    c.total_steps = arg.steps
    if arg.paper:
        c.data.crop_size = (352, 480)
        c.batch_size = 16
        c.eval.flip = True
        c.optimizer.learning_rate = 1e-4
        c.optimizer.warmup_steps = 100
        set_architecture(c.model, arg.arch)
    else:
        cpu_camvid_model(c.model, arg.arch)
        c.data.base_scale = 0.5
        c.data.crop_size = (96, 96)
        c.data.scale_range = (0.75, 1.5)
        c.batch_size = 8
        c.optimizer.learning_rate = 1e-3
        c.optimizer.weight_decay = 1e-4
        c.optimizer.warmup_steps = 10
        c.log_every = 10
        c.checkpoint_every = 50
        c.eval.num_visualize = 4
        c.eval.every_steps = 50  # validation mIoU on the first 25 images
        c.eval.max_images = 25
    if arg.arch in ("r50unet", "xnet"):
        c.eval.size_multiple = 32  # the ResNet's output stride
    set_xnet_init(c, arg)
    return c
