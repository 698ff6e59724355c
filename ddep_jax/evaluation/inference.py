"""Evaluation protocols: whole image, multi-scale + flip, sliding window.

DDeP Sec. 5.1 ("Training details", evaluation paragraph):

* Cityscapes: the full 1024x2048 image is split into two 1024x1024 halves,
  each half is averaged with its horizontal flip, and the two halves are
  concatenated (`predict_cityscapes_halves`, mode ``'cityscapes'``; the same
  as `predict_sliding` with ``window=(1024, 1024)``, stride 1024, flip).
* ADE20K and Pascal Context: multi-scale (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
  with horizontal flip (`predict_multiscale`, mode ``'multiscale'``).

Everything here is model-agnostic: the model is a callable
``logits_fn(images) -> logits`` taking float32 ``[N, h, w, 3]`` images
(already normalised by the caller) whose ``h, w`` are multiples of
``size_multiple`` (16 by default: the ViT patch grid at 1/16) and returning
float32 ``[N, h, w, C]`` logits at the input resolution. Inputs of other sizes
are padded at the bottom/right with 0.0 (`pad_to_multiple`) and the outputs
cropped back. ``logits_fn`` may be jitted; it is then compiled once per input
shape (jit's shape cache), so data sets with a few image sizes compile a few
times.

All protocols average class *probabilities* (softmax of the logits), not
logits, over flips, scales and overlapping windows. Resizing is bilinear
(``jax.image.resize``, half-pixel centres, antialiased when shrinking, like
the PIL bilinear resize of the training pipeline); probabilities are resized back to the original
image resolution before averaging. Each function returns float32
``[H, W, C]`` probabilities of ONE image; take ``argmax(-1)`` for the labels.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

LogitsFn = Callable[[jax.Array], jax.Array]
"""float32 [N, h, w, 3] -> float32 [N, h, w, C], h and w multiples of size_multiple."""

EVAL_MODES = ("whole", "sliding", "cityscapes", "multiscale")
"""Valid ``mode`` values of `predict`."""

PAPER_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
"""Multi-scale evaluation scales of DDeP Sec. 5.1 (ADE20K, Pascal Context)."""


def pad_to_multiple(images: jax.Array | np.ndarray, multiple: int,
                    value: float = 0.0) -> tuple[jax.Array, tuple[int, int]]:
    """Pads height and width at the bottom / right up to multiples of `multiple`.

    The pad value 0.0 is the centre of the usual normalised input range (mid
    grey for images in [-1, 1]); the padded outputs are cropped away by
    `crop_to`, but a model with global context (ViT attention) still sees the
    padding, so results near a padded border can differ slightly from an
    unpadded run of the same content.

    Args:
      images: [..., H, W, K] (e.g. [N, H, W, 3]); the last three axes are
        height, width, channels.
      multiple: positive int.
      value: pad value.

    Returns:
      (padded jax array [..., ceil(H/m)*m, ceil(W/m)*m, K], (H, W)).

    Raises:
      ValueError: `images` has fewer than 3 dimensions or `multiple` < 1.
    """
    images = jnp.asarray(images)
    if images.ndim < 3:
        raise ValueError(f"images must be [..., H, W, K], got shape {images.shape}.")
    if int(multiple) < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}.")
    h, w = images.shape[-3], images.shape[-2]
    ph = -h % multiple
    pw = -w % multiple
    if ph or pw:
        pad = [(0, 0)] * (images.ndim - 3) + [(0, ph), (0, pw), (0, 0)]
        images = jnp.pad(images, pad, constant_values=value)
    return images, (h, w)


def crop_to(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Crops [..., H', W', K] to the top-left [..., h, w, K] (undoes `pad_to_multiple`)."""
    h, w = size
    return x[..., :h, :w, :]


