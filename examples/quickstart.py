# %% [markdown]
# # ddep_jax from Python: pretrain a decoder, fine-tune on your folder, segment
#
# The three steps a user takes, through `ddep_jax.api`:
#
# 1. DDeP (decoder denoising pretraining) on unlabeled photographs: here the
#    real photos bundled with scikit-image (offline, nothing to prepare);
#    `data.source='folder'` reads your own folder instead.
# 2. Fine-tuning from that checkpoint on a labelled folder in the
#    mmsegmentation layout: here CamVid's real street scenes, linked from
#    `../shared/data/camvid` into such a folder (skipped when absent).
# 3. Segmenting an image with the fine-tuned model.
#
# Run it as a script (`python examples/quickstart.py --workdir=DIR`) or cell
# by cell (`# %%`) in an editor. The defaults take a few CPU minutes; the
# tests run it with `--pretrain_steps=3 --finetune_steps=3 --tiny`.

# %%
import argparse
import json
import os
import pathlib

import numpy as np
from PIL import Image

from ddep_jax import api

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

parser = argparse.ArgumentParser(description="ddep_jax quickstart")
parser.add_argument("--workdir", default="workdirs/quickstart")
parser.add_argument("--pretrain_steps", type=int, default=100)
parser.add_argument("--finetune_steps", type=int, default=100)
parser.add_argument("--camvid", default=str(REPO.parent / "shared" / "data" / "camvid"),
                    help="CamVid in the converted layout ({train,val}/{images,labels}).")
parser.add_argument("--tiny", action="store_true",
                    help="a tiny model and 32x32 crops (a smoke run, as in the tests)")
args, _ = parser.parse_known_args()  # known only: notebooks pass their own flags
workdir = pathlib.Path(args.workdir)

# The CPU recipe's model (configs/ddep_camvid.py and finetune_camvid.py share
# it, so the stage-2 checkpoint hands over); --tiny shrinks it for a smoke run.
TINY = {"model.encoder.vit_size": "mu", "model.encoder.resnet_width": 8,
        "model.encoder.image_size": (32, 32), "model.encoder.num_groups": 4,
        "model.decoder_widths": (32, 16, 16, 8, 8), "model.decoder_num_groups": 4}
model = TINY if args.tiny else {}

# %% [markdown]
# ## 1. Decoder denoising pretraining on unlabeled photographs
#
# `load_config` is `--config=FILE:ARG --config.KEY=VALUE` of the command
# line; `train` is `python -m ddep_jax.main`. A second call on the same
# workdir resumes (or, when finished, returns at once).

# %%
ddep = api.load_config(str(CONFIGS / "ddep_camvid.py"), f"steps={args.pretrain_steps}",
                       {"data.source": "embedded", "batch_size": 8,  # 15 photos
                        "checkpoint_every": 50,
                        "image_grid_every": 0, **model})
pretrained = api.train(ddep, str(workdir / "ddep"))
print(f"DDeP: {pretrained['step']} steps, final denoising loss "
      f"{pretrained['loss']:.4f}")

# %% [markdown]
# ## 2. A labelled folder in the mmsegmentation layout
#
# `img_dir/{train,val}/<stem>.jpg`, `ann_dir/{train,val}/<stem>.png` (class
# ids, 255 ignored) and `classes.json`. Here 60 training and 20 validation
# pairs of CamVid, linked.

# %%
camvid = pathlib.Path(args.camvid)
if not (camvid / "train" / "images").is_dir():
    print(f"CamVid not found at {camvid} (--camvid): steps 2-4 need a labelled "
          "folder and are skipped; step 1 ran.")
    raise SystemExit(0)
folder = workdir / "camvid_mmseg"
for split, sub, n in (("train", "train", 60), ("val", "val", 20)):
    for kind, ext, dest in (("images", ".jpg", "img_dir"), ("labels", ".png", "ann_dir")):
        (folder / dest / sub).mkdir(parents=True, exist_ok=True)
        for name in sorted(os.listdir(camvid / split / kind))[:n]:
            link = folder / dest / sub / name
            if not link.exists():
                link.symlink_to(camvid / split / kind / name)
# CamVid's classes.json lists {"id", "name", "rgb"}; mmseg's own form,
# {"classes": [names], "palette": [[r, g, b], ...]}, is read as well.
(folder / "classes.json").write_text((camvid / "classes.json").read_text())

# %% [markdown]
# ## 3. Fine-tune from the DDeP checkpoint on a quarter of the labels

# %%
finetune = api.load_config(
    str(CONFIGS / "finetune_camvid.py"),
    f"init=pretrained,ckpt={workdir / 'ddep'},fraction=1/4,steps={args.finetune_steps}",
    {"data.source": "mmseg", "data.folder": str(folder), "eval.every_steps": 0,
     "eval.final_splits": (), "checkpoint_every": 50,
     **model, **({"data.crop_size": (32, 32)} if args.tiny else {})})
result = api.train(finetune, str(workdir / "finetune"))
report = result["eval"]["validation"]
subset = json.loads((workdir / "finetune" / "labelled_subset.json").read_text())
print(f"Fine-tuned {result['step']} steps on {subset['num_labelled']} of "
      f"{subset['num_examples']} labelled pairs: validation "
      f"mIoU {100 * report['miou']:.2f}% on {report['num_images']} images, "
      f"pixel accuracy {100 * report['pixel_accuracy']:.2f}%")

# %% [markdown]
# ## 4. Segment an image

# %%
segmenter = api.load_segmenter(str(workdir / "finetune"))
image = np.asarray(Image.open(sorted((folder / "img_dir" / "val").iterdir())[0]))
labels = segmenter.segment(image)  # uint8 [H, W] class ids
Image.fromarray(segmenter.overlay(image, labels)).save(workdir / "overlay.png")
counts = np.bincount(labels.ravel(), minlength=len(segmenter.class_names))
top = [segmenter.class_names[i] for i in np.argsort(-counts)[:3]]
print(f"Segmented a {image.shape[1]}x{image.shape[0]} image: most pixels are "
      f"{', '.join(top)}; overlay in {workdir / 'overlay.png'}")
