"""How well attention labels match true masks: pointing, right-object rate, per-class IoU (pure numpy).

Per image, ``maps`` are (K, H, W) class maps in ``class_ids`` order (``Sample.class_maps``),
``label`` the (H, W) attention label map (255 uncertain) and ``truth`` the (H, W) true label
map; truth pixels outside the class list (VOC's 255 void band) are left out of every count.
:func:`image_record` turns one image into JSON-able counts and :class:`QualityTally` sums
them, so per-image results can be stored (a resumable run) and aggregated later.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from dsdiff.data.classes import IGNORE_INDEX


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
    """(C, C) counts of (truth, prediction) over pixels whose prediction is certain and whose truth is a class."""
    keep = (pred != ignore_index) & (truth < num_classes)
    index = truth[keep].astype(np.int64) * num_classes + pred[keep].astype(np.int64)
    return np.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def mean_iou(conf: np.ndarray) -> tuple[float, np.ndarray]:
    """mIoU over classes that occur (in truth or prediction), background included; and per-class IoU (NaN if absent)."""
    inter = np.diag(conf).astype(float)
    union = conf.sum(0) + conf.sum(1) - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"), iou


def image_record(maps: np.ndarray, class_ids: Sequence[int], label: np.ndarray, truth: np.ndarray,
                 num_classes: int) -> dict:
    """One image's counts, JSON-able: pointing and right-object decisions, the sparse confusion
    ``[[truth, pred, count], ...]``, pixels with a true class, and how many of those are uncertain."""
    known = truth < num_classes
    conf = confusion(label, truth, num_classes)
    rows, cols = np.nonzero(conf)
    return {
        "pointing": pointing(maps, class_ids, truth),
        "right_object": right_object(maps, class_ids, truth),
        "confusion": [[int(t), int(p), int(conf[t, p])] for t, p in zip(rows, cols)],
        "pixels": int(known.sum()),
        "uncertain": int((label[known] == IGNORE_INDEX).sum()),
    }


class QualityTally:
    """Accumulates pointing, right-object and pseudo-mask counts over images."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.point: list[bool] = []
        self.right: list[bool] = []
        self.conf = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.pixels = 0
        self.uncertain = 0
        self.images = 0

    def add(self, maps: np.ndarray, class_ids: Sequence[int], label: np.ndarray, truth: np.ndarray) -> None:
        self.add_record(image_record(maps, class_ids, label, truth, self.num_classes))

    def add_record(self, record: Mapping) -> None:
        """Add an :func:`image_record` (as stored in a JSONL line)."""
        self.point += [bool(v) for v in record["pointing"]]
        self.right += [bool(v) for v in record["right_object"]]
        for t, p, n in record["confusion"]:
            self.conf[t, p] += n
        self.pixels += int(record["pixels"])
        self.uncertain += int(record["uncertain"])
        self.images += 1

    def per_class_iou(self, class_names: Sequence[str]) -> dict[str, float]:
        """IoU of every class that occurs (in truth or labels), by name."""
        _, iou = mean_iou(self.conf)
        return {name: float(v) for name, v in zip(class_names, iou) if np.isfinite(v)}

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
