"""Generating a synthetic folder as Lightning prediction (one process, DDP, several nodes alike).

:func:`generate_dataset` follows a checked :class:`~dsdiff.synthetic.spec.GenerationPlan`:
``GenerationDataModule`` lists the groups the folder still lacks (after a barrier, so every rank
sees the same list) and Lightning's predict sampler gives each rank its own groups with no repeats;
``GenerationModule.predict_step`` runs the generator on one group; ``SyntheticWriter`` (a
``BasePredictionWriter``) writes each sample through :func:`~dsdiff.synthetic.store.store_sample`
into a per-rank manifest shard, then the shards are merged and ``grid.png`` drawn (also by a rerun
with nothing left to make, which loads no weights). ``dataset.json`` is written once the pipeline
has loaded, so a failed start leaves nothing behind.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dsdiff.diffusion.pipeline import model_identity
from dsdiff.synthetic.export import export_folder
from dsdiff.synthetic.spec import GenerationPlan, sample_groups, sample_id
from dsdiff.synthetic.drops import check_dropped, summarize
from dsdiff.synthetic.store import SyntheticStore, store_sample
from dsdiff.utils.config import config_diff
from dsdiff.utils.errors import WriteError
from dsdiff.utils.io import write_json_atomic
from dsdiff.utils.progress import LogProgress
from dsdiff.viz.samples import save_sample_grid

log = logging.getLogger("dsdiff")


def pending_groups(store: SyntheticStore, num_images: int, batch_size: int, overwrite: bool = False) -> list[list[int]]:
    """Groups with any member not yet done (all of them with ``overwrite``)."""
    done = set() if overwrite else store.done_ids()
    pending = [g for g in sample_groups(num_images, batch_size) if any(sample_id(i) not in done for i in g)]
    have = sum(sample_id(i) in done for i in range(num_images))
    log.info("%s: %d of %d samples done, %d to generate (%d groups of %d ids, made whole)", store.root, have,
             num_images, num_images - have, len(pending), batch_size)
    return pending


class GenerationRequests(Dataset):
    """Group ``k`` -> its requests ``[{"id", "seed", "record"}]``."""

    def __init__(self, plan: GenerationPlan, groups: Sequence[Sequence[int]]) -> None:
        self.plan, self.groups = plan, [list(g) for g in groups]

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, k: int) -> list[dict]:
        return self.plan.requests(self.groups[k])


def _one_group(batch: list[list[dict]]) -> list[dict]:
    return batch[0]


class GenerationDataModule(L.LightningDataModule):
    """Serves the pending groups (it writes nothing: the writer prepares the folder)."""

    def __init__(self, plan: GenerationPlan, pending: list[list[int]]) -> None:
        super().__init__()
        self.plan, self.pending = plan, pending

    def setup(self, stage: str | None = None) -> None:
        world = self.trainer.world_size if self.trainer is not None else 1
        # every rank needs a batch: Lightning refuses a rank with an empty predict loader (and would skip its hooks)
        self.pending = self.pending + [[]] * max(0, world - len(self.pending))
        if self.trainer is not None:
            self.trainer.strategy.barrier("dsdiff_generation_setup")  # nobody writes before all have listed

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(GenerationRequests(self.plan, self.pending), batch_size=1, shuffle=False, num_workers=0, collate_fn=_one_group)


class GenerationModule(L.LightningModule):
    """Runs the plan's :class:`dsdiff.diffusion.SyntheticGenerator`; ``predict_step`` returns ``[(id, Sample)]``.

    The pipeline is loaded on the rank's device in ``setup`` (its weights are not module
    parameters, so Lightning neither wraps nor checkpoints them).
    """

    def __init__(self, plan: GenerationPlan) -> None:
        super().__init__()
        self.plan = plan
        self.generator = None

    def build_generator(self, device: torch.device):
        return self.plan.build_generator(device)

    def setup(self, stage: str) -> None:
        if self.generator is None:  # before the writer's on_predict_start, which writes dataset.json
            self.generator = self.build_generator(self.trainer.strategy.root_device)

    def predict_step(self, batch: list[dict], batch_idx: int = 0) -> list[tuple[str, Any]]:
        if not batch:  # padding: fewer groups left than ranks
            return []
        samples = self.generator([r["record"] for r in batch], [r["seed"] for r in batch])
        return [(r["id"], s) for r, s in zip(batch, samples)]


class SyntheticWriter(BasePredictionWriter):
    """Prepares the folder once the pipeline has loaded, stores the samples (per-rank shards), finishes the folder."""

    def __init__(self, plan: GenerationPlan, config: Mapping, overwrite: bool = False) -> None:
        super().__init__(write_interval="batch")
        self.plan, self.store, self.config, self.overwrite = plan, plan.store, config, overwrite
        self.grid_size = int(plan.synthetic.get("grid_size", 8) or 0)
        self.grid_samples: dict[str, Any] = {}  # the lowest ids this rank made, for grid.png
        self.written = self.dropped = 0
        self.grid_path: Path | None = None

    def _failed(self, what: str, e: OSError) -> WriteError:
        return WriteError(e.errno, f"could not write {what} into synthetic.dir={self.store.root} ({e}): free space or fix "
                                "permissions there and rerun the same command; finished samples are kept")

    def on_predict_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            try:
                self.store.prepare(self.config, overwrite=self.overwrite, clean_tmp=True)
            except OSError as e:
                raise self._failed("dataset.json", e) from e
        trainer.strategy.barrier("dsdiff_generation_prepared")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0) -> None:
        for sid, sample in prediction:
            try:
                reason = store_sample(self.store, sid, sample, self.plan.options, tag=f"rank{trainer.global_rank}")
            except OSError as e:
                raise self._failed(f"sample {sid}", e) from e
            self.dropped += reason is not None
            self.written += reason is None
            if reason is None and self.grid_size:
                self.grid_samples[sid] = sample
                if len(self.grid_samples) > self.grid_size:
                    del self.grid_samples[max(self.grid_samples)]

    def on_predict_end(self, trainer, pl_module) -> None:
        log.info("rank %d wrote %d samples, dropped %d", trainer.global_rank, self.written, self.dropped)
        trainer.strategy.barrier("dsdiff_generation_end")
        if trainer.is_global_zero:
            try:
                self.grid_path = finish_folder(self.store, self.grid_size, self.plan.class_names, self.grid_samples, trainer.loggers)
            except OSError as e:
                raise self._failed("the merged manifest or grid.png", e) from e
        trainer.strategy.barrier("dsdiff_generation_compacted")


def _disk_sample(store: SyntheticStore, entry: Mapping) -> SimpleNamespace:
    """A finished sample read back for the grid (attention panels only if ``save_attention`` kept them)."""
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
    made = made or {}
    samples = [made[e["id"]] if e["id"] in made else _disk_sample(store, e) for e in entries]
    path = save_sample_grid(samples, grid, class_names)
    log.info("picture: synthetic samples -> %s", path)
    for logger in loggers:
        if hasattr(logger, "log_image"):
            logger.log_image(key="synthetic/samples", images=[str(path)])
    return path


def adopt_older_folder(store: SyntheticStore, config: Mapping) -> None:
    """Upgrade the ``dataset.json`` of a folder made before batch groups and model digests (no
    ``generator.batch_size``, the model as a path) when it matches ``config`` in everything else."""
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


def generate_dataset(plan: GenerationPlan, make_trainer: Callable[[list], L.Trainer], loggers: Sequence = (),
                     progress: bool = True) -> dict[str, Any]:
    """Generate (or finish) the folder of ``plan``; returns a summary (counts, ``dir``, ``grid``, ``export``).

    ``make_trainer(callbacks)`` builds the Lightning Trainer that runs the prediction (its devices,
    strategy and nodes decide the split). A folder made with another configuration is refused
    before any weights load, unless ``synthetic.overwrite``.
    """
    store, synthetic = plan.store, plan.synthetic
    overwrite = bool(synthetic.get("overwrite"))
    config = plan.dataset_config()
    if not overwrite:
        adopt_older_folder(store, config)
        store.check_config(config)  # fail before any process or weights start
    pending = pending_groups(store, plan.num_images, plan.batch_size, overwrite)
    if not pending:
        # Lightning skips on_predict_end on an empty loader: finish here, without loading weights
        log.info("%s: all %d samples are done; finishing the folder", store.root, plan.num_images)
        is_zero = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0))) == 0
        grid = finish_folder(store, synthetic.get("grid_size", 8), plan.class_names, None, loggers) if is_zero else None
    else:
        writer = SyntheticWriter(plan, config, overwrite=overwrite)
        trainer = make_trainer([writer, *([LogProgress(name="generation")] if progress else [])])
        log.info("generating into %s (%d images, %d prompt records)", store.root, plan.num_images, len(plan.records))
        trainer.predict(GenerationModule(plan), datamodule=GenerationDataModule(plan, pending), return_predictions=False)
        grid, is_zero = writer.grid_path, trainer.is_global_zero
    summary = {**summarize(store), "dir": str(store.root), "grid": str(grid) if grid else None}
    if summary["dropped"]:
        log.info("dropped %d samples by filter: %s (listed in %s)", summary["dropped"], summary["dropped_by_reason"], store.root / "dropped.jsonl")
    check_dropped(store, summary, synthetic.get("max_dropped", 0.5), reset=is_zero)
    if synthetic.get("export") and is_zero:
        summary["export"] = str(export_folder(store.root, synthetic["export"]))
    return summary
