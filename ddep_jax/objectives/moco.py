"""MoCo (momentum contrast) as a dense pretext task: the SSL4DP draft's
encoder-decoder MoCo and patch-level MoCo.

Follows MoCo v2 (He et al. 2020, "Momentum Contrast for Unsupervised Visual
Representation Learning", Algorithm 1; Chen et al. 2020, "Improved Baselines
with Momentum Contrastive Learning"):
- two views of every image (`sample_views`, `render_views`): a random
  resized crop of 20-100% of the image area with aspect ratio in [3/4, 4/3],
  a horizontal flip with probability 1/2, colour jitter (brightness,
  contrast, saturation 0.4, hue 0.1) with probability 0.8, grayscale with
  probability 0.2, Gaussian blur (sigma in [0.1, 2.0] at 224 pixels, scaled
  to the image side) with probability 0.5;
- the query encoder is trained; the key encoder is its momentum copy,
  theta_k <- m theta_k + (1 - m) theta_q with m = 0.999 (`momentum_update`),
  updated before the keys are computed;
- the InfoNCE loss (`info_nce`) with temperature 0.2 over the positive key
  and a queue of K earlier keys (`enqueue`, first in first out), the
  embeddings being the projection MLP's L2-normalised 128-d outputs.

Where this deviates from MoCo v2: the colour operations run in a fixed
order (torchvision draws a random order), the hue shift is a rotation of
the chroma plane in YIQ space (not an HSV hue shift), a crop that does not
fit is clipped rather than redrawn, and there is no shuffling BN (the
encoder and decoder normalise with GroupNorm and LayerNorm, which see no
other example). The patch-level task is our reading of the draft: the
positive of a query patch is the key patch that contains the query patch's
centre in image coordinates (`match_patches`, through the two crops and
flips); query patches whose centre falls outside the key view have no
positive and are left out of the loss; the negatives are the other key
patches of the batch and the queue, which holds every key patch of the
recent batches.

Where this project departs from a literal reading of the draft, to keep
false negatives out (`negative_exclusions`): a key (queued or in the batch)
of the query's own image is not a negative (MoCo's queue is a small
fraction of its dataset, 65536 of 1.28 M images, so it rarely holds the
query's image; a queue of 4096 over CamVid's 367 images holds each image ~11
times), and a key patch of the same image whose region overlaps the query
patch's region by more than `negative_max_overlap` (intersection over the
smaller region, `overlap_coefficient`) is not a negative either. Both views
are cropped from the whole frame (the pipeline hands over whole frames,
`pipeline.FullFrame`), as in MoCo v2.

Boxes are (y0, x0, h, w) in pixels of the source image, continuous
coordinates with pixel i covering [i, i + 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

CROP_AREA = (0.2, 1.0)
CROP_ASPECT = (3 / 4, 4 / 3)
JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
JITTER_PROB, GRAYSCALE_PROB, BLUR_PROB = 0.8, 0.2, 0.5
BLUR_SIGMA_224 = (0.1, 2.0)  # pixels at a 224-pixel image


def momentum_update(key_params, query_params, momentum: float):
    """theta_k <- m theta_k + (1 - m) theta_q, leaf by leaf (MoCo Eq. 2)."""
    return jax.tree.map(lambda k, q: momentum * k + (1.0 - momentum) * q,
                        key_params, query_params)


def enqueue(queue: jax.Array, pointer: jax.Array, keys: jax.Array):
    """Writes `keys` [N, D] into the ring buffer `queue` [K, D] at rows
    pointer, pointer + 1, ... (mod K), replacing the oldest keys.

    Returns:
      (queue [K, D], new pointer: int32 scalar (pointer + N) mod K).

    Raises:
      ValueError: N > K (the batch's keys would overwrite each other).
    """
    size, n = queue.shape[0], keys.shape[0]
    if n > size:
        raise ValueError(f"pretext.queue_size={size} is smaller than the {n} keys "
                         "of one batch: raise it (MoCo v2: 65536).")
    rows = (pointer + jnp.arange(n)) % size
    return (queue.at[rows].set(keys.astype(queue.dtype)),
            ((pointer + n) % size).astype(jnp.int32))


def enqueue_ids(queue_ids: jax.Array, pointer: jax.Array, ids: jax.Array) -> jax.Array:
    """The image id of every queued key, written where `enqueue` writes the
    keys (the pointer before that call): int32 [K] with `ids` [N] at rows
    pointer, ... (mod K)."""
    rows = (pointer + jnp.arange(ids.shape[0])) % queue_ids.shape[0]
    return queue_ids.at[rows].set(ids.astype(queue_ids.dtype))


NO_IMAGE = -1
"""The image id of a queue row that holds no key yet (the random start)."""


def initial_queue(key: jax.Array, size: int, dim: int) -> jax.Array:
    """A queue of random unit vectors, float32 [size, dim] (MoCo starts from
    normalised Gaussian noise)."""
    q = jax.random.normal(key, (size, dim), jnp.float32)
    return q / jnp.linalg.norm(q, axis=1, keepdims=True)


_EXCLUDED = -1e9
"""The logit of a key that is not a negative (exp of it / T is 0)."""


def info_nce(queries: jax.Array, keys: jax.Array, positive: jax.Array,
             queue: jax.Array, temperature: float, valid: jax.Array | None = None,
             batch_negatives: bool = False, exclude_queue: jax.Array | None = None,
             exclude_keys: jax.Array | None = None):
    """The InfoNCE loss of MoCo: -log softmax(logits / T)[positive].

    Args:
      queries: float [N, D] unit vectors (the trained encoder).
      keys: float [M, D] unit vectors (the momentum encoder; no gradient).
      positive: int32 [N]: the row of `keys` that is each query's positive.
      queue: float [K, D] negatives from earlier batches.
      temperature: T (MoCo v2: 0.2).
      valid: bool [N]: queries that take part (None: all).
      batch_negatives: False: the logits are [q . k_positive, q . queue]
        (MoCo, K + 1 classes); True: every row of `keys` is a class too
        (the other keys are negatives; M + K classes).
      exclude_queue: bool [N, K]: queue rows that are not negatives of a
        query (its own image's keys); None: all are.
      exclude_keys: bool [N, M], with `batch_negatives`: keys that are not
        negatives of a query (the positive is never excluded); None: all are.

    Returns:
      (mean loss over the valid queries, the fraction of valid queries whose
      positive has the largest logit); float32 scalars, 0 with no valid query.
    """
    q = queries.astype(jnp.float32)
    neg = q @ queue.astype(jnp.float32).T
    if exclude_queue is not None:
        neg = jnp.where(exclude_queue, _EXCLUDED, neg)
    if batch_negatives:
        batch = q @ keys.astype(jnp.float32).T
        if exclude_keys is not None:
            is_positive = jnp.arange(keys.shape[0])[None, :] == positive[:, None]
            batch = jnp.where(exclude_keys & ~is_positive, _EXCLUDED, batch)
        logits = jnp.concatenate([batch, neg], axis=1)
        target = positive
    else:
        pos = jnp.sum(q * keys[positive].astype(jnp.float32), axis=1, keepdims=True)
        logits = jnp.concatenate([pos, neg], axis=1)
        target = jnp.zeros_like(positive)
    logits = logits / temperature
    log_p = jax.nn.log_softmax(logits, axis=1)
    nll = -jnp.take_along_axis(log_p, target[:, None], axis=1)[:, 0]
    hit = (jnp.argmax(logits, axis=1) == target).astype(jnp.float32)
    w = jnp.ones_like(nll) if valid is None else valid.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(w), 1.0)
    return jnp.sum(w * nll) / count, jnp.sum(w * hit) / count


# ----------------------------------------------------------------------------
# Two views with known geometry.
# ----------------------------------------------------------------------------
def sample_views(key: jax.Array, batch: int, image_hw: tuple[int, int],
                 area=CROP_AREA, aspect=CROP_ASPECT, num_views: int = 2):
    """Random resized crops and flips of every image.

    Returns:
      boxes: float32 [B, V, 4] (y0, x0, h, w) in source pixels: area a
        uniform in `area` (a fraction of H * W), aspect w / h log-uniform in
        `aspect`, sides clipped to the image, the corner uniform over the
        positions that keep the box inside;
      flips: bool [B, V], each True with probability 1/2.
    """
    h_img, w_img = image_hw
    k_area, k_aspect, k_y, k_x, k_flip = jax.random.split(key, 5)
    shape = (batch, num_views)
    a = jax.random.uniform(k_area, shape, minval=area[0], maxval=area[1])
    r = jnp.exp(jax.random.uniform(k_aspect, shape, minval=np.log(aspect[0]),
                                   maxval=np.log(aspect[1])))
    hh = jnp.minimum(jnp.sqrt(a * h_img * w_img / r), h_img)
    ww = jnp.minimum(jnp.sqrt(a * h_img * w_img * r), w_img)
    y0 = jax.random.uniform(k_y, shape) * (h_img - hh)
    x0 = jax.random.uniform(k_x, shape) * (w_img - ww)
    boxes = jnp.stack([y0, x0, hh, ww], axis=-1).astype(jnp.float32)
    return boxes, jax.random.bernoulli(k_flip, 0.5, shape)


def crop_and_resize(images: jax.Array, boxes: jax.Array, flips: jax.Array,
                    out_hw: tuple[int, int]) -> jax.Array:
    """The views: each box resampled (bilinear, antialiased when shrinking)
    to `out_hw`, then flipped left-right where `flips`.

    images: float [B, H, W, C]; boxes [B, 4]; flips bool [B] ->
    float32 [B, h, w, C]. Output pixel (i, j) (before the flip) shows source
    point (y0 + (i + 1/2) h_box / h, x0 + (j + 1/2) w_box / w).
    """
    oh, ow = out_hw

    def one(image, box, flip):
        y0, x0, bh, bw = box[0], box[1], box[2], box[3]
        scale = jnp.stack([oh / bh, ow / bw])
        view = jax.image.scale_and_translate(
            image.astype(jnp.float32), (oh, ow, image.shape[-1]), (0, 1), scale,
            -jnp.stack([y0, x0]) * scale, method="linear", antialias=True)
        return jnp.where(flip, view[:, ::-1], view)

    return jax.vmap(one)(images, boxes, flips)


def patch_centres(boxes: jax.Array, flips: jax.Array, out_hw: tuple[int, int],
                  grid: tuple[int, int]) -> jax.Array:
    """Source-image coordinates of the centre of every patch of a view.

    boxes [B, 4], flips bool [B]; the view is `out_hw` pixels cut into a
    `grid` (gh, gw) of equal patches -> float32 [B, gh * gw, 2] (y, x),
    patches in row-major order of the (flipped) view.
    """
    (oh, ow), (gh, gw) = out_hw, grid
    cy = (jnp.arange(gh) + 0.5) * (oh / gh)  # view pixels
    cx = (jnp.arange(gw) + 0.5) * (ow / gw)
    cx = jnp.where(flips[:, None], ow - cx[None], cx[None])  # [B, gw], unflipped
    y = boxes[:, 0, None] + cy[None] * boxes[:, 2, None] / oh  # [B, gh]
    x = boxes[:, 1, None] + cx * boxes[:, 3, None] / ow  # [B, gw]
    yy = jnp.broadcast_to(y[:, :, None], (y.shape[0], gh, gw))
    xx = jnp.broadcast_to(x[:, None, :], (x.shape[0], gh, gw))
    return jnp.stack([yy, xx], axis=-1).reshape(-1, gh * gw, 2)


def match_patches(boxes_q, flips_q, boxes_k, flips_k, out_hw, grid):
    """The positive of every query patch: the key-view patch containing the
    query patch's centre.

    Args: the two views' boxes [B, 4] and flips [B] (`sample_views`), the
      views' pixel size and patch grid.

    Returns:
      (index int32 [B, gh * gw]: the key patch (row-major in the key view),
      valid bool [B, gh * gw]: the centre lies inside the key view).
    """
    (oh, ow), (gh, gw) = out_hw, grid
    c = patch_centres(boxes_q, flips_q, out_hw, grid)
    u = (c[..., 0] - boxes_k[:, 0, None]) * oh / boxes_k[:, 2, None]
    v = (c[..., 1] - boxes_k[:, 1, None]) * ow / boxes_k[:, 3, None]
    v = jnp.where(flips_k[:, None], ow - v, v)
    valid = (u >= 0) & (u < oh) & (v >= 0) & (v < ow)
    row = jnp.clip(jnp.floor(u / (oh / gh)), 0, gh - 1).astype(jnp.int32)
    col = jnp.clip(jnp.floor(v / (ow / gw)), 0, gw - 1).astype(jnp.int32)
    return row * gw + col, valid


def patch_regions(boxes: jax.Array, flips: jax.Array,
                  grid: tuple[int, int]) -> jax.Array:
    """The source-image region of every patch of a view.

    boxes [B, 4], flips bool [B]; the view cut into a `grid` (gh, gw) ->
    float32 [B, gh * gw, 4] (y0, x0, y1, x1), patches in row-major order of
    the (flipped) view: column c of a flipped view shows the box's column
    gw - 1 - c.
    """
    gh, gw = grid
    ph, pw = boxes[:, 2] / gh, boxes[:, 3] / gw  # [B]
    r = jnp.arange(gh, dtype=jnp.float32)
    c = jnp.arange(gw, dtype=jnp.float32)
    c = jnp.where(flips[:, None], gw - 1 - c[None], c[None])  # [B, gw]
    y0 = boxes[:, 0, None] + r[None] * ph[:, None]  # [B, gh]
    x0 = boxes[:, 1, None] + c * pw[:, None]  # [B, gw]
    b = boxes.shape[0]
    yy = jnp.broadcast_to(y0[:, :, None], (b, gh, gw))
    xx = jnp.broadcast_to(x0[:, None, :], (b, gh, gw))
    out = jnp.stack([yy, xx, yy + ph[:, None, None], xx + pw[:, None, None]], -1)
    return out.reshape(b, gh * gw, 4)


def overlap_coefficient(a: jax.Array, b: jax.Array) -> jax.Array:
    """Intersection over the smaller area of every pair of regions: 1 when
    one contains the other, 0 when they share no area.

    a [B, N, 4], b [B, M, 4] (y0, x0, y1, x1) -> float32 [B, N, M]."""
    a, b = a[:, :, None], b[:, None, :]
    h = jnp.maximum(0.0, jnp.minimum(a[..., 2], b[..., 2]) - jnp.maximum(a[..., 0], b[..., 0]))
    w = jnp.maximum(0.0, jnp.minimum(a[..., 3], b[..., 3]) - jnp.maximum(a[..., 1], b[..., 1]))
    area = lambda r: (r[..., 2] - r[..., 0]) * (r[..., 3] - r[..., 1])
    return h * w / jnp.maximum(jnp.minimum(area(a), area(b)), 1e-12)


def negative_exclusions(image_ids: jax.Array, queue_ids: jax.Array, n: int,
                        overlap: jax.Array | None = None, max_overlap: float = 1.0,
                        same_image: bool = True):
    """Which keys are not negatives of which queries.

    Args:
      image_ids: int32 [B] the source index of each image of the batch.
      queue_ids: int32 [K] the image id of each queued key (`NO_IMAGE`: none).
      n: embeddings per image (1: image level; the patch grid's cells).
      overlap: float [B, n, n] (patch levels): `overlap_coefficient` of each
        query patch's region with each key patch's region of the same image.
      max_overlap: a key patch of the query's own view pair overlapping its
        region by more than this is excluded (1.0: none is).
      same_image: exclude every key of the query's own image from the queue,
        and of another batch row showing the same image (the positive's own
        view pair is governed by `overlap` instead).

    Returns:
      (exclude_queue bool [B * n, K], exclude_keys bool [B * n, B * n] or
      None at the image level), for `info_nce`.
    """
    q_img = jnp.repeat(image_ids, n)  # [B * n]
    exclude_queue = (q_img[:, None] == queue_ids[None, :]) & same_image
    if n == 1 and overlap is None:
        return exclude_queue, None
    b = image_ids.shape[0]
    row = jnp.repeat(jnp.arange(b), n)
    same_row = row[:, None] == row[None, :]
    exclude_keys = (q_img[:, None] == q_img[None, :]) & ~same_row & same_image
    if overlap is not None:
        # Block-diagonal [B * n, B * n]: the query's own row's cells.
        eye = jnp.eye(b, dtype=bool)
        blocks = (overlap > max_overlap)[:, :, None, :] & eye[:, None, :, None]
        exclude_keys = exclude_keys | blocks.reshape(b * n, b * n)
    return exclude_queue, exclude_keys


# ----------------------------------------------------------------------------
# Photometric augmentation (MoCo v2).
# ----------------------------------------------------------------------------
_GRAY = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601 luma
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114],
                        [0.596, -0.274, -0.322],
                        [0.211, -0.523, 0.312]], np.float32)


def _blur(image: jax.Array, sigma: jax.Array, radius: int) -> jax.Array:
    """Separable Gaussian blur of one float [H, W, C] image (edges
    reflected); `sigma` in pixels."""
    t = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    k = jnp.exp(-0.5 * (t / sigma) ** 2)
    k = k / jnp.sum(k)
    x = jnp.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode="reflect")
    h, w = image.shape[:2]
    x = sum(k[i] * x[i:i + h] for i in range(2 * radius + 1))
    return sum(k[i] * x[:, i:i + w] for i in range(2 * radius + 1))


def photometric(key: jax.Array, images: jax.Array, *, jitter=JITTER,
                jitter_prob=JITTER_PROB, grayscale_prob=GRAYSCALE_PROB,
                blur_prob=BLUR_PROB) -> jax.Array:
    """MoCo v2's colour jitter, random grayscale and Gaussian blur, drawn per
    image. float [B, H, W, 3] in [0, 1] -> float32 [B, H, W, 3] in [0, 1]."""
    b, h, w, _ = images.shape
    ks = jax.random.split(key, 8)
    bri, con, sat, hue = jitter

    def factor(k, s):
        return jax.random.uniform(k, (b, 1, 1, 1), minval=1 - s, maxval=1 + s)

    x = images.astype(jnp.float32)
    gray = lambda im: jnp.sum(im * _GRAY, axis=-1, keepdims=True)
    j = x * factor(ks[0], bri)
    j = jnp.clip(j, 0, 1)
    mean = jnp.mean(gray(j), axis=(1, 2, 3), keepdims=True)
    j = jnp.clip(mean + factor(ks[1], con) * (j - mean), 0, 1)
    j = jnp.clip(gray(j) + factor(ks[2], sat) * (j - gray(j)), 0, 1)
    theta = jax.random.uniform(ks[3], (b, 1, 1), minval=-hue, maxval=hue) * 2 * np.pi
    yiq = j @ _RGB_TO_YIQ.T
    i_, q_ = yiq[..., 1], yiq[..., 2]
    yiq = jnp.stack([yiq[..., 0], jnp.cos(theta) * i_ - jnp.sin(theta) * q_,
                     jnp.sin(theta) * i_ + jnp.cos(theta) * q_], axis=-1)
    j = jnp.clip(yiq @ np.linalg.inv(_RGB_TO_YIQ).T.astype(np.float32), 0, 1)
    apply = jax.random.bernoulli(ks[4], jitter_prob, (b, 1, 1, 1))
    x = jnp.where(apply, j, x)
    x = jnp.where(jax.random.bernoulli(ks[5], grayscale_prob, (b, 1, 1, 1)),
                  jnp.broadcast_to(gray(x), x.shape), x)
    scale = h / 224.0
    lo, hi = BLUR_SIGMA_224[0] * scale, BLUR_SIGMA_224[1] * scale
    radius = max(1, int(np.ceil(3 * hi)))
    sigma = jax.random.uniform(ks[6], (b,), minval=lo, maxval=hi)
    blurred = jax.vmap(lambda im, s: _blur(im, s, radius))(x, sigma)
    return jnp.where(jax.random.bernoulli(ks[7], blur_prob, (b, 1, 1, 1)), blurred, x)


def render_views(key: jax.Array, images_uint8: jax.Array, boxes: jax.Array,
                 flips: jax.Array, out_hw: tuple[int, int], **photometric_kw):
    """uint8 [B, H, W, 3] -> the views of `boxes` [B, V, 4] / `flips`
    [B, V] with their photometric augmentation: float32 [V, B, h, w, 3] in
    [-1, 1] (the encoder's input convention)."""
    x = images_uint8.astype(jnp.float32) / 255.0
    views = []
    for v, k in enumerate(jax.random.split(key, boxes.shape[1])):
        view = crop_and_resize(x, boxes[:, v], flips[:, v], out_hw)
        views.append(photometric(k, jnp.clip(view, 0, 1), **photometric_kw) * 2 - 1)
    return jnp.stack(views)
