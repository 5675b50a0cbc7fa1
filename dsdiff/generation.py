"""Synthetic dataset generation as Lightning prediction.

Sample ``i`` (id ``f"{i:07d}"``) is prompt record ``i mod R`` with seed ``synthetic.seed + i``,
so the dataset depends only on the configuration, never on how many processes made it.
``GenerationDataModule`` lists the samples the folder still lacks (after a barrier, so every
rank sees the same list) and Lightning's predict sampler gives each rank its own share with no
repeats; ``GenerationModule.predict_step`` runs the generator on a batch of prompt records;
``SyntheticWriter`` (a ``BasePredictionWriter``) writes each sample atomically to a per-rank
manifest shard, then merges the shards when every rank is done. Devices, DDP/SLURM/torchrun,
precision and the progress bar are Lightning's.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from dsdiff.data.synthetic import SyntheticStore, filter_reason, sample_id, summarize
from dsdiff.diffusion.prompts import DEFAULT_TEMPLATE, PromptRecord, read_jsonl, template_prompt

log = logging.getLogger("dsdiff")

# generator settings that change what is generated (batch size, device and dtype="auto" do not)
GENERATOR_KEYS = (
    "model", "scheduler", "num_inference_steps", "guidance_scale", "negative_prompt", "height", "width",
    "cross_res", "self_res", "tau", "alpha", "beta", "window", "class_prompt",
)


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
    generator, synthetic = to_plain(generator), to_plain(synthetic)
    return {
        "class_names": list(class_names),
        "generator": {k: generator.get(k) for k in GENERATOR_KEYS},
        "dtype": generator.get("dtype", "auto"),
        "seed": int(synthetic["seed"]),
        "prompts": {"file": str(synthetic.get("prompts")) if synthetic.get("prompts") else None,
                    "template": synthetic.get("template"), "max_classes": synthetic.get("max_classes_per_prompt", 1),
                    "records": len(records), "digest": records_digest(records)},
        "image_format": synthetic.get("image_format", "png"),
        "filters": to_plain(synthetic.get("filters", {})),
    }


class GenerationRequests(Dataset):
    """Sample indices -> ``{"id", "seed", "record"}`` (record ``i mod R``, seed ``seed + i``)."""

    def __init__(self, records: Sequence[PromptRecord], indices: Sequence[int], seed: int) -> None:
        self.records, self.indices, self.seed = list(records), list(indices), int(seed)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict:
        i = self.indices[k]
        return {"id": sample_id(i), "seed": self.seed + i, "record": self.records[i % len(self.records)].to_dict()}


def _collate(batch: list[dict]) -> list[dict]:
    return batch


class GenerationDataModule(L.LightningDataModule):
    """Prepares the folder (rank 0) and serves the samples it still lacks."""

    def __init__(self, store: SyntheticStore, config: Mapping, records: Sequence[PromptRecord], num_images: int,
                 seed: int, batch_size: int = 4, overwrite: bool = False) -> None:
        super().__init__()
        self.prepare_data_per_node = False  # one process on a shared file system prepares the folder
        self.store, self.config, self.records = store, dict(config), list(records)
        self.num_images, self.seed, self.batch_size, self.overwrite = int(num_images), int(seed), int(batch_size), overwrite
        self.pending: list[int] = []

    def prepare_data(self) -> None:
        self.store.prepare(self.config, overwrite=self.overwrite, clean_tmp=True)

    def setup(self, stage: str | None = None) -> None:
        self.store.check_config(self.config)
        done = self.store.done_ids()
        self.pending = [i for i in range(self.num_images) if sample_id(i) not in done]
        log.info("%s: %d of %d samples done, %d to generate", self.store.root, self.num_images - len(self.pending), self.num_images, len(self.pending))
        if self.trainer is not None:
            self.trainer.strategy.barrier("dsdiff_generation_setup")  # nobody writes before all have listed

    def predict_dataloader(self) -> DataLoader:
        requests = GenerationRequests(self.records, self.pending, self.seed)
        return DataLoader(requests, batch_size=self.batch_size, shuffle=False, num_workers=0, collate_fn=_collate)


class GenerationModule(L.LightningModule):
    """Wraps :class:`dsdiff.diffusion.SyntheticGenerator`; ``predict_step`` returns ``[(id, Sample)]``.

    The pipeline is loaded on the rank's device when prediction starts (its weights are not
    module parameters, so Lightning neither wraps nor checkpoints them).
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

    def on_predict_start(self) -> None:
        if self.generator is None:
            self.generator = self.build_generator(self.trainer.strategy.root_device)

    def predict_step(self, batch: list[dict], batch_idx: int = 0) -> list[tuple[str, Any]]:
        samples = self.generator([r["record"] for r in batch], [r["seed"] for r in batch], return_attention=self.return_attention)
        return [(r["id"], s) for r, s in zip(batch, samples)]


