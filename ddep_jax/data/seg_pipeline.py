"""Input pipeline for semantic-segmentation fine-tuning (stage 3).

A TFDS record source is wrapped by `SegmentationSource` (decode + label
mapping + validation through the dataset's `SegDatasetSpec`), restricted to
the labelled subset, then read through grain exactly like the DDeP stream:

source -> labelled subset -> this host's shard -> (decoded once into memory,
`data.cache`) -> seeded shuffle (reshuffled
every epoch) -> repeat -> random scale + random crop (void-padded) + flip,
applied identically to image and mask -> batch -> threaded prefetch.
"""

from __future__ import annotations

from typing import Any, Sequence

import grain
import numpy as np
from PIL import Image

from ddep_jax.data.cache import cache_in_memory
from ddep_jax.data.pipeline import augment_seed
from ddep_jax.data.seg_datasets import IGNORE_LABEL, SegDatasetSpec


class SegmentationSource:
    """Random-access ``{'image', 'label'}`` view of a TFDS segmentation split.

    ``source[i]`` is ``{'image': uint8 [H, W, 3], 'label': uint8 [H, W]}``
    with labels mapped to ``0..C-1`` / 255 by ``spec``. Picklable when the
    wrapped source is.

    Args:
      records: random-access TFDS source (``__len__``, ``__getitem__`` ->
        record dict), e.g. `ddep_jax.data.tfds_sources.load_data_source`.
      spec: the dataset's `SegDatasetSpec`.
      indices: optional subset (labelled examples) as indices into `records`.
      split: split name, for error messages.

    Raises (from ``__getitem__``):
      ValueError: image/label size mismatch or a label value outside
        ``[0, num_classes)`` and not void, naming the record.
    """

    def __init__(self, records, spec: SegDatasetSpec,
                 indices: Sequence[int] | None = None, split: str = ""):
        self.records = records
        self.spec = spec
        self.indices = None if indices is None else np.asarray(indices, np.int64)
        self.split = split

    def __len__(self) -> int:
        return len(self.records) if self.indices is None else len(self.indices)

    def record_index(self, i: int) -> int:
        return int(i) if self.indices is None else int(self.indices[i])

    def __getitem__(self, i: int) -> dict[str, Any]:
        j = self.record_index(i)
        image, label = self.spec.decode(self.records[j], j, self.split)
        return {"image": image, "label": label}


def resize_pair(image: np.ndarray, label: np.ndarray,
                size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Resizes image (bilinear) and label (nearest) to ``size = (H, W)``."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image, label
    im = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    lb = np.asarray(Image.fromarray(label).resize((w, h), Image.NEAREST))
    return im, lb


class RandomScaleCropFlip:
    """Random scale, random crop and horizontal flip of an image-mask pair.

    1. Scale both by ``base_scale * s``, ``s ~ U(scale_range)`` (image
       bilinear, mask nearest-neighbour).
    2. If smaller than the crop, pad bottom/right: image with 128 (0.0 after
       normalisation, as evaluation pads), mask with void (255), so padding
       never counts in the loss.
    3. Crop ``crop_size`` at a uniformly random position.
    4. Flip both left-right with probability 1/2.

    Input ``{'image': uint8 [H, W, 3], 'label': uint8 [H, W]}``; output the
    same keys at ``crop_size``.
    """

    def __init__(self, crop_size: tuple[int, int], scale_range=(0.5, 2.0),
                 base_scale: float = 1.0, flip: bool = True):
        self.crop_size = tuple(int(s) for s in crop_size)
        self.scale_range = tuple(float(s) for s in scale_range)
        self.base_scale = float(base_scale)
        self.flip = flip

    def __call__(self, example: dict, rng: np.random.Generator) -> dict:
        image, label = example["image"], example["label"]
        s = self.base_scale * rng.uniform(*self.scale_range)
        h, w = image.shape[:2]
        image, label = resize_pair(image, label,
                                   (max(1, round(h * s)), max(1, round(w * s))))
        ch, cw = self.crop_size
        h, w = image.shape[:2]
        if h < ch or w < cw:
            ph, pw = max(ch - h, 0), max(cw - w, 0)
            image = np.pad(image, ((0, ph), (0, pw), (0, 0)), constant_values=128)
            label = np.pad(label, ((0, ph), (0, pw)), constant_values=IGNORE_LABEL)
            h, w = image.shape[:2]
        top = int(rng.integers(0, h - ch + 1))
        left = int(rng.integers(0, w - cw + 1))
        image = image[top:top + ch, left:left + cw]
        label = label[top:top + ch, left:left + cw]
        if self.flip and rng.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        return {"image": np.ascontiguousarray(image),
                "label": np.ascontiguousarray(label)}


def make_seg_train_dataset(source: SegmentationSource, *, crop_size,
                           batch_size: int, seed: int, scale_range=(0.5, 2.0),
                           base_scale: float = 1.0, flip: bool = True,
                           process_index: int = 0, process_count: int = 1,
                           num_threads: int = 8, prefetch: int = 4,
                           cache: str = "none",
                           cache_max_mib: float = 2048) -> grain.IterDataset:
    """The fine-tuning stream of this host.

    Args:
      source: the labelled subset (`SegmentationSource`).
      crop_size: (H, W) of the training crops.
      batch_size: per-host batch size.
      seed: shuffling and augmentation seed.
      cache, cache_max_mib: hold this host's decoded pairs in memory
        (`cache.cache_in_memory`); the batches are the same either way.

    Returns:
      grain.IterDataset of ``{'image': uint8 [B, H, W, 3], 'label': uint8
      [B, H, W]}``; infinite (epochs repeat, reshuffled).

    Raises:
      ValueError: this host's shard of the labelled subset is empty. (A subset
        smaller than the batch is repeated to fill batches.)
    """
    ds = grain.MapDataset.source(source)[process_index::process_count]
    if len(ds) == 0:
        raise ValueError(f"host {process_index} of {process_count} has no labelled "
                         "examples: use a larger label fraction or fewer hosts.")
    ds = cache_in_memory(ds, mode=cache, max_mib=cache_max_mib,
                         num_threads=num_threads, name="labelled training pairs")
    ds = ds.shuffle(seed=seed).repeat(None)
    ds = ds.random_map(RandomScaleCropFlip(crop_size, scale_range, base_scale, flip),
                       seed=augment_seed(seed, process_index))
    ds = ds.batch(batch_size, drop_remainder=True)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                prefetch_buffer_size=prefetch))
