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
``GenerationModule.predict_step`` runs the generator on one group; ``dsdiff.data.writer.SyntheticWriter`` (a
``BasePredictionWriter``) writes each sample atomically to a per-rank manifest shard, then the
shards are merged and ``grid.png`` drawn (also by a rerun with nothing left to make).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from dsdiff.data.synthetic import SyntheticStore, sample_id, summarize
from dsdiff.data.writer import SyntheticWriter, adopt_older_folder, check_output_dir, finish_folder
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
        world = self.trainer.world_size if self.trainer is not None else 1
        # every rank needs a batch: Lightning refuses a rank with an empty predict loader (and would skip its hooks)
        self.pending = self.pending + [[]] * max(0, world - len(self.pending))
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
        if not batch:  # padding: fewer groups left than ranks
            return []
        samples = self.generator([r["record"] for r in batch], [r["seed"] for r in batch], return_attention=self.return_attention)
        return [(r["id"], s) for r, s in zip(batch, samples)]


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
    if export == "hf" and importlib.util.find_spec("datasets") is None:
        raise ModuleNotFoundError("synthetic.export=hf needs the `datasets` package: pip install datasets (or dsdiff[hf])")
    num_images = synthetic.get("num_images")
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images <= 0:
        raise ValueError(f"synthetic.num_images={num_images!r}: how many samples to make, a whole number >= 1")
    batch_size = generator.get("batch_size") or 1
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"generator.batch_size={batch_size!r}: prompts per forward pass, a whole number >= 1")
    class_names = get_class_list(cfg.data.class_list).classes
    check_settings(scheduler=generator.get("scheduler"), tau=generator.get("tau", 4), alpha=generator.get("alpha", 0.6),
                   beta=generator.get("beta", 0.5), window=list(generator.get("window") or (0.0, 1.0)))
    overwrite = bool(synthetic.get("overwrite"))
    store = SyntheticStore(synthetic.dir)
    check_output_dir(store.root)
    check_class_names(load_tokenizer(generator.model), class_names)  # also: is it a pipeline at all
    from dsdiff.prompts import ensure_prompts  # the prompts stage (captions + class names, cached): after the cheap checks

    records = prompt_records(synthetic.get("prompts") or ensure_prompts(cfg), class_names, synthetic.get("template") or DEFAULT_TEMPLATE,
                             synthetic.get("max_classes_per_prompt", 1))
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
    # Lightning refuses a progress-bar callback when the trainer config turns progress bars off
    progress = [LogProgress(name="generation")] if cfg.trainer.get("enable_progress_bar", True) else []
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=[writer, *progress], logger=loggers or False)
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