class SyntheticWriter(BasePredictionWriter):
    """Writes generated samples into a :class:`SyntheticStore` (per-rank shards), applies the filters,
    keeps the first ``grid_size`` samples for a sample grid, and merges the shards at the end."""

    def __init__(self, store: SyntheticStore, *, image_format: str = "png", jpeg_quality: int = 95,
                 save_attention: bool = False, drop_empty: bool = True, max_uncertain: float | None = None,
                 grid_size: int = 8, class_names: Sequence[str] | None = None) -> None:
        super().__init__(write_interval="batch")
        self.store, self.image_format, self.jpeg_quality = store, image_format, jpeg_quality
        self.save_attention, self.drop_empty, self.max_uncertain = save_attention, drop_empty, max_uncertain
        self.grid_size, self.class_names = grid_size, class_names
        self.grid_samples: list = []
        self.written = self.dropped = 0
        self.grid_path: Path | None = None

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0) -> None:
        tag = f"rank{trainer.global_rank}"
        for sid, sample in prediction:
            metadata = {k: v for k, v in sample.metadata.items() if k != "id"}
            metadata.update(class_ids=list(sample.class_ids), record_id=sample.metadata.get("id"))
            reason = filter_reason(sample.label, drop_empty=self.drop_empty, max_uncertain=self.max_uncertain)
            if reason:
                self.store.write_dropped(sid, reason, metadata, tag=tag)
                self.dropped += 1
                continue
            maps = sample.class_maps if self.save_attention else None
            self.store.write_sample(sid, sample.image, sample.label, metadata, tag=tag, image_format=self.image_format,
                                    jpeg_quality=self.jpeg_quality, class_maps=maps)
            self.written += 1
            if len(self.grid_samples) < self.grid_size:
                self.grid_samples.append(sample)

    def on_predict_end(self, trainer, pl_module) -> None:
        log.info("rank %d wrote %d samples, dropped %d", trainer.global_rank, self.written, self.dropped)
        trainer.strategy.barrier("dsdiff_generation_end")
        if trainer.is_global_zero:
            self.store.compact()
            if self.grid_samples and self.grid_size:
                from dsdiff.viz import save_sample_grid

                self.grid_path = save_sample_grid(self.grid_samples, self.store.root / "grid.png", self.class_names)
                for logger in trainer.loggers:
                    if hasattr(logger, "log_image"):
                        logger.log_image(key="synthetic/samples", images=[str(self.grid_path)])
        trainer.strategy.barrier("dsdiff_generation_compacted")


def generate(cfg: DictConfig, loggers: list | None = None) -> dict[str, Any]:
    """Generate (or finish) the synthetic dataset that ``cfg.synthetic`` describes; returns a summary."""
    from dsdiff.data.classes import get_class_list

    synthetic, generator = cfg.synthetic, cfg.generator
    if synthetic.get("export") not in (None, "voc"):
        raise ValueError(f"synthetic.export={synthetic.export!r}: the only layout is 'voc' (or null)")
    class_names = get_class_list(cfg.data.class_list).classes
    from dsdiff.prompts import ensure_prompts  # the prompts stage: captions + class names, cached

    records = prompt_records(synthetic.get("prompts") or ensure_prompts(cfg), class_names, synthetic.get("template") or DEFAULT_TEMPLATE,
                             synthetic.get("max_classes_per_prompt", 1))
    config = dataset_config(generator, synthetic, class_names, records)
    store = SyntheticStore(synthetic.dir)
    if not synthetic.get("overwrite"):
        store.check_config(config)  # fail before any process or weights start
    datamodule = GenerationDataModule(store, config, records, synthetic.num_images, synthetic.seed,
                                      batch_size=generator.get("batch_size", 4), overwrite=bool(synthetic.get("overwrite")))
    filters = synthetic.get("filters") or {}
    writer = SyntheticWriter(
        store, image_format=synthetic.get("image_format", "png"), jpeg_quality=synthetic.get("jpeg_quality", 95),
        save_attention=bool(synthetic.get("save_attention")), drop_empty=bool(filters.get("drop_empty", True)),
        max_uncertain=filters.get("max_uncertain"), grid_size=synthetic.get("grid_size", 8), class_names=class_names,
    )
    module = GenerationModule(generator, class_names, return_attention=False)
    import hydra

    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=[writer], logger=loggers or False)
    log.info("generating into %s (%d images, %d prompt records)", store.root, synthetic.num_images, len(records))
    trainer.predict(module, datamodule=datamodule, return_predictions=False)
    summary = {**summarize(store), "dir": str(store.root), "grid": str(writer.grid_path) if writer.grid_path else None}
    if summary["dropped"]:
        log.info("dropped %d samples by filter: %s (listed in %s)", summary["dropped"], summary["dropped_by_reason"], store.root / "dropped.jsonl")
    if synthetic.get("export") == "voc" and trainer.is_global_zero:
        from dsdiff.data.synthetic import export_voc

        summary["export"] = str(export_voc(store.root))
    return summary
