"""The label-efficiency harness (ddep_jax.experiments): the summary arithmetic
against hand computations, the recipes' configs, and a tiny two-row,
two-fraction, two-seed grid on real CamVid that is killed mid-grid, resumed
without repeating a finished run, and rerun without running anything."""

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO, subprocess_env, tiny_config, tiny_finetune_config
from ddep_jax.experiments import label_efficiency as le
from ddep_jax.experiments import figures, protocols, provenance, report, stats

T_975_2DF = 4.302652729749462  # Student t, 97.5% quantile, 2 degrees of freedom


def test_cell_difference_and_pooled_std_against_hand_computation():
    c = stats.cell([30.0, 32.0, 34.0])
    assert (c.mean, c.std, c.n) == (32.0, 2.0, 3)
    assert math.isnan(stats.cell([5.0]).std)
    # Paired (same seeds): d = 10, 13, 7 -> mean 10, sd 3, half-width t * 3 / sqrt 3.
    d = stats.difference({0: 40.0, 1: 45.0, 2: 41.0}, {0: 30.0, 1: 32.0, 2: 34.0})
    half = T_975_2DF * 3 / math.sqrt(3)
    assert d.method == "paired" and d.n == 3
    assert d.mean == pytest.approx(10.0)
    assert (d.low, d.high) == pytest.approx((10 - half, 10 + half))
    assert d.significant
    # Seeds in common with more in one cell: paired over the common ones.
    p = stats.difference({0: 40.0, 1: 45.0, 2: 41.0, 3: 99.0, 4: 0.0},
                         {0: 30.0, 1: 32.0, 2: 34.0})
    assert (p.method, p.n, p.mean, p.low) == ("paired", 3, d.mean, d.low)
    # Seeds that only overlap: Welch on all of them, not paired on two.
    assert stats.difference({0: 40.0, 1: 45.0, 2: 41.0},
                            {1: 30.0, 2: 32.0, 3: 34.0}).method == "welch"
    # Welch (different seeds): means 42 and 32; s^2/n = 8/2 and 4/3;
    # nu = (4 + 4/3)^2 / (4^2 / 1 + (4/3)^2 / 2) = 1.68421...
    w = stats.difference({3: 40.0, 4: 44.0}, {0: 30.0, 1: 32.0, 2: 34.0})
    se = math.sqrt(4 + 4 / 3)
    nu = (4 + 4 / 3) ** 2 / (16 + (16 / 9) / 2)
    assert nu == pytest.approx(1.684210526)
    from scipy.stats import t

    assert w.method == "welch" and w.mean == pytest.approx(10.0)
    assert w.high - w.mean == pytest.approx(t.ppf(0.975, nu) * se)
    one = stats.difference({0: 40.0}, {0: 30.0})
    assert one.mean == 10.0 and math.isnan(one.low) and not one.significant
    # Pooled: sqrt((2 * 4 + 1 * 8) / (2 + 1)); a single value adds nothing.
    assert stats.pooled_std([[30, 32, 34], [40, 44], [50]]) == pytest.approx(
        math.sqrt(16 / 3))
    assert math.isnan(stats.pooled_std([[1.0], [2.0]]))
    # Detectable difference: std 2, 3 seeds -> t(0.975, 4) * 2 * sqrt(2 / 3).
    assert stats.detectable_difference(2.0, 3) == pytest.approx(
        2.7764451051977987 * 2 * math.sqrt(2 / 3))
    assert math.isnan(stats.detectable_difference(2.0, 1))
    # 80% power adds t(0.8, 4) = 0.940965...
    assert stats.detectable_difference(2.0, 3, power=0.8) == pytest.approx(
        (2.7764451051977987 + 0.9409645) * 2 * math.sqrt(2 / 3), rel=1e-6)


def _recipe(**kw):
    rows = (le.Row("scratch", "No pretraining", "scratch"),
            le.Row("supervised", "Supervised", "encoder", "sup"),
            le.Row("ddep", "DDeP", "pretrained", "dd"))
    pre = (le.Pretraining("sup", "stage 1", "classify_cifar10.py"),
           le.Pretraining("dd", "stage 2", "ddep_camvid.py", init_from="sup"))
    args = dict(name="synthetic", description="Synthetic figures.",
                finetune_config="finetune_camvid.py", rows=rows, pretrainings=pre,
                fractions=("1/30", "100%"), seeds={"1/30": 3, "100%": 3})
    return le.Recipe(**{**args, **kw})


def _record(row, fraction, seed, miou, images):
    return {"row": row, "fraction": fraction, "seed": seed, "miou": miou / 100,
            "labelled_images": images, "cpu_seconds": 360.0,
            "per_class_iou": {"sky": 0.9, "pole": None}}


