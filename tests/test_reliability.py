"""Reliability of the one loop, tried from the outside where it matters:
signals at start-up, during a run and during the final evaluation, two runs
on one workdir, error exits, non-finite losses, resumes with another config,
a damaged checkpoint, metrics after a resume, and rerunning a finished run."""

import json
import os
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest
from conftest import REPO, TINY_OVERRIDES, flags, subprocess_env, tiny_config

from ddep_jax.trainers import ddep, loop


def _main(workdir, *extra, config="configs/ddep_default.py", overrides=None):
    return [sys.executable, "-m", "ddep_jax.main", f"--config={config}",
            f"--workdir={workdir}", *flags({**TINY_OVERRIDES, **(overrides or {})}),
            *extra]


def _start(command):
    return subprocess.Popen(command, cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(proc, text, timeout=400):
    """Reads the child's output until a line holds `text`; returns what was read."""
    seen = []
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        seen.append(line)
        if text in line:
            return "".join(seen)
        assert time.monotonic() < deadline, f"{text!r} not printed in time"
    raise AssertionError(f"exited before printing {text!r}:\n{''.join(seen)[-3000:]}")


def _finish(proc, before=""):
    out = before + proc.communicate(timeout=400)[0]
    return proc.returncode, out


def test_sigterm_while_compiling_exits_75_and_loses_nothing(tmp_path):
    """Defect 1: the handler is in place from the start: a SIGTERM after the
    restore, while the step compiles, exits 75; the rerun resumes."""
    workdir = tmp_path / "work"
    command = _main(workdir, overrides={"total_steps": 4, "checkpoint_every": 2})
    proc = _start(command)
    seen = _wait_for(proc, "Compiling the train step")
    proc.send_signal(signal.SIGTERM)
    status, out = _finish(proc, seen)
    assert status == 75, out[-3000:]
    assert not (workdir / "metrics.jsonl").exists() or not (
        workdir / "metrics.jsonl").read_text().strip()
    status, out = _finish(_start(command))
    assert status == 0, out[-3000:]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]


def test_ctrl_c_once_checkpoints_twice_aborts(tmp_path):
    """SIGINT once behaves as SIGTERM (checkpoint of the step, exit 75); a
    second one aborts at once."""
    workdir = tmp_path / "work"
    command = _main(workdir, overrides={"total_steps": 100000,
                                        "checkpoint_every": 100000})
    proc = _start(command)
    seen = _wait_for(proc, "step 1/100000")
    proc.send_signal(signal.SIGINT)
    status, out = _finish(proc, seen)
    assert status == 75, out[-3000:]
    assert "SIGINT received" in out
    assert len(os.listdir(workdir / "checkpoints")) == 1

    proc = _start(command)
    seen = _wait_for(proc, "Resumed from")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    status, out = _finish(proc, seen)
    assert status not in (0, 75), out[-3000:]


def test_second_run_on_a_workdir_is_refused_and_a_stale_lock_taken_over(tmp_path):
    """Defect 7: the running run holds WORKDIR/run.lock; a second run names
    the owner and exits 1 without touching anything; after the first run
    ends, the lock file left behind does not block a new run."""
    workdir = tmp_path / "work"
    first = _start(_main(workdir, overrides={"total_steps": 100000,
                                             "checkpoint_every": 100000}))
    seen = _wait_for(first, "step 1/100000")
    metrics_before = (workdir / "metrics.jsonl").read_text()
    status, out = _finish(_start(_main(workdir)))
    assert status == 1
    assert f"pid {first.pid}" in out and "is in use by another run" in out
    assert "ddep_jax.main: error:" in out.strip().splitlines()[-1]
    first.send_signal(signal.SIGTERM)
    status, out = _finish(first, seen)
    assert status == 75, out[-3000:]
    assert (workdir / "metrics.jsonl").read_text().startswith(metrics_before)
    assert (workdir / "run.lock").exists()  # left behind, stale
    proc = _start(_main(workdir, overrides={"total_steps": 100000,
                                            "checkpoint_every": 100000}))
    seen = _wait_for(proc, "Resumed from")
    proc.send_signal(signal.SIGTERM)
    assert _finish(proc, seen)[0] == 75


