"""Each stage's default config: the values every `configs/*.py` starts from.

One function per stage, named as its trainer module (`ddep_jax.trainers.<stage>`
re-exports it as `default_config`). This module and `config_lib` import
nothing heavy (ml_collections only, no JAX), so that a config file loads,
prints `--help` and fails on a bad argument in a fraction of a second; the
checks that need the models' constants live in the trainers' `validate`.
"""

from __future__ import annotations

import ml_collections

from ddep_jax import config_lib

# Paper Sec. 5.1: lr 6e-5 for the 1x and 3x decoders, 1e-4 for the 2x decoder.
PAPER_LEARNING_RATE = {1: 6e-5, 2: 1e-4, 3: 6e-5}


def classify() -> ml_collections.ConfigDict:
    """Stage-1 defaults: supervised Hybrid-ViT classifier pretraining.

    ViT/big_vision recipe (Dosovitskiy et al. 2021, Sec. 4.1 and App. B.1):
    Adam(W), linear warm-up then cosine decay, inception crop + flip, label
    smoothing; `loss.type` 'sigmoid' is the usual choice for ImageNet-21k.
    `model.encoder` is the encoder that stage 2 and 3 take over, so it must
    equal theirs; `data.image_size` is the training resolution (the position
    embedding is learned for `model.encoder.image_size` and resampled to it).
    """
    c = ml_collections.ConfigDict()
    c.stage = "classify"
    c.seed = 0
    c.model = config_lib.model_config()
    c.model.num_outputs = 0  # 0: the dataset's number of classes
    c.model.head_bias_init = 0.0  # big_vision: -10 with sigmoid on ImageNet-21k

    # Optional initial encoder (e.g. converted from a public .npz, to continue
    # on another dataset); '' trains from scratch.
    c.init = ml_collections.ConfigDict()
    c.init.checkpoint = ""
    c.init.step = -1

    c.data = ml_collections.ConfigDict()
    c.data.name = "cifar10"  # a name in ddep_jax.data.class_datasets
    c.data.data_dir = ""  # '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.data.train_split = "train"
    c.data.image_size = (224, 224)  # training and evaluation input (H, W)
    c.data.crop_area_range = (0.08, 1.0)  # inception crop (Szegedy et al. 2015)
    c.data.crop_aspect_range = (3 / 4, 4 / 3)
    c.data.flip = True
    c.data.eval_crop_fraction = 0.875  # eval: resize to size/f, centre crop size
    config_lib.add_data_loading(c.data)

    c.loss = ml_collections.ConfigDict()
    c.loss.type = "softmax"  # LOSS_TYPES
    c.loss.label_smoothing = 0.0

    c.eval = ml_collections.ConfigDict()
    c.eval.splits = ("validation",)  # top-1 accuracy at the end
    c.eval.every_steps = 0  # also every N steps on the first split; 0: end only
    c.eval.batch_size = 256
    c.eval.max_examples = 0  # periodic evaluation on the first N; 0 = all

    c.batch_size = 4096
    c.num_epochs = 90.0
    c.total_steps = 0  # > 0 overrides num_epochs

    c.optimizer = config_lib.optimizer_config(learning_rate=1e-3)
    c.optimizer.warmup_steps = 10000
    c.optimizer.weight_decay = 0.03
    c.optimizer.grad_clip_norm = 1.0
    return config_lib.add_run_options(c)