def test_summary_and_figure_from_records(tmp_path):
    recipe = _recipe()
    values = {"scratch": (30, 32, 34), "supervised": (40, 45, 41), "ddep": (41, 44, 45)}
    results = [_record(row, "1/30", s, v, 13) for row, vs in values.items()
               for s, v in enumerate(vs)]
    results += [_record(row, "100%", 0, 60, 367) for row in values]
    text = report.summary_markdown(recipe, results, [], total_runs=18)
    assert "| No pretraining | 32.00 ± 2.00 (n=3) | 60.00 (n=1) |" in text
    assert "| 1/30 (13 images) | 100% (367 images) |" in text
    half = T_975_2DF * 3 / math.sqrt(3)
    assert (f"| Supervised | +10.00 [{10 - half:+.2f}, {10 + half:+.2f}]* "
            "(paired, n=3) | +0.00 [n/a, n/a] (welch, n=1) |") in text
    # Pooled std of the three 1/30 cells: variances 4, 7, 4.333 -> sqrt(15.333/3).
    pooled = math.sqrt((4 + 7 + 13 / 3) / 3)
    assert f"Pooled seed std of the initialisations at 1/30: {pooled:.2f}" in text
    assert f"- Supervised - No pretraining: +10.00 = {10 / pooled:.2f} x pooled std " \
           "(> 2x: yes)" in text
    # The encoder's bar: >= 3x pooled std (10 / 2.26 = 4.42x) with the
    # interval excluding 0 (+2.55 at its low end): met.
    assert (f"Does the encoder matter here? Supervised - No pretraining at 1/30: +10.00 "
            f"[{10 - half:+.2f}, {10 + half:+.2f}] (paired, n=3) = {10 / pooled:.2f} x the "
            "pooled seed std; the bar is 3 x with the interval excluding 0: met.") in text
    assert (f"{stats.detectable_difference(pooled, 3):.2f} at 3 seeds, "
            f"{stats.detectable_difference(pooled, 5):.2f} at 5 seeds") in text
    assert f"{stats.detectable_difference(pooled, 3, power=0.8):.2f} at 3, " in text
    assert "Fine-tuning runs finished: 12 of 18. CPU time: pretraining 0.00 h, " \
           "fine-tuning 1.20 h." in text
    assert "| DDeP (n=3) | 90.0 | - |" in text  # per-class IoU at 1/30, None -> '-'
    assert "## Per-class IoU at 100%" in text
    assert "## Sensitivity at 100%" not in text  # one seed per cell: no pooled std
    path = tmp_path / "fig.png"
    figures.plot(recipe, results, recipe.rows, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_states_what_each_method_costs():
    """'What each method costs': a row's pretraining chain in CPU hours (DDeP:
    its stage 1, then stage 2) and its fine-tuning's CPU seconds per step."""
    recipe = _recipe()
    results = [{**_record(row, "1/30", seed, 40, 13), "steps": 1000,
                "cpu_seconds": 300.0 + 100 * seed}
               for row in ("scratch", "ddep") for seed in range(3)]
    pre = [{"name": "sup", "config": "classify_cifar10.py", "cpu_seconds": 7200.0},
           {"name": "dd", "config": "ddep_camvid.py", "cpu_seconds": 1800.0,
            "cpu_seconds_complete": False}]
    text = report.summary_markdown(recipe, results, pre)
    assert "## What each method costs" in text
    assert "| No pretraining | - | 0.400 (3) |" in text
    assert "| Supervised | sup 2.00 | - |" in text
    assert "| DDeP | sup 2.00 + dd >= 0.50 | 0.400 (3) |" in text
    costs = report.method_costs(recipe, results, pre)
    assert costs["ddep"].pretraining == (("sup", 2.0, False), ("dd", 0.5, True))
    assert costs["ddep"].pretraining_hours == 2.5 and costs["ddep"].runs == 3
    assert costs["ddep"].finetune_seconds_per_step == pytest.approx(0.4)
    assert math.isnan(costs["supervised"].finetune_seconds_per_step)


def test_figure_6_has_the_costs_beside_it(tmp_path):
    """With costs in the records, Figure 6 gets a second panel (what each row
    costs): a wider PNG than from records without CPU times."""
    from PIL import Image

    recipe = _recipe()
    results = [{**_record(row, "1/30", seed, 40 + seed, 13), "steps": 1000}
               for row in ("scratch", "ddep") for seed in range(2)]
    pre = [{"name": "sup", "cpu_seconds": 7200.0}, {"name": "dd", "cpu_seconds": 1800.0}]
    figures.plot(recipe, results, recipe.rows, str(tmp_path / "with.png"), pre)
    uncounted = [{k: v for k, v in r.items() if k != "cpu_seconds"} for r in results]
    figures.plot(recipe, uncounted, recipe.rows, str(tmp_path / "without.png"))
    with Image.open(tmp_path / "with.png") as a, Image.open(tmp_path / "without.png") as b:
        assert a.size[1] == b.size[1] and a.size[0] > 1.4 * b.size[0], (a.size, b.size)


def test_sensitivity_and_per_class_at_each_fraction():
    """Past the lowest fraction, each fraction with a pooled std gets its own
    sensitivity lines (hand-computed) and per-class table."""
    values = {("scratch", "1/30"): (30, 32), ("supervised", "1/30"): (31, 33),
              ("scratch", "100%"): (60, 62), ("supervised", "100%"): (60, 70),
              ("ddep", "100%"): (65,), ("dep", "1/30"): (28, 29)}
    results = [_record(row, f, s, v, 13 if f == "1/30" else 367)
               for (row, f), vs in values.items() for s, v in enumerate(vs)]
    recipe = _recipe()
    recipe = _recipe(rows=(*recipe.rows, le.Row("dep", "DeP", "pretrained", "dd")))
    text = report.summary_markdown(recipe, results)
    # The default references include DeP: Supervised - DeP at 1/30, paired
    # (+3, +4): +3.50, half-width t(0.975, 1) * sd / sqrt(2).
    half = 12.706204736174698 * math.sqrt(0.5) / math.sqrt(2)
    assert "Difference against DeP" in text
    assert f"| Supervised | +3.50 [{3.5 - half:+.2f}, {3.5 + half:+.2f}] (paired, n=2) |" \
        in text
    assert "## Sensitivity at the lowest fraction (1/30)" in text
    # The encoder's bar, at the lowest fraction only: paired (+1, +1) against
    # a pooled std of sqrt((2 + 2 + 0.5) / 3) (DeP's cell counts too).
    assert ("Supervised - No pretraining at 1/30: +1.00 [+1.00, +1.00] (paired, n=2) = "
            f"{1 / math.sqrt(1.5):.2f} x the pooled seed std; the bar is 3 x with the "
            "interval excluding 0: not met.") in text
    assert "Supervised - No pretraining at 100%" not in text
    # 100%: variances 2 and 50, one df each -> pooled sqrt(26); Supervised -
    # No pretraining paired (0, +8): mean +4, sd sqrt(32).
    pooled = math.sqrt(26)
    assert "## Sensitivity at 100%" in text
    assert f"Pooled seed std of the initialisations at 100%: {pooled:.2f}" in text
    assert (f"- Supervised - No pretraining: +4.00 = {4 / pooled:.2f} x pooled std "
            f"(> 2x: no); paired over 2 seeds, the differences' sd is "
            f"{math.sqrt(32):.2f}, the effect {4 / math.sqrt(32):.2f} x it") in text
    assert f"- DDeP - No pretraining: +4.00 = {4 / pooled:.2f} x pooled std" in text
    assert f"{stats.detectable_difference(pooled, 3):.2f} at 3 seeds" in text
    assert "## Per-class IoU at 100% (%, mean over seeds)" in text
    assert "| DDeP (n=1) | 90.0 | - |" in text


def test_recipe_errors_and_selection(tmp_path):
    with pytest.raises(ValueError, match="no pretraining 'missing'"):
        _recipe(rows=(le.Row("x", "X", "encoder", "missing"),)).check()
    with pytest.raises(ValueError, match="fraction '1/8' has no seeds"):
        _recipe(fractions=("1/8",)).check()
    with pytest.raises(ValueError, match="unknown; known"):
        protocols.get("camvid")
    with pytest.raises(ValueError, match="--checkpoint=supervised=PATH"):
        le.Harness(protocols.get("cityscapes_1x"), str(tmp_path)).plan()
    h = le.Harness(_recipe(), str(tmp_path), only=["finetune/ddep/1-30/*"],
                   seeds={"1/30": 2})
    # A selected fine-tuning run brings its pretraining chain, dependencies first.
    assert h.plan() == [("pretrain/sup", "pending"), ("pretrain/dd", "pending"),
                        ("finetune/ddep/1-30/s0", "pending"),
                        ("finetune/ddep/1-30/s1", "pending")]


def test_parallel_plan_waits_for_pretrainings_and_recipe_loading(tmp_path):
    """--jobs: each task waits for the pretraining run it reads, recorded
    runs are not tasks; workers load a recipe by name or FILE.py:NAME."""
    recipe = _recipe()
    spec = tmp_path / "synthetic.py"
    spec.write_text(f"import sys\nsys.path.insert(0, {str(REPO / 'tests')!r})\n"
                    "from test_label_efficiency import _recipe\nR = _recipe()\n")
    h = le.Harness(recipe, str(tmp_path), seeds={"1/30": 1}, jobs=2,
                   recipe_spec=f"{spec}:R", only=["finetune/*/1-30/*"])
    # A fine-tuning waits for its whole pretraining chain.
    assert h._tasks() == [
        ("pretrain/sup", []), ("pretrain/dd", ["pretrain/sup"]),
        ("finetune/scratch/1-30/s0", []),
        ("finetune/supervised/1-30/s0", ["pretrain/sup"]),
        ("finetune/ddep/1-30/s0", ["pretrain/sup", "pretrain/dd"])]
    with pytest.raises(ValueError, match="loads another recipe"):
        le.Harness(_recipe(fractions=("1/30",)), str(tmp_path), jobs=2,
                   recipe_spec=f"{spec}:R")
    with pytest.raises(ValueError, match="need jobs=1"):
        le.Harness(recipe, str(tmp_path), jobs=2, recipe_spec=f"{spec}:R",
                   run_fn=lambda c, w: {})
    h.results = [_record("scratch", "1/30", 0, 0.3, 13)]
    assert "finetune/scratch/1-30/s0" not in dict(h._tasks())
    assert "--seeds=1/30:1" in h._worker_command("pretrain/sup")
    with pytest.raises(ValueError, match="not in protocols.RECIPES"):
        le.Harness(recipe, str(tmp_path), jobs=2)
    assert le.Harness(protocols.get("camvid_cpu"), str(tmp_path),
                      jobs=2).recipe_spec == "camvid_cpu"
    path = tmp_path / "mine.py"
    path.write_text("from ddep_jax.experiments import protocols\n"
                    "MINE = protocols.get('camvid_cpu')\nNOT = 3\n")
    assert le.load_recipe(f"{path}:MINE") is protocols.get("camvid_cpu")
    assert le.load_recipe("ddep_jax.experiments.protocols:CAMVID_CPU").name == "camvid_cpu"
    with pytest.raises(ValueError, match="no Recipe called 'NOT'"):
        le.load_recipe(f"{path}:NOT")
    with pytest.raises(ValueError, match="is not a file"):
        le.load_recipe(f"{tmp_path}/absent.py:MINE")
    with pytest.raises(ValueError, match="cannot import"):
        le.load_recipe("no_such_module_here:X")
    (tmp_path / "broken.py").write_text("raise RuntimeError('oops')\n")
    with pytest.raises(ValueError, match="RuntimeError: oops"):
        le.load_recipe(f"{tmp_path}/broken.py:R")
    with pytest.raises(ValueError, match=r"as .*mine.py:NAME"):
        le.load_recipe(str(path))
    # Records of another protocol (other steps) in OUT are named, not mixed in.
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "results.jsonl").write_text(json.dumps(
        {**_record("scratch", "100%", 0, 30.0, 367), "steps": 1000,
         "workdir": "finetune/scratch/100pct/s0"}) + "\n")
    with pytest.raises(ValueError, match=r"trained 1000 steps where recipe "
                                         r"'camvid_cpu' now trains 2000 at 100%"):
        le.Harness(protocols.get("camvid_cpu"), str(stale))