def test_sigterm_during_final_evaluation_finishes_it(tmp_path, camvid_tfds):
    """A SIGTERM during stage 3's final evaluation lets it finish (exit 0,
    reports and done.json written); the rerun says it is already finished."""
    workdir = tmp_path / "ft"
    config = "configs/finetune_camvid.py:steps=1"
    overrides = {**{k: v for k, v in TINY_OVERRIDES.items()
                    if not k.startswith("image_grid")},
                 "data.data_dir": camvid_tfds, "data.crop_size": (32, 32),
                 "data.base_scale": 0.25, "eval.final_splits": (),
                 "eval.num_visualize": 0, "eval.every_steps": 0}
    command = [sys.executable, "-m", "ddep_jax.main", f"--config={config}",
               f"--workdir={workdir}", *flags(overrides)]
    proc = _start(command)
    seen = _wait_for(proc, "Final evaluation at step 1")
    proc.send_signal(signal.SIGTERM)
    status, out = _finish(proc, seen)
    assert status == 0, out[-3000:]
    assert (workdir / "eval" / "validation_00000001.json").is_file()
    assert json.loads((workdir / "done.json").read_text())["step"] == 1
    status, out = _finish(_start(command))
    assert status == 0 and "Already finished at step 1" in out, out[-2000:]
    assert "Compiling the train step" not in out


def test_error_exit_waits_for_the_save_and_prints_the_real_error(tmp_path, monkeypatch):
    """Defect 2: a bad record while a checkpoint is being written: the save
    completes (no temporary folder left) and the record's error propagates."""

    class FailingSource:
        def __init__(self, source, after):
            self.source, self.after, self.calls = source, after, 0

        def __len__(self):
            return len(self.source)

        def __getitem__(self, i):
            self.calls += 1
            if self.calls > self.after:
                raise ValueError(f"embedded record {i} is corrupt (test)")
            return self.source[i]

    make_source = ddep.make_source
    monkeypatch.setattr(ddep, "make_source",
                        lambda data: FailingSource(make_source(data), after=20))
    config = tiny_config(total_steps=8, checkpoint_every=1)
    with pytest.raises(ValueError, match="is corrupt"):
        loop.run(config, str(tmp_path))
    names = os.listdir(tmp_path / "checkpoints")
    assert names and all(n.isdigit() for n in names), names  # no *-tmp-* folder


def test_expected_errors_end_with_one_clean_line(tmp_path):
    status, out = _finish(_start(_main(tmp_path / "w", overrides={
        "data.source": "tfds", "data.name": "camvid",
        "data.data_dir": str(tmp_path / "nothing")})))
    assert status == 1 and "Traceback" not in out
    tail = out[out.rindex("ddep_jax.main: error:"):]  # the last thing printed
    assert "camvid" in tail and "ddep_jax.data.prepare" in tail
    assert not (tmp_path / "w").exists()  # a refused run leaves no workdir


def test_non_finite_loss_never_saves_or_recommends_poisoned_checkpoints(tmp_path):
    """Defect 3: the checkpoint holding the parameters that produced the NaN
    is set aside, the message names the last checked one, and the resume
    may lower the learning rate and add clipping."""
    config = tiny_config(total_steps=8, checkpoint_every=1)
    config.optimizer.learning_rate = 1e30  # the first update blows the decoder up
    with pytest.raises(FloatingPointError, match=r"at step 2\b") as err:
        loop.run(config, str(tmp_path / "a"))
    assert "No checkpoint was saved before it" in str(err.value)
    assert os.listdir(tmp_path / "a" / "checkpoints") == []
    assert os.listdir(tmp_path / "a" / "poisoned_checkpoints") == ["1"]

    # Warm-up: step 1 moves nothing (lr 0), later steps blow up.
    config.optimizer.warmup_steps = 4
    with pytest.raises(FloatingPointError) as err:
        loop.run(config, str(tmp_path / "b"))
    message = str(err.value)
    bad = int(message.split("at step ")[1].split(":")[0])
    good = sorted(int(s) for s in os.listdir(tmp_path / "b" / "checkpoints"))
    assert good and good[-1] <= bad - 2 and f"checkpoint is step {good[-1]}" in message
    poisoned = sorted(int(s) for s in os.listdir(tmp_path / "b" / "poisoned_checkpoints"))
    assert poisoned and poisoned[0] == bad - 1

    # The advice works: lower learning rate plus clipping (a new optimizer
    # state tree) resumes from the checked checkpoint and finishes.
    config.optimizer.learning_rate = 1e-3
    config.optimizer.grad_clip_norm = 1.0
    result = loop.run(config, str(tmp_path / "b"))
    assert result["step"] == 8 and np.isfinite(result["loss"])
    assert result["history"][0][0] == good[-1] + 1


