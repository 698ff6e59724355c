"""The worked example of the Python API (examples/quickstart.py) runs, on the
embedded photographs and real CamVid pairs, and prints what it claims."""

import subprocess
import sys

import numpy as np
import pytest
from conftest import COMPILE_FAST_FLAGS, REPO, subprocess_env
from PIL import Image


def test_quickstart_example_runs(tmp_path, camvid_dir):
    """Executed as a user runs it (a child process on one CPU device)."""
    out = subprocess.run(
        [sys.executable, str(REPO / "examples" / "quickstart.py"),
         f"--workdir={tmp_path}", "--pretrain_steps=3", "--finetune_steps=3",
         "--tiny", f"--camvid={camvid_dir}"],
        env=subprocess_env(XLA_FLAGS=COMPILE_FAST_FLAGS), cwd=str(tmp_path),
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "DDeP: 3 steps" in out.stdout
    assert "Fine-tuned 3 steps on 15 of 60 labelled pairs" in out.stdout
    assert "on 20 images" in out.stdout
    overlay = np.asarray(Image.open(tmp_path / "overlay.png"))
    assert overlay.shape == (360, 480, 3)
    assert (tmp_path / "finetune" / "done.json").exists()


def test_segmenter_errors_are_named(tmp_path):
    from ddep_jax import api

    with pytest.raises(FileNotFoundError, match="config.json"):
        api.load_segmenter(str(tmp_path))
    with pytest.raises(ValueError, match="mode='nope'"):
        api.load_segmenter(str(tmp_path), mode="nope")