@pytest.mark.parametrize("name", sorted(protocols.RECIPES))
def test_every_recipe_builds_valid_configs(name, tmp_path):
    """Every run of every recipe gets a config its stage accepts (the
    recipes' overrides name real keys, the models of the stages match)."""
    from ddep_jax.trainers import loop

    recipe = protocols.get(name)
    h = le.Harness(recipe, str(tmp_path), checkpoints={"supervised": "/ckpt/encoder"})
    encoders = {}  # pretraining name -> its encoder config
    decoders = {r.decoder_pretraining: r for r in recipe.rows if r.decoder_pretraining}
    for p in recipe.pretrainings:
        if p.config:
            config = h.pretraining_config(p.name)
            loop.trainer(config.stage).validate(config, 1)
            if p.name in decoders:  # ×Net's decoder: a classifier of its backbone
                run = next(r for r in h.finetune_runs() if r.row == decoders[p.name].key)
                x = h.finetune_config(run).model.xnet
                e = config.model.encoder
                assert (e.vit_size, tuple(e.resnet_layers), e.resnet_width) == (
                    "none", tuple(x.decoder_layers), x.decoder_width), p.name
                continue
            encoders[p.name] = json.dumps(config.model.encoder.to_dict(), sort_keys=True)
    for p in recipe.pretrainings:  # a stage-2 run freezes its stage-1 encoder
        if p.init_from and p.name in encoders and p.init_from in encoders:
            assert encoders[p.name] == encoders[p.init_from], p.name
    first = {}
    for run in h.finetune_runs():
        first.setdefault(run.row, run)
    for row in recipe.rows:
        config = h.finetune_config(first[row.key])
        loop.trainer("finetune").validate(config, 1)
        assert recipe.metric_split in (config.eval.split, *config.eval.final_splits)
        if row.pretraining in encoders:  # the hand-over needs the same encoder
            encoder = json.dumps(config.model.encoder.to_dict(), sort_keys=True)
            assert encoder == encoders[row.pretraining], row.key


def _tiny_recipe(data_dir: str, seeds=None, **overrides) -> le.Recipe:
    """Two rows, two fractions (two seeds at 1/30, one at 1/8, unless `seeds`
    says otherwise) of the tiny model on real CamVid; `overrides` (dotted
    keys) go to every run."""
    seeds = seeds or {"1/30": 2, "1/8": 1}
    def stage2(arg):
        return tiny_config(**{"data.source": "tfds", "data.name": "camvid",
                              "data.data_dir": data_dir, "total_steps": 2, **overrides})

    def stage3(arg):
        return tiny_finetune_config(**{"data.data_dir": data_dir, "total_steps": 2,
                                       "checkpoint_every": 2, "eval.num_visualize": 0,
                                       "data.base_scale": 0.125,  # eval at 45x60
                                       **overrides})

    return le.Recipe(
        name="tiny", description="Two rows, two fractions, two seeds at 1/30.",
        finetune_config=stage3,
        rows=(le.Row("scratch", "No pretraining", "scratch"),
              le.Row("ddep", "DDeP", "pretrained", "ddep")),
        pretrainings=(le.Pretraining("ddep", "tiny DDeP on CamVid", stage2),),
        fractions=tuple(seeds), seeds=seeds, metric_split="validation")


