"""PNG grids of clean / noisy / denoised images."""

from __future__ import annotations

import numpy as np
from PIL import Image


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
    Image.fromarray(grid).save(path)
