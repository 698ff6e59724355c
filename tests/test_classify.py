"""Stage 1 (classifier pretraining) and the stage-1 -> stage-2 encoder hand-over.

Real data: a 16-per-class subset of ../shared/data/cifar10/test.tar.gz, laid
out as the builder's two accepted forms (a tar.gz and a folder) in a temporary
manual directory.
"""

import io
import json
import os
import tarfile

import jax
import numpy as np
import pytest
from conftest import SHARED_DATA, apply_overrides, tiny_config
from PIL import Image

from ddep_jax import classify, handover, train
from ddep_jax.data import pipeline, prepare
from ddep_jax.data.builders import cifar10_jpeg

PER_CLASS = 8


def _write_tar(path, members: dict[str, bytes]):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="session")
def cifar_subset(tmp_path_factory):
    """(manual_dir, data_dir, {split: {member: bytes}}): 8 real test images per
    class as `train.tar.gz`, the next 8 as a `test/` folder, prepared once."""
    archive = SHARED_DATA / "cifar10" / "test.tar.gz"
    if not archive.is_file():
        pytest.skip(f"CIFAR-10 not found at {archive}: put the shared data beside "
                    "the repo (../shared/data/cifar10) to run real-data tests.")
    picked = {"train": {}, "test": {}}
    counts = dict.fromkeys(cifar10_jpeg.CLASS_NAMES, 0)
    with tarfile.open(archive) as tar:
        for member in tar:
            cls = member.name.split("/")[0]
            if not member.isfile() or counts[cls] >= 2 * PER_CLASS:
                continue
            split = "train" if counts[cls] < PER_CLASS else "test"
            picked[split][member.name] = tar.extractfile(member).read()
            counts[cls] += 1
    manual = tmp_path_factory.mktemp("cifar_manual")
    _write_tar(manual / "train.tar.gz", picked["train"])
    for name, data in picked["test"].items():
        (manual / "test" / name).parent.mkdir(parents=True, exist_ok=True)
        (manual / "test" / name).write_bytes(data)
    data_dir = tmp_path_factory.mktemp("cifar_tfds")
    prepare.prepare("cifar10_jpeg", manual, data_dir)
    return manual, str(data_dir), picked


def test_cifar10_builder_matches_the_files(cifar_subset):
    _, data_dir, picked = cifar_subset
    for split in ("train", "test"):
        records = classify.open_split(_classify_config(data_dir), _spec(), split)
        assert len(records) == 10 * PER_CLASS
        for i in range(len(records)):
            r = records[i]
            name = r["file_name"].decode()
            assert r["label"] == cifar10_jpeg.CLASS_NAMES.index(name.split("/")[0])
            expected = np.asarray(Image.open(io.BytesIO(picked[split][name])))
            np.testing.assert_array_equal(r["image"], expected)  # stored unchanged


def test_cifar10_builder_errors(cifar_subset, tmp_path):
    manual, _, picked = cifar_subset
    name, data = next(iter(picked["test"].items()))
    bad = tmp_path / "bad"
    (bad / "test" / "tiger").mkdir(parents=True)
    (bad / "test" / "tiger" / "0001.jpg").write_bytes(data)
    files = cifar10_jpeg.find_split(bad, "test")
    with pytest.raises(ValueError, match=r"tiger/0001.jpg.*'tiger' is not a CIFAR"):
        list(cifar10_jpeg.iter_examples(files, "test"))
    big = tmp_path / "big"
    (big / "test" / "cat").mkdir(parents=True)
    Image.new("RGB", (33, 32)).save(big / "test" / "cat" / "0001.jpg")
    with pytest.raises(ValueError, match=r"cat/0001.jpg is 33x32 pixels"):
        list(cifar10_jpeg.iter_examples(cifar10_jpeg.find_split(big, "test"), "test"))
    with pytest.raises(FileNotFoundError, match="'train' not found"):
        cifar10_jpeg.find_split(big, "train")


