"""Self-training (docs/self-training.md): the trained segmenter relabels the synthetic images.

``selftrain.mode`` chooses how its predictions become the next round's labels:

- ``replace`` (the paper): every pixel takes the prediction;
- ``fill_uncertain``: only uncertain (255) pixels of the current labels take the prediction;
- ``confident``: the prediction where its softmax confidence >= ``selftrain.threshold``, else 255;
- ``agree``: the attention label where the prediction agrees with it, the prediction where the
  attention label was uncertain and the prediction is confident (>= ``selftrain.threshold``), 255
  elsewhere: the teacher fills the uncertainty band but never overrules a certain label it disagrees
  with (so the band is kept where teacher and attention disagree).

``selftrain.tta=true`` predicts with test-time augmentation. Pseudo-labels go into a synthetic
folder of their own (masks + manifest; images stay where they are) with the same atomic,
resumable writer as generation, as Lightning prediction (so DDP splits the work).

Exactly the samples the model trained on are relabelled (ids ``0..max_samples-1``), each label
under the id of the image it was predicted from. A sample whose image or mask cannot be read
gets no pseudo-label: it is recorded in ``dropped.jsonl`` (reason ``unreadable``) and counted.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset

from dsdiff.data.classes import IGNORE_INDEX
from dsdiff.data.transforms import EvalTransform
from dsdiff.synthetic.dataset import SyntheticDataset
from dsdiff.synthetic.drops import summarize
from dsdiff.synthetic.store import SyntheticStore
from dsdiff.utils.errors import SettingError
from dsdiff.utils.progress import LogProgress

log = logging.getLogger("dsdiff")
MODES = ("replace", "fill_uncertain", "confident", "agree")
THRESHOLD_MODES = ("confident", "agree")  # the modes that read selftrain.threshold
INITS = ("scratch", "teacher")  # selftrain.init: where the student's weights start


def combine(pred: torch.Tensor, confidence: torch.Tensor, current: torch.Tensor, mode: str, threshold: float = 0.9) -> torch.Tensor:
    """The next round's label map from a prediction, its confidence and the current labels (all (H, W))."""
    if mode == "replace":
        return pred
    if mode == "fill_uncertain":
        return torch.where(current == IGNORE_INDEX, pred, current)
    if mode == "confident":
        return torch.where(confidence >= threshold, pred, torch.full_like(pred, IGNORE_INDEX))
    if mode == "agree":
        uncertain = torch.full_like(pred, IGNORE_INDEX)
        filled = torch.where((current == IGNORE_INDEX) & (confidence >= threshold), pred, uncertain)
        return torch.where((current != IGNORE_INDEX) & (pred == current), current, filled)
    raise SettingError(f"selftrain.mode={mode!r}: use one of {MODES}")


class _Pending(Dataset):
    """Sample ``indices[k]`` of ``data``, read by its own entry: never another sample in its place."""

    def __init__(self, data: SyntheticDataset, indices: list[int]) -> None:
        self.data, self.indices = data, indices
        self.transform = EvalTransform()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict:
        entry = self.data.entries[self.indices[k]]
        try:
            image, mask = self.data.read(entry)
        except Exception as e:  # noqa: BLE001 - an unreadable sample is reported and skipped, never relabelled
            log.warning("pseudo-labels: synthetic sample %s is unreadable (%s): no pseudo-label for it", entry["id"], e)
            return {"entry": entry, "error": str(e)}
        image, mask = self.transform(image, mask)
        return {"image": image, "mask": mask, "entry": entry}


def _collate(items: list[dict]) -> dict:
    good = [it for it in items if "error" not in it]
    return {"image": torch.stack([it["image"] for it in good]) if good else None,
            "mask": torch.stack([it["mask"] for it in good]) if good else None,
            "entry": [it["entry"] for it in good],
            "unreadable": [(it["entry"], it["error"]) for it in items if "error" in it]}


class PseudoLabelData(L.LightningDataModule):
    """The source folder's samples that the pseudo-label folder still lacks (listed after a barrier)."""

    def __init__(self, source: str | Path, store: SyntheticStore, config: Mapping, batch_size: int = 8, num_workers: int = 0,
                 max_samples: int | None = None) -> None:
        super().__init__()
        self.prepare_data_per_node = False
        self.source, self.store, self.config = Path(source), store, dict(config)
        self.batch_size, self.num_workers, self.max_samples = batch_size, num_workers, max_samples
        self.pending: _Pending | None = None

    def prepare_data(self) -> None:
        self.store.prepare(self.config, clean_tmp=True)

    def setup(self, stage: str | None = None) -> None:
        data = SyntheticDataset(self.source, max_samples=self.max_samples)
        done = self.store.done_ids()
        self.pending = _Pending(data, [i for i, sid in enumerate(data.ids) if sid not in done])
        log.info("pseudo-labels at %s: %d of %d done", self.store.root, len(data) - len(self.pending), len(data))
        if self.trainer is not None:
            self.trainer.strategy.barrier("dsdiff_pseudo_setup")

    def predict_dataloader(self) -> DataLoader:
        # same-size synthetic images batch without padding; a batch of mixed sizes falls back to 1
        return DataLoader(self.pending, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers, collate_fn=_collate)


