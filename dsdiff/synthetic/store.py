"""A synthetic dataset on disk: the folder, its configuration check, its manifest, and :func:`store_sample`,
the one way a generated sample enters it (the prediction writer and the on-the-fly stream both use it).

Layout of ``synthetic.dir``::

    dataset.json            the configuration that made the folder (generation into it must match)
    images/<id>.png|jpg     generated images
    masks/<id>.png          palette PNG labels: 0..C-1, 255 = uncertain (ignored by the loss)
    attention/<id>.npz      per-class maps (float16, compressed), only with ``synthetic.save_attention``
    manifest.jsonl          one JSON line per finished sample (merged when a generation run completes)
    manifest.<tag>.jsonl    per-rank / per-worker shards while a run is in progress; read with the rest
    dropped.jsonl           samples removed by the filters, with the reason (and dropped.<tag>.jsonl)
    grid.png                a sample grid (image | attention | label), written after generation

Every file is written to a temporary name and renamed, so a reader never sees half a file; a
sample is done only once its manifest line is written, after its image and mask. A killed run
leaves at most a torn last manifest line, which is ignored on reading and cut off before the
shard is appended to again. Ids are ``f"{i:07d}"`` for sample index ``i``.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dsdiff.data.classes import IGNORE_INDEX, flat_palette
from dsdiff.diffusion.settings import LabelSettings
from dsdiff.utils.config import config_diff
from dsdiff.utils.errors import NotAFolderError, NotWritableError, SettingError
from dsdiff.utils.io import (
    ShardAppender,
    atomic_path,
    file_problem,
    read_jsonl_lines,
    save_image_atomic,
    stale_tmp_files,
    write_json_atomic,
    write_text_atomic,
)

log = logging.getLogger("dsdiff")

CONFIG_FILE = "dataset.json"
MANIFEST = "manifest"
DROPPED = "dropped"
IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG"}
PROMPT_KEYS = {"file": "synthetic.prompts", "template": "synthetic.template", "max_classes": "synthetic.max_classes_per_prompt",
               "records": "the prompt records (their number)", "digest": "the prompt records (their content)"}
RESTART_HINT = "pass synthetic.overwrite=true to start over there, or choose another synthetic.dir"


def setting_name(key: str) -> str:
    """The setting behind a ``dataset.json`` key: ``generator.tau`` -> ``generator.labels.tau``,
    ``seed`` -> ``synthetic.seed``, ``prompts.digest`` -> the prompt records' content."""
    head, _, rest = key.partition(".")
    if head == "generator":
        return f"generator.labels.{rest}" if rest.split(".")[0] in LabelSettings.__dataclass_fields__ else key
    if head == "prompts":
        return PROMPT_KEYS.get(rest, key)
    return {"dtype": "generator.dtype", "class_names": "data.class_list (its class names)"}.get(head, f"synthetic.{key}")


def setting_diff(old: Mapping, new: Mapping) -> list[str]:
    """:func:`~dsdiff.utils.config.config_diff` of two ``dataset.json`` dicts, keyed by today's setting names."""
    return [f"{setting_name(line.split(': ', 1)[0])}: {line.split(': ', 1)[1]}" for line in config_diff(old, new)]


def save_label_png(label: np.ndarray, path: Path) -> Path:
    """A (H, W) uint8 label map as a palette PNG (VOC colours), atomically."""
    im = Image.fromarray(np.asarray(label, dtype=np.uint8), mode="P")
    im.putpalette(flat_palette())
    return save_image_atomic(im, path, format="PNG")


def filter_reason(label: np.ndarray, *, drop_empty: bool = True, max_uncertain: float | None = None,
                  class_ids: Sequence[int] | None = None) -> str | None:
    """Why a generated label map should be dropped, or None to keep it. Empty: no pixel of a prompted class
    (``class_ids``; without them, no pixel other than 0 and 255: a class list with a background)."""
    label = np.asarray(label)
    found = np.isin(label, list(class_ids)) if class_ids is not None else (label != 0) & (label != IGNORE_INDEX)
    if drop_empty and not found.any():
        return "no_foreground"
    if max_uncertain is not None and (label == IGNORE_INDEX).mean() > max_uncertain:
        return "too_uncertain"
    return None


