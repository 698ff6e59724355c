"""TFDS builders of ddep_jax; importing this package registers them with TFDS.

Registered names: ``camvid`` (:mod:`ddep_jax.data.builders.camvid`) and
``imagenet21k`` (:mod:`ddep_jax.data.builders.imagenet21k`).
"""

from ddep_jax.data.builders import camvid
from ddep_jax.data.builders import imagenet21k

__all__ = ["camvid", "imagenet21k"]
