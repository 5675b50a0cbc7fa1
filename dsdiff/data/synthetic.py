"""A synthetic dataset on disk: the store that generation writes and the Dataset that training reads.

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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dsdiff.data.classes import IGNORE_INDEX, flat_palette, get_class_list
from dsdiff.data.voc import read_label_png, read_rgb
from dsdiff.io import atomic_path, link_or_copy_atomic, save_image_atomic, stale_tmp_files, write_json_atomic, write_text_atomic

log = logging.getLogger("dsdiff")

CONFIG_FILE = "dataset.json"
MANIFEST = "manifest"
DROPPED = "dropped"
IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG"}
RESTART_HINT = "pass synthetic.overwrite=true to start over there, or choose another synthetic.dir"


def sample_id(index: int) -> str:
    return f"{index:07d}"


def save_label_png(label: np.ndarray, path: Path) -> Path:
    """A (H, W) uint8 label map as a palette PNG (VOC colours), atomically."""
    im = Image.fromarray(np.asarray(label, dtype=np.uint8), mode="P")
    im.putpalette(flat_palette())
    return save_image_atomic(im, path, format="PNG")


def read_jsonl_lines(path: Path) -> list[dict]:
    """Parsed lines of a JSONL file; a torn or corrupt line (a killed writer) is skipped with a warning."""
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s line %d is not valid JSON (a writer killed mid-line?): ignored", path, n)
    return rows


def _repair_tail(path: Path) -> None:
    """Cut a torn last line (no trailing newline) so appending starts on a fresh line."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with path.open("rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        f.truncate(keep)
        log.warning("%s ended in a torn line (a writer killed mid-line): cut it off", path)


_TAILS = {".png": b"IEND\xaeB`\x82", ".jpg": b"\xff\xd9", ".jpeg": b"\xff\xd9"}


def file_problem(path: Path) -> str | None:
    """Why an image file is not a whole image (missing, empty, unreadable header, cut short), or None.

    Cheap: reads the header and the last bytes, not the pixels (PNG must end in IEND, JPEG in EOI).
    """
    try:
        size = path.stat().st_size
    except OSError:
        return "missing"
    if size == 0:
        return "empty (0 bytes)"
    try:
        with Image.open(path) as im:
            im.size  # noqa: B018 - the header parsed
    except Exception as e:  # noqa: BLE001 - any undecodable header
        return f"unreadable ({e})"
    tail = _TAILS.get(path.suffix.lower())
    if tail:
        with path.open("rb") as f:
            f.seek(max(0, size - 16))
            if not f.read().rstrip(b"\0").endswith(tail):
                return "truncated (no end marker)"
    return None


def filter_reason(label: np.ndarray, *, drop_empty: bool = True, max_uncertain: float | None = None) -> str | None:
    """Why a generated label map should be dropped, or None to keep it."""
    label = np.asarray(label)
    if drop_empty and not ((label != 0) & (label != IGNORE_INDEX)).any():
        return "no_foreground"
    if max_uncertain is not None and (label == IGNORE_INDEX).mean() > max_uncertain:
        return "too_uncertain"
    return None


