"""Stage 1 (classifier pretraining) and the stage-1 -> stage-2 encoder hand-over.

Real data: a 16-per-class subset of ../shared/data/cifar10/test.tar.gz, laid
out as the builder's two accepted forms (a tar.gz and a folder) in a temporary
manual directory.
"""

import io
import json
import os

import jax
import numpy as np
import pytest
from conftest import PER_CLASS, tiny_classify_config, tiny_config
from PIL import Image

from ddep_jax.checkpoints import handover
from ddep_jax.data import class_datasets, pipeline
from ddep_jax.objectives.classification import classification_loss
from ddep_jax.trainers import loop
from ddep_jax.data.builders import cifar10_jpeg
from ddep_jax.models import to_float_images
from ddep_jax.models.classifier import build_classifier

def test_cifar10_builder_matches_the_files(cifar_subset):
    _, data_dir, picked = cifar_subset
    for split in ("train", "test"):
        records = class_datasets.open_split(_spec(), split, data_dir)
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
        classification_loss(logits, labels, "softmax", s),
        np.mean(-(targets * logp).sum(-1)), rtol=1e-5)
    p = 1 / (1 + np.exp(-logits))
    bce = -(targets * np.log(p) + (1 - targets) * np.log(1 - p))
    np.testing.assert_allclose(
        classification_loss(logits, labels, "sigmoid", s),
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
    check = class_datasets.CheckLabel(10, "cifar10_jpeg train")
    with pytest.raises(ValueError, match=r"'cat/0001.jpg' has label 12"):
        check({"label": 12, "file_name": b"cat/0001.jpg"})


def _spec():
    return class_datasets.get_spec("cifar10")


def test_stage1_trains_resumes_and_hands_its_encoder_to_stage2(cifar_subset, tmp_path):
    _, data_dir, _ = cifar_subset
    stage1 = str(tmp_path / "stage1")
    config = tiny_classify_config(data_dir)
    first = loop.run(config, stage1, stop_after_step=1)
    assert first["step"] == 1 and first["eval"] == {}
    result = loop.run(config, stage1)  # resumes
    assert [s for s, _ in result["history"]] == [2]
    report = result["eval"]["test"]
    assert report["num_examples"] == 10 * PER_CLASS
    # The same figures computed here from the checkpoint's model and the test
    # records (32x32, eval_crop_fraction 1: the images go in unchanged).
    model = build_classifier(config.model, 10)
    records = class_datasets.open_split(_spec(), "test", data_dir)
    images = np.stack([records[i]["image"] for i in range(len(records))])
    labels = np.array([records[i]["label"] for i in range(len(records))])
    logits = np.asarray(jax.jit(model.apply)({"params": jax.device_get(
        result["state"]["params"])}, to_float_images(images)))
    top5 = np.argsort(-logits, axis=-1, kind="stable")[:, :5]
    # At most one image may differ (a near-tie resolved by float rounding of
    # another batch size).
    one = 1 / len(labels) + 1e-9
    assert abs(report["top1"] - np.mean(top5[:, 0] == labels)) <= one
    assert abs(report["top5"] - np.mean((top5 == labels[:, None]).any(-1))) <= one
    with open(os.path.join(stage1, "eval", "test_00000002.json")) as f:
        assert json.load(f)["top1"] == report["top1"]
    saved = handover.read_collection(os.path.join(stage1, "checkpoints", "2", "state"))

    # Stage 2 (DDeP, frozen encoder) from the stage-1 workdir.
    stage2 = str(tmp_path / "stage2")
    ddep = tiny_config(total_steps=1, **{"init.checkpoint": stage1})
    out = loop.run(ddep, stage2)
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
        loop.run(other, str(tmp_path / "other"))
    assert not os.path.exists(tmp_path / "other" / "checkpoints" / "1")
