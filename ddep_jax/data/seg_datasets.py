"""Semantic-segmentation datasets: one `SegDatasetSpec` per dataset
(`data.seg_spec`, re-exported here), looked up by name (`get_spec`,
`spec_for`) and opened (`open_split`).

Registered specs (`SEG_DATASETS`): ``camvid`` here; ``cityscapes``,
``ade20k`` and ``pascal_context`` are added by their builder modules' entries
below.
"""

from __future__ import annotations

from ddep_jax.data.seg_spec import (  # noqa: F401  (re-exported)
    FACTORIES, IGNORE_LABEL, SegDatasetSpec, register)

def _camvid_spec() -> SegDatasetSpec:
    from ddep_jax.data.builders import camvid

    return SegDatasetSpec(
        name="camvid", tfds_name="camvid", num_classes=camvid.NUM_CLASSES,
        class_names=camvid.CLASS_NAMES, class_colors=camvid.CLASS_COLORS,
        crop_size=360, eval_mode="whole")


register("camvid", _camvid_spec)


def get_spec(name: str) -> SegDatasetSpec:
    """The spec of segmentation dataset `name`.

    Raises:
      ValueError: unknown name, listing the known ones.
    """
    _load_all()
    if name not in FACTORIES:
        raise ValueError(f"Unknown segmentation dataset {name!r}; known: "
                         f"{sorted(FACTORIES)}.")
    return FACTORIES[name]()


def names() -> list[str]:
    """Names of all registered segmentation datasets."""
    _load_all()
    return sorted(FACTORIES)


def _load_all() -> None:
    # Builder modules register their specs on import.
    import ddep_jax.data.builders  # noqa: F401


def spec_for(data_config, num_outputs: int = 0) -> SegDatasetSpec:
    """The spec of a stage-3 `config.data`: a registered dataset or an own
    folder prepared as `data.name` in `data.data_dir` (``source='tfds'``;
    `builders.folders.prepared_spec`), or an mmseg-layout folder
    (``source='mmseg'``, `data.folder`; `mmseg.mmseg_spec`, which takes the
    class count from `num_outputs` when the folder has no classes.json).

    Raises:
      ValueError, FileNotFoundError: unknown name; a missing or malformed
        folder (from `mmseg.mmseg_spec`).
    """
    if data_config.get("source", "tfds") == "mmseg":
        from ddep_jax.data import mmseg

        return mmseg.mmseg_spec(data_config, num_outputs)
    _load_all()
    if data_config.name not in FACTORIES:  # an own folder, prepared?
        from ddep_jax.data.builders import folders as folder_builders
        from ddep_jax.data.tfds_sources import default_data_dir

        data_dir = data_config.get("data_dir") or default_data_dir()
        spec = folder_builders.prepared_spec(data_config.name, data_dir)
        if spec is not None:
            return spec
        raise ValueError(
            f"Unknown segmentation dataset {data_config.name!r}: neither a built-in "
            f"one ({sorted(FACTORIES)}) nor a folder prepared in {data_dir} "
            "(python -m ddep_jax.data.prepare --folder=DIR --layout=mmseg "
            f"--name={data_config.name}).")
    return get_spec(data_config.name)


def open_split(spec: SegDatasetSpec, split: str, data_dir: str = ""):
    """The records of a split: the prepared TFDS records, or an mmseg
    folder's pairs (`mmseg.MMSegSplit`) when `spec.folder` is set; the
    config's split names ('validation', 'test') go through `spec.splits`.

    Raises:
      FileNotFoundError: the dataset is not prepared (names the command), or
        the folder's split is missing.
      ValueError: (folders) unpaired files or size mismatches, named.
    """
    if spec.folder:
        from ddep_jax.data import mmseg

        return mmseg.MMSegSplit(spec, split)
    from ddep_jax.data.tfds_sources import load_data_source

    return load_data_source(spec.tfds_name, spec.splits.get(split, split),
                            data_dir or None)
