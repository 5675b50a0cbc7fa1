"""Writing generated samples into a synthetic folder: the prediction writer, finishing the
folder (merged shards, ``grid.png``), and the checks on ``synthetic.dir`` and its ``dataset.json``."""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter

from dsdiff.data.synthetic import SyntheticStore, filter_reason

log = logging.getLogger("dsdiff")


class SyntheticWriter(BasePredictionWriter):
    """Prepares the folder once the pipeline has loaded, writes generated samples into a
    :class:`SyntheticStore` (per-rank shards), applies the filters, and finishes the folder."""

    def __init__(self, store: SyntheticStore, config: Mapping | None = None, *, overwrite: bool = False,
                 image_format: str = "png", jpeg_quality: int = 95, save_attention: bool = False, drop_empty: bool = True,
                 max_uncertain: float | None = None, grid_size: int = 8, class_names: Sequence[str] | None = None) -> None:
        super().__init__(write_interval="batch")
        self.store, self.config, self.overwrite = store, config, overwrite
        self.image_format, self.jpeg_quality = image_format, jpeg_quality
        self.save_attention, self.drop_empty, self.max_uncertain = save_attention, drop_empty, max_uncertain
        self.grid_size, self.class_names = grid_size, class_names
        self.grid_samples: dict[str, Any] = {}  # the lowest ids this rank made, for grid.png
        self.written = self.dropped = 0
        self.grid_path: Path | None = None

    def _failed(self, what: str, e: OSError) -> OSError:
        return OSError(e.errno, f"could not write {what} into synthetic.dir={self.store.root} ({e}): free space or fix "
                                "permissions there and rerun the same command; finished samples are kept")

    def on_predict_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and self.config is not None:
            try:
                self.store.prepare(self.config, overwrite=self.overwrite, clean_tmp=True)
            except OSError as e:
                raise self._failed("dataset.json", e) from e
        trainer.strategy.barrier("dsdiff_generation_prepared")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0) -> None:
        tag = f"rank{trainer.global_rank}"
        for sid, sample in prediction:
            try:
                self._write(sid, sample, tag)
            except OSError as e:
                raise self._failed(f"sample {sid}", e) from e

    def _write(self, sid: str, sample, tag: str) -> None:
        metadata = {k: v for k, v in sample.metadata.items() if k != "id"}
        metadata.update(class_ids=list(sample.class_ids), record_id=sample.metadata.get("id"))
        reason = filter_reason(sample.label, drop_empty=self.drop_empty, max_uncertain=self.max_uncertain)
        if reason:
            self.store.write_dropped(sid, reason, metadata, tag=tag)
            self.dropped += 1
            return
        maps = sample.class_maps if self.save_attention else None
        self.store.write_sample(sid, sample.image, sample.label, metadata, tag=tag, image_format=self.image_format,
                                jpeg_quality=self.jpeg_quality, class_maps=maps)
        self.written += 1
        if self.grid_size:
            self.grid_samples[sid] = sample
            if len(self.grid_samples) > self.grid_size:
                del self.grid_samples[max(self.grid_samples)]

    def on_predict_end(self, trainer, pl_module) -> None:
        log.info("rank %d wrote %d samples, dropped %d", trainer.global_rank, self.written, self.dropped)
        trainer.strategy.barrier("dsdiff_generation_end")
        if trainer.is_global_zero:
            try:
                self.grid_path = finish_folder(self.store, self.grid_size, self.class_names, self.grid_samples, trainer.loggers)
            except OSError as e:
                raise self._failed("the merged manifest or grid.png", e) from e
        trainer.strategy.barrier("dsdiff_generation_compacted")


def _disk_sample(store: SyntheticStore, entry: Mapping) -> SimpleNamespace:
    """A finished sample read back for the grid (attention panels only if ``save_attention`` kept them)."""
    from PIL import Image

    with Image.open(store.root / entry["image"]) as im:
        image = np.asarray(im.convert("RGB"))
    with Image.open(store.root / entry["mask"]) as im:
        label = np.asarray(im)
    maps = np.zeros((0, *label.shape), np.float32)
    if entry.get("attention") and (store.root / entry["attention"]).is_file():
        maps = np.load(store.root / entry["attention"])["class_maps"].astype(np.float32)
    return SimpleNamespace(image=image, label=label, class_maps=maps, class_ids=list(entry.get("class_ids", []))[: len(maps)])


def finish_folder(store: SyntheticStore, grid_size: int, class_names: Sequence[str] | None, made: Mapping[str, Any] | None = None,
                  loggers: Sequence = ()) -> Path | None:
    """Merge the shards and draw ``grid.png`` from the first ``grid_size`` samples (kept in memory
    where this run made them, else read back); an existing grid is kept when nothing new was made."""
    store.compact()
    grid = store.root / "grid.png"
    if not grid_size or (not made and grid.is_file()):
        return grid if grid.is_file() else None
    entries = store.entries()[:grid_size]
    if not entries:
        return None
    from dsdiff.viz import save_sample_grid

    made = made or {}
    samples = [made[e["id"]] if e["id"] in made else _disk_sample(store, e) for e in entries]
    path = save_sample_grid(samples, grid, class_names)
    for logger in loggers:
        if hasattr(logger, "log_image"):
            logger.log_image(key="synthetic/samples", images=[str(path)])
    return path


def adopt_older_folder(store: SyntheticStore, config: Mapping) -> None:
    """Upgrade the ``dataset.json`` of a folder made before batch groups and model digests (no
    ``generator.batch_size``, the model as a path) when it matches ``config`` in everything else."""
    from dsdiff.data.synthetic import config_diff
    from dsdiff.diffusion.generator import model_identity
    from dsdiff.io import write_json_atomic

    old = store.read_config()
    if not old or "batch_size" in old.get("generator", {}):
        return
    model = old["generator"].get("model")
    moved = isinstance(model, str) and Path(model).is_dir()
    upgraded = {**old, "generator": {**old["generator"], "model": model_identity(model) if moved else model,
                                     "batch_size": config["generator"]["batch_size"]}}
    if config_diff(upgraded, json.loads(json.dumps(dict(config)))):
        return  # check_config lists what differs
    log.warning("%s was made by an older dsdiff (no batch groups, model recorded by path): adopting it with "
                "generator.batch_size=%d; samples made before keep their bits", store.root, config["generator"]["batch_size"])
    write_json_atomic(store.config_path, upgraded)


def check_output_dir(path: Path, setting: str = "synthetic.dir") -> None:
    """Raise, naming ``setting``, if ``path`` cannot become a writable folder; writes nothing."""
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{setting}={path} is a file, not a folder: point {setting} at a folder (new or made by dsdiff)")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"{setting}={path} lies under the file {parent}: point {setting} at a folder path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{setting}={path}: {parent} is not writable (read-only or another user's): "
                              f"choose another {setting} or fix its permissions")
