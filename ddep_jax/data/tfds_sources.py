"""Random-access readers for the prepared TFDS datasets (no TensorFlow).

``load_data_source(name, split, data_dir)`` opens an ``array_record`` dataset
prepared by ``python -m ddep_jax.data.prepare`` and returns a
``TfdsDataSource``: a picklable ``__len__``/``__getitem__`` sequence usable as
``grain.MapDataset.source(...)`` (or any grain/PyTorch-style random-access
source).

Records (``source[i]``, a ``dict`` of NumPy values, images decoded by PIL):

* ``camvid`` (splits ``train`` 367, ``validation`` 101, ``test`` 233):
  ``image`` ``uint8 [H, W, 3]`` (480x360 frames: ``[360, 480, 3]``),
  ``segmentation_mask`` ``uint8 [H, W, 1]`` with values ``0..10`` and
  ``255`` (void), ``file_name`` ``bytes``.
* ``imagenet21k`` (splits ``train``, ``validation``):
  ``image`` ``uint8 [H, W, 3]`` (variable size), ``label`` Python ``int``
  (TFDS ``int64`` scalar; index into the sorted synset ids,
  ``source.dataset_info.features['label'].names``), ``file_name`` ``bytes``
  (``b'<synset>/<basename>'``).

Other TFDS datasets prepared in ``array_record`` format can be opened too; their
records follow their own feature specs.
"""

from __future__ import annotations

import operator
import os
from typing import Any

import tensorflow_datasets as tfds


_MAX_LISTED_SHARDS = 8
"""A read error lists every shard file of a split with at most this many."""


class CorruptRecordError(OSError):
    """A record of a prepared dataset cannot be read from its ``array_record``
    shard (the file is truncated or corrupt); the message names the dataset,
    split, record index and shard file(s), and the preparation command."""


def default_data_dir() -> str:
    """``$TFDS_DATA_DIR`` if set, else ``~/tensorflow_datasets``."""
    return os.path.expanduser(
        os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    )


def _register_builders() -> None:
    # Importing the package registers `camvid` and `imagenet21k` with TFDS.
    import ddep_jax.data.builders  # noqa: F401  (registration side effect)


def prepare_command(name: str, data_dir: str) -> str:
    """The shell command that prepares dataset ``name`` into ``data_dir``."""
    return (
        f"python -m ddep_jax.data.prepare --dataset={name} "
        f"--manual_dir=<DIR> --data_dir={data_dir}"
    )


def _base_name(name: str) -> str:
    """``'camvid:1.0.0'`` or ``'camvid/config'`` -> ``'camvid'``."""
    return name.split(":", 1)[0].split("/", 1)[0]


def _open(name: str, split: str, data_dir: str):
    """Opens the TFDS array_record source; FileNotFoundError if unprepared."""
    _register_builders()
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"TFDS dataset {builder.name!r} (builder {type(builder).__module__}."
            f"{type(builder).__name__}, version {builder.version}) is not "
            f"prepared in data_dir={data_dir!r} (looked for {builder.data_dir}). "
            "Prepare it with:\n  "
            + prepare_command(_base_name(name), data_dir)
            + "\n(see docs/DATASETS.md for where to get <DIR>)."
        )
    return tfds.data_source(
        name, split=split, data_dir=data_dir, download=False, try_gcs=False
    )