def _tiny_recipe_one_fraction(data_dir: str) -> le.Recipe:
    """The tiny recipe at 1/30 alone (two seeds: four fine-tuning runs)."""
    return _tiny_recipe(data_dir, seeds={"1/30": 2})


def _run_cli_jobs2(tmp_path, factory: str, data_dir: str, out):
    """The harness CLI with --jobs=2 on this module's recipe `factory`
    (given as a file, which the worker processes load too)."""
    recipe_file = tmp_path / f"{factory.strip('_')}.py"
    recipe_file.write_text(
        f"import sys\nsys.path.insert(0, {str(REPO / 'tests')!r})\n"
        f"from test_label_efficiency import {factory}\n"
        f"RECIPE = {factory}({data_dir!r})\n")
    return subprocess.run(
        [sys.executable, "-m", "ddep_jax.experiments.label_efficiency",
         f"--recipe={recipe_file}:RECIPE", f"--out={out}", "--jobs=2"],
        cwd=REPO, capture_output=True, text=True, env=subprocess_env())


class _Killed(BaseException):
    """Stands for SIGKILL: nothing in the harness catches it."""


def test_tiny_grid_on_real_camvid_is_killed_resumed_and_not_redone(tmp_path,
                                                                   camvid_tfds):
    from ddep_jax.trainers import loop

    # Two seeds of one fraction: 4 fine-tuning runs (the fractions' plan is
    # test_rows_run_their_own_seed_counts_and_arguments').
    recipe = _tiny_recipe_one_fraction(camvid_tfds)
    out = tmp_path / "grid"
    results = out / "results.jsonl"
    calls = []

    # 1. The harness dies in its third fine-tuning run, after that run's
    # first step was checkpointed (as a kill after a checkpoint leaves it).
    def dying(config, workdir):
        calls.append(os.path.relpath(workdir, out))
        if len(calls) == 4:  # pretrain/ddep, two fine-tuning runs, this one
            loop.run(config, workdir, stop_after_step=1)
            raise _Killed
        return loop.run(config, workdir)

    with pytest.raises(_Killed):
        le.Harness(recipe, str(out), run_fn=dying).run()
    first = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["workdir"] for r in first] == calls[1:3]
    assert all(set(le.RESULT_KEYS) <= set(r) for r in first)
    killed = out / calls[3]
    assert (killed / "checkpoints" / "1").is_dir() and not (killed / "done.json").exists()
    done_before = {r["workdir"]: os.path.getmtime(out / r["workdir"] / "done.json")
                   for r in first}

    # 2. Resumed: the finished runs are read, not redone; the killed one
    # continues from its checkpoint.
    calls.clear()

    def counting(config, workdir):
        calls.append(os.path.relpath(workdir, out))
        return loop.run(config, workdir)

    assert le.Harness(recipe, str(out), run_fn=counting).run() == 0
    assert not set(done_before) & set(calls) and "pretrain/ddep" not in calls
    assert calls[0] == os.path.relpath(killed, out) and len(calls) == 2
    for workdir, mtime in done_before.items():
        assert os.path.getmtime(out / workdir / "done.json") == mtime
    records = [json.loads(line) for line in results.read_text().splitlines()]
    keys = [(r["row"], r["fraction"], r["seed"]) for r in records]
    assert sorted(keys) == sorted([(row, f, s) for row in ("scratch", "ddep")
                                   for f, seeds in (("1/30", (0, 1)),)
                                   for s in seeds])
    resumed = next(r for r in records if r["workdir"] == calls[0])
    assert resumed["cpu_seconds_complete"] is False  # the killed part is uncounted
    assert {r["labelled_images"] for r in records} == {13}
    for r in records:
        report_path = out / r["workdir"] / "eval" / f"validation_{2:08d}.json"
        assert json.loads(report_path.read_text())["miou"] == r["miou"]
        assert 0 < r["miou"] < 1 and len(r["per_class_iou"]) == 11
        assert r["cpu_seconds"] > 0 and r["steps"] == 2
        history = json.loads((out / r["workdir"] / "loss_history.json").read_text())
        assert r["train_loss"] == [[step, round(loss, 5)] for step, loss in history]
    # The same seed means the same labelled images in both rows.
    subsets = {(r["row"], r["fraction"], r["seed"]): json.loads(
        (out / r["workdir"] / "labelled_subset.json").read_text())["indices"]
        for r in records}
    assert subsets[("scratch", "1/30", 1)] == subsets[("ddep", "1/30", 1)]
    assert subsets[("scratch", "1/30", 0)] != subsets[("scratch", "1/30", 1)]
    summary = (out / "summary.md").read_text()
    assert "Fine-tuning runs finished: 4 of 4." in summary
    assert "| No pretraining | " in summary and "| DDeP | " in summary
    assert "Difference against No pretraining" in summary
    assert (out / "label_efficiency.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "training_loss.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "pretraining.jsonl").read_text())["name"] == "ddep"

    # 3. A rerun of the finished grid runs nothing.
    calls.clear()
    assert le.Harness(recipe, str(out), run_fn=counting).run() == 0
    assert calls == []

    # 4. The records alone carried to a new machine (no workdirs): a grid
    # whose every run is recorded runs nothing, not even its pretraining; with
    # one DDeP result taken out, the pretraining runs again (its checkpoint
    # is gone), reproduces its recorded figures, and only that run is redone,
    # here by the CLI with --jobs=2: two worker processes, each pinned to a
    # CPU, the fine-tuning started once the pretraining it reads is done.
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("results.jsonl", "pretraining.jsonl"):
        (moved / name).write_text((out / name).read_text())

    def counting_moved(config, workdir):
        calls.append(os.path.relpath(workdir, moved))
        return loop.run(config, workdir)

    assert le.Harness(recipe, str(moved), run_fn=counting_moved).run() == 0
    assert calls == []
    redo = "finetune/ddep/1-30/s1"
    lines = (moved / "results.jsonl").read_text().splitlines(keepends=True)
    (moved / "results.jsonl").write_text(
        "".join(line for line in lines if json.loads(line)["workdir"] != redo))
    proc = _run_cli_jobs2(tmp_path, "_tiny_recipe_one_fraction", camvid_tfds, moved)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(os.listdir(moved / "logs")) == ["finetune_ddep_1-30_s1.log",
                                                  "pretrain_ddep.log"]
    assert proc.stdout.index("pretrain/ddep: done") < proc.stdout.index(f"{redo}: running")
    cpus = sorted(os.sched_getaffinity(0))
    logs = [(moved / "logs" / name).read_text() for name in sorted(os.listdir(moved / "logs"))]
    assert all(f"worker pinned to CPUs [{cpus[0]}]" in t or
               (len(cpus) > 1 and f"worker pinned to CPUs [{cpus[1]}]" in t) for t in logs)
    assert not list(moved.glob(f"**/{le.WORKER_RECORD}"))  # moved into the records
    rerun = json.loads((moved / "pretraining.jsonl").read_text())
    assert rerun["earlier"][0]["final"] == rerun["final"]
    redone = [json.loads(line) for line in (moved / "results.jsonl").read_text().splitlines()]
    assert next(r for r in redone if r["workdir"] == redo)["miou"] == next(
        r for r in records if r["workdir"] == redo)["miou"]
    assert "an earlier run of the same config" in (moved / "summary.md").read_text()


