"""Synthetic dataset generation as Lightning prediction.

Sample ``i`` (id ``f"{i:07d}"``) is prompt record ``i mod R`` with seed ``synthetic.seed + i``.
Samples are made in fixed groups ``[kB, (k+1)B)`` of ``B = generator.batch_size`` ids, one
group per forward pass, and a group with any member missing (or broken) is made again whole:
batched kernels round differently for different batch mates, so this is what makes a resumed
folder bit-identical to an uninterrupted one, however many processes made it.

Every setting is checked, and the tokenizer placed every class name, before anything is
written; ``dataset.json`` is written once the pipeline has loaded. ``GenerationDataModule``
lists the groups the folder still lacks (after a barrier, so every rank sees the same list) and
Lightning's predict sampler gives each rank its own groups with no repeats;
``GenerationModule.predict_step`` runs the generator on one group; ``SyntheticWriter`` (a
``BasePredictionWriter``) writes each sample atomically to a per-rank manifest shard, then the
shards are merged and ``grid.png`` drawn (also by a rerun with nothing left to make).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from dsdiff.data.synthetic import SyntheticStore, filter_reason, sample_id, summarize
from dsdiff.diffusion.prompts import DEFAULT_TEMPLATE, PromptRecord, read_jsonl, template_prompt
from dsdiff.progress import LogProgress

log = logging.getLogger("dsdiff")

# generator settings that change what is generated (the device and dtype="auto" do not; the batch
# size does, in the last bits: it decides which ids share a forward pass)
GENERATOR_KEYS = (
    "model", "scheduler", "num_inference_steps", "guidance_scale", "negative_prompt", "height", "width",
    "cross_res", "self_res", "tau", "alpha", "beta", "window", "class_prompt", "batch_size",
)
EXPORTS = (None, "voc", "hf")


def to_plain(cfg: Any) -> Any:
    """A resolved plain container for a DictConfig; anything else as it is."""
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def prompt_records(prompts: str | Path | None, class_names: Sequence[str], template: str = DEFAULT_TEMPLATE,
                   max_classes: int = 1) -> list[PromptRecord]:
    """Records from a prompts JSONL (``python -m dsdiff.prompts``), or class-only templates.

    Templates name one class each, then (``max_classes`` >= 2) every ordered pair of distinct
    classes, and so on: ``"a photo of a dog and a cat"``.
    """
    from itertools import permutations

    from dsdiff.data.classes import class_words

    if prompts:
        path = Path(prompts).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no prompts file at {path}: make one with `python -m dsdiff.prompts` or set synthetic.prompts=null for class templates")
        records = read_jsonl(path)
        if not records:
            raise ValueError(f"prompts file {path} holds no records")
        bad = sorted({c for r in records for c in r.class_ids if not 0 < c < len(class_names)})
        if bad:
            raise ValueError(f"prompts file {path} uses class ids {bad} outside this {len(class_names)}-class list: was it made for another dataset?")
        return records
    if max_classes < 1:
        raise ValueError(f"synthetic.max_classes_per_prompt={max_classes}: use 1 or more")
    records = []
    for k in range(1, max_classes + 1):
        for ids in permutations(range(1, len(class_names)), k):
            words = [class_words(class_names[c]) for c in ids]
            records.append(PromptRecord("class_" + "_".join(map(str, ids)), template_prompt(words, template), list(ids), words))
    return records


def records_digest(records: Sequence[PromptRecord]) -> str:
    text = "\n".join(json.dumps(r.to_dict(), sort_keys=True) for r in records)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def dataset_config(generator: Mapping, synthetic: Mapping, class_names: Sequence[str], records: Sequence[PromptRecord]) -> dict:
    """What ``dataset.json`` records: everything that decides the samples, nothing that does not."""
    from dsdiff.diffusion.generator import model_identity

    generator, synthetic = to_plain(generator), to_plain(synthetic)
    settings = {k: generator.get(k) for k in GENERATOR_KEYS}
    settings["model"] = model_identity(generator["model"]) if generator.get("model") else None
    settings["batch_size"] = int(generator.get("batch_size") or 1)
    return {
        "class_names": list(class_names),
        "generator": settings,
        "dtype": generator.get("dtype", "auto"),
        "seed": int(synthetic["seed"]),
        "prompts": {"file": str(synthetic.get("prompts")) if synthetic.get("prompts") else None,
                    "template": synthetic.get("template"), "max_classes": synthetic.get("max_classes_per_prompt", 1),
                    "records": len(records), "digest": records_digest(records)},
        "image_format": synthetic.get("image_format", "png"),
        "filters": to_plain(synthetic.get("filters", {})),
    }


def sample_groups(num_images: int, batch_size: int) -> list[list[int]]:
    """The fixed generation groups: ids ``[kB, min((k+1)B, N))``, one forward pass each."""
    return [list(range(s, min(s + batch_size, num_images))) for s in range(0, num_images, batch_size)]


def pending_groups(store: SyntheticStore, num_images: int, batch_size: int, overwrite: bool = False) -> list[list[int]]:
    """Groups with any member not yet done (all of them with ``overwrite``)."""
    done = set() if overwrite else store.done_ids()
    pending = [g for g in sample_groups(num_images, batch_size) if any(sample_id(i) not in done for i in g)]
    have = sum(sample_id(i) in done for i in range(num_images))
    log.info("%s: %d of %d samples done, %d to generate (%d groups of %d ids, made whole)", store.root, have,
             num_images, num_images - have, len(pending), batch_size)
    return pending


class GenerationRequests(Dataset):
    """Group ``k`` -> its requests ``[{"id", "seed", "record"}]`` (record ``i mod R``, seed ``seed + i``)."""

    def __init__(self, records: Sequence[PromptRecord], groups: Sequence[Sequence[int]], seed: int) -> None:
        self.records, self.groups, self.seed = list(records), [list(g) for g in groups], int(seed)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, k: int) -> list[dict]:
        return [{"id": sample_id(i), "seed": self.seed + i, "record": self.records[i % len(self.records)].to_dict()}
                for i in self.groups[k]]


def _one_group(batch: list[list[dict]]) -> list[dict]:
    return batch[0]


class GenerationDataModule(L.LightningDataModule):
    """Serves the groups the folder still lacks (it writes nothing: the writer prepares the folder)."""

    def __init__(self, store: SyntheticStore, records: Sequence[PromptRecord], num_images: int,
                 seed: int, batch_size: int = 4, overwrite: bool = False, pending: list[list[int]] | None = None) -> None:
        super().__init__()
        self.store, self.records = store, list(records)
        self.num_images, self.seed, self.batch_size, self.overwrite = int(num_images), int(seed), int(batch_size), overwrite
        self.pending = pending

    def setup(self, stage: str | None = None) -> None:
        if self.pending is None:
            self.pending = pending_groups(self.store, self.num_images, self.batch_size, self.overwrite)
        if self.trainer is not None:
            self.trainer.strategy.barrier("dsdiff_generation_setup")  # nobody writes before all have listed

    def predict_dataloader(self) -> DataLoader:
        requests = GenerationRequests(self.records, self.pending, self.seed)
        return DataLoader(requests, batch_size=1, shuffle=False, num_workers=0, collate_fn=_one_group)


class GenerationModule(L.LightningModule):
    """Wraps :class:`dsdiff.diffusion.SyntheticGenerator`; ``predict_step`` returns ``[(id, Sample)]``.

    The pipeline is loaded on the rank's device in ``setup`` (its weights are not module
    parameters, so Lightning neither wraps nor checkpoints them).
    """

    def __init__(self, generator: Mapping, class_names: Sequence[str], return_attention: bool = False) -> None:
        super().__init__()
        self.generator_cfg = dict(to_plain(generator))
        self.class_names = list(class_names)
        self.return_attention = return_attention
        self.generator = None

    def build_generator(self, device: torch.device):
        from dsdiff.diffusion.generator import SyntheticGenerator

        g = self.generator_cfg
        kwargs = {k: g[k] for k in ("num_inference_steps", "guidance_scale", "negative_prompt", "height", "width",
                                    "cross_res", "self_res", "tau", "alpha", "beta", "class_prompt") if g.get(k) is not None}
        if g.get("window") is not None:
            kwargs["window"] = tuple(g["window"])
        return SyntheticGenerator.from_pretrained(
            g["model"], self.class_names, dtype=g.get("dtype", "auto"), device=device,
            scheduler=g.get("scheduler"), safety_checker=bool(g.get("safety_checker", False)), **kwargs,
        )

    def setup(self, stage: str) -> None:
        if self.generator is None:  # before the writer's on_predict_start, which writes dataset.json
            self.generator = self.build_generator(self.trainer.strategy.root_device)

    def predict_step(self, batch: list[dict], batch_idx: int = 0) -> list[tuple[str, Any]]:
        samples = self.generator([r["record"] for r in batch], [r["seed"] for r in batch], return_attention=self.return_attention)
        return [(r["id"], s) for r, s in zip(batch, samples)]


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
    from dsdiff.runtime import write_text_atomic

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
    write_text_atomic(store.config_path, json.dumps(upgraded, indent=2, sort_keys=True) + "\n")


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


def generate(cfg: DictConfig, loggers: list | None = None) -> dict[str, Any]:
    """Generate (or finish) the synthetic dataset that ``cfg.synthetic`` describes; returns a summary.

    Everything that can be judged without weights is checked before any file is written.
    """
    from dsdiff.data.classes import get_class_list
    from dsdiff.diffusion.generator import check_class_names, check_settings, load_tokenizer

    synthetic, generator = cfg.synthetic, cfg.generator
    export = synthetic.get("export")
    if export not in EXPORTS:
        raise ValueError(f"synthetic.export={export!r}: use null, 'voc' (a VOC-layout copy) or 'hf' (a Hugging Face datasets folder)")
    num_images = synthetic.get("num_images")
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images <= 0:
        raise ValueError(f"synthetic.num_images={num_images!r}: how many samples to make, a whole number >= 1")
    batch_size = generator.get("batch_size") or 1
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"generator.batch_size={batch_size!r}: prompts per forward pass, a whole number >= 1")
    class_names = get_class_list(cfg.data.class_list).classes
    records = prompt_records(synthetic.get("prompts"), class_names, synthetic.get("template") or DEFAULT_TEMPLATE,
                             synthetic.get("max_classes_per_prompt", 1))
    check_settings(scheduler=generator.get("scheduler"), tau=generator.get("tau", 4), alpha=generator.get("alpha", 0.6),
                   beta=generator.get("beta", 0.5), window=list(generator.get("window") or (0.0, 1.0)))
    overwrite = bool(synthetic.get("overwrite"))
    store = SyntheticStore(synthetic.dir)
    check_output_dir(store.root)
    check_class_names(load_tokenizer(generator.model), class_names)  # also: is it a pipeline at all
    config = dataset_config(generator, synthetic, class_names, records)
    if not overwrite:
        adopt_older_folder(store, config)
        store.check_config(config)  # fail before any process or weights start
    pending = pending_groups(store, num_images, batch_size, overwrite)
    if not pending:
        # Lightning skips on_predict_end on an empty loader: finish here, without loading weights
        log.info("%s: all %d samples are done; finishing the folder", store.root, num_images)
        is_zero = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0))) == 0
        grid = finish_folder(store, synthetic.get("grid_size", 8), class_names, None, loggers or ()) if is_zero else None
    else:
        grid, is_zero = _predict(cfg, store, config, records, class_names, pending, num_images, batch_size, overwrite, loggers)
    summary = {**summarize(store), "dir": str(store.root), "grid": str(grid) if grid else None}
    if summary["dropped"]:
        log.info("dropped %d samples by filter: %s (listed in %s)", summary["dropped"], summary["dropped_by_reason"], store.root / "dropped.jsonl")
    if export and is_zero:
        summary["export"] = str(export_folder(store.root, export))
    return summary


def _predict(cfg, store, config, records, class_names, pending, num_images, batch_size, overwrite, loggers) -> tuple[Path | None, bool]:
    import hydra

    synthetic, filters = cfg.synthetic, cfg.synthetic.get("filters") or {}
    datamodule = GenerationDataModule(store, records, num_images, synthetic.seed, batch_size=batch_size, overwrite=overwrite,
                                      pending=pending)
    writer = SyntheticWriter(
        store, config, overwrite=overwrite, image_format=synthetic.get("image_format", "png"),
        jpeg_quality=synthetic.get("jpeg_quality", 95), save_attention=bool(synthetic.get("save_attention")),
        drop_empty=bool(filters.get("drop_empty", True)), max_uncertain=filters.get("max_uncertain"),
        grid_size=synthetic.get("grid_size", 8), class_names=class_names,
    )
    module = GenerationModule(cfg.generator, class_names, return_attention=False)
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=[writer, LogProgress(name="generation")], logger=loggers or False)
    log.info("generating into %s (%d images, %d prompt records)", store.root, num_images, len(records))
    trainer.predict(module, datamodule=datamodule, return_predictions=False)
    return writer.grid_path, trainer.is_global_zero


def export_folder(root: Path, export: str) -> Path:
    """``synthetic.export``: a VOC-layout copy (``<dir>/voc``) or a Hugging Face datasets folder (``<dir>/hf``)."""
    if export == "voc":
        from dsdiff.data.synthetic import export_voc

        return export_voc(root)
    from dsdiff.data.export import export_hf

    return export_hf(root)