def _scaled_size(h: int, w: int, scale: float) -> tuple[int, int]:
    """Round-half-up of (h*scale, w*scale), at least 1."""
    return (max(1, int(math.floor(h * scale + 0.5))),
            max(1, int(math.floor(w * scale + 0.5))))


def _resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Bilinear resize of the two spatial axes of [..., H, W, K]; antialiased
    when shrinking (as PIL's bilinear resize in training), exact when growing."""
    if tuple(x.shape[-3:-1]) == tuple(size):
        return x
    return jax.image.resize(x, x.shape[:-3] + tuple(size) + x.shape[-1:],
                            method="bilinear", antialias=True)


def _check_image(image: Any) -> jax.Array:
    image = jnp.asarray(image, jnp.float32)
    if image.ndim != 3:
        raise ValueError(f"image must be one float32 [H, W, 3] array, got shape "
                         f"{image.shape} (call per image, not per batch).")
    return image


@functools.partial(jax.jit, static_argnames=("size", "flip", "multiple"))
def _prepare(images: jax.Array, size: tuple[int, int], flip: bool,
             multiple: int) -> jax.Array:
    """[N, H, W, K] -> resized to `size`, (with `flip`: + flipped copies,
    [2N, ...]), padded to `multiple`. Jitted: one compile per shape/setting."""
    images = _resize(images, size)
    if flip:
        images = jnp.concatenate([images, images[:, :, ::-1, :]], axis=0)
    return pad_to_multiple(images, multiple)[0]


@functools.partial(jax.jit, static_argnames=("size", "out_size", "flip"))
def _finish(logits: jax.Array, size: tuple[int, int], out_size: tuple[int, int],
            flip: bool) -> jax.Array:
    """Logits [N', h', w', C] -> cropped to `size`, softmax, flip-averaged
    ([N, ...]), resized to `out_size`. Jitted: one compile per shape/setting."""
    probs = jax.nn.softmax(crop_to(logits.astype(jnp.float32), size), axis=-1)
    if flip:
        n = probs.shape[0] // 2
        probs = 0.5 * (probs[:n] + probs[n:, :, ::-1, :])
    return _resize(probs, out_size)


def _batch_probs(logits_fn: LogitsFn, images: jax.Array, num_classes: int,
                 flip: bool, size_multiple: int,
                 size: tuple[int, int] | None = None) -> jax.Array:
    """Probabilities [N, H, W, C] of images [N, H, W, K], run at `size`.

    The images are resized to `size` (default: unchanged), padded to
    `size_multiple` and, with `flip`, run in the same `logits_fn` call as their
    horizontal flips (batch 2N); the probabilities are cropped, flipped back,
    averaged and resized back to ``H, W``.

    Raises:
      ValueError: `logits_fn` returned a shape other than [N', h', w', C] for
        its padded input [N', h', w', K], or `size_multiple` < 1.
    """
    if int(size_multiple) < 1:
        raise ValueError(f"size_multiple must be >= 1, got {size_multiple}.")
    out_size = tuple(images.shape[1:3])
    size = out_size if size is None else tuple(size)
    padded = _prepare(images, size, bool(flip), int(size_multiple))
    logits = jnp.asarray(logits_fn(padded))
    expected = padded.shape[:3] + (num_classes,)
    if tuple(logits.shape) != expected:
        raise ValueError(f"logits_fn returned shape {tuple(logits.shape)} for input "
                         f"{tuple(padded.shape)}; expected {expected} (logits at the "
                         f"input resolution, num_classes={num_classes}).")
    return _finish(logits, size, out_size, bool(flip))


def predict_whole(logits_fn: LogitsFn, image: jax.Array | np.ndarray, num_classes: int,
                  scale: float = 1.0, flip: bool = False,
                  size_multiple: int = 16) -> jax.Array:
    """Class probabilities of one image at one scale, optionally flip-averaged.

    Steps: resize the image by `scale` (bilinear; target size
    ``floor(H*scale + 0.5), floor(W*scale + 0.5)``, at least 1), pad to a
    multiple of `size_multiple`, run `logits_fn` (with `flip`: on the image and
    its horizontal flip in one batch of 2), crop the padding, softmax, flip the
    flipped probabilities back and average, resize the probabilities
    (bilinear) back to ``H, W``.

    Args:
      logits_fn: float32 [N, h, w, 3] -> float32 [N, h, w, C].
      image: float32 [H, W, 3], normalised as the model expects.
      num_classes: C.
      scale: positive resize factor.
      flip: also average with the horizontally flipped image.
      size_multiple: h and w passed to `logits_fn` are multiples of this.

    Returns:
      float32 [H, W, C] probabilities (each pixel sums to 1).

    Raises:
      ValueError: `image` is not 3-D, `scale` <= 0, or `logits_fn` returns a
        wrong shape.
    """
    image = _check_image(image)
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}.")
    h, w = image.shape[:2]
    return _batch_probs(logits_fn, image[None], num_classes, flip, size_multiple,
                        size=_scaled_size(h, w, scale))[0]