def _broken_recipe(data_dir: str) -> le.Recipe:
    """The tiny recipe whose one pretraining fails in its worker (a dataset
    that does not exist), so the row reading it cannot run either."""
    tiny = _tiny_recipe(data_dir)

    def broken(arg):
        return tiny_config(**{"data.source": "tfds", "data.name": "no_such_dataset",
                              "data.data_dir": data_dir, "total_steps": 2})

    return le.Recipe(
        name="broken", description="A pretraining that fails.",
        finetune_config=tiny.finetune_config, rows=tiny.rows,
        pretrainings=(le.Pretraining("ddep", "fails: no such dataset", broken),),
        fractions=("1/30",), seeds={"1/30": 1}, metric_split="validation")


def test_parallel_harness_fails_a_run_and_what_reads_it_and_goes_on(tmp_path,
                                                                     camvid_tfds):
    """--jobs=2: a worker that fails fails its run, the run reading its
    checkpoint is failed without starting, the independent run still
    finishes and is recorded; failures.jsonl names both with the reason,
    the worker's log holds its error, and the exit status is 1."""
    out = tmp_path / "grid"
    proc = _run_cli_jobs2(tmp_path, "_broken_recipe", camvid_tfds, out)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    failures = {f["run"]: f["error"] for f in map(
        json.loads, (out / "failures.jsonl").read_text().splitlines())}
    assert set(failures) == {"pretrain/ddep", "finetune/ddep/1-30/s0"}
    assert "its worker exited with status" in failures["pretrain/ddep"]
    assert "pretrain_ddep.log" in failures["pretrain/ddep"]
    assert "did not finish" in failures["finetune/ddep/1-30/s0"]
    assert "no_such_dataset" in (out / "logs" / "pretrain_ddep.log").read_text()
    assert not (out / "logs" / "finetune_ddep_1-30_s0.log").exists()  # never started
    [record] = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert (record["row"], record["fraction"], record["seed"]) == ("scratch", "1/30", 0)
    assert 0 < record["miou"] < 1


def test_grid_runs_share_a_compilation_cache_in_out(tmp_path):
    """Without a cache set, a harness process caches XLA's compiles in
    OUT/xla_cache (a grid's runs compile the same init and step); a cache
    already set (here the tests' own) is kept."""
    env = {k: v for k, v in subprocess_env().items() if k != "JAX_COMPILATION_CACHE_DIR"}
    code = ("import jax, jax.numpy as jnp\n"
            "from ddep_jax.experiments import label_efficiency as le\n"
            "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
            f"print(le.use_compilation_cache({str(tmp_path)!r}))\n"
            "print(jax.jit(lambda x: jnp.sin(x) * 3)(jnp.ones(4)).sum())\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    m = le.machine_fingerprint()
    cache = tmp_path / "xla_cache" / f"cpus{m['cpus']}-{m['cpu_isa']}"
    assert proc.stdout.splitlines()[0] == str(cache)
    assert any(cache.iterdir())
    # A process on another CPU count gets its own folder (XLA compiles
    # another program for it; JAX's cache key does not hold the count).
    pinned = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code],
                            cwd=REPO, env=env, capture_output=True, text=True)
    if m["cpus"] > 1 and pinned.returncode == 0:
        assert pinned.stdout.splitlines()[0] == str(
            tmp_path / "xla_cache" / f"cpus1-{m['cpu_isa']}")
    # A second process (another run of the grid) reads the compile back.
    hits = ("hits = []\njax.monitoring.register_event_listener(\n"
            "    lambda name, **kw: hits.append(name))\n")
    proc = subprocess.run(
        [sys.executable, "-c", code.replace("from ddep_jax", hits + "from ddep_jax", 1)
         + "print('/jax/compilation_cache/cache_hits' in hits)\n"],
        cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "True"


def test_cli_lists_the_plan(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ddep_jax.experiments.label_efficiency",
         "--recipe=camvid_cpu", f"--out={tmp_path}", "--list", "--seeds=1",
         "--only=finetune/*/1-30/*"], cwd=REPO, capture_output=True, text=True,
        env=subprocess_env())
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split("\n")
    assert lines[:3] == ["pending  pretrain/supervised", "pending  pretrain/dep",
                         "pending  pretrain/ddep"]
    assert "pending  finetune/ddep/1-30/s0" in lines
    assert not any("100pct" in line for line in lines)


