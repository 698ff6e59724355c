"""Reliability of the one loop, tried from the outside where it matters:
signals at start-up, during a run and during the final evaluation, two runs
on one workdir, error exits, non-finite losses, resumes with another config,
a damaged checkpoint, metrics after a resume, rerunning a finished run, and
concurrent writes of one record file."""

import dataclasses
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


def test_signals_and_a_second_run_from_the_outside(tmp_path):
    """Real processes running the README's first command (tiny sizes):

    1. defect 1: SIGTERM while the step compiles (handler in place from the
       start): exit 75, nothing written, nothing lost;
    2. defect 7: a second run on the workdir while the first trains is
       refused naming the owner's pid, and changes nothing;
    3. Ctrl-C once: the first run saves the current step, exits 75;
    4. Ctrl-C twice: aborts at once (neither 0 nor 75);
    5. the lock the aborted run left is stale: SIGTERM mid-run -> exit 75
       with the checkpoint of that step; every step so far is in
       metrics.jsonl once (none lost or repeated).
    """
    workdir = tmp_path / "work"
    metrics = workdir / "metrics.jsonl"
    command = _main(workdir, overrides={"total_steps": 100000,
                                        "checkpoint_every": 100000})
    proc = _start(command)
    seen = _wait_for(proc, "Compiling the train step")
    proc.send_signal(signal.SIGTERM)
    status, out = _finish(proc, seen)
    assert status == 75, out[-3000:]
    assert not metrics.exists() or not metrics.read_text().strip()
    assert not os.listdir(workdir / "checkpoints")

    first = _start(command)
    seen = _wait_for(first, "step 1/100000")
    before = metrics.read_text()
    status, out = _finish(_start(_main(workdir)))
    assert status == 1, out[-3000:]
    assert f"pid {first.pid}" in out and "is in use by another run" in out
    assert "ddep_jax.main: error:" in out
    first.send_signal(signal.SIGINT)
    status, out = _finish(first, seen)
    assert status == 75, out[-3000:]
    assert "SIGINT received" in out and metrics.read_text().startswith(before)
    saved = [int(s) for s in os.listdir(workdir / "checkpoints")]
    assert len(saved) == 1

    proc = _start(command)
    seen = _wait_for(proc, "Resumed from")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    status, out = _finish(proc, seen)
    assert status not in (0, 75), out[-3000:]

    assert (workdir / "run.lock").exists()  # left by the aborted run: stale
    proc = _start(command)
    seen = _wait_for(proc, f"step {saved[0] + 1}/100000")
    proc.send_signal(signal.SIGTERM)
    status, out = _finish(proc, seen)
    assert status == 75, out[-3000:]
    last = max(int(s) for s in os.listdir(workdir / "checkpoints"))
    steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines()]
    assert steps == list(range(1, last + 1)), "a step was lost or repeated"
    report = json.loads((workdir / "compile_report.json").read_text())["train_step"]
    assert report["flops_per_example"] > 0 and report["memory"]["peak"] > 0


def test_signal_during_final_evaluation_lets_it_finish(tmp_path, monkeypatch):
    """A SIGTERM that arrives during the final evaluation lets it finish
    within `final_eval_grace_seconds` (default 20 s): reports and done.json
    are written and the run is not 'preempted'. A run killed during its
    final evaluation redoes only the evaluation."""
    calls = []

    def evaluate(run, params, step, final):
        calls.append(step)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # the platform wants the machine
            time.sleep(0.2)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed mid-evaluation
        return {"validation": {"miou": 0.5, "step": step}}

    stage = ddep.stage
    monkeypatch.setattr(ddep, "stage", lambda *a, **k: dataclasses.replace(
        stage(*a, **k), evaluate=evaluate))
    config = tiny_config(total_steps=2)
    result = loop.run(config, str(tmp_path / "a"))
    assert calls == [2] and not result["preempted"]
    assert json.loads((tmp_path / "a" / "done.json").read_text())["eval"] == {
        "validation": {"miou": 0.5, "step": 2}}

    with pytest.raises(KeyboardInterrupt):
        loop.run(config, str(tmp_path / "b"))
    assert not (tmp_path / "b" / "done.json").exists()
    redo = loop.run(config, str(tmp_path / "b"))
    assert calls == [2, 2, 2] and redo["eval"]["validation"]["miou"] == 0.5
    assert redo["history"] == []  # no training step was redone
    assert (tmp_path / "b" / "done.json").exists()


