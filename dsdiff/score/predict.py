"""Scoring attention labels on tune-split images as Lightning prediction (one process, DDP, several nodes alike).

``ScoreDataModule`` serves the pending groups (images resized to the generator's size, true masks
at their own size); ``ScoreModule.predict_step`` noises a group at the scored timesteps, records
the attention with each image's text and class prompt (:func:`attention_on_images`) and scores the
labels, brought back to the mask's size, against the mask (:func:`image_record`); ``ScoreWriter``
stores each image's label PNG and result line (:class:`ScoreStore`), and merges the shards at the end.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dsdiff.diffusion.generator import SyntheticGenerator
from dsdiff.diffusion.quality import image_record
from dsdiff.diffusion.real_images import attention_on_images
from dsdiff.score.store import ScoreStore
from dsdiff.utils.progress import LogProgress

log = logging.getLogger("dsdiff")


def read_item(dataset, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Tune image ``index`` as uint8 (H, W, 3) and its (H, W) true label map, untransformed."""
    item = dataset[index]
    image = item["image"].permute(1, 2, 0).numpy() if torch.is_tensor(item["image"]) else np.asarray(item["image"])
    mask = item["mask"].numpy() if torch.is_tensor(item["mask"]) else np.asarray(item["mask"])
    return image.astype(np.uint8), mask.astype(np.int64)


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC))


def to_mask_size(label: np.ndarray, maps: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Labels (nearest) and class maps (bilinear) at the true mask's size."""
    if label.shape == size:
        return label, maps
    label = np.asarray(Image.fromarray(label).resize((size[1], size[0]), Image.NEAREST))
    if len(maps):
        maps = F.interpolate(torch.from_numpy(maps)[None], size=size, mode="bilinear", align_corners=False)[0].numpy()
    else:
        maps = np.zeros((0, *size), np.float32)
    return label, maps


class ScoreGroups(Dataset):
    """Group ``k`` -> its members ``[{"position", "name", "record", "image", "truth"}]`` and the group's seed."""

    def __init__(self, dataset, items: Sequence[dict], groups: Sequence[Sequence[int]], seed: int) -> None:
        self.dataset, self.items, self.groups, self.seed = dataset, list(items), [list(g) for g in groups], seed

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, k: int) -> dict:
        members = []
        for position in self.groups[k]:
            item = self.items[position]
            image, truth = read_item(self.dataset, item["index"])
            members.append({"position": position, "name": item["name"], "record": item["record"], "image": image, "truth": truth})
        return {"seed": self.seed + (self.groups[k][0] if self.groups[k] else 0), "members": members}


def _one(batch: list[dict]) -> dict:
    return batch[0]


class ScoreDataModule(L.LightningDataModule):
    def __init__(self, groups: ScoreGroups) -> None:
        super().__init__()
        self.groups = groups

    def setup(self, stage: str | None = None) -> None:
        world = self.trainer.world_size if self.trainer is not None else 1
        # every rank needs a batch: Lightning refuses a rank with an empty predict loader
        self.groups.groups += [[]] * max(0, world - len(self.groups.groups))

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.groups, batch_size=1, shuffle=False, num_workers=0, collate_fn=_one)


class ScoreModule(L.LightningModule):
    """Loads the generator on the rank's device in ``setup``; ``predict_step`` returns ``[(row, label)]``."""

    def __init__(self, build_generator: Callable[[torch.device], SyntheticGenerator], timesteps: Sequence[int],
                 num_classes: int) -> None:
        super().__init__()
        self.build_generator, self.timesteps, self.num_classes = build_generator, list(timesteps), num_classes
        self.generator: SyntheticGenerator | None = None

    def setup(self, stage: str) -> None:
        if self.generator is None:
            self.generator = self.build_generator(self.trainer.strategy.root_device)

    def predict_step(self, batch: dict, batch_idx: int = 0) -> list[tuple[dict, np.ndarray]]:
        members = batch["members"]
        if not members:  # padding: fewer groups left than ranks
            return []
        gen = self.generator
        images = np.stack([resize_image(m["image"], gen.height, gen.width) for m in members])
        samples = attention_on_images(gen, images, [m["record"] for m in members], self.timesteps, seed=batch["seed"],
                                      class_prompt=gen.labels.class_prompt)
        out = []
        for m, s in zip(members, samples):
            label, maps = to_mask_size(s.label, s.class_maps, m["truth"].shape)
            row = {"position": m["position"], "name": m["name"], "prompt": s.metadata["prompt"],
                   "class_prompt": s.metadata["class_prompt"], "class_ids": s.class_ids, "seed": batch["seed"],
                   "truth_classes": [int(c) for c in np.unique(m["truth"]) if c < self.num_classes],
                   **image_record(maps, s.class_ids, label, m["truth"], self.num_classes)}
            out.append((row, label))
        return out