def test_list_prints_recorded_and_estimated_cpu_time(tmp_path):
    """--list: recorded runs' CPU time, unrecorded ones estimated from the
    recorded runs at their fraction (else per step), a started run less the
    steps its checkpoint holds, and the total left."""
    recipe = _recipe(seeds={"1/30": 2, "100%": 1}, finetune_steps={"1/30": 100, "100%": 400})
    lines = [dict(_record("scratch", "1/30", 0, 30, 13), steps=100, wall_seconds=200.0),
             dict(_record("supervised", "1/30", 0, 40, 13), steps=100, cpu_seconds=480.0,
                  wall_seconds=300.0),
             # Killed before its CPU time was counted: shown, not estimated from.
             dict(_record("scratch", "1/30", 1, 30, 13), steps=100, cpu_seconds=10.0,
                  wall_seconds=None, cpu_seconds_complete=False)]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (tmp_path / "pretraining.jsonl").write_text(json.dumps(
        {"name": "sup", "cpu_seconds": 1200.0, "wall_seconds": 700.0}) + "\n")
    (tmp_path / "pretrain" / "sup").mkdir(parents=True)
    (tmp_path / "pretrain" / "sup" / "done.json").write_text("{}")
    started = tmp_path / "finetune" / "ddep" / "1-30" / "s0" / "checkpoints"
    (started / "25" / "state").mkdir(parents=True)
    (started / "50").mkdir()  # unfinished (no state/): not counted
    h = le.Harness(recipe, str(tmp_path), jobs=1)
    costs = h.costs()
    assert costs["pretrain/sup"] == (1200.0, 700.0, False)
    assert costs["pretrain/dd"] is None  # never recorded
    assert costs["finetune/supervised/1-30/s0"] == (480.0, 300.0, False)
    assert costs["finetune/scratch/1-30/s1"] == (10.0, 0.0, False)
    assert costs["finetune/supervised/1-30/s1"] == (420.0, 250.0, True)  # mean at 1/30
    assert costs["finetune/ddep/1-30/s0"] == (315.0, 187.5, True)  # 3/4 of the steps left
    assert costs["finetune/ddep/100pct/s0"] == (4 * 840.0 / 2, 4 * 500.0 / 2, True)  # per step
    text = le._list_text(h).splitlines()
    assert text[0] == "done     pretrain/sup                            20.0 CPU min"
    assert text[1] == "pending  pretrain/dd"
    assert "started  finetune/ddep/1-30/s0                   ~5.2 CPU min" in text
    # Left: 3 runs at 1/30 (ddep s0 started, 2 at s1), 3 at 100%, and dd (unknown).
    left_cpu = (315 + 2 * 420 + 3 * 1680) / 3600
    left_wall = (187.5 + 2 * 250 + 3 * 1000) / 3600
    assert text[-1] == (f"left: 7 run(s), ~{left_cpu:.2f} CPU h; ~{left_wall:.2f} h wall at "
                        "--jobs=1 (from the recorded runs' wall time, at the --jobs they ran "
                        "with); 1 with nothing recorded to estimate from")
    # An external checkpoint (--checkpoint) is never run: not left to run.
    external = _recipe(pretrainings=(le.Pretraining("sup", "stage 1", ""),
                                     le.Pretraining("dd", "stage 2", "ddep_camvid.py",
                                                    init_from="sup")),
                       seeds={"1/30": 1, "100%": 1}, finetune_steps={"1/30": 100, "100%": 400})
    h = le.Harness(external, str(tmp_path), checkpoints={"sup": str(tmp_path / "enc")})
    assert h.plan()[0] == ("pretrain/sup", "external")
    text = le._list_text(h).splitlines()
    assert text[0] == "external pretrain/sup"
    assert text[-1].startswith("left: 5 run(s), ~") and text[-1].endswith(
        "; 1 with nothing recorded to estimate from")  # ddep/1-30/s0, 100% x 3 and dd


def test_invocations_sharing_out_keep_each_others_records(tmp_path):
    """Two harnesses on one OUT (e.g. different --only): each writes the
    file as it is on disk plus its record, so neither drops the other's."""
    a = le.Harness(_recipe(), str(tmp_path), only=["finetune/*/1-30/*"])
    b = le.Harness(_recipe(), str(tmp_path), only=["finetune/*/100pct/*"])
    a._add_result(_record("scratch", "1/30", 0, 30, 13))
    b._add_result(_record("scratch", "100%", 0, 60, 367))  # b read OUT before a wrote
    a._add_result(_record("ddep", "1/30", 0, 35, 13))
    b._add_result(dict(_record("scratch", "100%", 0, 61, 367)))  # a rerun replaces its line
    a._add_pretraining_record({"name": "sup", "config": "c.py", "cpu_seconds": 1.0})
    b._add_pretraining_record({"name": "dd", "config": "d.py", "cpu_seconds": 2.0})
    on_disk = [json.loads(line) for line in (tmp_path / "results.jsonl").open()]
    assert [(r["row"], r["fraction"], r["miou"]) for r in on_disk] == [
        ("scratch", "1/30", 0.30), ("ddep", "1/30", 0.35), ("scratch", "100%", 0.61)]
    assert b.results == on_disk
    assert [json.loads(line)["name"] for line in (tmp_path / "pretraining.jsonl").open()] \
        == ["sup", "dd"]
    # Both read, both wrote: the second write lacks the first's run. The first
    # puts it back at its next write (a record, or the outputs after a run).
    (tmp_path / "results.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in on_disk if r["row"] != "ddep"))
    a.write_outputs()
    assert [json.loads(line)["row"] for line in (tmp_path / "results.jsonl").open()] == [
        "scratch", "scratch", "ddep"]
    assert "| DDeP | 35.00 (n=1) |" in (tmp_path / "summary.md").read_text()
    assert le.Harness(_recipe(), str(tmp_path)).plan()[2:4] == [
        ("finetune/scratch/1-30/s0", "done"), ("finetune/supervised/1-30/s0", "pending")]


def test_loss_curve_window_means_and_filling_old_lines(tmp_path):
    """`loss_curve`: CURVE_POINTS window means of loss_history.json, each at
    its window's last step; `fill_from_workdirs` adds them to results lines
    written without (from their workdirs), puts per-class IoU back in the
    evaluation report's class order, and rewrites results.jsonl;
    `figures.mean_curve` averages runs over the steps they share."""
    from ddep_jax.experiments import report

    run = tmp_path / "finetune" / "scratch" / "1-30" / "s0"
    run.mkdir(parents=True)
    (run / "loss_history.json").write_text(json.dumps([[s, float(s)] for s in range(1, 51)]))
    curve = le.loss_curve(str(run), points=20)  # windows of 3 steps (50 / 20, up)
    assert curve[0] == [3, 2.0] and curve[1] == [6, 5.0] and curve[-1] == [50, 49.5]
    assert len(curve) == 17
    # A history that lacks steps (a resumed run) keeps the same step grid.
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "loss_history.json").write_text(json.dumps([[s, 1.0] for s in range(8, 51)]))
    assert [s for s, _ in le.loss_curve(str(partial), points=20)] == [
        s for s, _ in curve if s >= 9]
    assert le.loss_curve(str(tmp_path)) is None  # no history
    assert figures.mean_curve([[[1, 1.0], [2, 3.0]], [[2, 5.0], [3, 0.0]]]) == ([2], [4.0])

    recipe = le.Recipe(name="tiny", description="", finetune_config=lambda arg: None,
                       rows=(le.Row("scratch", "No pretraining", "scratch"),),
                       pretrainings=(), fractions=("1/30",), seeds={"1/30": 1})
    classes = {"Sky": 0.9, "Building": 0.5, "Pole": 0.0}  # CamVid's order
    (run / "eval").mkdir()
    (run / "eval" / "test_00000050.json").write_text(json.dumps({"per_class": classes}))
    line = {"recipe": "tiny", "row": "scratch", "fraction": "1/30", "seed": 0,
            "labelled_images": 13, "miou": 0.2, "steps": 50, "split": "test",
            "per_class_iou": dict(sorted(classes.items())),
            "workdir": "finetune/scratch/1-30/s0"}
    (tmp_path / "results.jsonl").write_text(json.dumps(line) + "\n")
    harness = le.Harness(recipe, str(tmp_path))
    assert harness.fill_from_workdirs() == 1
    written = json.loads((tmp_path / "results.jsonl").read_text())
    assert written["train_loss"] == le.loss_curve(str(run))
    assert list(written["per_class_iou"]) == ["Sky", "Building", "Pole"]
    assert harness.fill_from_workdirs() == 0  # nothing left to fill
    summary = report.summary_markdown(recipe, harness.results, [], total_runs=1)
    assert "| initialisation | Sky | Building | Pole |" in summary



