"""Synthetic training data generated while training (``synthetic.mode=on_the_fly``).

An endless stream: dataloader worker ``w`` of rank ``r`` (``W`` workers per rank, ``R`` ranks)
makes the generation groups ``k = g, g + G, g + 2G, ...`` (ids ``[kB, (k+1)B)``, ``B`` the batch
size) with ``g = r * W + w`` and ``G = R * W``; sample ``i`` has seed ``synthetic.seed + i`` and
prompt record ``i mod len(records)``. Every worker and rank draws distinct seeds, and each group
is the same batch, so the same bits, as ``python -m dsdiff.generate`` makes.
With ``synthetic.write_through=true`` each sample is also written to ``synthetic.dir`` (its own
shard per rank and worker), and a sample already there is read back instead of generated, so a
resumed run does not pay twice. Training is step-based (``max_steps``), so the stream has no end.

The generator runs where the dataset iterates: in the main process with ``num_workers=0`` (the
default for this mode, on the rank's GPU), or in CPU workers. CUDA generation inside dataloader
workers needs the ``spawn`` start method; prefer ``num_workers=0`` there.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from dsdiff.data.classes import get_class_list
from dsdiff.data.synthetic import SyntheticDataset, SyntheticStore, filter_reason, sample_id
from dsdiff.data.voc import read_label_png, read_rgb
from dsdiff.diffusion.prompts import DEFAULT_TEMPLATE
from dsdiff.generation import dataset_config, prompt_records, to_plain

log = logging.getLogger("dsdiff")


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size, from torch.distributed or the launcher's environment."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0))), int(os.environ.get("WORLD_SIZE", 1))


class OnTheFlySynthetic(IterableDataset):
    """Generates ``{"image", "mask", "name"}`` samples forever; see the module docstring."""

    def __init__(self, generator: Mapping, synthetic: Mapping, class_names, transform: Callable | None = None,
                 generator_factory: Callable[[torch.device], Any] | None = None) -> None:
        self.generator_cfg, self.synthetic = dict(to_plain(generator)), dict(to_plain(synthetic))
        self.classes = tuple(class_names)
        self.num_classes = len(self.classes)
        self.transform = transform
        self.records = prompt_records(self.synthetic.get("prompts"), self.classes, self.synthetic.get("template") or DEFAULT_TEMPLATE,
                                      self.synthetic.get("max_classes_per_prompt", 1))
        self.seed = int(self.synthetic.get("seed", 0))
        self.batch_size = int(self.generator_cfg.get("batch_size", 1))
        self.filters = self.synthetic.get("filters") or {}
        self._factory = generator_factory
        self._generator = None
        self.store = None
        self._prepared = False
        if self.synthetic.get("write_through"):
            self.store = SyntheticStore(self.synthetic["dir"])
            self.config = dataset_config(self.generator_cfg, self.synthetic, self.classes, self.records)
            self.store.check_config(self.config)  # the folder is written only once a pipeline has loaded

    def _device(self) -> torch.device:
        if torch.cuda.is_available() and get_worker_info() is None:
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")

    def generator(self):
        if self._generator is None:
            if self._factory is not None:
                self._generator = self._factory(self._device())
            else:
                from dsdiff.generation import GenerationModule

                self._generator = GenerationModule(self.generator_cfg, self.classes).build_generator(self._device())
        return self._generator

    def stream(self) -> tuple[int, int, str]:
        """(first group index, stride in groups, shard tag) of this worker's share of the stream."""
        rank, world = rank_and_world()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * workers + worker, world * workers, f"otf-rank{rank}-w{worker}"

    def _read_cached(self, entry: Mapping) -> tuple[torch.Tensor, torch.Tensor] | None:
        try:
            image = read_rgb(self.store.root / entry["image"])
            mask = torch.from_numpy(read_label_png(self.store.root / entry["mask"]).astype(np.int64))
            return image, mask
        except (OSError, ValueError, RuntimeError) as e:
            log.warning("cached sample %s unreadable (%s): generating it again", entry["id"], e)
            return None

    def __iter__(self):
        start, stride, tag = self.stream()
        cache = {e["id"]: e for e in self.store.entries()} if self.store is not None else {}
        dropped = {d["id"] for d in self.store.dropped()} if self.store is not None else set()
        group = start
        while True:
            todo = list(range(group * self.batch_size, (group + 1) * self.batch_size))
            group += stride
            cached = {}
            for i in todo:
                sid = sample_id(i)
                if sid in cache and sid not in dropped:
                    cached[sid] = self._read_cached(cache[sid])
            if all(sample_id(i) in dropped or cached.get(sample_id(i)) is not None for i in todo):
                for sid, item in cached.items():
                    yield self._item(*item, sid)
                continue
            # a group is made whole, as by `python -m dsdiff.generate`, so its samples are the same bits
            records = [self.records[i % len(self.records)] for i in todo]
            samples = self.generator()(records, [self.seed + i for i in todo])
            if self.store is not None and not self._prepared:
                self.store.prepare(self.config)
                self._prepared = True
            for i, sample in zip(todo, samples):
                sid = sample_id(i)
                reason = filter_reason(sample.label, drop_empty=bool(self.filters.get("drop_empty", True)),
                                       max_uncertain=self.filters.get("max_uncertain"))
                metadata = {**{k: v for k, v in sample.metadata.items() if k != "id"}, "class_ids": list(sample.class_ids)}
                if self.store is not None:
                    if reason:
                        self.store.write_dropped(sid, reason, metadata, tag=tag)
                    else:
                        self.store.write_sample(sid, sample.image, sample.label, metadata, tag=tag,
                                                image_format=self.synthetic.get("image_format", "png"))
                if reason:
                    continue
                image = torch.from_numpy(np.ascontiguousarray(sample.image)).permute(2, 0, 1)
                yield self._item(image, torch.from_numpy(sample.label.astype(np.int64)), sid)

    def _item(self, image: torch.Tensor, mask: torch.Tensor, name: str) -> dict:
        if self.transform is None:
            return {"image": image, "mask": mask.long(), "name": name}
        image, mask = self.transform(image, mask)
        return {"image": image, "mask": mask, "name": name}


def synthetic_train_set(synthetic: Mapping, generator: Mapping, class_list: str, transform: Callable | None = None):
    """The training set of ``data/train=synthetic``: the cached folder or the on-the-fly stream."""
    synthetic = dict(to_plain(synthetic))
    mode = synthetic.get("mode", "cached")
    if mode == "cached":
        return SyntheticDataset(synthetic["dir"], transform=transform, class_list=class_list, max_samples=synthetic.get("num_images"))
    if mode == "on_the_fly":
        return OnTheFlySynthetic(generator, synthetic, get_class_list(class_list).classes, transform=transform)
    raise ValueError(f"synthetic.mode={mode!r}: use 'cached' (read synthetic.dir) or 'on_the_fly'")
