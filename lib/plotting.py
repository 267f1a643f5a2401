"""Pictures for people: class-coloured masks and titled image grids (evaluate's grid, the ablation report)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from wsss.lib.images import palette
from wsss.lib.metrics import IGNORE_INDEX

GRID_CELL = 192  # cells are upscaled (nearest) by the whole factor that brings them closest to this side
GRID_GAP = 4
FONT_SIZE = 14  # titles and legend: legible at the grid's scale


def colorize(mask: np.ndarray) -> np.ndarray:
    """An index mask in the VOC palette's colours (``[H, W]`` -> ``[H, W, 3]`` uint8)."""
    return np.asarray(palette(), dtype=np.uint8).reshape(256, 3)[mask]


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def image_grid(
    columns: dict[str, list[np.ndarray]],
    title: str | None = None,
    legend: Sequence[tuple[int, str]] | None = None,
    captions: dict[str, list[str]] | None = None,
) -> Image.Image:
    """One row per image, one titled column per source; small cells upscaled (nearest, x3 for 64 px,
    x1 for photos), padded with white.

    Args:
        columns: column title -> one ``[H, W, 3]`` uint8 cell per row.
        title: a line above the columns (e.g. which split and images).
        legend: ``(mask value, name)`` pairs, shown under the grid as swatches in :func:`colorize`'s colours.
        captions: column title -> one text per row, written on the (upscaled) cell's top left corner.
    """
    titles = list(columns)
    rows = [list(cells) for cells in zip(*columns.values(), strict=True)]
    factor = max(1, round(GRID_CELL / max(max(cell.shape[:2]) for row in rows for cell in row)))
    upscale = np.ones((factor, factor, 1), np.uint8)
    rows = [[np.kron(cell, upscale) for cell in row] for row in rows]
    cell_w = max(cell.shape[1] for row in rows for cell in row)
    heights = [max(cell.shape[0] for cell in row) for row in rows]
    width = len(titles) * (cell_w + GRID_GAP) + GRID_GAP
    font = _font(FONT_SIZE)
    top = (FONT_SIZE + 2 * GRID_GAP if title else 0) + FONT_SIZE + GRID_GAP
    legend_rows = _legend_layout(legend or [], width, font)
    bottom = len(legend_rows) * (FONT_SIZE + GRID_GAP) + (GRID_GAP if legend_rows else 0)
    height = top + sum(heights) + GRID_GAP * (len(rows) + 1) + bottom
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = GRID_GAP
    if title:
        draw.text((GRID_GAP, y), title, fill="black", font=font)
        y += FONT_SIZE + GRID_GAP
    for c, name in enumerate(titles):
        draw.text((GRID_GAP + c * (cell_w + GRID_GAP), y), name, fill="black", font=font)
    y = top + GRID_GAP
    captions = captions or {}
    for r, (row, row_height) in enumerate(zip(rows, heights, strict=True)):
        for c, cell in enumerate(row):
            x = GRID_GAP + c * (cell_w + GRID_GAP)
            canvas.paste(Image.fromarray(cell), (x, y))
            if titles[c] in captions and captions[titles[c]][r]:
                draw.text(
                    (x + 2, y + 1), captions[titles[c]][r], fill="white", font=font, stroke_width=1, stroke_fill="black"
                )
        y += row_height + GRID_GAP
    _draw_legend(draw, legend_rows, y, font)
    return canvas


def heatmap(values: np.ndarray) -> np.ndarray:
    """A map ``[H, W]`` in [0, 1] as a viridis picture (uint8 ``[H, W, 3]``)."""
    from matplotlib import colormaps

    return (colormaps["viridis"](np.asarray(values))[..., :3] * 255).astype(np.uint8)


def class_legend(classes: Sequence[str]) -> list[tuple[int, str]]:
    """The legend of a data set's masks: background, its classes (1..C) and the ignore value."""
    return [(0, "background"), *((k + 1, name) for k, name in enumerate(classes)), (IGNORE_INDEX, "ignore")]


def _legend_layout(names: Sequence[tuple[int, str]], width: int, font) -> list[list[tuple[int, int, str]]]:
    """Swatch positions ``(x, class value, name)`` wrapped into rows that fit ``width``."""
    rows: list[list[tuple[int, int, str]]] = []
    x = width  # forces a first row
    for k, name in names:
        entry = FONT_SIZE + GRID_GAP + int(font.getlength(name)) + 3 * GRID_GAP
        if x + entry > width:
            rows.append([])
            x = GRID_GAP
        rows[-1].append((x, k, name))
        x += entry
    return rows


OVERLAY_MIN_SIDE = 256  # smaller images are enlarged (nearest, whole factor) so the legend stays legible


def overlay_picture(image: np.ndarray, mask: np.ndarray, names: Sequence[str] | None = None) -> Image.Image:
    """``image`` (``[H, W, 3]`` uint8) with ``mask`` coloured on it at half opacity and, below it on white, the
    legend of the values the mask holds (``names[value]`` when given, else the value): never drawn over the
    picture, where dark pixels would hide black text."""
    factor = max(1, -(-OVERLAY_MIN_SIDE // max(image.shape[:2])))
    upscale = np.ones((factor, factor, 1), np.uint8)
    blend = (0.5 * image.astype(np.float32) + 0.5 * colorize(mask).astype(np.float32)).round().astype(np.uint8)
    picture = Image.fromarray(np.kron(blend, upscale))
    font = _font(FONT_SIZE)
    values = [int(v) for v in np.unique(mask)]
    legend = [(v, names[v] if names is not None and v < len(names) else str(v)) for v in values]
    if IGNORE_INDEX in values and names is not None:
        legend[values.index(IGNORE_INDEX)] = (IGNORE_INDEX, "ignore")
    rows = _legend_layout(legend, picture.width, font)
    canvas = Image.new("RGB", (picture.width, picture.height + len(rows) * (FONT_SIZE + GRID_GAP) + GRID_GAP), "white")
    canvas.paste(picture, (0, 0))
    _draw_legend(ImageDraw.Draw(canvas), rows, picture.height + GRID_GAP, font)
    return canvas


def _draw_legend(draw: ImageDraw.ImageDraw, rows: list[list[tuple[int, int, str]]], y: int, font) -> int:
    """Draws :func:`_legend_layout` rows from ``y`` down (swatch in the class colour, name in black); returns
    the ``y`` below them."""
    colours = np.asarray(palette(), dtype=np.uint8).reshape(256, 3)
    for entries in rows:
        for x, k, name in entries:
            draw.rectangle(
                (x, y, x + FONT_SIZE, y + FONT_SIZE), fill=tuple(int(v) for v in colours[k]), outline="black"
            )
            draw.text((x + FONT_SIZE + GRID_GAP, y), name, fill="black", font=font)
        y += FONT_SIZE + GRID_GAP
    return y