def test_each_cell_prints_the_command_that_builds_its_config(tmp_path):
    """The summary's Reproduce section gives, per pretraining and per cell,
    one `python -m ddep_jax.main` command; its flags applied to its config
    file rebuild exactly the config the harness runs."""
    import ast
    import shlex

    from ddep_jax import config_lib

    recipe = protocols.get("camvid_cpu_v2")
    h = le.Harness(recipe, str(tmp_path), data_dir="/data/tfds")

    def rebuilt(command: str):
        args = shlex.split(command)
        assert args[:3] == ["python", "-m", "ddep_jax.main"]
        spec = args[3][len("--config="):]
        path, _, arg = spec.partition(":")
        config = config_lib.load_config_file(str(REPO / path), arg or None)
        for flag in args[4:-1]:
            key, _, text = flag[len("--config."):].partition("=")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text.replace("OUT/", str(tmp_path) + "/")
            config_lib.apply_overrides(config, {key: value})
        assert args[-1].startswith("--workdir=OUT/")
        return config

    for p in recipe.pretrainings:
        command = h.pretraining_command(p.name)
        want = h.pretraining_config(p.name).to_dict()
        assert rebuilt(command).to_dict() == want, p.name
    for run in h.finetune_runs()[:len(recipe.rows)]:
        got = rebuilt(h.finetune_command(run)).to_dict()
        assert got == h.finetune_config(run).to_dict(), run.id
    text = report.summary_markdown(recipe, [], commands=h.commands())
    cells = sum(1 for r in recipe.rows for f in recipe.fractions if recipe.seeds_of(r, f))
    assert cells == 13 * 2 + 10 + 4  # the ablations at 1/8 only, 100% for the main four
    assert "## Reproduce" in text and text.count("\n  python -m ddep_jax.main") == (
        len(recipe.pretrainings) + cells)


def test_xnet_rows_read_two_stage1_runs(tmp_path):
    """×Net (pretrained decoder) waits for the hybrid encoder's and the
    decoder classifier's stage-1 runs and reads the second as its decoder;
    the random-decoder row reads the encoder only; the denoising row reads
    its stage-2 run (on the stage-1 encoder) whole."""
    recipe = protocols.get("camvid_cpu_v2")
    h = le.Harness(recipe, str(tmp_path), only=["finetune/xnet*/1-30/s0"])
    tasks = dict(h._tasks())
    assert set(tasks) == {"pretrain/supervised", "pretrain/supervised_xnet_decoder",
                          "pretrain/ddep_xnet", "finetune/xnet/1-30/s0",
                          "finetune/xnet_random/1-30/s0", "finetune/xnet_ddep/1-30/s0"}
    assert tasks["pretrain/ddep_xnet"] == ["pretrain/supervised"]
    dd = h.finetune_config(next(r for r in h.finetune_runs() if r.row == "xnet_ddep"))
    assert dd.model.architecture == "xnet" and dd.init.mode == "pretrained"
    assert dd.init.checkpoint == str(tmp_path / "pretrain" / "ddep_xnet")
    assert dd.init.decoder_checkpoint == ""
    s2 = h.pretraining_config("ddep_xnet")
    assert s2.model.architecture == "xnet" and s2.frozen == ("encoder",)
    assert s2.model.to_dict()["xnet"] == dd.model.to_dict()["xnet"]
    assert set(tasks["finetune/xnet/1-30/s0"]) == {"pretrain/supervised",
                                                   "pretrain/supervised_xnet_decoder"}
    assert tasks["finetune/xnet_random/1-30/s0"] == ["pretrain/supervised"]
    pre = next(r for r in h.finetune_runs() if r.row == "xnet")
    c = h.finetune_config(pre)
    assert c.model.architecture == "xnet" and c.init.mode == "encoder"
    assert c.init.decoder_checkpoint == str(tmp_path / "pretrain" / "supervised_xnet_decoder")
    rnd = h.finetune_config(next(r for r in h.finetune_runs() if r.row == "xnet_random"))
    assert rnd.init.decoder_checkpoint == "" and rnd.model.architecture == "xnet"


def test_two_runs_of_one_cell_give_identical_records(tmp_path, camvid_tfds):
    """The same cell run twice (the harness CLI, --jobs=1, each run pinned
    to one CPU by default) into two OUTs: identical mIoU, per-class IoU and
    loss curve, on the same machine fingerprint (1 CPU)."""
    recipe_file = tmp_path / "tiny.py"
    recipe_file.write_text(
        f"import sys\nsys.path.insert(0, {str(REPO / 'tests')!r})\n"
        "from test_label_efficiency import _tiny_recipe\n"
        f"RECIPE = _tiny_recipe({camvid_tfds!r})\n")
    records = []
    for name in ("a", "b"):
        out = tmp_path / name
        proc = subprocess.run(
            [sys.executable, "-m", "ddep_jax.experiments.label_efficiency",
             f"--recipe={recipe_file}:RECIPE", f"--out={out}", "--jobs=1",
             "--only=finetune/scratch/1-30/s0"],
            cwd=REPO, capture_output=True, text=True, env=subprocess_env())
        assert proc.returncode == 0, proc.stderr[-3000:]
        [record] = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
        records.append(record)
    a, b = records
    for key in ("miou", "per_class_iou", "pixel_accuracy", "train_loss", "config_hash",
                "machine"):
        assert a[key] == b[key], key
    if le.usable_cpus() > 1:
        assert a["machine"]["cpus"] == 1


