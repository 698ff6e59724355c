"""The paper's DDeP run: R50+ViT-B/16 encoder frozen, 1x decoder, ImageNet-21k.

DDeP Sec. 5.1: batch 512, 100 epochs, 224x224, Adam with cosine decay, lr 6e-5
(1x and 3x decoders) or 1e-4 (2x), scaled additive noise with sigma = 0.22
(Eq. 5, Fig. 5), eps target (Eq. 6).

Prepare the data once (docs/DATASETS.md), then:
  python -m ddep_jax.main --config=configs/ddep_imagenet21k.py --workdir=DIR
Variants: --config=configs/ddep_imagenet21k.py:decoder=2 (2x decoder, lr 1e-4),
  :vit=L (R50+ViT-L/16), :dep (DeP: the whole model denoised from a random
  initialisation, Sec. 3; refuses :ckpt, since denoising the whole model from
  a pretrained encoder is another method, not the paper's DeP),
  :arch=r50unet (the Table 7 ResNet-50 U-Net, from a ResNet-50 stage-1 run:
  configs/classify_imagenet21k.py:arch=r50unet),
  :runlocal (tiny sizes to smoke-test the config on a laptop),
  :ckpt=PATH the pretrained encoder: the public R50+ViT-B_16.npz (or
  ViT-L), its Orbax conversion (python -m ddep_jax.checkpoints.vit_import) or a stage-1
  workdir (configs/classify_imagenet21k.py). The paper freezes the public
  ImageNet-21k checkpoint's encoder; without it the encoder is random.
  :dtype=bfloat16 (bf16 compute, float32 parameters and optimizer state),
  :accum=K (the batch of 512 as K micro-batches: fits fewer or smaller
  devices). ViT-L and the 3x decoder shard parameters and Adam state over
  the devices (mesh.param_sharding='fsdp').

On a Cloud TPU slice (docs/LAUNCH.md):
  launch/tpu.sh run --config=configs/ddep_imagenet21k.py:ckpt=gs://B/encoders/r50_vitb16 \
      --workdir=gs://B/runs/ddep_1x
"""

from ddep_jax import defaults
from ddep_jax.config_lib import parse_arg
from ddep_jax.recipes import set_architecture


def get_config(arg=None):
    arg = parse_arg(arg, decoder=1, vit="B", dep=False, runlocal=False, ckpt="",
                    dtype="float32", accum=1, arch="hybrid")
    if arg.dep and arg.ckpt:
        raise ValueError(
            f"configs/ddep_imagenet21k.py:dep,ckpt={arg.ckpt}: DeP denoises the whole "
            "model from a random initialisation (DDeP Sec. 3); drop ckpt for DeP, or "
            "drop dep for DDeP (the encoder from ckpt, frozen).")
    c = defaults.ddep()
    # Model (Sec. 2): R50+ViT-B/16 hybrid encoder (ViT-L with :vit=L), the
    # TransUNet decoder of widths [1024, 512, 256, 128, 64] x `decoder`.
    c.model.encoder.update(vit_size=arg.vit, resnet_layers=(3, 4, 9), resnet_width=64,
                           image_size=(224, 224), num_groups=32)
    c.model.decoder_multiplier = arg.decoder
    c.model.decoder_widths = tuple(w * arg.decoder for w in (1024, 512, 256, 128, 64))
    c.model.dtype = arg.dtype
    # Denoising (Sec. 4): scaled additive noise (Eq. 5), sigma 0.22 (Fig. 5),
    # fixed (Table 4), predict the noise eps (Eq. 6), no noise conditioning.
    c.denoising.update(noise_type="scaled", sigma=0.22, sigma_range=(), gamma_range=(),
                       target="eps")
    c.model.noise_conditioning = False
    # Data (Sec. 5.1): ImageNet-21k training images, labels unused, 224x224
    # inception crops and flips.
    c.data.source = "tfds"
    c.data.name = "imagenet21k"
    c.data.split = "train"
    c.data.crop_area_range = (0.08, 1.0)
    c.data.flip = True
    # Optimisation (Sec. 5.1): batch 512, 100 epochs, Adam, cosine decay, lr
    # 6e-5 for the 1x and 3x decoders and 1e-4 for the 2x.
    c.batch_size = 512
    c.num_epochs = 100.0
    c.total_steps = 0  # the 100 epochs decide
    c.optimizer.update(learning_rate={1: 6e-5, 2: 1e-4, 3: 6e-5}[arg.decoder],
                       b1=0.9, b2=0.999, weight_decay=0.0, warmup_steps=0)
    # DDeP freezes the encoder (Sec. 4); DeP trains it from scratch (Sec. 3).
    c.frozen = () if arg.dep else ("encoder",)
    c.init.checkpoint = arg.ckpt
    c.grad_accum_steps = arg.accum
    if arg.vit == "L" or arg.decoder == 3:
        c.mesh.param_sharding = "fsdp"
    if arg.runlocal:
        c.model.encoder.update(vit_size="mu", resnet_layers=(1, 1, 1),
                               image_size=(64, 64), num_groups=16)
        c.model.decoder_widths = (64, 64, 32, 32, 32)
        c.model.decoder_num_groups = 8
        c.batch_size = 8
        c.total_steps = 20
        c.log_every = 5
        c.data.num_threads = 2
    set_architecture(c.model, arg.arch)
    return c
