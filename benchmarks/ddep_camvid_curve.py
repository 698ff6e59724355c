"""DDeP on CamVid's real training images: prepares the TFDS dataset from
../shared/data/camvid (once), trains configs/ddep_camvid.py and prints the
loss curve (every logged step) from the workdir's metrics.jsonl.

  python benchmarks/ddep_camvid_curve.py --workdir=workdirs/ddep_camvid [--steps=400]

Not a test: it takes tens of minutes on a 2-core CPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import time

from absl import app, flags, logging

from ddep_jax.trainers import loop
from ddep_jax.data import prepare

REPO = pathlib.Path(__file__).resolve().parents[1]
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/ddep_camvid", "Output directory.")
_DATA_DIR = flags.DEFINE_string("data_dir", "workdirs/tfds", "TFDS data directory.")
_CAMVID = flags.DEFINE_string("camvid", str(REPO.parent / "shared/data/camvid"),
                              "CamVid manual directory.")
_STEPS = flags.DEFINE_integer("steps", 400, "Training steps.")


def main(_):
    if not os.path.isdir(_CAMVID.value):
        raise SystemExit(f"CamVid not found at {_CAMVID.value}: pass --camvid=DIR.")
    prepare.prepare("camvid", _CAMVID.value, _DATA_DIR.value)
    spec = importlib.util.spec_from_file_location("cfg", REPO / "configs/ddep_camvid.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(f"steps={_STEPS.value}")
    config.data.data_dir = os.path.abspath(_DATA_DIR.value)
    logging.set_verbosity(logging.INFO)
    t = time.perf_counter()
    result = loop.run(config, _WORKDIR.value)
    minutes = (time.perf_counter() - t) / 60
    print(f"step  loss   (DDeP on CamVid train images, {minutes:.1f} min this run)")
    with open(os.path.join(_WORKDIR.value, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            print(f"{row['step']:4d}  {row['loss']:.4f}")
    print(f"final loss {result['loss']:.4f} (predicting zeros scores 1.0)")


if __name__ == "__main__":
    app.run(main)
