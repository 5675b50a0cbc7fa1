"""How well class attention finds objects: pointing, right-object rate, pseudo-mask IoU (pure numpy).

Per image, ``maps`` are (K, H, W) class maps in ``class_ids`` order (``Sample.class_maps``),
``truth`` an (H, W) label map. On generated images the truth is :func:`colour_mask`: in the
shapes world each class has its own colour family, so where a class's colours were drawn is
where the model drew that class.
"""
from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np

from dsdiff.data.classes import IGNORE_INDEX

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


def pointing(maps: np.ndarray, class_ids: Sequence[int], truth: np.ndarray) -> list[bool]:
    """Per class present in ``truth``: does its map's peak lie on that class's pixels?"""
    hits = []
    for m, c in zip(maps, class_ids):
        if (truth == c).any():
            hits.append(bool(truth.flat[int(np.argmax(m))] == c))
    return hits


def right_object(maps: np.ndarray, class_ids: Sequence[int], truth: np.ndarray) -> list[bool]:
    """For two objects of different classes: is each class's map stronger (mean) on its own object?

    Empty unless exactly two prompted classes are both present in ``truth``; chance is 0.5.
    """
    ids = [c for c in class_ids if (truth == c).any()]
    if len(class_ids) != 2 or len(ids) != 2:
        return []
    out = []
    for k, c in enumerate(class_ids):
        other = class_ids[1 - k]
        out.append(bool(maps[k][truth == c].mean() > maps[k][truth == other].mean()))
    return out


def confusion(pred: np.ndarray, truth: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """(C, C) counts of (truth, prediction) over pixels whose prediction is not ``ignore_index``."""
    keep = pred != ignore_index
    index = truth[keep].astype(np.int64) * num_classes + pred[keep].astype(np.int64)
    return np.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def mean_iou(conf: np.ndarray) -> tuple[float, np.ndarray]:
    """mIoU over classes that occur (in truth or prediction), background included; and per-class IoU (NaN if absent)."""
    inter = np.diag(conf).astype(float)
    union = conf.sum(0) + conf.sum(1) - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
    return float(np.nanmean(iou)), iou


class QualityTally:
    """Accumulates pointing, right-object and pseudo-mask counts over images."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.point: list[bool] = []
        self.right: list[bool] = []
        self.conf = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.pixels = 0
        self.uncertain = 0

    def add(self, maps: np.ndarray, class_ids: Sequence[int], label: np.ndarray, truth: np.ndarray) -> None:
        self.point += pointing(maps, class_ids, truth)
        self.right += right_object(maps, class_ids, truth)
        self.conf += confusion(label, truth, self.num_classes)
        self.pixels += label.size
        self.uncertain += int((label == IGNORE_INDEX).sum())

    def summary(self) -> dict[str, float]:
        """pointing, right_object (and its count), mIoU over certain pixels, uncertain fraction."""
        miou, _ = mean_iou(self.conf)
        return {
            "pointing": float(np.mean(self.point)) if self.point else float("nan"),
            "right_object": float(np.mean(self.right)) if self.right else float("nan"),
            "right_object_n": len(self.right),
            "mIoU": miou,
            "uncertain": self.uncertain / max(self.pixels, 1),
        }
