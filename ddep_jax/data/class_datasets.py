"""Classification datasets of stage 1 (supervised encoder pretraining).

Each `ClassDatasetSpec` names the prepared TFDS dataset a config's
`data.name` reads and its class count and splits. Records are
``{'image': uint8 [H, W, 3], 'label': int}`` as `tfds_sources` returns them.

* ``cifar10``: TFDS ``cifar10_jpeg`` (this project's builder; 32x32, splits
  train 50,000 / test 10,000), prepared from ``../shared/data/cifar10``.
* ``imagenet2012``: TFDS's own ``imagenet2012`` (ILSVRC-2012, 1000 classes,
  train 1,281,167 / validation 50,000; manual download of
  ``ILSVRC2012_img_{train,val}.tar``, see docs/DATASETS.md).
* ``imagenet21k``: this project's ``imagenet21k`` builder (winter 2021,
  19167 synsets; train / the hashed 1% validation split).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ClassDatasetSpec:
    """name: config name; tfds_name: prepared TFDS dataset; num_classes;
    splits: the split names it has (TFDS names)."""

    name: str
    tfds_name: str
    num_classes: int
    splits: tuple[str, ...]


_SPECS = {s.name: s for s in (
    ClassDatasetSpec("cifar10", "cifar10_jpeg", 10, ("train", "test")),
    ClassDatasetSpec("imagenet2012", "imagenet2012", 1000, ("train", "validation")),
    ClassDatasetSpec("imagenet21k", "imagenet21k", 19167, ("train", "validation")),
)}


def names() -> list[str]:
    return sorted(_SPECS)


def get_spec(name: str) -> ClassDatasetSpec:
    """Raises ValueError naming the unknown dataset and the known ones."""
    if name not in _SPECS:
        raise ValueError(f"classification dataset {name!r} is unknown; known: "
                         f"{names()}.")
    return _SPECS[name]


def open_split(spec: ClassDatasetSpec, split: str, data_dir: str = ""):
    """The prepared TFDS records of `split` (random access).

    Raises:
      FileNotFoundError: the dataset is not prepared (names the command).
    """
    from ddep_jax.data.tfds_sources import load_data_source

    return load_data_source(spec.tfds_name, split, data_dir or None)


def num_classes_of(spec: ClassDatasetSpec, records) -> int:
    """The prepared dataset's class count (its ClassLabel), else the spec's."""
    info = getattr(records, "dataset_info", None)
    try:
        return int(info.features["label"].num_classes)
    except (AttributeError, KeyError, TypeError):
        return spec.num_classes


class CheckLabel:
    """Passes a record through after checking 0 <= label < num_classes.

    Raises:
      ValueError: naming the dataset, split, record file name and value.
    """

    def __init__(self, num_classes: int, where: str):
        self.num_classes, self.where = num_classes, where

    def __call__(self, example: dict) -> dict:
        label = int(example["label"])
        if not 0 <= label < self.num_classes:
            name = example.get("file_name", b"?")
            name = name.decode() if isinstance(name, bytes) else name
            raise ValueError(f"{self.where} record {name!r} has label {label}, "
                             f"outside [0, {self.num_classes}).")
        return example