def test_final_evaluation_longer_than_the_grace_period_is_stopped(tmp_path,
                                                                 monkeypatch):
    """A SIGTERM during a final evaluation that would take minutes: it is
    stopped `final_eval_grace_seconds` after the signal (not before: the
    splits it evaluated meanwhile are kept), the run returns as preempted
    (exit 75 from main) with no done.json, and a rerun on the workdir
    evaluates the saved last step without a training step. -1 lets it
    always finish."""
    calls, done_splits = [], []

    def evaluate(run, params, step, final):
        calls.append(step)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
            signalled = time.monotonic()
            for split in ("validation", "test"):  # 1.5 s each
                for _ in range(150):
                    time.sleep(0.01)
                done_splits.append((split, time.monotonic() - signalled))
            return {"test": {"miou": 0.1, "step": step}}
        return {"test": {"miou": 0.5, "step": step}}

    stage = ddep.stage
    monkeypatch.setattr(ddep, "stage", lambda *a, **k: dataclasses.replace(
        stage(*a, **k), evaluate=evaluate))
    config = tiny_config(total_steps=2, final_eval_grace_seconds=2.0)
    t0 = time.monotonic()
    result = loop.run(config, str(tmp_path / "a"))
    assert result["preempted"] and result["eval"] == {} and result["step"] == 2
    assert [s for s, _ in done_splits] == ["validation"], done_splits
    assert done_splits[0][1] < 2.0
    assert not (tmp_path / "a" / "done.json").exists()
    assert (tmp_path / "a" / "checkpoints" / "2").is_dir()
    redo = loop.run(config, str(tmp_path / "a"))
    assert calls == [2, 2] and not redo["preempted"] and redo["history"] == []
    assert json.loads((tmp_path / "a" / "done.json").read_text())["eval"] == {
        "test": {"miou": 0.5, "step": 2}}
    assert time.monotonic() - t0 < 300

    # -1: no bound, the evaluation ends and the run is not preempted.
    calls.clear()
    done_splits.clear()
    result = loop.run(tiny_config(total_steps=2, final_eval_grace_seconds=-1),
                      str(tmp_path / "b"))
    assert [s for s, _ in done_splits] == ["validation", "test"]
    assert not result["preempted"] and result["eval"]["test"]["miou"] == 0.1


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
                        lambda data, workdir=None: FailingSource(
                            make_source(data, workdir), after=20))
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
    config = tiny_config(total_steps=6, checkpoint_every=1)
    config.optimizer.learning_rate = 1e30  # the first update blows the decoder up
    with pytest.raises(FloatingPointError, match=r"at step 2\b") as err:
        loop.run(config, str(tmp_path / "a"))
    assert "No checkpoint was saved before it" in str(err.value)
    assert os.listdir(tmp_path / "a" / "checkpoints") == []
    assert os.listdir(tmp_path / "a" / "poisoned_checkpoints") == ["1"]

    # Warm-up: step 1 moves nothing (lr 0), later steps blow up.
    config.optimizer.warmup_steps = 3
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
    assert result["step"] == 6 and np.isfinite(result["loss"])
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


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
    """Defect 9: a damaged file in the newest checkpoint: it is named in one
    warning and set aside, the previous one is taken, and the run still ends
    bit-identical to an uninterrupted one."""
    config = tiny_config(total_steps=6, checkpoint_every=2)
    straight = loop.run(config, str(tmp_path / "straight"))
    workdir = tmp_path / "damaged"
    loop.run(config, str(workdir), stop_after_step=4)
    files = [p for p in (workdir / "checkpoints" / "4" / "state").rglob("*")
             if p.is_file()]
    biggest = max(files, key=lambda p: p.stat().st_size)
    biggest.write_bytes(b"\0" * biggest.stat().st_size)
    resumed = loop.run(config, str(workdir))
    warned = [r.getMessage() for r in caplog.records if "is unreadable" in r.getMessage()]
    assert len(warned) == 1 and "corrupt_checkpoints" in warned[0], warned
    assert [s for s, _ in resumed["history"]] == [3, 4, 5, 6]
    assert os.listdir(workdir / "corrupt_checkpoints") == ["4"]
    chex.assert_trees_all_equal(jax.device_get(resumed["state"]),
                                jax.device_get(straight["state"]))


_CLOSED_LOOP_CALLBACK = """
import asyncio, sys
import tensorstore as ts
from ddep_jax.checkpoints import store

def pending_read_completed_after_its_loop_closed():
    # What a damaged checkpoint's abandoned reads do: an asyncio task awaits a
    # TensorStore future, Orbax closes the loop, the read completes later and
    # its callback calls loop.call_soon_threadsafe on the closed loop.
    promise, future = ts.Promise.new()
    loop = asyncio.new_event_loop()
    async def read():
        return await future
    async def start():
        asyncio.ensure_future(read())
        await asyncio.sleep(0.01)
    loop.run_until_complete(start())
    loop.close()
    promise.set_result(1)

class Other:
    def __del__(self):
        raise ValueError("an unrelated error")

pending_read_completed_after_its_loop_closed()
print("--- filter", file=sys.stderr, flush=True)
if sys.argv[1] == "damaged":
    try:
        with store._quiet_read_errors([]):
            raise TypeError("a damaged manifest")
    except TypeError:
        pass
pending_read_completed_after_its_loop_closed()
Other()
"""


