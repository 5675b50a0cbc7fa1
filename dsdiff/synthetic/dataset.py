"""A synthetic folder as a training set: the cached reader and the on-the-fly stream.

``SyntheticDataset`` reads a folder (``synthetic.mode=cached``). ``OnTheFlySynthetic``
(``synthetic.mode=on_the_fly``) generates while training, an endless stream: dataloader worker ``w``
of rank ``r`` (``W`` workers per rank, ``R`` ranks) makes the generation groups ``k = g, g + G,
g + 2G, ...`` with ``g = r * W + w`` and ``G = R * W``, so every worker and rank draws distinct seeds,
and each group is the same batch, so the same bits, as ``python -m dsdiff.generate`` makes. With
``synthetic.write_through=true`` each sample also goes into ``synthetic.dir`` through the same
:func:`~dsdiff.synthetic.store.store_sample` as the cached writer (its own shard per rank and
worker), and a sample already there is read back instead of generated, so a resumed run does not
pay twice. Training is step-based (``max_steps``), so the stream has no end.

The generator runs where the dataset iterates: in the main process with ``num_workers=0`` (the
default for this mode, on the rank's GPU), or in CPU workers. CUDA generation inside dataloader
workers needs the ``spawn`` start method; prefer ``num_workers=0`` there.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from dsdiff.data.classes import IGNORE_INDEX, get_class_list
from dsdiff.data.voc import read_label_png, read_rgb
from dsdiff.synthetic.spec import GenerationPlan, sample_id
from dsdiff.synthetic.store import (
    CONFIG_FILE,
    SyntheticStore,
    filter_reason,
    store_sample,
)
from dsdiff.utils.config import to_plain
from dsdiff.utils.errors import MissingPathError, SettingError

log = logging.getLogger("dsdiff")


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
            raise MissingPathError(
                f"no synthetic dataset at {self.root} (no {CONFIG_FILE}): generate one with "
                "`python -m dsdiff.generate +experiment=NAME synthetic.dir=DIR`, or point synthetic.dir at one"
            )
        names = config.get("class_names") or (get_class_list(class_list).classes if class_list else None)
        if names is None:
            raise SettingError(f"{self.config_path} has no class_names: pass class_list=<name>")
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
            raise SettingError(f"the synthetic dataset at {self.root} has no finished samples: generate (or resume) it first")
        self.ids = [e["id"] for e in self.entries]
        self.skipped = 0

    @property
    def config_path(self) -> Path:
        return self.store.config_path

    def __len__(self) -> int:
        return len(self.entries)

    def read(self, entry: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
        """One entry's (image uint8 (3, H, W), mask (H, W)); a file that cannot be read raises, naming it."""
        image_path, mask_path = self.root / entry["image"], self.root / entry["mask"]
        try:
            image = read_rgb(image_path)
        except Exception as e:  # noqa: BLE001 - torchvision's decode errors do not name the file
            raise MissingPathError(f"image {image_path} could not be read: {e}") from e
        try:
            mask = read_label_png(mask_path)
        except Exception as e:  # noqa: BLE001
            raise MissingPathError(f"mask {mask_path} could not be read: {e}") from e
        bad = (mask >= self.num_classes) & (mask != IGNORE_INDEX)
        if bad.any():
            raise SettingError(f"mask {mask_path} holds labels {np.unique(mask[bad]).tolist()} outside 0..{self.num_classes - 1}, 255")
        if mask.shape != tuple(image.shape[1:]):
            raise SettingError(f"mask {mask_path} is {mask.shape} but its image is {tuple(image.shape[1:])}")
        return image, torch.from_numpy(mask)

    def __getitem__(self, index: int) -> dict:
        for step in range(len(self.entries)):
            entry = self.entries[(index + step) % len(self.entries)]
            try:
                image, mask = self.read(entry)
                break
            except Exception as e:  # noqa: BLE001 - any unreadable file is skipped, never fatal mid-epoch
                self.skipped += 1
                log.warning("skipped synthetic sample %s (%s); %d skipped so far in this process", entry["id"], e, self.skipped)
        else:
            raise MissingPathError(f"no sample of the synthetic dataset at {self.root} could be read")
        if self.transform is None:
            return {"image": image, "mask": mask.long(), "name": entry["id"]}
        image, mask = self.transform(image, mask)
        return {"image": image, "mask": mask, "name": entry["id"]}


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size, from torch.distributed or the launcher's environment."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0))), int(os.environ.get("WORLD_SIZE", 1))


class OnTheFlySynthetic(IterableDataset):
    """Generates ``{"image", "mask", "name"}`` samples forever; see the module docstring."""

    def __init__(self, generator: Mapping, synthetic: Mapping, class_names, transform: Callable | None = None,
                 generator_factory: Callable[[torch.device], Any] | None = None) -> None:
        self.plan = GenerationPlan.from_settings(generator, synthetic, class_names)
        self.classes = self.plan.class_names
        self.num_classes = len(self.classes)
        self.transform = transform
        self._factory = generator_factory
        self._generator = None
        self.store = self.plan.store if self.plan.synthetic.get("write_through") else None
        self._prepared = False
        if self.store is not None:
            self.config = self.plan.dataset_config()
            self.store.check_config(self.config)  # the folder is written only once a pipeline has loaded

    def _device(self) -> torch.device:
        if torch.cuda.is_available() and get_worker_info() is None:
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")

    def generator(self):
        if self._generator is None:
            self._generator = (self._factory or self.plan.build_generator)(self._device())
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
        options, batch_size = self.plan.options, self.plan.batch_size
        group = start
        while True:
            todo = list(range(group * batch_size, (group + 1) * batch_size))
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
            requests = self.plan.requests(todo)
            samples = self.generator()([r["record"] for r in requests], [r["seed"] for r in requests])
            if self.store is not None and not self._prepared:
                self.store.prepare(self.config)
                self._prepared = True
            for i, sample in zip(todo, samples):
                sid = sample_id(i)
                if self.store is not None:
                    reason = store_sample(self.store, sid, sample, options, tag=tag)
                else:
                    reason = filter_reason(sample.label, drop_empty=options.drop_empty, max_uncertain=options.max_uncertain,
                                           class_ids=sample.class_ids)
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
    raise SettingError(f"synthetic.mode={mode!r}: use 'cached' (read synthetic.dir) or 'on_the_fly'")
