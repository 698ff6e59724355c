"""TFDS builders of ddep_jax; importing this package registers them with TFDS.

Registered TFDS names:

* ``camvid`` (:mod:`ddep_jax.data.builders.camvid`);
* ``cifar10_jpeg`` (:mod:`ddep_jax.data.builders.cifar10_jpeg`; TFDS's own
  ``cifar10`` downloads the binary release);
* ``imagenet21k`` (:mod:`ddep_jax.data.builders.imagenet21k`);
* ``cityscapes_seg`` (:mod:`ddep_jax.data.builders.cityscapes`; TFDS's own
  ``cityscapes`` builder needs TensorFlow);
* ``ade20k`` (:mod:`ddep_jax.data.builders.ade20k`);
* ``pascal_context`` (:mod:`ddep_jax.data.builders.pascal_context`).

The three segmentation builders also register their
`ddep_jax.data.seg_datasets` specs (``cityscapes``, ``ade20k``,
``pascal_context``). :mod:`ddep_jax.data.builders.manual_files` holds their
shared folder/zip/tar reading and image validation helpers.
"""

from ddep_jax.data.builders import ade20k
from ddep_jax.data.builders import camvid
from ddep_jax.data.builders import cifar10_jpeg
from ddep_jax.data.builders import cityscapes
from ddep_jax.data.builders import imagenet21k
from ddep_jax.data.builders import manual_files
from ddep_jax.data.builders import pascal_context

__all__ = [
    "ade20k",
    "camvid",
    "cifar10_jpeg",
    "cityscapes",
    "imagenet21k",
    "manual_files",
    "pascal_context",
]