class ScoreWriter(BasePredictionWriter):
    """Prepares the results folder once the pipeline has loaded, stores every image, merges the shards."""

    def __init__(self, store: ScoreStore, config: dict) -> None:
        super().__init__(write_interval="batch")
        self.store, self.config, self.written = store, config, 0

    def _failed(self, e: OSError) -> OSError:
        return OSError(e.errno, f"could not write into {self.store.root} ({e}): free space or fix permissions there "
                                "(score.dir) and rerun the same command; finished images are kept")

    def on_predict_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            try:
                self.store.prepare(self.config)
            except OSError as e:
                raise self._failed(e) from e
        trainer.strategy.barrier("dsdiff_score_prepared")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0) -> None:
        for row, label in prediction:
            try:
                self.store.write(row, label, tag=f"rank{trainer.global_rank}")
            except OSError as e:
                raise self._failed(e) from e
            self.written += 1

    def on_predict_end(self, trainer, pl_module) -> None:
        log.info("rank %d scored %d images", trainer.global_rank, self.written)
        trainer.strategy.barrier("dsdiff_score_end")
        if trainer.is_global_zero:
            self.store.compact()
        trainer.strategy.barrier("dsdiff_score_compacted")


def pending_groups(store: ScoreStore, items: Sequence[dict], groups: Sequence[Sequence[int]]) -> list[list[int]]:
    """Groups with any member not yet scored (made whole again: the same bits as the first time)."""
    done = set(store.rows())
    pending = [list(g) for g in groups if any(items[p]["name"] not in done for p in g)]
    have = sum(item["name"] in done for item in items)
    log.info("%s: %d of %d images scored, %d groups to score", store.root, have, len(items), len(pending))
    return pending


def run_scoring(store: ScoreStore, config: dict, dataset, items: Sequence[dict], groups: Sequence[Sequence[int]],
                seed: int, module: ScoreModule, make_trainer: Callable[[list], L.Trainer], progress: bool = True) -> int:
    """Score the pending groups into ``store``; returns how many groups were scored (0: only aggregate)."""
    pending = pending_groups(store, items, groups)
    if not pending:
        if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0))) == 0:
            store.compact()
        return 0
    writer = ScoreWriter(store, config)
    trainer = make_trainer([writer, *([LogProgress(name="label scoring")] if progress else [])])
    trainer.predict(module, datamodule=ScoreDataModule(ScoreGroups(dataset, items, pending, seed)), return_predictions=False)
    return len(pending)


def checked_rows(store: ScoreStore, items: Sequence[dict]) -> list[dict]:
    """The stored rows of ``items``, in order; an image without one is an error (a run that did not finish)."""
    rows = store.rows()
    missing = [item["name"] for item in items if item["name"] not in rows]
    if missing:
        raise RuntimeError(f"{len(missing)} images have no result in {store.root} (e.g. {missing[0]}): the run stopped "
                           "early; rerun the same command to finish them")
    return [rows[item["name"]] for item in items]


def images_per_class(rows: Sequence[dict], class_names: Sequence[str]) -> dict[str, int]:
    """How many scored images show each class (by their true masks)."""
    counts = np.zeros(len(class_names), dtype=np.int64)
    for row in rows:
        counts[row["truth_classes"]] += 1
    return {name: int(n) for name, n in zip(class_names, counts) if n}
