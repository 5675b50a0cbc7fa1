"""Pictures of generated samples: image | per-class attention | label map, one row per sample.

Labels use the VOC palette with uncertain (255) pixels drawn white.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dsdiff.data.classes import IGNORE_INDEX, voc_palette
from dsdiff.utils.io import save_image_atomic

TITLE_HEIGHT = 12
_HEAT = np.array([[0, 0, 0], [90, 0, 140], [220, 40, 60], [255, 160, 0], [255, 255, 200]], dtype=np.float32)


def colorize_labels(label: np.ndarray, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8 in the VOC palette; ``ignore_index`` is white."""
    palette = np.array(voc_palette(256), dtype=np.uint8)
    palette[ignore_index] = 255
    return palette[np.asarray(label, dtype=np.uint8)]


def heatmap(values: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 (black - purple - red - orange - cream)."""
    x = np.clip(np.asarray(values, dtype=np.float32), 0, 1) * (len(_HEAT) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_HEAT) - 2)
    frac = (x - lo)[..., None]
    return (_HEAT[lo] * (1 - frac) + _HEAT[lo + 1] * frac).round().astype(np.uint8)


def _titled(panel: np.ndarray, title: str) -> Image.Image:
    h, w = panel.shape[:2]
    canvas = Image.new("RGB", (w, h + TITLE_HEIGHT), "white")
    canvas.paste(Image.fromarray(panel), (0, TITLE_HEIGHT))
    ImageDraw.Draw(canvas).text((2, 0), title[: max(1, w // 6)], fill="black")
    return canvas


def sample_row(
    image: np.ndarray,
    class_maps: np.ndarray,
    label: np.ndarray,
    class_ids: Sequence[int],
    class_names: Sequence[str] | None = None,
) -> Image.Image:
    """image (H, W, 3) uint8 | one attention heat map per class (K, H, W) | label map (H, W)."""
    name = (lambda i: class_names[i]) if class_names else str
    panels = [_titled(np.asarray(image, dtype=np.uint8), "image")]
    panels += [_titled(heatmap(m), name(c)) for m, c in zip(class_maps, class_ids)]
    panels.append(_titled(colorize_labels(label), "label"))
    row = Image.new("RGB", (sum(p.width for p in panels), max(p.height for p in panels)), "white")
    x = 0
    for p in panels:
        row.paste(p, (x, 0))
        x += p.width
    return row


def stack_rows(rows: Sequence[Image.Image]) -> Image.Image:
    """Row pictures one under the other, left-aligned on white."""
    grid = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "white")
    y = 0
    for row in rows:
        grid.paste(row, (0, y))
        y += row.height
    return grid


def sample_grid(samples: Sequence, class_names: Sequence[str] | None = None) -> Image.Image:
    """Rows of :func:`sample_row` for objects with ``image, class_maps, label, class_ids`` (e.g. ``Sample``)."""
    if not samples:
        raise ValueError("sample_grid needs at least one sample")
    return stack_rows([sample_row(s.image, s.class_maps, s.label, s.class_ids, class_names) for s in samples])


def save_sample_grid(samples: Sequence, path: str | Path, class_names: Sequence[str] | None = None) -> Path:
    """Write :func:`sample_grid` as a PNG (atomically: a reader never sees half of one) and return its path."""
    return save_image_atomic(sample_grid(samples, class_names), path, format="PNG")


def comparison_grid(rows: Sequence[Sequence[np.ndarray]], titles: Sequence[str], min_side: int = 96) -> Image.Image:
    """Rows of titled panels, e.g. image | true mask | attention labels; an (H, W) panel is a label map
    (drawn in the VOC palette, 255 white), an (H, W, 3) panel an RGB image. Panels smaller than
    ``min_side`` are enlarged by a whole factor (nearest), so 32 px images stay readable."""
    if not rows:
        raise ValueError("comparison_grid needs at least one row")
    drawn = []
    for panels in rows:
        pictures = [colorize_labels(p) if np.asarray(p).ndim == 2 else np.asarray(p, dtype=np.uint8) for p in panels]
        factor = max(1, min_side // max(1, min(min(p.shape[:2]) for p in pictures)))
        tiles = [_titled(p.repeat(factor, 0).repeat(factor, 1), t) for p, t in zip(pictures, titles)]
        row = Image.new("RGB", (sum(t.width for t in tiles), max(t.height for t in tiles)), "white")
        x = 0
        for tile in tiles:
            row.paste(tile, (x, 0))
            x += tile.width
        drawn.append(row)
    return stack_rows(drawn)