def predict_multiscale(logits_fn: LogitsFn, image: jax.Array | np.ndarray,
                       num_classes: int, scales: Sequence[float] = PAPER_SCALES,
                       flip: bool = True, size_multiple: int = 16) -> jax.Array:
    """Multi-scale (+ flip) probabilities: the ADE20K / Pascal Context protocol.

    The mean over `scales` of `predict_whole` (each already flip-averaged and
    resized back to ``H, W``), i.e. an equally weighted mean over all
    ``len(scales) * (2 if flip else 1)`` predictions (DDeP Sec. 5.1).

    Args:
      logits_fn, image, num_classes, flip, size_multiple: as `predict_whole`.
      scales: non-empty sequence of positive resize factors (default: the
        paper's 0.5 ... 1.75).

    Returns:
      float32 [H, W, C] probabilities.

    Raises:
      ValueError: `scales` is empty or has a non-positive entry, or as
        `predict_whole`.
    """
    scales = tuple(float(s) for s in scales)
    if not scales:
        raise ValueError("scales must not be empty.")
    image = _check_image(image)
    total = None
    for s in scales:
        p = predict_whole(logits_fn, image, num_classes, scale=s, flip=flip,
                          size_multiple=size_multiple)
        total = p if total is None else total + p
    return total / len(scales)


def _window_starts(size: int, window: int, stride: int) -> list[int]:
    """Starts of windows of length `window` covering [0, size), the last one
    shifted back to end at `size` (window <= size)."""
    n = max(0, math.ceil((size - window) / stride)) + 1
    return sorted({min(i * stride, size - window) for i in range(n)})


@functools.partial(jax.jit, static_argnames=("size",))
def _crop_window(image: jax.Array, y: int, x: int, size: tuple[int, int]) -> jax.Array:
    return jax.lax.dynamic_slice(image, (y, x, 0), size + image.shape[-1:])


@jax.jit
def _add_window(total: jax.Array, p: jax.Array, y: int, x: int) -> jax.Array:
    window = jax.lax.dynamic_slice(total, (y, x, 0), p.shape)
    return jax.lax.dynamic_update_slice(total, window + p, (y, x, 0))


