"""The paper's comparison on real CamVid at CPU scale: three initialisations x
label fractions x seeds, fine-tuned with configs/finetune_camvid.py and scored
by test-split mIoU (233 images, 360x480, global confusion matrix).

  python benchmarks/finetune_camvid_grid.py --out=workdirs/grid \
      [--ddep_workdir=workdirs/ddep_camvid] [--seeds=0,1,2] \
      [--fractions=1/30,100%] [--inits=pretrained,encoder,scratch] [--steps=100]

Rows (DDeP Fig. 6 / Table 6): `pretrained` = encoder + decoder from the DDeP
(stage-2) checkpoint of configs/ddep_camvid.py, `encoder` = only its encoder
("Supervised" when that encoder was trained in stage 1), `scratch` = no
pretraining. Without --ddep_workdir, stage 2 is run first into OUT/ddep
(400 steps, ~35 CPU minutes). Each finished run leaves OUT/<init>_<frac>_s<seed>
/eval/test_*.json, so an interrupted grid continues where it stopped.

Not a test: each run takes minutes on a 2-core CPU. Prints a results table
(mean +- std over seeds) and the CPU minutes; writes OUT/results.json.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import pathlib
import resource
import time

import numpy as np
from absl import app, flags, logging

from ddep_jax.trainers import loop
from ddep_jax.data import prepare

REPO = pathlib.Path(__file__).resolve().parents[1]
_OUT = flags.DEFINE_string("out", "workdirs/finetune_grid", "Output directory.")
_DDEP = flags.DEFINE_string("ddep_workdir", "", "Stage-2 workdir of "
                            "configs/ddep_camvid.py ('' = train one into OUT/ddep).")
_DATA_DIR = flags.DEFINE_string("data_dir", "workdirs/tfds", "TFDS data directory.")
_CAMVID = flags.DEFINE_string("camvid", str(REPO.parent / "shared/data/camvid"),
                              "CamVid manual directory.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (init, data order "
                           "and labelled subset).")
_FRACTIONS = flags.DEFINE_list("fractions", ["1/30", "100%"], "Label fractions.")
_INITS = flags.DEFINE_list("inits", ["pretrained", "encoder", "scratch"],
                           "Initialisations.")
_STEPS = flags.DEFINE_integer("steps", 100, "Fine-tuning steps per run (batch 8).")
_DDEP_STEPS = flags.DEFINE_integer("ddep_steps", 400, "Stage-2 steps if it is run.")


def _config_module(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cpu_minutes() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return (usage.ru_utime + usage.ru_stime) / 60


def run_one(init: str, fraction: str, seed: int, ddep_workdir: str,
            data_dir: str) -> dict:
    workdir = os.path.join(_OUT.value, f"{init}_{fraction.replace('/', '-')}_s{seed}")
    done = sorted(glob.glob(os.path.join(workdir, "eval", "test_*.json")))
    if done:
        with open(done[-1]) as f:
            report = json.load(f)
        return {"miou": report["miou"], "workdir": workdir, "minutes": None}
    ckpt = ddep_workdir if init != "scratch" else ""
    config = _config_module("finetune_camvid").get_config(
        f"init={init},ckpt={ckpt},fraction={fraction},seed={seed},steps={_STEPS.value}")
    config.data.data_dir = data_dir
    config.eval.split = "test"  # one evaluation, at the end, on the test split
    config.eval.final_splits = ()
    config.eval.every_steps = 0
    t = time.perf_counter()
    result = loop.run(config, workdir)
    minutes = (time.perf_counter() - t) / 60
    miou = result["eval"]["test"]["miou"]
    print(f"{init:10s} {fraction:>5s} seed {seed}: test mIoU {100 * miou:.2f} "
          f"({minutes:.1f} min)", flush=True)
    return {"miou": miou, "workdir": workdir, "minutes": minutes}


def main(_):
    logging.set_verbosity(logging.WARNING)
    if not os.path.isdir(_CAMVID.value):
        raise SystemExit(f"CamVid not found at {_CAMVID.value}: pass --camvid=DIR.")
    data_dir = os.path.abspath(_DATA_DIR.value)
    prepare.prepare("camvid", _CAMVID.value, data_dir)
    os.makedirs(_OUT.value, exist_ok=True)
    t0, cpu0 = time.perf_counter(), _cpu_minutes()

    ddep_workdir = _DDEP.value or os.path.join(_OUT.value, "ddep")
    if not _DDEP.value:
        config = _config_module("ddep_camvid").get_config(f"steps={_DDEP_STEPS.value}")
        config.data.data_dir = data_dir
        loop.run(config, ddep_workdir)

    results: dict[str, dict[str, list[float]]] = {}
    for seed in map(int, _SEEDS.value):  # every cell gets seed 0 first
        for fraction in _FRACTIONS.value:
            for init in _INITS.value:
                r = run_one(init, fraction, seed, ddep_workdir, data_dir)
                results.setdefault(init, {}).setdefault(fraction, []).append(r["miou"])

    wall = (time.perf_counter() - t0) / 60
    cpu = _cpu_minutes() - cpu0
    header = f"{'init':12s}" + "".join(f"{f:>22s}" for f in _FRACTIONS.value)
    lines = [f"CamVid test mIoU (%), mean +- std over seeds {_SEEDS.value}, "
             f"{_STEPS.value} steps of batch 8, from {ddep_workdir}", header]
    for init in _INITS.value:
        cells = []
        for fraction in _FRACTIONS.value:
            v = 100 * np.asarray(results[init][fraction])
            cells.append(f"{v.mean():6.2f} +- {v.std():5.2f} (n={len(v)})")
        lines.append(f"{init:12s}" + "".join(f"{c:>22s}" for c in cells))
    lines.append(f"this invocation: {wall:.1f} min wall, {cpu:.1f} CPU min "
                 "(runs already finished are read back, not re-run)")
    print("\n".join(lines))
    with open(os.path.join(_OUT.value, "results.json"), "w") as f:
        json.dump({"miou": results, "table": lines, "ddep_workdir": ddep_workdir,
                   "steps": _STEPS.value}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
