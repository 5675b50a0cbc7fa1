"""The shapes world's colour-derived masks: where a class's colours were drawn is where the model drew it.

The generic label-quality metrics (pointing, right-object rate, confusion, mIoU) are in
:mod:`dsdiff.diffusion.quality`; this module only knows the shapes world's colour families.
"""
from __future__ import annotations

import colorsys

import numpy as np

# Hue windows (degrees, wrapping at 360) around dsdiff.data.shapes' colour families; index = class id.
SHAPES_HUE_WINDOWS = {1: (345, 30), 2: (195, 245), 3: (85, 150), 4: (35, 72), 5: (265, 320)}


def colour_mask(image: np.ndarray, min_saturation: float = 0.35, min_value: float = 0.15) -> np.ndarray:
    """(H, W, 3) uint8 shapes-world image -> (H, W) uint8 labels by colour family (0: grey-ish background)."""
    rgb = np.asarray(image, dtype=np.float32).reshape(-1, 3) / 255.0
    hsv = np.array([colorsys.rgb_to_hsv(*p) for p in rgb])
    hue, sat, val = hsv[:, 0] * 360, hsv[:, 1], hsv[:, 2]
    out = np.zeros(len(rgb), dtype=np.uint8)
    coloured = (sat >= min_saturation) & (val >= min_value)
    for label, (lo, hi) in SHAPES_HUE_WINDOWS.items():
        inside = (hue >= lo) & (hue <= hi) if lo <= hi else (hue >= lo) | (hue <= hi)
        out[coloured & inside] = label
    return out.reshape(image.shape[:2])
