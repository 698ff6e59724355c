"""PNG grids of clean / noisy / denoised images (optionally labelled rows) and
segmentation panels (optionally with a legend of class colours).

Colours are a palette lookup (`colorize`): each class id keeps its dataset
colour in every image. scikit-image's `label2rgb` assigns its colours by the
rank of the labels present in an image, so the same class could change
colour between panels. The legend is drawn by matplotlib (`_legend`).
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ddep_jax.common import writers
from ddep_jax.data.seg_datasets import IGNORE_LABEL

TEXT_COLOR = (0, 0, 0)
"""Colour of row labels and legend names (on white)."""


@functools.cache
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's default font (Pillow's built-in, no font file needed)."""
    return ImageFont.load_default()


def _text_width(text: str) -> int:
    """Width in pixels of `text` in the default font."""
    left, _, right, _ = _font().getbbox(text)
    return max(0, right - left)


@functools.cache
def _line_metrics() -> tuple[int, int]:
    """(top, height): the ink of a line of text drawn at y spans rows
    ``y + top .. y + top + height`` (the same for every text)."""
    _, top, _, bottom = _font().getbbox("Ag|")
    return top, bottom - top


def _draw_text(draw: ImageDraw.ImageDraw, x: int, y_center: float, text: str) -> None:
    """Draws `text` from column `x`, its line vertically centred on `y_center`."""
    top, height = _line_metrics()
    draw.text((x, round(y_center - height / 2 - top)), text, fill=TEXT_COLOR,
              font=_font())


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float [..., 3] in [-1, 1] (values outside are clipped) -> uint8."""
    return np.clip(np.round((np.asarray(images) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def save_image_grid(path: str, rows: list[np.ndarray], pad: int = 2,
                    row_labels: Sequence[str] | None = None) -> None:
    """Saves rows of images as one PNG, one row per array.

    Args:
      path: output .png file.
      rows: arrays float [N, H, W, 3] in [-1, 1] (e.g. clean, noisy, denoised),
        all of the same shape.
      pad: white pixels around and between the images.
      row_labels: optional text of each row (e.g. ``'clean'``, ``'noisy 19.4
        dB'``, ``'denoised 24.1 dB'``), drawn in PIL's default font in a white
        strip to the left of the grid, vertically centred on its row (text
        taller than a row is clipped to it). ``None``: no strip, the grid alone.

    Raises:
      ValueError: `row_labels` does not have one entry per row.
    """
    rows = [to_uint8(r) for r in rows]
    n, h, w, _ = rows[0].shape
    grid = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j in range(n):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[y:y + h, x:x + w] = row[j]
    if row_labels is not None:
        grid = _with_row_labels(grid, [str(t) for t in row_labels], len(rows), h, pad)
    writers.save_png(path, grid)


def _with_row_labels(grid: np.ndarray, labels: list[str], num_rows: int, h: int,
                     pad: int) -> np.ndarray:
    """`grid` with a white strip on its left holding each row's label."""
    if len(labels) != num_rows:
        raise ValueError(f"{len(labels)} row_labels for {num_rows} rows.")
    margin = max(pad, 4)
    width = max([_text_width(t) for t in labels] + [0]) + 2 * margin
    strip = Image.new("RGB", (width, grid.shape[0]), (255, 255, 255))
    for i, text in enumerate(labels):
        cell = Image.new("RGB", (width, h), (255, 255, 255))  # clips to the row
        _draw_text(ImageDraw.Draw(cell), margin, h / 2, text)
        strip.paste(cell, (0, pad + i * (h + pad)))
    return np.concatenate([np.asarray(strip, np.uint8), grid], axis=1)


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
                            alpha: float = 0.5, pad: int = 2,
                            class_names: Sequence[str] | None = None,
                            legend_classes: Sequence[int] | None = None) -> None:
    """Writes a PNG: image | prediction colours | ground truth colours | overlay,
    and, with `class_names`, a legend below them.

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
      class_names: names of class ids ``0..C-1``; given, a matplotlib legend
        (a colour swatch and the name of each class, in as many columns as
        fit) is drawn in a white strip below the panels (widening the image
        if one entry is wider than the panels). ``None``: no legend, the
        panels alone.
      legend_classes: the class ids to list (default: those in the prediction
        or the ground truth, in id order; ``'void'`` is added, black, when the
        ground truth has void pixels).

    Raises:
      ValueError: sizes differ, a `legend_classes` id has no name, or as
        `colorize` / `overlay`.
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
    if class_names is not None:
        entries = _legend_entries(prediction, label, palette, class_names,
                                  legend_classes)
        legend = _legend(entries, canvas.shape[1], pad)
        if legend.shape[1] > canvas.shape[1]:
            canvas = np.pad(canvas, ((0, 0), (0, legend.shape[1] - canvas.shape[1]),
                                     (0, 0)), constant_values=255)
        canvas = np.concatenate([canvas, legend], axis=0)
    writers.save_png(path, canvas)


def _legend_entries(prediction, label, palette, class_names, legend_classes
                    ) -> list[tuple[tuple[int, int, int], str]]:
    """(colour, name) of each class to list in a panel's legend."""
    palette = np.asarray(palette, np.uint8)
    num = len(class_names)
    if legend_classes is None:
        ids = np.unique(prediction)
        if label is not None:
            ids = np.union1d(ids, np.unique(label))
        classes = [int(c) for c in ids if 0 <= c < num]
    else:
        classes = [int(c) for c in legend_classes]
        bad = [c for c in classes if not 0 <= c < num]
        if bad:
            raise ValueError(f"legend_classes {bad} have no name ({num} class_names).")
    entries = []
    for c in classes:
        color = palette[c] if c < len(palette) else np.zeros(3, np.uint8)
        entries.append((tuple(int(v) for v in color), str(class_names[c])))
    if legend_classes is None and label is not None and np.any(
            label == IGNORE_LABEL):
        void = palette[IGNORE_LABEL] if IGNORE_LABEL < len(palette) else (0, 0, 0)
        entries.append((tuple(int(v) for v in void), "void"))
    return entries