def ddep() -> ml_collections.ConfigDict:
    """Defaults: the paper's DDeP run (R50+ViT-B/16, 1x decoder, Sec. 5.1)."""
    c = ml_collections.ConfigDict()
    c.stage = "ddep"
    c.seed = 0
    c.model = config_lib.model_config()

    # Denoising objective (Sec. 3-4).
    c.denoising = ml_collections.ConfigDict()
    c.denoising.noise_type = "scaled"  # Eq. 5; 'simple' is Eq. 1
    c.denoising.target = "eps"  # Eq. 6; 'x' is Eq. 2
    c.denoising.sigma = 0.22  # Fig. 5
    c.denoising.sigma_range = ()  # (low, high): sample sigma per example
    # (low, high): sample gamma = 1 / (1 + sigma^2) per example instead: Table 4's
    # caption (0.9, 0.95), DDPM's (0, 1) (`denoising.sample_sigma`).
    c.denoising.gamma_range = ()

    # Which top-level collections stay fixed: ('encoder',) is DDeP, () is DeP.
    c.frozen = ("encoder",)

    # The pretrained encoder (stage-1 hand-over): a stage-1 workdir, one of its
    # checkpoints/<step> folders, an Orbax folder written by `python -m
    # ddep_jax.checkpoints.vit_import`, or a vision_transformer .npz; only params/encoder
    # is read, every leaf must match. '' keeps the random initialisation.
    c.init = ml_collections.ConfigDict()
    c.init.checkpoint = ""
    c.init.step = -1  # which checkpoint of a workdir; -1 = the latest

    c.data = ml_collections.ConfigDict()
    c.data.source = "tfds"  # DATA_SOURCES
    c.data.name = "imagenet21k"  # 'tfds': the prepared dataset
    c.data.split = "train"
    c.data.data_dir = ""  # '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
    # 'folder' (ddep_jax.data.folders): the images under `folder` that match
    # `glob` (recursive with **); undecodable files skipped and listed in
    # WORKDIR/skipped_images.txt ('skip'), or the run stops ('error').
    c.data.folder = ""
    c.data.glob = "**/*"
    c.data.bad_images = "skip"
    c.data.crop_area_range = (0.08, 1.0)  # inception crop (Szegedy et al. 2015)
    c.data.crop_aspect_range = (3 / 4, 4 / 3)
    c.data.flip = True
    config_lib.add_data_loading(c.data)

    c.batch_size = 512
    c.num_epochs = 100.0
    c.total_steps = 0  # > 0 overrides num_epochs

    # Adam, cosine decay, the 1x decoder's lr (Sec. 5.1; PAPER_LEARNING_RATE).
    c.optimizer = config_lib.optimizer_config(PAPER_LEARNING_RATE[1])
    c.image_grid_every = 500  # and at the end; 0: no image grids
    c.image_grid_size = 8
    return config_lib.add_run_options(c, keep_checkpoints=3)


def finetune() -> ml_collections.ConfigDict:
    """Stage-3 defaults: fine-tune the whole TransUNet (DDeP Sec. 5.1)."""
    c = ml_collections.ConfigDict()
    c.stage = "finetune"
    c.seed = 0
    c.model = config_lib.model_config()
    c.model.num_outputs = 0  # 0: the dataset's number of classes

    # Where the initial weights come from (INIT_MODES). `checkpoint` is a
    # stage-1/2/3 workdir, one of its checkpoints/<step> folders, or an Orbax
    # state folder; `step` -1 means the latest. The head is always new.
    c.init = ml_collections.ConfigDict()
    c.init.mode = "scratch"
    c.init.checkpoint = ""
    c.init.step = -1
    # The decoder from another run (its latest checkpoint): ×Net's pretrained
    # decoder is a stage-1 classifier's backbone (`decoder_collection`
    # 'encoder', its head dropped); a stage-2 run's is its 'decoder'. '' : the
    # decoder is as `mode` says.
    c.init.decoder_checkpoint = ""
    c.init.decoder_collection = "encoder"

    c.data = ml_collections.ConfigDict()
    c.data.source = "tfds"  # DATA_SOURCES: a prepared dataset, or 'mmseg' folder
    c.data.name = "camvid"  # 'tfds': a name in ddep_jax.data.seg_datasets
    c.data.data_dir = ""  # '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
    # 'mmseg' (ddep_jax.data.folders): FOLDER/img_dir/{train,val}/,
    # FOLDER/ann_dir/{train,val}/, FOLDER/classes.json (or model.num_outputs).
    c.data.folder = ""
    c.data.img_suffix = ".jpg"
    c.data.seg_map_suffix = ".png"
    c.data.reduce_zero_label = False  # mmseg's: stored 0 is void, v -> v - 1
    c.data.classes_file = ""  # '' = FOLDER/classes.json
    c.data.train_split = "train"
    c.data.label_fraction = "100%"  # '1%', '1/30', '0.25', or a count '100'
    c.data.subset_seed = -1  # -1: same as `seed`
    c.data.crop_size = (512, 512)
    c.data.scale_range = (0.5, 2.0)  # random scale (times base_scale)
    c.data.base_scale = 1.0  # resize every image by this first (train and eval)
    c.data.flip = True
    config_lib.add_data_loading(c.data)

    c.eval = ml_collections.ConfigDict()
    c.eval.mode = "whole"  # ddep_jax.evaluation.inference.EVAL_MODES
    c.eval.scales = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # 'multiscale' (x base_scale)
    c.eval.flip = False  # 'whole': also average with the flipped image
    c.eval.window = (1024, 1024)  # 'sliding' (pixels of the base_scale'd image)
    c.eval.stride = 0  # 'sliding': 0 = the window size
    # Model inputs are padded to multiples of this: 16 is the ViT patch grid;
    # coarser (e.g. 128) means fewer compilations on datasets of many sizes.
    c.eval.size_multiple = 16
    c.eval.split = "validation"  # evaluated every `every_steps` and at the end
    c.eval.final_splits = ("test",)  # evaluated once at the end
    c.eval.every_steps = 0  # 0: only at the end
    c.eval.max_images = 0  # periodic evaluation on the first N images; 0 = all
    # The final evaluations on the first N images of each split: a smoke run
    # (the report's num_images says so); 0 = all, which any result needs.
    c.eval.final_max_images = 0
    c.eval.num_visualize = 4  # colourised PNGs of the first N final-eval images

    c.loss = ml_collections.ConfigDict()
    # CLASS_WEIGHTINGS: 'none' (the paper's plain cross-entropy) or
    # 'median_frequency' (Eigen & Fergus 2015; SegNet on CamVid), from the
    # labelled subset's label maps.
    c.loss.class_weighting = "none"

    c.batch_size = 16
    c.num_epochs = 0.0
    c.total_steps = 10000  # > 0 overrides num_epochs

    c.optimizer = config_lib.optimizer_config(learning_rate=1e-4)
    c.optimizer.weight_decay = 1e-4
    return config_lib.add_run_options(c)