class PseudoLabeler(L.LightningModule):
    """``predict_step``: the segmenter's labels for a batch, combined with the current ones."""

    def __init__(self, segmenter: L.LightningModule, mode: str = "replace", threshold: float = 0.9, tta: bool = False) -> None:
        super().__init__()
        if mode not in MODES:
            raise SettingError(f"selftrain.mode={mode!r}: use one of {MODES}")
        self.segmenter, self.mode, self.threshold, self.tta = segmenter, mode, threshold, tta

    def predict_step(self, batch: dict, batch_idx: int = 0) -> list[tuple[dict, np.ndarray | None]]:
        """(entry, label) per readable sample, and (entry, None) per unreadable one."""
        skipped = [(entry, None) for entry, _ in batch.get("unreadable", [])]
        images = batch["image"]
        if images is None:
            return skipped
        logits = self.segmenter.forward_tta(images) if self.tta else self.segmenter(images)
        confidence, pred = logits.softmax(1).max(1)
        out = []
        for b, entry in enumerate(batch["entry"]):
            label = combine(pred[b], confidence[b], batch["mask"][b], self.mode, self.threshold)
            out.append((entry, label.to(torch.uint8).cpu().numpy()))
        return out + skipped


class PseudoLabelWriter(BasePredictionWriter):
    def __init__(self, store: SyntheticStore, source: str | Path) -> None:
        super().__init__(write_interval="batch")
        self.store, self.source = store, Path(source)
        self.written = self.unreadable = 0

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0) -> None:
        for entry, label in prediction:
            if label is None:
                self.store.write_dropped(entry["id"], "unreadable", {"source_image": str((self.source / entry["image"]).resolve())},
                                         tag=f"rank{trainer.global_rank}")
                self.unreadable += 1
                continue
            meta = {k: v for k, v in entry.items() if k not in ("image", "mask", "foreground", "uncertain", "attention")}
            meta["source_mask"] = str((self.source / entry["mask"]).resolve())
            self.store.write_label(entry["id"], label, meta, image=self.source / entry["image"], tag=f"rank{trainer.global_rank}")
            self.written += 1

    def on_predict_end(self, trainer, pl_module) -> None:
        trainer.strategy.barrier("dsdiff_pseudo_end")
        if trainer.is_global_zero:
            self.store.compact()
        trainer.strategy.barrier("dsdiff_pseudo_compacted")


def pseudo_label(segmenter: L.LightningModule, source: str | Path, out: str | Path, make_trainer, *,
                 mode: str = "replace", threshold: float = 0.9, tta: bool = False, checkpoint: str | None = None,
                 batch_size: int = 8, num_workers: int = 0, max_samples: int | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Write pseudo-labels for samples ``0..max_samples-1`` of ``source`` (all with None) into ``out``, resuming.

    ``make_trainer(callbacks)`` builds the Lightning Trainer that runs the prediction. The summary
    counts ``samples`` written and ``dropped_by_reason["unreadable"]`` samples skipped.
    """
    source_cfg = SyntheticStore(source).read_config() or {}
    config = {"class_names": source_cfg.get("class_names"), "source": str(Path(source).resolve()),
              "selftrain": {"mode": mode, "threshold": threshold if mode in THRESHOLD_MODES else None, "tta": tta},
              "checkpoint": checkpoint}
    store = SyntheticStore(out)
    store.check_config(config)
    trainer = make_trainer([PseudoLabelWriter(store, source), *([LogProgress(name="pseudo-labels")] if progress else [])])
    segmenter.eval()
    data = PseudoLabelData(source, store, config, batch_size, num_workers, max_samples=max_samples)
    trainer.predict(PseudoLabeler(segmenter, mode, threshold, tta), datamodule=data, return_predictions=False)
    summary = summarize(store)
    unreadable = summary["dropped_by_reason"].get("unreadable", 0)
    if unreadable:
        log.warning("pseudo-labels at %s: %d unreadable samples got no label (listed in %s)", store.root, unreadable,
                    store.root / "dropped.jsonl")
    return {**summary, "unreadable": unreadable, "max_samples": max_samples, "dir": str(store.root)}
