"""What the filters dropped, and when that fails generation: :func:`summarize` counts a finished
folder (samples, drops by reason, mean foreground and uncertain share) for logs and reports;
:func:`check_dropped` stops a run whose filters kept nothing, or dropped more than
``synthetic.max_dropped`` of what was made, with the reasons counted.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from dsdiff.synthetic.store import DROPPED, MANIFEST, SyntheticStore
from dsdiff.utils.errors import SettingError


def summarize(store: SyntheticStore) -> dict[str, Any]:
    """Counts for logs and closing reports: samples, dropped (by reason), mean foreground/uncertain share."""
    entries, dropped = store.entries(), store.dropped()
    reasons: dict[str, int] = {}
    for d in dropped:
        reasons[d.get("reason", "?")] = reasons.get(d.get("reason", "?"), 0) + 1
    mean = lambda key: round(float(np.mean([e.get(key, 0.0) for e in entries])), 4) if entries else 0.0  # noqa: E731
    return {"samples": len(entries), "dropped": len(dropped), "dropped_by_reason": reasons,
            "mean_foreground": mean("foreground"), "mean_uncertain": mean("uncertain")}


def check_max_dropped(value: Any) -> float:
    """``synthetic.max_dropped`` as a share in [0, 1]; raises naming the setting otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise SettingError(f"synthetic.max_dropped={value!r}: the largest share of made samples the filters may drop "
                           "before generation fails, a number from 0 to 1 (default 0.5; 1 never fails)")
    return float(value)


def check_dropped(store: SyntheticStore, summary: Mapping[str, Any], max_dropped: Any, reset: bool = True) -> None:
    """Fail when generation kept no sample, or the filters dropped more than ``max_dropped`` of what was made.

    With no sample kept the folder holds nothing worth keeping: its ``dataset.json`` and drop lists
    are removed (``reset``) so that a rerun with corrected prompts or filters starts it afresh. With
    some samples kept the folder stays as it is: a rerun with a higher ``synthetic.max_dropped``
    accepts it without generating again.
    """
    share = check_max_dropped(max_dropped)
    kept, dropped = int(summary["samples"]), int(summary["dropped"])
    made = kept + dropped
    if made == 0 or (kept and dropped <= share * made):
        return
    reasons = ", ".join(f"{reason}: {n} of {made}" for reason, n in sorted(summary["dropped_by_reason"].items()))
    lines = f"{store.root / 'dropped.jsonl'}"
    if not kept:
        if reset:
            for path in [store.config_path, store.root / "grid.png", *store.root.glob(f"{DROPPED}*.jsonl"),
                         *store.root.glob(f"{MANIFEST}*.jsonl")]:
                path.unlink(missing_ok=True)
        raise SettingError(
            f"generation kept 0 of {made} samples: every one was dropped by synthetic.filters ({reasons}). "
            "no_foreground: no pixel of a prompted class was labelled (check the prompts' class_ids, the "
            "generator.labels thresholds, or pass synthetic.filters.drop_empty=false); uncertain: raise or null "
            f"synthetic.filters.max_uncertain. The folder {store.root} was reset, so the corrected rerun starts afresh")
    raise SettingError(
        f"synthetic.filters dropped {dropped} of {made} samples ({dropped / made:.0%} > synthetic.max_dropped={share:g}; "
        f"{reasons}; listed in {lines}). Fix the prompts or filters and rerun with synthetic.overwrite=true, or accept "
        f"the {kept} kept samples with synthetic.max_dropped={min(1.0, round(dropped / made + 0.05, 2)):g} (the folder is kept: "
        "that rerun makes nothing again)")
