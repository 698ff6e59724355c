"""Runs an exported model.onnx with onnxruntime alone (no JAX, no ddep_jax).

  python tools/onnx_check/run_onnx.py --model OUT/model.onnx \
      --images a.png b.png c.png --batch 3 --logits logits.npy [--labels DIR]

Needs only ``pip install onnxruntime numpy pillow`` (the fresh environment
of tests/test_export_onnx.py and docs/onnx.md). Each image is read as RGB
and, where its size differs from the model's input, resized to it
(bilinear); the images run in batches of --batch (the last one may be
smaller: the batch axis is dynamic). Writes the float32 logits of all
images, stacked [n, H, W, C], to --logits (.npy), and with --labels one
PNG of class ids per image (and a colour PNG from the model's palette).
Prints one line per batch and the class names from the model's metadata.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import onnxruntime as ort
from PIL import Image


def load(path: str) -> tuple[ort.InferenceSession, dict]:
    """(an onnxruntime CPU session of `path`, its metadata_props)."""
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session, dict(session.get_modelmeta().custom_metadata_map)


def read_images(paths, size) -> np.ndarray:
    """uint8 [n, H, W, 3] of the images at `size` (H, W)."""
    out = []
    for p in paths:
        im = Image.open(p).convert("RGB")
        if im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.BILINEAR)
        out.append(np.asarray(im, np.uint8))
    return np.stack(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model.onnx")
    parser.add_argument("--images", nargs="+", required=True, help="image files")
    parser.add_argument("--batch", type=int, default=1, help="images per run")
    parser.add_argument("--logits", required=True, help="output .npy [n, H, W, C]")
    parser.add_argument("--labels", default="", help="optional folder for label PNGs")
    args = parser.parse_args(argv)

    session, meta = load(args.model)
    inp = session.get_inputs()[0]
    size = tuple(int(d) for d in inp.shape[1:3])
    images = read_images(args.images, size)
    logits = []
    for i in range(0, len(images), args.batch):
        batch = images[i:i + args.batch]
        t0 = time.perf_counter()
        logits.append(session.run(None, {inp.name: batch})[0])
        print(f"batch {i // args.batch}: {tuple(batch.shape)} -> "
              f"{tuple(logits[-1].shape)} in {1e3 * (time.perf_counter() - t0):.1f} ms")
    logits = np.concatenate(logits)
    np.save(args.logits, logits)
    names = json.loads(meta.get("class_names", "[]"))
    print(f"opset {meta.get('opset')}, {len(names)} classes: {', '.join(names)}")
    if args.labels:
        os.makedirs(args.labels, exist_ok=True)
        palette = np.asarray(json.loads(meta.get("palette", "[]")) or [[0, 0, 0]],
                             np.uint8)
        for path, lg in zip(args.images, logits):
            ids = lg.argmax(-1).astype(np.uint8)
            stem = os.path.splitext(os.path.basename(path))[0]
            Image.fromarray(ids).save(os.path.join(args.labels, f"{stem}_labels.png"))
            Image.fromarray(palette[ids % len(palette)]).save(
                os.path.join(args.labels, f"{stem}_mask.png"))
    print(f"wrote {args.logits}: {tuple(logits.shape)} {logits.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