LEGEND_OUTLINE = (128, 128, 128)
"""Outline of the legend's colour swatches (so white or black classes show)."""


LEGEND_FONT_SIZE = 9
"""Legend font size in points (at 100 dpi: 12.5 px per em)."""


def _legend(entries: list[tuple[tuple[int, int, int], str]], width: int,
            pad: int) -> np.ndarray:
    """uint8 [h, max(width, widest entry), 3]: a white strip with a matplotlib
    legend of the entries (a colour swatch outlined in grey, then the name),
    in as many columns as fit the width (filled column by column)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    dpi = 100
    em = LEGEND_FONT_SIZE * dpi / 72
    outline = tuple(v / 255 for v in LEGEND_OUTLINE)
    handles = [Patch(facecolor=tuple(v / 255 for v in color), edgecolor=outline,
                     label=name) for color, name in entries]
    style = {"frameon": False, "fontsize": LEGEND_FONT_SIZE, "handlelength": 2.0,
             "handletextpad": 0.6, "columnspacing": 1.5, "borderaxespad": 0.0,
             "borderpad": 0.3, "loc": "upper left", "bbox_to_anchor": (0, 1)}
    probe = Figure(dpi=dpi)
    renderer = FigureCanvasAgg(probe).get_renderer()
    texts = probe.legend(handles=handles, ncol=1, **style).get_texts()
    widest = max(t.get_window_extent(renderer).width for t in texts)
    per_entry = widest + (2.0 + 0.6 + 1.5) * em
    inner = max(width - 2 * pad, int(np.ceil(per_entry)))
    ncol = max(1, min(len(entries), int(inner // per_entry)))
    rows = -(-len(entries) // ncol)
    total_w, total_h = inner + 2 * pad, int(rows * 2 * em + 4 * em)
    fig = Figure(figsize=(total_w / dpi, total_h / dpi), dpi=dpi, facecolor="white")
    canvas = FigureCanvasAgg(fig)
    style["bbox_to_anchor"] = (pad / total_w, 1)
    legend = fig.legend(handles=handles, ncol=ncol, **style)
    canvas.draw()
    bottom = legend.get_window_extent(canvas.get_renderer()).y0  # from the bottom
    strip = np.asarray(canvas.buffer_rgba())[..., :3]
    return np.ascontiguousarray(strip[:min(total_h, int(total_h - bottom) + pad)])