def test_rows_run_their_own_seed_counts_and_arguments(tmp_path):
    """camvid_cpu_v2's plan: 10 seeds at 1/30 for No pretraining, Supervised
    and DDeP, 5 for the other rows, the ablations at 1/8 only, 100% for the
    main four; --seeds replaces every count that is not 0; a row's `arg`
    reaches its config and its command (Table 7's ResNet-50 U-Net)."""
    from collections import Counter

    recipe = protocols.get("camvid_cpu_v2")
    runs = le.Harness(recipe, str(tmp_path)).finetune_runs()
    cells = Counter((r.row, r.fraction) for r in runs)
    assert len(runs) == 207 and len(set(runs)) == 207
    assert cells[("ddep", "1/30")] == cells[("scratch", "1/30")] == 10
    assert cells[("rotation", "1/30")] == cells[("r50unet_ddep", "1/8")] == 5
    assert ("ddep_x", "1/30") not in cells and cells[("ddep_x", "1/8")] == 5
    assert {r for r, f in cells if f == "100%"} == {"scratch", "supervised", "dep", "ddep"}
    assert runs[0].seed == 0 and runs[-1].seed == 9  # seed-major
    fewer = le.Harness(recipe, str(tmp_path), seeds={"1/30": 2, "100%": 1}).finetune_runs()
    cells = Counter((r.row, r.fraction) for r in fewer)
    assert cells[("ddep", "1/30")] == cells[("rotation", "1/30")] == 2
    assert ("ddep_x", "1/30") not in cells and cells[("ddep", "100%")] == 1
    h = le.Harness(recipe, str(tmp_path))
    run = le.FinetuneRun("r50unet_ddep", "1/8", 0)
    c = h.finetune_config(run)
    assert c.model.encoder.vit_size == "none" and c.eval.size_multiple == 32
    assert c.init.checkpoint == str(tmp_path / "pretrain" / "ddep_r50unet")
    assert "--config=configs/finetune_camvid.py:arch=r50unet " in h.finetune_command(run)
    with pytest.raises(ValueError, match=r"row 'a': seeds for \['1/2'\]"):
        _recipe(rows=(le.Row("a", "A", "scratch", seeds={"1/2": 3}),)).check()
    with pytest.raises(ValueError, match="fraction '100%' has no seeds"):
        _recipe(rows=(le.Row("a", "A", "scratch", seeds={"100%": 0}),)).check()


def test_v3_changes_only_the_stage1_length(tmp_path):
    """camvid_cpu_v3 is camvid_cpu_v2 with a 24-epoch stage 1: the same
    rows, runs and fine-tuning configs (No pretraining's cells hash alike,
    so their records are comparable across the two), a stage-1 command
    with epochs=24, and DDeP still reading this recipe's own stage 1."""
    v2, v3 = protocols.get("camvid_cpu_v2"), protocols.get("camvid_cpu_v3")
    h2, h3 = le.Harness(v2, str(tmp_path)), le.Harness(v3, str(tmp_path))
    assert h2.finetune_runs() == h3.finetune_runs()
    run = le.FinetuneRun("scratch", "1/30", 0)
    assert (provenance.config_hash(h2.finetune_config(run), str(tmp_path))
            == provenance.config_hash(h3.finetune_config(run), str(tmp_path)))
    assert h3.pretraining_config("supervised").num_epochs == 24
    assert h2.pretraining_config("supervised").num_epochs == 6
    assert "classify_cifar10.py:epochs=24,size=96" in h3.pretraining_command("supervised")
    assert v3.pretraining("ddep").init_from == "supervised"
    assert ([p.name for p in v2.pretrainings] == [p.name for p in v3.pretrainings])


def test_claim_verdicts():
    """Each relation's verdict from the interval of row - reference."""
    from ddep_jax.experiments import claims

    def d(low, high):
        return stats.Difference((low + high) / 2, low, high, 5, "paired")

    def v(relation, low, high, margin=1.0):
        return claims.verdict(claims.Claim("c", "s", "a", "b", relation, margin=margin),
                              d(low, high))

    assert v(">", 0.1, 2) == claims.REPRODUCED and v(">", -2, -0.1) == claims.CONTRADICTED
    assert v(">", -1, 2) == claims.NOT_RESOLVED
    assert v("<", -2, -0.1) == claims.REPRODUCED and v("<", 0.1, 2) == claims.CONTRADICTED
    assert v(">=", -0.9, 3) == claims.REPRODUCED and v(">=", -1.5, 3) == claims.NOT_RESOLVED
    assert v(">=", -0.9, -0.1) == claims.CONTRADICTED  # significantly worse
    assert v("~", -0.5, 0.8) == claims.REPRODUCED and v("~", -0.5, 1.5) == claims.NOT_RESOLVED
    assert v("~", 0.2, 0.8) == claims.CONTRADICTED
    assert v("", -3, 3) == claims.NO_CLAIM
    assert claims.verdict(claims.Claim("c", "s", "a", "b"),
                          stats.Difference(1.0, math.nan, math.nan, 1, "welch")) == claims.NOT_RUN
    with pytest.raises(ValueError, match="relation '=>'"):
        claims.Claim("c", "s", "a", "b", "=>")


def test_summary_opens_with_the_ranking_and_the_claims(tmp_path):
    """summary.md (rebuilt by --summary_only from results.jsonl alone) opens
    with the ranking at each fraction and the claims table: rows sorted by
    mean, paired differences to DDeP and Supervised, ties with the best."""
    from ddep_jax.experiments import claims

    recipe = _recipe(claims=(
        claims.Claim("DDeP beats Supervised", "Fig. 6", "ddep", "supervised", ">",
                     "Cityscapes 1/30: +9.76"),
        claims.Claim("Supervised beats No pretraining", "Fig. 6", "supervised",
                     "scratch", ">"),
        claims.Claim("DDeP at 100%", "Fig. 6", "ddep", "supervised", ">=",
                     fraction="100%")))
    values = {"scratch": (30, 32, 34), "supervised": (40, 45, 41), "ddep": (41, 44, 45)}
    results = [_record(row, "1/30", s, v, 13) for row, vs in values.items()
               for s, v in enumerate(vs)]
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    le.Harness(recipe, str(out)).write_outputs()
    text = (out / "summary.md").read_text()
    assert text.index("## Ranking") < text.index("## The papers' claims, checked") \
        < text.index("## Initialisations")
    ranking = text[text.index("### 1/30"):text.index("## The papers'")]
    lines = [line for line in ranking.splitlines() if line.startswith("| ") and
             line[2].isdigit()]
    assert [line.split(" | ")[1] for line in lines] == ["DDeP", "Supervised",
                                                       "No pretraining"]
    d = stats.difference(dict(enumerate(values["supervised"])),
                         dict(enumerate(values["ddep"])))
    assert lines[1].endswith(f"| {d.mean:+.2f} [{d.low:+.2f}, {d.high:+.2f}] (n=3) | - | "
                             "yes |")
    assert lines[0].endswith("| best |") and lines[2].endswith("| no |")
    assert ("| Supervised beats No pretraining: Supervised > No pretraining | Fig. 6 | "
            "- | 1/30 | +10.00 [") in text
    claim_lines = [line for line in text.splitlines() if line.startswith("| DDeP ")
                   or line.startswith("| Supervised beats")]
    assert claim_lines[0].endswith(f"| {claims.NOT_RESOLVED} |")  # [-4.9, +6.2]
    assert claim_lines[1].endswith(f"| {claims.REPRODUCED} |")
    assert claim_lines[2].endswith(f"| - | {claims.NOT_RUN} |")  # 100% not run