def predict_sliding(logits_fn: LogitsFn, image: jax.Array | np.ndarray, num_classes: int,
                    window: tuple[int, int] = (1024, 1024),
                    stride: tuple[int, int] | int | None = None, flip: bool = True,
                    size_multiple: int = 16) -> jax.Array:
    """Sliding-window probabilities of one image at its own resolution.

    Windows of size ``min(window, (H, W))`` start every `stride` pixels; the
    last row/column of windows is shifted back to end at the image border
    (windows never leave the image). Each window runs through `logits_fn`
    (padded to `size_multiple`, with its horizontal flip if `flip`, the two
    averaged), and each pixel's probabilities are averaged over the windows
    covering it. An image smaller than `window` in a dimension uses one window
    spanning that dimension. With ``window=(1024, 1024)``, stride 1024 and
    flip on a 1024x2048 image this is exactly the paper's Cityscapes protocol
    (`predict_cityscapes_halves`).

    Args:
      logits_fn, image, num_classes, flip, size_multiple: as `predict_whole`.
      window: (height, width) of a window, positive.
      stride: (height, width) step, or one int for both; default `window`
        (non-overlapping except where the last window is shifted back).

    Returns:
      float32 [H, W, C] probabilities.

    Raises:
      ValueError: non-positive `window` or `stride`, or as `predict_whole`.
    """
    image = _check_image(image)
    h, w = image.shape[:2]
    window = tuple(int(v) for v in window)
    if len(window) != 2 or min(window) < 1:
        raise ValueError(f"window must be two positive ints, got {window}.")
    if stride is None:
        stride = window
    elif isinstance(stride, (int, np.integer)):
        stride = (int(stride), int(stride))
    stride = tuple(int(v) for v in stride)
    if len(stride) != 2 or min(stride) < 1:
        raise ValueError(f"stride must be positive, got {stride}.")
    wh, ww = min(window[0], h), min(window[1], w)
    ys = _window_starts(h, wh, stride[0])
    xs = _window_starts(w, ww, stride[1])
    if len(ys) == 1 and len(xs) == 1:
        return _batch_probs(logits_fn, image[None], num_classes, flip, size_multiple)[0]
    total = jnp.zeros((h, w, num_classes), jnp.float32)
    count = np.zeros((h, w, 1), np.float32)
    for y in ys:
        for x in xs:
            crop = _crop_window(image, y, x, (wh, ww))
            p = _batch_probs(logits_fn, crop[None], num_classes, flip, size_multiple)[0]
            total = _add_window(total, p, y, x)
            count[y:y + wh, x:x + ww] += 1.0
    return total / jnp.asarray(count)



def predict_cityscapes_halves(logits_fn: LogitsFn, image: jax.Array | np.ndarray,
                              num_classes: int, flip: bool = True,
                              size_multiple: int = 16) -> jax.Array:
    """The paper's Cityscapes protocol: left and right halves, each flip-averaged.

    ``predict_sliding`` with ``window = (H, ceil(W / 2))`` and the same stride:
    for the full-resolution 1024x2048 image, two 1024x1024 halves, each
    averaged with its horizontal flip, concatenated (DDeP Sec. 5.1). For an
    odd width the two halves overlap by one column, which is averaged.

    Args / Returns / Raises: as `predict_sliding`.
    """
    image = _check_image(image)
    h, w = image.shape[:2]
    half = (h, (w + 1) // 2)
    return predict_sliding(logits_fn, image, num_classes, window=half, stride=half,
                           flip=flip, size_multiple=size_multiple)


def predict(logits_fn: LogitsFn, image: jax.Array | np.ndarray, num_classes: int,
            mode: str, **kwargs: Any) -> jax.Array:
    """Dispatches to the protocol named by `mode`.

    ``'whole'`` -> `predict_whole`, ``'sliding'`` -> `predict_sliding`,
    ``'cityscapes'`` -> `predict_cityscapes_halves`, ``'multiscale'`` ->
    `predict_multiscale`; `kwargs` go to that function.

    Returns:
      float32 [H, W, C] probabilities.

    Raises:
      ValueError: `mode` is not in `EVAL_MODES` (the message names it and the
        valid modes), or as the chosen function.
    """
    fns = {"whole": predict_whole, "sliding": predict_sliding,
           "cityscapes": predict_cityscapes_halves, "multiscale": predict_multiscale}
    if mode not in fns:
        raise ValueError(f"unknown evaluation mode {mode!r}; valid modes are "
                         f"{', '.join(repr(m) for m in EVAL_MODES)}.")
    return fns[mode](logits_fn, image, num_classes, **kwargs)