def config_diff(old: Mapping, new: Mapping, prefix: str = "") -> list[str]:
    """Human-readable differences between two configuration dicts (``key: old -> new``)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


class SyntheticStore:
    """Reads and writes one synthetic dataset folder (see the module docstring for the layout)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()

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
        diff = config_diff(old, new)
        if diff:
            raise ValueError(
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
        if not getattr(self, "_repaired", None):
            self._repaired = set()
        if path not in self._repaired:
            _repair_tail(path)
            self._repaired.add(path)
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({**dict(row), "time": round(time.time(), 6)}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

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
            raise ValueError(f"image_format={image_format!r}: use one of {sorted(IMAGE_FORMATS)}")
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
        entry["foreground"] = round(float(((label != 0) & (label != IGNORE_INDEX)).mean()), 4)
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


class SyntheticDataset(Dataset):
    """A synthetic folder as a segmentation Dataset: ``{"image", "mask", "name"}`` like the VOC reader.

    ``max_samples`` keeps samples ``0..max_samples-1`` (``synthetic.num_images`` in training).
    Entries whose files are missing are left out when the dataset opens (with a count); a file
    that fails to decode while training is reported with its path and replaced by the next good
    sample, so an epoch never stops halfway.
    """

    def __init__(self, root: str | Path, transform: Callable | None = None, class_list: str | None = None,
                 max_samples: int | None = None) -> None:
        self.store = SyntheticStore(root)
        self.root = self.store.root
        self.transform = transform
        config = self.store.read_config()
        if config is None:
            raise FileNotFoundError(
                f"no synthetic dataset at {self.root} (no {CONFIG_FILE}): generate one with "
                "`python -m dsdiff.generate +experiment=NAME synthetic.dir=DIR`, or point synthetic.dir at one"
            )
        names = config.get("class_names") or (get_class_list(class_list).classes if class_list else None)
        if names is None:
            raise ValueError(f"{self.config_path} has no class_names: pass class_list=<name>")
        self.classes = tuple(names)
        self.num_classes = len(self.classes)
        entries = self.store.entries()
        if max_samples is not None:  # samples 0..max_samples-1 (a folder extended for a larger run holds more)
            entries = [e for e in entries if not e["id"].isdigit() or int(e["id"]) < max_samples]
        self.entries = [e for e in entries if (self.root / e["image"]).is_file() and (self.root / e["mask"]).is_file()]
        missing = len(entries) - len(self.entries)
        if missing:
            log.warning("%s: %d manifest entries have a missing image or mask and are left out", self.root, missing)
        if not self.entries:
            raise ValueError(f"the synthetic dataset at {self.root} has no finished samples: generate (or resume) it first")
        self.ids = [e["id"] for e in self.entries]
        self.skipped = 0

    @property
    def config_path(self) -> Path:
        return self.store.config_path

    def __len__(self) -> int:
        return len(self.entries)

    def _read(self, entry: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, mask_path = self.root / entry["image"], self.root / entry["mask"]
        try:
            image = read_rgb(image_path)
        except Exception as e:  # noqa: BLE001 - torchvision's decode errors do not name the file
            raise ValueError(f"image {image_path} could not be read: {e}") from e
        try:
            mask = read_label_png(mask_path)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"mask {mask_path} could not be read: {e}") from e
        bad = (mask >= self.num_classes) & (mask != IGNORE_INDEX)
        if bad.any():
            raise ValueError(f"mask {mask_path} holds labels {np.unique(mask[bad]).tolist()} outside 0..{self.num_classes - 1}, 255")
        if mask.shape != tuple(image.shape[1:]):
            raise ValueError(f"mask {mask_path} is {mask.shape} but its image is {tuple(image.shape[1:])}")
        return image, torch.from_numpy(mask)

    def __getitem__(self, index: int) -> dict:
        for step in range(len(self.entries)):
            entry = self.entries[(index + step) % len(self.entries)]
            try:
                image, mask = self._read(entry)
                break
            except Exception as e:  # noqa: BLE001 - any unreadable file is skipped, never fatal mid-epoch
                self.skipped += 1
                log.warning("skipped synthetic sample %s (%s); %d skipped so far in this process", entry["id"], e, self.skipped)
        else:
            raise RuntimeError(f"no sample of the synthetic dataset at {self.root} could be read")
        if self.transform is None:
            return {"image": image, "mask": mask.long(), "name": entry["id"]}
        image, mask = self.transform(image, mask)
        return {"image": image, "mask": mask, "name": entry["id"]}


def export_voc(root: str | Path, out: str | Path | None = None, split: str = "train") -> Path:
    """Lay a synthetic folder out as PASCAL VOC (JPEGImages, SegmentationClass, ImageSets/Segmentation).

    Masks (and JPEG images) are hard-linked where the file system allows, else copied; PNG images
    are re-encoded as JPEG (quality 95). The id list is written last, so a half-done export has
    no list. Re-running skips files already exported. Returns the VOC root (default ``<root>/voc``).
    """
    store = SyntheticStore(root)
    entries = [e for e in store.entries() if (store.root / e["image"]).is_file() and (store.root / e["mask"]).is_file()]
    if not entries:
        raise ValueError(f"nothing to export: the synthetic dataset at {store.root} has no finished samples")
    out = Path(out) if out is not None else store.root / "voc"
    images, masks = out / "JPEGImages", out / "SegmentationClass"
    for folder in (images, masks, out / "ImageSets" / "Segmentation"):
        folder.mkdir(parents=True, exist_ok=True)
    for e in entries:
        src_image, src_mask = store.root / e["image"], store.root / e["mask"]
        dst_image, dst_mask = images / f"{e['id']}.jpg", masks / f"{e['id']}.png"
        if not dst_image.is_file():
            if src_image.suffix == ".jpg":
                link_or_copy_atomic(src_image, dst_image)
            else:
                with Image.open(src_image) as im:
                    save_image_atomic(im.convert("RGB"), dst_image, format="JPEG", quality=95)
        if not dst_mask.is_file():
            link_or_copy_atomic(src_mask, dst_mask)
    write_text_atomic(out / "ImageSets" / "Segmentation" / f"{split}.txt", "".join(f"{e['id']}\n" for e in entries))
    log.info("exported %d samples as a VOC folder at %s", len(entries), out)
    return out


def summarize(store: SyntheticStore) -> dict[str, Any]:
    """Counts for logs and closing reports: samples, dropped (by reason), mean foreground/uncertain share."""
    entries, dropped = store.entries(), store.dropped()
    reasons: dict[str, int] = {}
    for d in dropped:
        reasons[d.get("reason", "?")] = reasons.get(d.get("reason", "?"), 0) + 1
    mean = lambda key: round(float(np.mean([e.get(key, 0.0) for e in entries])), 4) if entries else 0.0  # noqa: E731
    return {"samples": len(entries), "dropped": len(dropped), "dropped_by_reason": reasons,
            "mean_foreground": mean("foreground"), "mean_uncertain": mean("uncertain")}

