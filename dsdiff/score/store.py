"""The results folder of one scoring configuration: per-image results that survive a kill.

``<score.dir>/<digest>/`` holds ``settings.json`` (what decides the results), ``labels/<name>.png``
(each image's attention labels, 255 uncertain) and the per-image lines: ``scores.<rank>.jsonl``
shards while a run is going, merged into ``scores.jsonl`` at its end. An image counts as done once
its line is written, which happens after its label PNG; a rerun scores only the groups that lack one.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from dsdiff.synthetic.store import save_label_png
from dsdiff.utils.config import config_diff
from dsdiff.utils.errors import SettingError
from dsdiff.utils.io import (
    ShardAppender,
    file_problem,
    read_jsonl_lines,
    write_json_atomic,
    write_text_atomic,
)


class ScoreStore:
    """Read and write one results folder (see the module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._shards = ShardAppender()

    @property
    def settings_path(self) -> Path:
        return self.root / "settings.json"

    @property
    def merged(self) -> Path:
        return self.root / "scores.jsonl"

    def label_path(self, name: str) -> Path:
        return self.root / "labels" / f"{name}.png"

    def check_settings(self, config: Mapping) -> None:
        """Refuse a folder whose recorded settings differ (a digest collision or an edited file), listing the keys."""
        if not self.settings_path.is_file():
            return
        old = json.loads(self.settings_path.read_text(encoding="utf-8"))
        diff = config_diff(old, json.loads(json.dumps(dict(config), default=str)))
        if diff:
            raise SettingError(f"{self.root} holds results of other settings ({'; '.join(diff[:6])}): delete that folder "
                             "or pass another score.dir")

    def prepare(self, config: Mapping) -> None:
        (self.root / "labels").mkdir(parents=True, exist_ok=True)
        if not self.settings_path.is_file():
            write_json_atomic(self.settings_path, json.loads(json.dumps(dict(config), default=str)))

    def rows(self) -> dict[str, dict]:
        """Finished images by name (a later line wins), those whose label PNG is whole."""
        out: dict[str, dict] = {}
        for path in [self.merged, *sorted(self.root.glob("scores.*.jsonl"))]:
            if path.is_file():
                for row in read_jsonl_lines(path):
                    out[row["name"]] = row
        return {n: r for n, r in out.items() if file_problem(self.label_path(n)) is None}

    def write(self, row: dict, label: np.ndarray, tag: str) -> None:
        """Store one image's label map, then its line in this process's shard."""
        save_label_png(label, self.label_path(row["name"]))
        self._shards.append(self.root / f"scores.{tag}.jsonl", json.dumps(row))

    def compact(self) -> None:
        """Merge the shards into ``scores.jsonl`` (sorted by position), atomically, then drop them."""
        shards = sorted(self.root.glob("scores.*.jsonl"))
        if not shards:
            return
        rows = sorted(self.rows().values(), key=lambda r: r["position"])
        write_text_atomic(self.merged, "".join(json.dumps(r) + "\n" for r in rows))
        for shard in shards:
            shard.unlink(missing_ok=True)

    def read_label(self, name: str) -> np.ndarray:
        with Image.open(self.label_path(name)) as im:
            return np.asarray(im)