class TfdsDataSource:
    """Random-access view of one split of a prepared TFDS dataset.

    ``len(source)`` is the number of records and ``source[i]`` (``0 <= i <
    len``, negative indices count from the end) is the decoded record, a
    ``dict`` of NumPy values (see the module docstring for each dataset's keys,
    shapes and dtypes).

    Pickling keeps only ``(name, split, data_dir)``; the underlying
    ArrayRecord reader is reopened lazily after unpickling, so instances can be
    sent to grain worker processes.

    Raises (from ``__getitem__``):
      IndexError: index out of range.
      CorruptRecordError: the record cannot be read from its ``array_record``
        shard (a truncated or corrupt file, e.g. an interrupted copy); the
        message names the dataset, split, record index, the shard file that
        holds the record and the split's shard files, and how to prepare the
        dataset again.
      ValueError: the record cannot be decoded (e.g. a truncated JPEG); the
        message names the dataset, split, record index and, when the record's
        non-image fields are readable, its ``file_name``.
    """

    def __init__(self, name: str, split: str, data_dir: str, _source=None):
        self.name = name
        self.split = split
        self.data_dir = data_dir
        self._source = _source

    @property
    def tfds_source(self):
        """The wrapped ``tfds`` ``ArrayRecordDataSource`` (opened on demand)."""
        if self._source is None:
            self._source = _open(self.name, self.split, self.data_dir)
        return self._source

    @property
    def dataset_info(self) -> tfds.core.DatasetInfo:
        """TFDS ``DatasetInfo`` (features, class names, split sizes)."""
        return self.tfds_source.dataset_info

    def __len__(self) -> int:
        return len(self.tfds_source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        source = self.tfds_source
        index = operator.index(index)
        length = len(source)
        if index < 0:
            index += length
        if not 0 <= index < length:
            raise IndexError(
                f"Record index {index} out of range for {self.name}/{self.split} "
                f"({length} records)."
            )
        record = self._read(index)  # Raw serialized bytes.
        features = source.dataset_info.features
        try:
            return features.deserialize_example_np(record, decoders=source.decoders)
        except Exception as e:  # pylint: disable=broad-except
            file_name = _readable_file_name(features, record)
            where = f" (file_name={file_name!r})" if file_name is not None else ""
            raise ValueError(
                f"Cannot decode record {index} of dataset {self.name!r}, split "
                f"{self.split!r}{where} in {self.data_dir}: "
                f"{type(e).__name__}: {e}"
            ) from e

    def record_name(self, index: int, key: str = "file_name") -> str:
        """The record's `key` feature (its file name or id) without decoding its
        images (``'#index'`` when the dataset has no such feature)."""
        source = self.tfds_source
        name = _readable_file_name(source.dataset_info.features,
                                   self._read(operator.index(index)), key)
        return name if name is not None else f"#{index}"

    def _read(self, index: int) -> bytes:
        """The raw serialized record `index` (in range); CorruptRecordError,
        naming the shard files, when the ArrayRecord/Riegeli read fails."""
        try:
            return self.tfds_source.data_source[index]
        except Exception as e:  # pylint: disable=broad-except
            raise CorruptRecordError(self._read_error_message(index, e)) from e

    def shard_files(self) -> list[str]:
        """Paths of this split's ``array_record`` shard files, in record order
        (for a sliced split such as ``'train[:10]'``, the shards it reads)."""
        return list(dict.fromkeys(
            os.fspath(f.filename) for f in self._file_instructions()))

    def _file_instructions(self) -> list[Any]:
        return list(self.dataset_info.splits[self.split].file_instructions)

    def _read_error_message(self, index: int, error: Exception) -> str:
        try:
            instructions = self._file_instructions()
        except Exception:  # pylint: disable=broad-except
            instructions = []
        files = list(dict.fromkeys(os.fspath(f.filename) for f in instructions))
        holder, start = None, 0
        for f in instructions:  # the shard holding record `index`
            if index < start + f.take:
                holder = os.fspath(f.filename)
                break
            start += f.take
        lines = [
            f"Cannot read record {index} of dataset {self.name!r}, split "
            f"{self.split!r} in {self.data_dir}: {type(error).__name__}: {error}"]
        if holder is not None:
            lines.append(f"  shard file: {holder}")
        if len(files) <= _MAX_LISTED_SHARDS:
            lines.append(f"  shard files of split {self.split!r}: "
                         + ", ".join(files))
        elif files:
            lines.append(
                f"  shard files of split {self.split!r}: {len(files)} files, "
                f"{files[0]} ... {files[-1]}")
        folder = os.path.dirname(holder or (files[0] if files else "")) or (
            f"{self.data_dir}/{_base_name(self.name)}/<version>")
        lines.append(
            "The file looks truncated or corrupt (an interrupted copy, download "
            f"or preparation?). Delete {folder} and prepare the dataset again:\n  "
            + prepare_command(_base_name(self.name), self.data_dir))
        return "\n".join(lines)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name, "split": self.split, "data_dir": self.data_dir}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def __repr__(self) -> str:
        return (
            f"TfdsDataSource(name={self.name!r}, split={self.split!r}, "
            f"data_dir={self.data_dir!r})"
        )


def _readable_file_name(features, record: bytes,
                        key: str = "file_name") -> str | None:
    """Feature `key` (``file_name``) of a record, read without decoding its
    images (which may be what failed); None if unreadable or absent."""
    if key not in features:
        return None
    skip = {
        key: tfds.decode.SkipDecoding()
        for key, feature in features.items()
        if isinstance(feature, tfds.features.Image)
    }
    try:
        value = features.deserialize_example_np(record, decoders=skip)[key]
    except Exception:  # pylint: disable=broad-except
        return None
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def load_data_source(
    name: str, split: str, data_dir: str | os.PathLike | None = None
) -> TfdsDataSource:
    """Opens split ``split`` of the prepared TFDS dataset ``name``.

    Args:
      name: TFDS name, e.g. ``'camvid'`` or ``'imagenet21k'`` (``ddep_jax``
        builders are registered on import), optionally with a version
        (``'camvid:1.0.0'``).
      split: e.g. ``'train'``, ``'validation'``, ``'test'`` (TFDS slicing such
        as ``'train[:10%]'`` works too).
      data_dir: TFDS data directory; ``None`` means ``$TFDS_DATA_DIR`` or
        ``~/tensorflow_datasets``.

    Returns:
      A ``TfdsDataSource`` (``__len__``/``__getitem__``, picklable) yielding
      ``dict`` records as described in the module docstring.

    Raises:
      FileNotFoundError: the dataset is not prepared in ``data_dir``; the message
        names the builder, the data_dir and the preparation command
        ``python -m ddep_jax.data.prepare --dataset=<name> --manual_dir=<DIR>
        --data_dir=<data_dir>``.
    """
    data_dir = os.path.abspath(
        os.fspath(data_dir) if data_dir is not None else default_data_dir()
    )
    return TfdsDataSource(name, split, data_dir, _source=_open(name, split, data_dir))