def test_lr_that_overflows_float32_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="optimizer.learning_rate=1e\\+39 is invalid"):
        loop.run(tiny_config(**{"optimizer.learning_rate": 1e39}), str(tmp_path))


def test_resume_refuses_changes_that_break_the_run(tmp_path):
    """Defects 4-6: a batch, seed or model change on resume is refused naming
    the keys, config.json stays as it was; a safe change is accepted."""
    workdir = str(tmp_path)
    loop.run(tiny_config(total_steps=4), workdir, stop_after_step=2)
    saved = (tmp_path / "config.json").read_text()
    for overrides, key in [({"batch_size": 16}, "batch_size: 8 -> 16"),
                           ({"seed": 3}, "seed: 0 -> 3"),
                           ({"model.decoder_widths": (32, 16, 16, 8, 4)},
                            "model.decoder_widths")]:
        with pytest.raises(ValueError, match="would mix two runs") as err:
            loop.run(tiny_config(total_steps=4, **overrides), workdir)
        assert key in str(err.value)
        assert (tmp_path / "config.json").read_text() == saved
    assert not list(tmp_path.glob("config.*.json"))
    # Without the record, the checkpoint itself names every mismatch.
    os.remove(tmp_path / "config.json")
    with pytest.raises(ValueError, match=r"(?s)does not match the configured model.*"
                                         r"shape params/decoder/block4/"):
        loop.run(tiny_config(total_steps=4, **{
            "model.decoder_widths": (32, 16, 16, 8, 4)}), workdir)
    result = loop.run(tiny_config(total_steps=4, log_every=2), workdir)
    assert result["history"][0][0] == 3


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path):
    """Defect 9: a damaged file in the newest checkpoint: it is named and set
    aside, the previous one is taken, and the run still ends bit-identical to
    an uninterrupted one."""
    config = tiny_config(total_steps=6, checkpoint_every=2)
    straight = loop.run(config, str(tmp_path / "straight"))
    workdir = tmp_path / "damaged"
    loop.run(config, str(workdir), stop_after_step=4)
    files = [p for p in (workdir / "checkpoints" / "4" / "state").rglob("*")
             if p.is_file()]
    biggest = max(files, key=lambda p: p.stat().st_size)
    biggest.write_bytes(b"\0" * biggest.stat().st_size)
    resumed = loop.run(config, str(workdir))
    assert [s for s, _ in resumed["history"]] == [3, 4, 5, 6]
    assert os.listdir(workdir / "corrupt_checkpoints") == ["4"]
    chex.assert_trees_all_equal(jax.device_get(resumed["state"]),
                                jax.device_get(straight["state"]))


def test_metrics_after_a_resume_hold_every_step_once(tmp_path):
    """Defect 10: lines written after the last checkpoint (a killed run) are
    cut on resume; loss_history.json holds the whole run."""
    workdir = tmp_path
    loop.run(tiny_config(total_steps=5, checkpoint_every=2), str(workdir),
             stop_after_step=3)
    import shutil
    shutil.rmtree(workdir / "checkpoints" / "3")  # as if killed after step 3
    loop.run(tiny_config(total_steps=5, checkpoint_every=2), str(workdir))
    steps = [json.loads(l)["step"] for l in
             (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    history = json.loads((workdir / "loss_history.json").read_text())
    assert [s for s, _ in history] == [1, 2, 3, 4, 5]


def test_rerunning_a_finished_run_does_nothing(tmp_path):
    """Defect 11: no recompile, no 'loss nan', no second evaluation."""
    config = tiny_config(total_steps=2)
    first = loop.run(config, str(tmp_path))
    report = (tmp_path / "compile_report.json").stat().st_mtime_ns
    again = loop.run(config, str(tmp_path))
    assert again["already_finished"] and again["step"] == 2
    assert again["loss"] == first["loss"] and again["history"] == []
    assert (tmp_path / "compile_report.json").stat().st_mtime_ns == report
