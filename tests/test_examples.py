"""The worked example of the Python API (examples/quickstart.py) runs, on the
embedded photographs and real CamVid pairs, and prints what it claims."""

import runpy
import sys

import numpy as np
import pytest
from conftest import REPO
from PIL import Image


def test_quickstart_example_runs(tmp_path, camvid_dir, monkeypatch, capsys):
    argv = ["quickstart.py", f"--workdir={tmp_path}", "--pretrain_steps=3",
            "--finetune_steps=3", "--tiny", f"--camvid={camvid_dir}"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(REPO / "examples" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "DDeP: 3 steps" in out
    assert "Fine-tuned 3 steps on 15 of 60 labelled pairs" in out
    assert "on 20 images" in out
    overlay = np.asarray(Image.open(tmp_path / "overlay.png"))
    assert overlay.shape == (360, 480, 3)
    # The example's workdirs are ordinary ones: a second run resumes nothing.
    assert (tmp_path / "finetune" / "done.json").exists()


def test_segmenter_rejects_a_non_rgb_array(tmp_path):
    from ddep_jax import api

    with pytest.raises(FileNotFoundError, match="config.json"):
        api.load_segmenter(str(tmp_path))
    with pytest.raises(ValueError, match="mode='nope'"):
        api.load_segmenter(str(tmp_path), mode="nope")