def moco() -> ml_collections.ConfigDict:
    """Defaults: the DDeP stage's data, model and schedule with MoCo v2's
    pretext settings (momentum 0.999, temperature 0.2, queue 65536, a
    2048-128 projection MLP); encoder frozen, image-level embeddings."""
    c = ddep()
    c.stage = "moco"
    del c.denoising
    del c.image_grid_every
    del c.image_grid_size
    c.model.num_outputs = 128  # the embedding size (MoCo v2: 128)
    c.pretext = ml_collections.ConfigDict()
    c.pretext.variant = "image"  # models.contrastive.VARIANTS
    c.pretext.momentum = 0.999  # of the key encoder
    c.pretext.temperature = 0.2
    c.pretext.queue_size = 65536  # negatives; >= keys per batch
    c.pretext.hidden = 2048  # the projection MLP's hidden width
    # Of each view, in the whole frame: MoCo v2's RandomResizedCrop scale
    # (= objectives.moco.CROP_AREA, its function default).
    c.pretext.crop_area_range = (0.2, 1.0)
    # The whole frame the two views are cropped from: each image resized
    # (shorter side) and centre-cropped to this; data.crop_area_range and
    # data.flip are not used.
    c.pretext.frame_size = (256, 256)
    # Keys of the query's own image are not negatives (queue and batch).
    c.pretext.exclude_same_image = True
    # Patch levels: a key patch of the query's own image overlapping the query
    # patch's region by more than this (intersection over the smaller region)
    # is not a negative; 1.0 keeps them all (the draft read literally).
    c.pretext.negative_max_overlap = 0.25
    c.optimizer.learning_rate = 1e-4
    return c


def rotation() -> ml_collections.ConfigDict:
    """Defaults: the DDeP stage's data, model and schedule, with the rotation
    pretext task instead of denoising; encoder frozen."""
    c = ddep()
    c.stage = "rotation"
    del c.denoising
    del c.image_grid_every
    del c.image_grid_size
    c.model.num_outputs = 4  # the four rotations (objectives.rotation.NUM_ANGLES)
    c.pretext = ml_collections.ConfigDict()
    c.pretext.patch_size = 32  # pixels; must divide the input size
    c.optimizer.learning_rate = 1e-4
    return c
