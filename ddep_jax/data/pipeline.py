"""Input pipeline: a random-access image source read through grain.

source -> this host's shard -> (decoded once into memory, `data.cache`) ->
seeded shuffle (reshuffled every epoch) ->
repeat -> inception-style random crop + horizontal flip (seeded per element)
-> batch -> threaded prefetch. The same seed gives the same batches, and the
iterator state (saved with the checkpoint) resumes exactly.
"""

from __future__ import annotations

import math

import grain
import numpy as np
from PIL import Image

from ddep_jax.data.cache import cache_in_memory


def sample_crop_box(rng: np.random.Generator, height: int, width: int,
                    area_range=(0.08, 1.0), aspect_range=(3 / 4, 4 / 3),
                    attempts: int = 10) -> tuple[int, int, int, int]:
    """Inception-style crop box (Szegedy et al. 2015): (top, left, h, w).

    The area fraction is uniform in `area_range`, the aspect ratio log-uniform
    in `aspect_range`; after `attempts` misses, the largest centred crop
    within the aspect range.
    """
    area = height * width
    log_lo, log_hi = math.log(aspect_range[0]), math.log(aspect_range[1])
    for _ in range(attempts):
        target = area * rng.uniform(*area_range)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return (int(rng.integers(0, height - h + 1)),
                    int(rng.integers(0, width - w + 1)), h, w)
    aspect = width / height
    if aspect < aspect_range[0]:
        w, h = width, int(round(width / aspect_range[0]))
    elif aspect > aspect_range[1]:
        h, w = height, int(round(height * aspect_range[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


class RandomCropFlip:
    """Random inception crop resized to `size`, then a random horizontal flip.

    Input: {'image': uint8 [H, W, 3], ...}; output: {'image': uint8
    [size_h, size_w, 3]} plus the keys named in `keep` (e.g. 'label'), others
    dropped. Resizing is PIL's bilinear.
    """

    def __init__(self, size, area_range, aspect_range, flip: bool,
                 keep: tuple[str, ...] = ()):
        self.size = tuple(size)
        self.area_range = tuple(area_range)
        self.aspect_range = tuple(aspect_range)
        self.flip = flip
        self.keep = tuple(keep)

    def __call__(self, example: dict, rng: np.random.Generator) -> dict:
        image = example["image"]
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"expected an RGB image [H, W, 3], got {image.shape}.")
        top, left, h, w = sample_crop_box(rng, *image.shape[:2],
                                          self.area_range, self.aspect_range)
        crop = Image.fromarray(image[top:top + h, left:left + w])
        crop = crop.resize((self.size[1], self.size[0]), Image.BILINEAR)
        out = np.asarray(crop)
        if self.flip and rng.random() < 0.5:
            out = out[:, ::-1]
        return {"image": np.ascontiguousarray(out),
                **{k: example[k] for k in self.keep}}


class FullFrame:
    """The whole image, its shorter side resized and its longer side
    centre-cropped to `size` (`resize_centre_crop` at fraction 1: CamVid's
    4:3 frames at a 4:3 `size` keep every pixel), no flip: the frame a
    pretext task crops its own views from (MoCo v2 crops both views from the
    whole image).

    Input: {'image': uint8 [H, W, 3], ...}; output: {'image': uint8
    [size_h, size_w, 3]} plus the keys named in `keep`.
    """

    def __init__(self, size, keep: tuple[str, ...] = ()):
        self.size = tuple(size)
        self.keep = tuple(keep)

    def __call__(self, example: dict) -> dict:
        image = example["image"]
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"expected an RGB image [H, W, 3], got {image.shape}.")
        return {"image": resize_centre_crop(image, self.size, 1.0),
                **{k: example[k] for k in self.keep}}


IMAGE_ID = "image_id"
"""The key `make_train_dataset(image_ids=True)` adds: int32, the record's
index in the whole source (the same on every host)."""


class _WithImageId:
    """Adds `IMAGE_ID`: the index modulo the source's length (grain's
    shuffle and repeat read a source at indices past its length, epoch after
    epoch, and the source wraps them)."""

    def __init__(self, length: int):
        self.length = length

    def __call__(self, index: int, record):
        if record is None:  # a record the source leaves out stays out
            return None
        return {**record, IMAGE_ID: np.int32(index % self.length)}


def is_record(record) -> bool:
    """False for the None a source returns for a record it leaves out."""
    return record is not None


def augment_seed(seed: int, process_index: int) -> int:
    """Augmentation seed of one host: grain seeds each element by this seed and
    its position in the host's stream, so hosts need different seeds or the
    k-th example of every host gets the same crop and flip."""
    return int(np.random.SeedSequence([seed, 1, process_index]).generate_state(1)[0])


def make_train_dataset(source, *, image_size, batch_size: int, seed: int,
                       process_index: int = 0, process_count: int = 1,
                       area_range=(0.08, 1.0), aspect_range=(3 / 4, 4 / 3),
                       flip: bool = True, keep: tuple[str, ...] = (),
                       num_threads: int = 8, prefetch: int = 4,
                       cache: str = "none", cache_max_mib: float = 2048,
                       skip_missing: bool = False, crop: str = "random",
                       image_ids: bool = False) -> grain.IterDataset:
    """The training stream of this host.

    Args:
      source: random-access source (`__len__`, `__getitem__` -> {'image':
        uint8 [H, W, 3]}), e.g. a TFDS data source or `EmbeddedImages`, or a
        grain.MapDataset of such records.
      image_size: (H, W) of the crops.
      batch_size: per-host batch size.
      seed: shuffling and augmentation seed.
      process_index, process_count: this host's shard of the source.
      keep: record keys batched along with the image (e.g. ('label',)).
      cache, cache_max_mib: hold this host's decoded records in memory
        (`cache.cache_in_memory`: 'auto' | 'memory' | 'none'); the batches
        are the same either way.
      skip_missing: the source returns None for records to leave out (an
        image folder's unreadable files): they are filtered from the shuffled
        stream and batches are formed after the filter, so every batch is
        full and the stream stays deterministic and resumable.
      crop: 'random' (an inception crop of `area_range` / `aspect_range`
        and a flip, `RandomCropFlip`) or 'full' (the whole frame at
        `image_size`, `FullFrame`; area, aspect and flip unused).
      image_ids: add `IMAGE_ID` (int32 [batch_size]): each example's index in
        the source (MoCo's queue keeps it to leave out negatives of the
        query's own image).

    Returns:
      grain.IterDataset of {'image': uint8 [batch_size, H, W, 3], **keep};
      infinite.

    Raises:
      ValueError: the host's shard holds fewer examples than one batch; an
        unknown `crop`.
    """
    if crop not in ("random", "full"):
        raise ValueError(f"crop={crop!r}: expected 'random' or 'full'.")
    if not isinstance(source, grain.MapDataset):
        source = grain.MapDataset.source(source)
    if image_ids:  # before sharding: the index in the whole source
        source = source.map_with_index(_WithImageId(len(source)))
        keep = (*keep, IMAGE_ID)
    ds = source[process_index::process_count]
    if len(ds) < batch_size:
        raise ValueError(f"host {process_index} has {len(ds)} examples, fewer than "
                         f"its batch of {batch_size}: lower batch_size or add data.")
    ds = cache_in_memory(ds, mode=cache, max_mib=cache_max_mib,
                         num_threads=num_threads, name="training images")
    ds = ds.shuffle(seed=seed).repeat(None)
    if skip_missing:
        ds = ds.filter(is_record)
    if crop == "full":
        ds = ds.map(FullFrame(image_size, keep))
    else:
        ds = ds.random_map(RandomCropFlip(image_size, area_range, aspect_range, flip,
                                          keep),
                           seed=augment_seed(seed, process_index))
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    if skip_missing:  # a filtered MapDataset has holes: batch the stream instead
        stream = grain.experimental.WithOptionsIterDataset(  # never spin forever
            ds.to_iter_dataset(options),
            grain.experimental.DatasetOptions(filter_raise_threshold_ratio=0.999))
        return stream.batch(batch_size, drop_remainder=True)
    ds = ds.batch(batch_size, drop_remainder=True)
    return ds.to_iter_dataset(options)


def resize_centre_crop(image: np.ndarray, size, crop_fraction: float) -> np.ndarray:
    """Evaluation preprocessing of classifiers (the Inception/ViT protocol):
    resize the shorter side to round(min(size) / crop_fraction), bilinear (PIL),
    then take the central `size` crop.

    Args:
      image: uint8 [H, W, 3].
      size: (h, w) output.
      crop_fraction: 0 < f <= 1 (0.875 for ImageNet; 1 resizes straight).

    Returns:
      uint8 [h, w, 3].
    """
    h, w = size
    height, width = image.shape[:2]
    scale = round(min(h, w) / crop_fraction) / min(height, width)
    new_h, new_w = max(h, round(height * scale)), max(w, round(width * scale))
    if (new_h, new_w) != (height, width):
        image = np.asarray(Image.fromarray(image).resize((new_w, new_h),
                                                         Image.BILINEAR))
    top, left = (new_h - h) // 2, (new_w - w) // 2
    return np.ascontiguousarray(image[top:top + h, left:left + w])
