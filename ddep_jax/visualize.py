"""PNG grids of clean / noisy / denoised images."""

from __future__ import annotations

import numpy as np

from ddep_jax import writers


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float [..., 3] in [-1, 1] (values outside are clipped) -> uint8."""
    return np.clip(np.round((np.asarray(images) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def save_image_grid(path: str, rows: list[np.ndarray], pad: int = 2) -> None:
    """Saves rows of images as one PNG, one row per array.

    Args:
      path: output .png file.
      rows: arrays float [N, H, W, 3] in [-1, 1] (e.g. clean, noisy, denoised),
        all of the same shape.
    """
    rows = [to_uint8(r) for r in rows]
    n, h, w, _ = rows[0].shape
    grid = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j in range(n):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[y:y + h, x:x + w] = row[j]
    writers.save_png(path, grid)


def colorize(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Class-id map -> RGB image through a palette.

    Args:
      labels: integer [H, W] (uint8 or any int dtype) class ids; void is 255.
      palette: uint8 [P, 3] colours of ids ``0..P-1`` (e.g. [256, 3] from
        `SegDatasetSpec.palette`, or [C, 3]).

    Returns:
      uint8 [H, W, 3]. Ids outside ``[0, P)`` (e.g. void 255 with a [C, 3]
      palette) are black; with a [256, 3] palette void gets ``palette[255]``.

    Raises:
      ValueError: `labels` is not 2-D or `palette` is not [P, 3].
    """
    labels = np.asarray(labels)
    palette = np.asarray(palette)
    if labels.ndim != 2:
        raise ValueError(f"labels must be [H, W], got shape {labels.shape}.")
    if palette.ndim != 2 or palette.shape[1] != 3:
        raise ValueError(f"palette must be [P, 3], got shape {palette.shape}.")
    ids = labels.astype(np.int64)
    valid = (ids >= 0) & (ids < len(palette))
    out = palette.astype(np.uint8)[np.where(valid, ids, 0)]
    out[~valid] = 0
    return out


def overlay(image: np.ndarray, color_mask: np.ndarray, alpha: float = 0.5,
            void_mask: np.ndarray | None = None) -> np.ndarray:
    """Alpha-blends a colour mask over an image.

    Args:
      image: uint8 [H, W, 3].
      color_mask: uint8 [H, W, 3] (e.g. from `colorize`).
      alpha: weight of the mask, in [0, 1].
      void_mask: optional bool [H, W]; where True the image is shown unchanged.

    Returns:
      uint8 [H, W, 3]: ``round((1 - alpha) * image + alpha * color_mask)``.

    Raises:
      ValueError: shapes differ or `alpha` is outside [0, 1].
    """
    image = np.asarray(image)
    color_mask = np.asarray(color_mask)
    if image.shape != color_mask.shape or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image {image.shape} and color_mask {color_mask.shape} must "
                         "both be [H, W, 3].")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    blend = (1.0 - alpha) * image.astype(np.float32) + alpha * color_mask.astype(np.float32)
    out = np.clip(np.round(blend), 0, 255).astype(np.uint8)
    if void_mask is not None:
        void_mask = np.asarray(void_mask, bool)
        if void_mask.shape != image.shape[:2]:
            raise ValueError(f"void_mask {void_mask.shape} must be [H, W] = "
                             f"{image.shape[:2]}.")
        out[void_mask] = image[void_mask]
    return out


def save_segmentation_panel(path: str, image: np.ndarray, prediction: np.ndarray,
                            label: np.ndarray | None, palette: np.ndarray,
                            alpha: float = 0.5, pad: int = 2) -> None:
    """Writes a PNG: image | prediction colours | ground truth colours | overlay.

    Args:
      path: output .png file.
      image: uint8 [H, W, 3], or float [H, W, 3] in [-1, 1] (converted with
        `to_uint8`).
      prediction: integer [H, W] predicted class ids.
      label: integer [H, W] ground truth (void 255) or ``None`` to omit that
        panel.
      palette: uint8 [P, 3] (see `colorize`).
      alpha: mask weight of the overlay panel (prediction over the image).
      pad: white pixels between panels.

    Raises:
      ValueError: sizes differ, or as `colorize` / `overlay`.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = to_uint8(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be [H, W, 3], got shape {image.shape}.")
    hw = image.shape[:2]
    prediction = np.asarray(prediction)
    if prediction.shape != hw:
        raise ValueError(f"prediction {prediction.shape} and image {hw} sizes differ.")
    pred_rgb = colorize(prediction, palette)
    panels = [image, pred_rgb]
    if label is not None:
        label = np.asarray(label)
        if label.shape != hw:
            raise ValueError(f"label {label.shape} and image {hw} sizes differ.")
        panels.append(colorize(label, palette))
    panels.append(overlay(image, pred_rgb, alpha))
    h, w = hw
    canvas = np.full((h + 2 * pad, len(panels) * (w + pad) + pad, 3), 255, np.uint8)
    for i, p in enumerate(panels):
        x = pad + i * (w + pad)
        canvas[pad:pad + h, x:x + w] = p
    writers.save_png(path, canvas)
