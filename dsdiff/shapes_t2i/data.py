"""Training data for the tiny text-to-image model: shapes-world images in [-1, 1] with their texts."""
from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from dsdiff.data.classes import SHAPES_CLASSES, class_words
from dsdiff.data.shapes import ShapesDataset


class CaptionedShapes(Dataset):
    """``{"image": float (3, H, W) in [-1, 1], "caption": "a ball and a leaf", "classes": "ball leaf"}``.

    ``classes`` is the class prompt the generator appends and encodes (class words in class-id
    order), so the model sees both kinds of text while training.
    """

    def __init__(self, size: int = 200_000, image_size: int = 32, seed: int = 0, split: str = "train") -> None:
        self.world = ShapesDataset(split=split, size=size, image_size=image_size, seed=seed)

    def __len__(self) -> int:
        return len(self.world)

    def __getitem__(self, index: int) -> dict:
        item = self.world[index]
        labels = sorted(int(c) for c in item["mask"].unique() if c != 0)
        return {
            "image": item["image"].float() / 127.5 - 1.0,
            "caption": item["caption"],
            "classes": " ".join(class_words(SHAPES_CLASSES[c]) for c in labels),
        }


class CaptionedShapesData(L.LightningDataModule):
    """Shuffled batches of :class:`CaptionedShapes` (rendered on access, so ``num_workers=0`` is fine)."""

    def __init__(self, size: int = 200_000, image_size: int = 32, seed: int = 0, batch_size: int = 32,
                 num_workers: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.train_set: CaptionedShapes | None = None

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        self.train_set = CaptionedShapes(hp.size, hp.image_size, hp.seed)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.hparams.num_workers, generator=generator)
