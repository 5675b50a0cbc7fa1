"""Segmentation metrics: per-class IoU with absent classes excluded from the mean."""
from __future__ import annotations

import torch
from torchmetrics.classification import MulticlassJaccardIndex

from dsdiff.data.classes import IGNORE_INDEX


def iou_metric(num_classes: int, ignore_index: int = IGNORE_INDEX) -> MulticlassJaccardIndex:
    """Per-class IoU; a class absent from both prediction and label scores NaN (not 0)."""
    return MulticlassJaccardIndex(
        num_classes, average="none", ignore_index=ignore_index, zero_division=float("nan")
    )


def mean_iou(per_class: torch.Tensor) -> torch.Tensor:
    """mIoU over the classes that occur (NaN entries skipped), as mmseg and the paper report it."""
    return per_class.nanmean()