def test_classification_loss_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 5)).astype(np.float32)
    labels = rng.integers(0, 5, size=6)
    s = 0.1
    targets = np.eye(5)[labels] * (1 - s) + s / 5
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(
        classify.classification_loss(logits, labels, "softmax", s),
        np.mean(-(targets * logp).sum(-1)), rtol=1e-5)
    p = 1 / (1 + np.exp(-logits))
    bce = -(targets * np.log(p) + (1 - targets) * np.log(1 - p))
    np.testing.assert_allclose(
        classify.classification_loss(logits, labels, "sigmoid", s),
        np.mean(bce.sum(-1)), rtol=1e-5)


def test_resize_centre_crop():
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, 38:42] = 255  # a centred vertical bar
    out = pipeline.resize_centre_crop(image, (16, 16), 0.5)  # shorter side -> 32
    assert out.shape == (16, 16, 3)
    assert out[:, 6:10].mean() > 200 and out[:, :4].max() == 0
    same = pipeline.resize_centre_crop(image[:32, :32], (32, 32), 1.0)
    np.testing.assert_array_equal(same, image[:32, :32])


def test_bad_label_names_the_record():
    check = classify.CheckLabel(10, "cifar10_jpeg train")
    with pytest.raises(ValueError, match=r"'cat/0001.jpg' has label 12"):
        check({"label": 12, "file_name": b"cat/0001.jpg"})


def _spec():
    from ddep_jax.data import class_datasets

    return class_datasets.get_spec("cifar10")


def _classify_config(data_dir, **overrides):
    from ddep_jax.config_lib import classify_config

    c = classify_config()
    c.model.encoder.update(tiny_config().model.encoder.to_dict())
    c.data.update(name="cifar10", data_dir=data_dir, image_size=(32, 32),
                  eval_crop_fraction=1.0, num_threads=1, prefetch=1)
    c.eval.update(splits=("test",), batch_size=32)
    c.update(batch_size=8, total_steps=2, log_every=1, checkpoint_every=1)
    c.optimizer.update(learning_rate=1e-3, warmup_steps=0)
    c.mesh.data = 1
    return apply_overrides(c, overrides)


def test_stage1_trains_resumes_and_hands_its_encoder_to_stage2(cifar_subset, tmp_path):
    _, data_dir, _ = cifar_subset
    stage1 = str(tmp_path / "stage1")
    config = _classify_config(data_dir)
    first = classify.classify_and_evaluate(config, stage1, stop_after_step=1)
    assert first["step"] == 1 and first["eval"] == {}
    result = classify.classify_and_evaluate(config, stage1)  # resumes
    assert [s for s, _ in result["history"]] == [2]
    report = result["eval"]["test"]
    assert report["num_examples"] == 10 * PER_CLASS and 0 <= report["top1"] <= 1
    assert report["top1"] <= report["top5"]
    with open(os.path.join(stage1, "eval", "test_00000002.json")) as f:
        assert json.load(f)["top1"] == report["top1"]
    saved = handover.read_collection(os.path.join(stage1, "checkpoints", "2", "state"))

    # Stage 2 (DDeP, frozen encoder) from the stage-1 workdir.
    stage2 = str(tmp_path / "stage2")
    ddep = tiny_config(total_steps=1, **{"init.checkpoint": stage1})
    out = train.train_and_evaluate(ddep, stage2)
    jax.tree.map(np.testing.assert_array_equal, saved,
                 jax.device_get(out["state"]["params"]["encoder"]))
    with open(os.path.join(stage2, "init.json")) as f:
        record = json.load(f)
    assert record["collections"] == ["encoder"] and record["step"] == 2
    assert record["source_init"]["stage"] == "classify"
    check = handover.check_encoder_chain(stage2)
    assert check["identical"] and check["num_arrays"] == len(jax.tree.leaves(saved))

    # Another architecture's encoder is refused with every mismatch listed.
    other = tiny_config(total_steps=1, **{"init.checkpoint": stage1,
                                          "model.encoder.resnet_width": 16})
    with pytest.raises(ValueError, match=r"shape encoder/conv_root/kernel: "
                                         r"checkpoint \(7, 7, 3, 8\) vs model"):
        train.train_and_evaluate(other, str(tmp_path / "other"))
    assert not os.path.exists(tmp_path / "other" / "checkpoints" / "1")