class SyntheticStore:
    """Reads and writes one synthetic dataset folder (see the module docstring for the layout)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        self._shards = ShardAppender()

    # -- configuration -------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_FILE

    def read_config(self) -> dict | None:
        if not self.config_path.is_file():
            return None
        return json.loads(self.config_path.read_text())

    def check_config(self, config: Mapping) -> None:
        """Raise if the folder was made with a different configuration than ``config``."""
        old = self.read_config()
        if old is None:
            return
        new = json.loads(json.dumps(dict(config)))  # the form it takes on disk
        diff = setting_diff(old, new)
        if diff:
            raise SettingError(
                f"the synthetic dataset at {self.root} was made with a different configuration "
                f"({'; '.join(diff[:6])}{'; ...' if len(diff) > 6 else ''}): {RESTART_HINT}"
            )

    def prepare(self, config: Mapping, *, overwrite: bool = False, clean_tmp: bool = False) -> None:
        """Create the folder for ``config``; refuse a folder made differently unless ``overwrite``.

        ``clean_tmp`` removes temporary files a killed writer left behind; only call it when no
        other process is writing (generation does it on rank 0 before the others start).
        """
        if overwrite and self.root.exists():
            log.warning("synthetic.overwrite=true: deleting the synthetic dataset at %s", self.root)
            shutil.rmtree(self.root)
        self.check_config(config)
        self.root.mkdir(parents=True, exist_ok=True)
        if clean_tmp:
            stale = [p for sub in ("", "images", "masks", "attention") for p in stale_tmp_files(self.root / sub)]
            for p in stale:
                p.unlink(missing_ok=True)
            if stale:
                log.info("%s: removed %d temporary files of an interrupted run", self.root, len(stale))
        if not self.config_path.is_file():
            write_json_atomic(self.config_path, dict(config))

    # -- reading -------------------------------------------------------------------------------
    def _files(self, stem: str) -> list[Path]:
        merged = self.root / f"{stem}.jsonl"
        shards = sorted(self.root.glob(f"{stem}.*.jsonl"))
        return ([merged] if merged.is_file() else []) + shards

    def _rows(self, stem: str) -> dict[str, dict]:
        rows: dict[str, dict] = {}
        for path in self._files(stem):
            for row in read_jsonl_lines(path):
                if "id" in row:
                    rows[str(row["id"])] = row
        return rows

    def _latest(self) -> tuple[dict[str, dict], dict[str, dict]]:
        """Manifest and dropped rows by id; an id in both (its group made again, the filter now
        deciding otherwise) counts where its latest row is."""
        kept, dropped = self._rows(MANIFEST), self._rows(DROPPED)
        for sid in set(kept) & set(dropped):
            if kept[sid].get("time", 0) >= dropped[sid].get("time", 0):
                del dropped[sid]
            else:
                del kept[sid]
        return kept, dropped

    def entries(self) -> list[dict]:
        """Manifest entries of finished samples, one per id, sorted by id."""
        return [row for _, row in sorted(self._latest()[0].items())]

    def present_entries(self, what: str = "") -> list[dict]:
        """:meth:`entries` whose image and mask files exist; with ``what`` (e.g. "export"), none is an error."""
        entries = [e for e in self.entries() if (self.root / e["image"]).is_file() and (self.root / e["mask"]).is_file()]
        if what and not entries:
            raise SettingError(f"nothing to {what}: the synthetic dataset at {self.root} has no finished samples")
        return entries

    def dropped(self) -> list[dict]:
        return [row for _, row in sorted(self._latest()[1].items())]

    def done_ids(self) -> set[str]:
        """Ids that need no generation: dropped, or in the manifest with an image and mask that are whole
        files (:func:`file_problem`); a sample whose file is empty or cut short is logged and left to redo."""
        done, broken = set(), []
        for e in self.entries():
            problems = [(f, why) for f in (self.root / e["image"], self.root / e["mask"]) if (why := file_problem(f))]
            if not problems:
                done.add(e["id"])
            elif any(why != "missing" for _, why in problems):
                broken.append(f"{problems[0][0]} is {problems[0][1]}")
        if broken:
            log.warning("%s: %d finished samples have a broken file and will be made again, e.g. %s",
                        self.root, len(broken), "; ".join(broken[:3]))
        return done | {d["id"] for d in self.dropped()}

    # -- writing -------------------------------------------------------------------------------
    def _append(self, stem: str, tag: str, row: Mapping) -> None:
        path = self.root / f"{stem}.{tag}.jsonl"
        self._shards.append(path, json.dumps({**dict(row), "time": round(time.time(), 6)}, ensure_ascii=False))

    def write_sample(
        self,
        sid: str,
        image: np.ndarray,
        label: np.ndarray,
        metadata: Mapping[str, Any],
        *,
        tag: str = "rank0",
        image_format: str = "png",
        jpeg_quality: int = 95,
        class_maps: np.ndarray | None = None,
    ) -> dict:
        """Write image, mask (and attention), then the manifest line that marks the sample done."""
        if image_format not in IMAGE_FORMATS:
            raise SettingError(f"image_format={image_format!r}: use one of {sorted(IMAGE_FORMATS)}")
        image_rel, mask_rel = f"images/{sid}.{image_format}", f"masks/{sid}.png"
        kwargs = {"quality": jpeg_quality} if image_format == "jpg" else {}
        save_image_atomic(Image.fromarray(np.asarray(image, dtype=np.uint8)), self.root / image_rel, format=IMAGE_FORMATS[image_format], **kwargs)
        save_label_png(label, self.root / mask_rel)
        entry = {**dict(metadata), "id": sid, "image": image_rel, "mask": mask_rel}
        if class_maps is not None:
            att = self.root / "attention" / f"{sid}.npz"
            with atomic_path(att) as tmp, tmp.open("wb") as f:
                np.savez_compressed(f, class_maps=np.asarray(class_maps, dtype=np.float16))
            entry["attention"] = f"attention/{sid}.npz"
        return self._finish(entry, label, tag)

    def write_label(self, sid: str, label: np.ndarray, metadata: Mapping[str, Any], *, image: str | Path, tag: str = "rank0") -> dict:
        """A new label map for an image that lives elsewhere (``image``: an absolute path), e.g. a pseudo-label."""
        mask_rel = f"masks/{sid}.png"
        save_label_png(label, self.root / mask_rel)
        return self._finish({**dict(metadata), "id": sid, "image": str(Path(image).resolve()), "mask": mask_rel}, label, tag)

    def _finish(self, entry: dict, label: np.ndarray, tag: str) -> dict:
        label = np.asarray(label)
        # a prompted class 0 (a list without background, e.g. Cityscapes' road) is foreground too
        background = label == 0 if 0 not in entry.get("class_ids", ()) else np.zeros(label.shape, dtype=bool)
        entry["foreground"] = round(float((~background & (label != IGNORE_INDEX)).mean()), 4)
        entry["uncertain"] = round(float((label == IGNORE_INDEX).mean()), 4)
        self._append(MANIFEST, tag, entry)  # last: the sample is done once this line is written
        return entry

    def write_dropped(self, sid: str, reason: str, metadata: Mapping[str, Any], *, tag: str = "rank0") -> None:
        self._append(DROPPED, tag, {**dict(metadata), "id": sid, "reason": reason})

    def compact(self) -> int:
        """Merge every manifest/dropped shard into ``manifest.jsonl`` / ``dropped.jsonl``; returns the sample count.

        The merged file is renamed into place before the shards are removed, so a kill at any
        point loses nothing (entries are deduplicated by id on reading).
        """
        count = 0
        for stem in (MANIFEST, DROPPED):
            shards = sorted(self.root.glob(f"{stem}.*.jsonl"))
            if not shards:
                count = len(self._rows(stem)) if stem == MANIFEST else count
                continue
            rows = self._rows(stem)
            text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for _, row in sorted(rows.items()))
            write_text_atomic(self.root / f"{stem}.jsonl", text)
            for shard in shards:
                shard.unlink()
            if stem == MANIFEST:
                count = len(rows)
        return count


@dataclass(frozen=True)
class WriteOptions:
    """How samples are stored and filtered (``conf/synthetic``: image format, attention, filters)."""

    image_format: str = "png"
    jpeg_quality: int = 95
    save_attention: bool = False
    drop_empty: bool = True
    max_uncertain: float | None = None

    def __post_init__(self) -> None:
        if self.image_format not in IMAGE_FORMATS:
            raise SettingError(f"synthetic.image_format={self.image_format!r}: use one of {sorted(IMAGE_FORMATS)}")
        quality = self.jpeg_quality
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
            raise SettingError(f"synthetic.jpeg_quality={quality!r}: PIL's JPEG quality, a whole number in 1..100 "
                               "(75: PIL's default, the original's; 95: near lossless)")

    @classmethod
    def from_synthetic(cls, synthetic: Mapping) -> WriteOptions:
        filters = synthetic.get("filters") or {}
        return cls(image_format=synthetic.get("image_format", "png"), jpeg_quality=synthetic.get("jpeg_quality", 95),
                   save_attention=bool(synthetic.get("save_attention")), drop_empty=bool(filters.get("drop_empty", True)),
                   max_uncertain=filters.get("max_uncertain"))


def store_sample(store: SyntheticStore, sid: str, sample, options: WriteOptions, tag: str) -> str | None:
    """Write a generated :class:`dsdiff.diffusion.generator.Sample` as ``sid`` (or record why the filters
    drop it); returns that reason, or None when the sample was kept."""
    metadata = {k: v for k, v in sample.metadata.items() if k != "id"}
    metadata.update(class_ids=list(sample.class_ids), record_id=sample.metadata.get("id"))
    reason = filter_reason(sample.label, drop_empty=options.drop_empty, max_uncertain=options.max_uncertain,
                           class_ids=sample.class_ids)
    if reason:
        store.write_dropped(sid, reason, metadata, tag=tag)
        return reason
    store.write_sample(sid, sample.image, sample.label, metadata, tag=tag, image_format=options.image_format,
                       jpeg_quality=options.jpeg_quality, class_maps=sample.class_maps if options.save_attention else None)
    return None


def check_output_dir(path: Path, setting: str = "synthetic.dir") -> None:
    """Raise, naming ``setting``, if ``path`` cannot become a writable folder; writes nothing."""
    if path.exists() and not path.is_dir():
        raise NotAFolderError(f"{setting}={path} is a file, not a folder: point {setting} at a folder (new or made by dsdiff)")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NotAFolderError(f"{setting}={path} lies under the file {parent}: point {setting} at a folder path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise NotWritableError(f"{setting}={path}: {parent} is not writable (read-only or another user's): "
                              f"choose another {setting} or fix its permissions")
