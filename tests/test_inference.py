"""Evaluation protocols against hand computations with known logits functions."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from PIL import Image

from ddep_jax.evaluation import visualize
from ddep_jax.evaluation import inference as I

C = 4
RNG = np.random.default_rng(0)
W_COLOR = RNG.normal(size=(3, C)).astype(np.float32)   # logits = x @ W + b (+ ...)
B = RNG.normal(size=(C,)).astype(np.float32)
A_RAMP = np.array([0.9, -0.6, 0.3, 0.0], np.float32)    # per-class slope over columns
V_MEAN = RNG.normal(size=(3, C)).astype(np.float32) * 3.0


def _check_input(x):
    assert x.ndim == 4 and x.shape[-1] == 3
    assert x.shape[1] % 16 == 0 and x.shape[2] % 16 == 0, x.shape


def linear_ramp_fn(x):
    """Per-pixel linear map of the colours plus a ramp over the absolute column:
    not flip-symmetric, and padding at the bottom/right leaves other pixels as is."""
    _check_input(x)
    col = jnp.arange(x.shape[2], dtype=jnp.float32)[None, None, :, None] / 8.0
    return x @ W_COLOR + B + A_RAMP * col


def window_mean_fn(x):
    """Linear + ramp + a term from the mean colour of each (whole) input image."""
    _check_input(x)
    mean = jnp.mean(x, axis=(1, 2), keepdims=True)
    return linear_ramp_fn(x) + mean @ V_MEAN


def np_linear_ramp(x):
    """numpy version of `linear_ramp_fn` on one unpadded image [h, w, 3]."""
    col = np.arange(x.shape[1], dtype=np.float32)[None, :, None] / 8.0
    return x @ W_COLOR + B + A_RAMP * col


def np_window_mean(x):
    return np_linear_ramp(x) + x.mean(axis=(0, 1)) @ V_MEAN


def np_softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def resize(x, hw):
    x = np.asarray(x, np.float32)
    return np.asarray(jax.image.resize(x, tuple(hw) + x.shape[2:], "bilinear",
                                       antialias=True))


def image(h, w, seed=1):
    return np.random.default_rng(seed).uniform(-1, 1, size=(h, w, 3)).astype(np.float32)


def test_multiscale_flip_equals_hand_computation():
    h, w = 20, 27   # not multiples of 16: every scale goes through padding
    img = image(h, w)
    scales = (0.75, 1.0, 1.75)   # a subset of the paper's, to keep compiles few
    expected = np.zeros((h, w, C), np.float32)
    no_flip_back = np.zeros((h, w, C), np.float32)
    for s in scales:
        size = (int(np.floor(h * s + 0.5)), int(np.floor(w * s + 0.5)))
        x = resize(img, size)
        for flipped in (False, True):
            xi = x[:, ::-1] if flipped else x
            p = np_softmax(np_linear_ramp(xi))
            no_flip_back += resize(p, (h, w)) / (2 * len(scales))
            if flipped:
                p = p[:, ::-1]
            expected += resize(p, (h, w)) / (2 * len(scales))
    assert I.PAPER_SCALES == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # the default
    got = np.asarray(I.predict(linear_ramp_fn, img, C, "multiscale", scales=scales))
    assert got.shape == (h, w, C) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=2e-5)
    # The model is not flip-symmetric: forgetting to flip back would be caught.
    assert np.abs(no_flip_back - expected).max() > 1e-2


def test_whole_single_scale_and_odd_size():
    h, w = 17, 23
    img = image(h, w, seed=2)
    got = np.asarray(I.predict_whole(linear_ramp_fn, img, C))
    np.testing.assert_allclose(got, np_softmax(np_linear_ramp(img)), atol=1e-5)
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
    got = np.asarray(I.predict_whole(linear_ramp_fn, img, C, scale=0.6, flip=True))
    x = resize(img, (10, 14))
    p = 0.5 * (np_softmax(np_linear_ramp(x)) + np_softmax(np_linear_ramp(x[:, ::-1]))[:, ::-1])
    np.testing.assert_allclose(got, resize(p, (h, w)), atol=1e-5)


def test_cityscapes_halves_equal_hand_concatenation():
    h, w = 32, 64   # halves 32x32: no padding, so the window mean is exact
    img = image(h, w, seed=3)
    halves = []
    for half in (img[:, :32], img[:, 32:]):
        p = np_softmax(np_window_mean(half))
        pf = np_softmax(np_window_mean(half[:, ::-1]))[:, ::-1]
        halves.append(0.5 * (p + pf))
    expected = np.concatenate(halves, axis=1)
    got = np.asarray(I.predict(window_mean_fn, img, C, "cityscapes"))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    got = np.asarray(I.predict(window_mean_fn, img, C, "sliding", window=(32, 32),
                               stride=32, flip=True))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # Whole-image prediction differs (the output depends on the window).
    whole = np.asarray(I.predict_whole(window_mean_fn, img, C, flip=True))
    assert np.abs(whole - expected).max() > 1e-2


def test_sliding_overlap_and_border_windows():
    h, w = 20, 40
    img = image(h, w, seed=4)
    # window 16x24, stride (8, 16): rows start 0 and 4 (last shifted back to the
    # border), columns 0 and 16; windows are padded to 16x32 for the model.
    total = np.zeros((h, w, C), np.float32)
    count = np.zeros((h, w, 1), np.float32)
    for y in (0, 4):
        for x in (0, 16):
            win = img[y:y + 16, x:x + 24]
            p = 0.5 * (np_softmax(np_linear_ramp(win))
                       + np_softmax(np_linear_ramp(win[:, ::-1]))[:, ::-1])
            total[y:y + 16, x:x + 24] += p
            count[y:y + 16, x:x + 24] += 1
    got = np.asarray(I.predict_sliding(linear_ramp_fn, img, C, window=(16, 24),
                                       stride=(8, 16), flip=True))
    np.testing.assert_allclose(got, total / count, atol=1e-5)


def test_image_smaller_than_window():
    img = image(10, 13, seed=5)
    got = np.asarray(I.predict_sliding(window_mean_fn, img, C, window=(64, 64)))
    whole = np.asarray(I.predict_whole(window_mean_fn, img, C, flip=True))
    np.testing.assert_allclose(got, whole, atol=1e-6)
    assert got.shape == (10, 13, C)


def test_pad_and_crop():
    x = jnp.ones((2, 17, 33, 3))
    padded, size = I.pad_to_multiple(x, 16)
    assert padded.shape == (2, 32, 48, 3) and size == (17, 33)
    assert float(padded[:, 17:].sum()) == 0.0 and float(padded[:, :, 33:].sum()) == 0.0
    np.testing.assert_array_equal(np.asarray(I.crop_to(padded, size)), np.asarray(x))
    same, _ = I.pad_to_multiple(jnp.ones((32, 16, 3)), 16)
    assert same.shape == (32, 16, 3)


def test_errors():
    img = image(16, 16)
    with pytest.raises(ValueError, match=r"unknown evaluation mode 'tiles'.*'whole'"):
        I.predict(linear_ramp_fn, img, C, "tiles")
    with pytest.raises(ValueError, match="expected"):
        I.predict_whole(linear_ramp_fn, img, C + 1)
    with pytest.raises(ValueError, match="one float32"):
        I.predict_whole(linear_ramp_fn, img[None], C)
    with pytest.raises(ValueError, match="scales"):
        I.predict_multiscale(linear_ramp_fn, img, C, scales=())
    with pytest.raises(ValueError, match="scale"):
        I.predict_whole(linear_ramp_fn, img, C, scale=0.0)
    with pytest.raises(ValueError, match="stride"):
        I.predict_sliding(linear_ramp_fn, img, C, window=(8, 8), stride=0)


def test_segmentation_panel(tmp_path):
    palette = np.zeros((256, 3), np.uint8)
    palette[:3] = [[255, 0, 0], [0, 255, 0], [0, 0, 255]]
    labels = np.array([[0, 1], [2, 255]], np.uint8)
    rgb = visualize.colorize(labels, palette[:3])
    np.testing.assert_array_equal(rgb[1, 1], [0, 0, 0])          # void -> black
    np.testing.assert_array_equal(rgb[0, 1], [0, 255, 0])
    img = np.full((2, 2, 3), 100, np.uint8)
    ov = visualize.overlay(img, rgb, 0.5, void_mask=labels == 255)
    np.testing.assert_array_equal(ov[0, 0], [178, 50, 50])
    np.testing.assert_array_equal(ov[1, 1], [100, 100, 100])
    path = tmp_path / "panel.png"
    visualize.save_segmentation_panel(str(path), img, labels.clip(0, 2), labels, palette)
    assert Image.open(path).size == (4 * 2 + 5 * 2, 2 + 4)
    # With class names: the same panels above a legend (widened to fit it).
    visualize.save_segmentation_panel(str(path), img, labels.clip(0, 2), labels,
                                      palette, class_names=["red", "green", "blue"])
    with_legend = np.asarray(Image.open(path).convert("RGB"))
    assert with_legend.shape[0] > 2 + 4 and with_legend.shape[1] > 4 * 2 + 5 * 2
    legend = with_legend[2 + 4:]
    colors = {tuple(c) for c in legend.reshape(-1, 3)}
    assert {(255, 0, 0), (0, 255, 0), (0, 0, 255)} <= colors
    with pytest.raises(ValueError, match="no name"):
        visualize.save_segmentation_panel(str(path), img, labels.clip(0, 2), labels,
                                          palette, class_names=["r"],
                                          legend_classes=[2])
