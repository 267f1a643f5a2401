"""Pictures for people: class-coloured masks and titled image grids (evaluate's grid, the ablation report)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from wsss.lib.datasets import palette

GRID_SCALE = 3
GRID_GAP = 4
GRID_HEADER = 14


def colorize(mask: np.ndarray) -> np.ndarray:
    """An index mask in the VOC palette's colours (``[H, W]`` -> ``[H, W, 3]`` uint8)."""
    return np.asarray(palette(), dtype=np.uint8).reshape(256, 3)[mask]


def image_grid(columns: dict[str, list[np.ndarray]]) -> Image.Image:
    """One row per image, one titled column per source; cells upscaled x3 (nearest), padded with white."""
    titles = list(columns)
    upscale = np.ones((GRID_SCALE, GRID_SCALE, 1), np.uint8)
    rows = [list(cells) for cells in zip(*columns.values(), strict=True)]
    rows = [[np.kron(cell, upscale) for cell in row] for row in rows]
    cell_w = max(cell.shape[1] for row in rows for cell in row)
    heights = [max(cell.shape[0] for cell in row) for row in rows]
    width = len(titles) * (cell_w + GRID_GAP) + GRID_GAP
    canvas = Image.new("RGB", (width, GRID_HEADER + sum(heights) + GRID_GAP * (len(rows) + 1)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(titles):
        draw.text((GRID_GAP + c * (cell_w + GRID_GAP), 2), title, fill="black")
    y = GRID_HEADER + GRID_GAP
    for row, height in zip(rows, heights, strict=True):
        for c, cell in enumerate(row):
            canvas.paste(Image.fromarray(cell), (GRID_GAP + c * (cell_w + GRID_GAP), y))
        y += height + GRID_GAP
    return canvas