@pytest.mark.parametrize("read", ["damaged", "clean"])
def test_closed_loop_callbacks_of_a_damaged_checkpoint_print_nothing(read):
    """A damaged checkpoint's pending TensorStore reads complete after Orbax
    closed their event loop and report 'RuntimeError: Event loop is closed'
    through sys.unraisablehook (a bare traceback each: dozens around the
    one warning). After a read that failed, exactly those are dropped for
    the rest of the process; other unraisable errors are still printed; a
    read that succeeded changes nothing."""
    out = subprocess.run([sys.executable, "-c", _CLOSED_LOOP_CALLBACK, read], cwd=REPO,
                         env=subprocess_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    before, after = out.stderr.split("--- filter")
    assert "RuntimeError: Event loop is closed" in before, out.stderr
    assert "call_soon_threadsafe" in before
    assert ("Event loop is closed" in after) == (read == "clean"), after
    assert "ValueError: an unrelated error" in after


def test_metrics_after_a_resume_hold_every_step_once_and_a_rerun_does_nothing(tmp_path):
    """Defect 10: lines written after the last checkpoint (a killed run) are
    cut on resume; loss_history.json holds the whole run. Defect 11: running
    the finished run again does nothing (no recompile, no 'loss nan')."""
    import shutil

    config = tiny_config(total_steps=5, checkpoint_every=2)
    loop.run(config, str(tmp_path), stop_after_step=3)
    shutil.rmtree(tmp_path / "checkpoints" / "3")  # as if killed after step 3
    finished = loop.run(config, str(tmp_path))
    steps = [json.loads(l)["step"] for l in
             (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    history = json.loads((tmp_path / "loss_history.json").read_text())
    assert [s for s, _ in history] == [1, 2, 3, 4, 5]

    report = (tmp_path / "compile_report.json").stat().st_mtime_ns
    again = loop.run(config, str(tmp_path))
    assert again["already_finished"] and again["step"] == 5
    assert again["loss"] == finished["loss"] and again["history"] == []
    assert (tmp_path / "compile_report.json").stat().st_mtime_ns == report


def test_concurrent_atomic_writes_of_one_file(tmp_path):
    """writers.write_bytes from two threads at once (harness invocations
    sharing OUT rewrite results.jsonl): each write is whole, none raises, no
    temporary file is left; the file is readable by others (0o644)."""
    import threading

    from ddep_jax.common import writers

    path = str(tmp_path / "results.jsonl")
    errors = []

    def write(text):
        try:
            for _ in range(300):
                writers.write_bytes(path, text.encode())
        except Exception as e:  # noqa: BLE001 - the test reports it
            errors.append(e)

    threads = [threading.Thread(target=write, args=(c * 5000,)) for c in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert open(path).read() in ("a" * 5000, "b" * 5000)
    assert os.listdir(tmp_path) == ["results.jsonl"]
    assert os.stat(path).st_mode & 0o777 == 0o644


def test_resume_on_another_process_count_is_refused_naming_both_layouts(tmp_path):
    """A checkpoint written by 2 processes (its data iterators saved as
    process_<i>-of-2.json) resumed by 1 process: refused with both layouts
    and the ways out, not a missing-file error; nothing in the workdir is
    changed."""
    config = tiny_config(total_steps=4, checkpoint_every=2)
    workdir = tmp_path / "run"
    loop.run(config, str(workdir), stop_after_step=2)
    data_iter = workdir / "checkpoints" / "2" / "data_iter"
    one = data_iter / "process_0-of-1.json"
    text = one.read_text()
    one.unlink()
    for i in range(2):  # as a 2-process run leaves it
        (data_iter / f"process_{i}-of-2.json").write_text(text)
    before = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
    with pytest.raises(ValueError, match=r"written by 2 process\(es\).*this run has 1 "
                                         r"process\(es\) x \d+ local device"):
        loop.run(config, str(workdir))
    try:
        loop.run(config, str(workdir))
    except ValueError as e:
        assert "Resume with 2 process(es)" in str(e) and "init.checkpoint=" in str(e)
    after = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
    assert [p for p in before if p not in after] == []  # nothing lost


def test_a_workdir_on_a_read_only_disk_gets_one_clear_message(tmp_path):
    """A fresh workdir that cannot be created (here under /sys, which refuses
    even root) ends with the same kind of message as an existing read-only
    one: what could not be written, and what to check; no raw OSError."""
    proc = subprocess.run(_main("/sys/ddep_jax_test/work", overrides={"total_steps": 1}),
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode not in (0, 75), out[-2000:]
    assert "cannot create the workdir /sys/ddep_jax_test/work" in out, out[-2000:]
    assert "Traceback" not in out, out[-3000:]
