"""From stored per-image results to what a user reads: ``label_scores.json``'s metrics, the sweep
objective, and the overlay grid (image | true mask | attention labels)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dsdiff.diffusion.quality import QualityTally
from dsdiff.score.predict import read_item
from dsdiff.score.store import ScoreStore
from dsdiff.utils.io import save_image_atomic
from dsdiff.viz.samples import comparison_grid


def objective(miou: float, certain: float, min_certain: float) -> float:
    """The sweep objective: ``labels/mIoU`` when at least ``min_certain`` of the pixels are certain, else
    ``labels/mIoU * certain / min_certain``, so a setting cannot win by leaving pixels uncertain."""
    if not math.isfinite(miou):
        return 0.0
    return miou if certain >= min_certain or min_certain <= 0 else miou * certain / min_certain


def label_metrics(rows: Sequence[dict], class_names: Sequence[str], min_certain: float) -> dict[str, float | int | None]:
    """``labels/mIoU`` (over certain pixels, background included), ``labels/uncertain``, ``labels/certain``,
    ``labels/pointing``, ``labels/right_object`` (+ ``_n``), ``labels/IoU/<class>``, ``labels/images``, ``labels/objective``."""
    tally = QualityTally(len(class_names))
    for row in rows:
        tally.add_record(row)
    s = tally.summary()
    certain = 1.0 - s["uncertain"]
    out = {
        "labels/mIoU": s["mIoU"], "labels/uncertain": s["uncertain"], "labels/certain": certain,
        "labels/pointing": s["pointing"], "labels/right_object": s["right_object"],
        "labels/right_object_n": s["right_object_n"], "labels/pointing_n": len(tally.point), "labels/images": tally.images,
        "labels/objective": objective(s["mIoU"], certain, min_certain),
    }
    out.update({f"labels/IoU/{name}": v for name, v in tally.per_class_iou(class_names).items()})
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in out.items()}


def save_overlay_grid(store: ScoreStore, dataset, items: Sequence[dict], rows: int, path: str | Path) -> Path | None:
    """The first ``rows`` scored images: image | true mask | attention labels (white: uncertain)."""
    panels = []
    for item in items[:rows]:
        image, truth = read_item(dataset, item["index"])
        panels.append([image, truth.clip(0, 255).astype(np.uint8), store.read_label(item["name"])])
    if not panels:
        return None
    return save_image_atomic(comparison_grid(panels, ["image", "true mask", "attention labels"]), path, format="PNG")
