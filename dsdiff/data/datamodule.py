"""The DataModule: a train dataset (real or synthetic), a labelled tune split and the real test split."""
from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, IterableDataset

from dsdiff.data.classes import IGNORE_INDEX, get_class_list
from dsdiff.utils.errors import MissingPathError, SettingError

DatasetFactory = Callable[..., Dataset]


def pad_collate(samples: list[dict[str, Any]], ignore_index: int = IGNORE_INDEX) -> dict[str, Any]:
    """Stack samples of different sizes: images zero-padded, masks padded with ``ignore_index``."""
    h = max(s["image"].shape[-2] for s in samples)
    w = max(s["image"].shape[-1] for s in samples)
    images, masks = [], []
    for s in samples:
        ph, pw = h - s["image"].shape[-2], w - s["image"].shape[-1]
        images.append(F.pad(s["image"], (0, pw, 0, ph)))
        masks.append(F.pad(s["mask"], (0, pw, 0, ph), value=ignore_index))
    return {"image": torch.stack(images), "mask": torch.stack(masks), "name": [s["name"] for s in samples]}


def _prepare(factory: DatasetFactory | None) -> None:
    """Run a dataset class's one-process disk preparation (e.g. COCO mask caching), if it has one."""
    if isinstance(factory, partial) and hasattr(factory.func, "prepare_data"):
        factory.func.prepare_data(*factory.args, **{k: v for k, v in factory.keywords.items() if k != "transform"})


def check_roots(data: Any) -> None:
    """Raise, naming the ``paths`` setting, when a VOC, COCO, Cityscapes or folder split of ``data`` points at a missing folder
    (checked before a run writes anything; the datasets check their files in detail when they load)."""
    from dsdiff.data import cityscapes, coco, folder, voc  # the readers, loaded only for a check

    for split in ("train", "tune", "test"):
        node = data.get(split)
        root = node.get("root") if hasattr(node, "get") else None
        if root is None:
            continue
        target = str(node.get("_target_", ""))
        if target.startswith("dsdiff.data.voc."):
            voc.resolve_voc_root(root)
        elif target.startswith("dsdiff.data.coco.") and not (Path(str(root)).expanduser() / "annotations").is_dir():
            raise MissingPathError(f"no COCO 2017 folder at {root} (data.{split}): expected {root}/annotations/; "
                                   f"{coco.ROOT_HINT}")
        elif target.startswith("dsdiff.data.cityscapes."):
            cityscapes.check_root(root)
        elif target.startswith("dsdiff.data.folder."):
            folder.check_root(root)


class SegDataModule(L.LightningDataModule):
    """Builds datasets from factories (``functools.partial`` of a Dataset class) in ``setup``.

    ``num_classes`` (and ``class_list``, a name in ``dsdiff.data.classes.CLASS_LISTS``) are what
    the model was configured with; every dataset must agree with them.

    ``tune`` is the labelled split that validation (curves, the sweep objective) runs on; it must
    share no image with ``test``, which is used once, at the end (VOC/COCO: their val split).
    ``tune=None`` validates nothing. ``eval_scale`` is the dataset's inference scale (mmseg's
    keep-ratio ``(long, short)``; the model config reads it as ``${data.eval_scale}``).

    ``batch_size`` is the global training batch: under DDP each of the trainer's W processes loads
    ``batch_size / W`` (:attr:`per_device_batch_size`). The tune and test splits are dealt out over
    the processes without repeats, so every image is scored once.
    """

    def __init__(
        self,
        num_classes: int,
        train: DatasetFactory | None,
        tune: DatasetFactory | None,
        test: DatasetFactory | None,
        class_list: str | None = None,
        eval_scale: tuple[int, int] | None = None,
        train_transform: Callable | None = None,
        eval_transform: Callable | None = None,
        batch_size: int = 8,
        val_batch_size: int = 1,
        num_workers: int = 4,
        pin_memory: bool = True,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.class_list = class_list
        self.factories = {"train": train, "tune": tune, "test": test}
        self.eval_scale = None if eval_scale is None else tuple(int(v) for v in eval_scale)
        self.train_transform = train_transform
        self.eval_transform = eval_transform
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.datasets: dict[str, Dataset] = {}

    def prepare_data(self) -> None:
        for factory in self.factories.values():
            _prepare(factory)

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "tune", "test"), "validate": ("tune", "test"), "test": ("test",)}
        for split in wanted.get(stage, ("train", "tune", "test")):
            if split in self.datasets or self.factories[split] is None:
                continue
            transform = self.train_transform if split == "train" else self.eval_transform
            dataset = self.factories[split](transform=transform)
            found = getattr(dataset, "num_classes", self.num_classes)
            if found != self.num_classes:
                raise SettingError(
                    f"the {split} dataset {type(dataset).__name__} has {found} classes but the model is "
                    f"configured for {self.num_classes}: set data.num_classes={found} or use a matching dataset"
                )
            if self.class_list and hasattr(dataset, "classes"):
                expected = get_class_list(self.class_list).classes
                if tuple(dataset.classes) != tuple(expected):
                    raise SettingError(
                        f"the {split} dataset's classes {list(dataset.classes)[:4]}... are not the "
                        f"{self.class_list!r} class list {list(expected)[:4]}...: set data.class_list to match"
                    )
            self.datasets[split] = dataset
        self._check_disjoint()

    def _check_disjoint(self) -> None:
        """Refuse a tune split that shares images with the test split (nothing is chosen on the test split)."""
        tune, test = (getattr(self.datasets.get(split), "ids", None) for split in ("tune", "test"))
        if tune is None or test is None:
            return
        shared = sorted(set(tune) & set(test))
        if shared:
            raise SettingError(
                f"the tune split shares {len(shared)} images with the test split ({', '.join(map(str, shared[:5]))}"
                f"{', ...' if len(shared) > 5 else ''}): the test split must pick nothing; give data.tune images "
                "outside the test split (e.g. drawn from the train list), or data.tune=null")

    @property
    def class_names(self) -> list[str]:
        for dataset in self.datasets.values():
            if hasattr(dataset, "classes"):
                return list(dataset.classes)
        raise RuntimeError("call setup() before asking for class_names")

    @property
    def per_device_batch_size(self) -> int:
        """Each training process's share of the global ``batch_size`` (all of it without a multi-process trainer)."""
        world = int(self.trainer.world_size) if self.trainer is not None else 1
        if self.batch_size % world:
            raise SettingError(f"data.batch_size={self.batch_size} does not divide over the trainer's {world} processes: "
                               f"it is the global batch; use a multiple of {world}")
        return self.batch_size // world

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            raise RuntimeError(f"no {split} dataset: configure data.{split} (and call setup())")
        dataset = self.datasets[split]
        if isinstance(dataset, IterableDataset):  # a stream (on-the-fly generation) orders itself
            shuffle = False
        # evaluation under DDP: each process scores its own images, none twice (Lightning's default sampler
        # pads the split to a multiple of the processes, counting some images twice in the synced metrics)
        distributed = None if shuffle or isinstance(dataset, IterableDataset) or self.trainer is None \
            else self.trainer.distributed_sampler_kwargs
        sampler = UnrepeatedDistributedSampler(dataset, shuffle=False, **distributed) \
            if distributed and distributed.get("num_replicas", 1) > 1 else None
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            drop_last=shuffle and len(dataset) > batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=pad_collate,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.per_device_batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        """The tune split (no loader, so no validation, with ``tune=None``)."""
        if self.factories["tune"] is None:
            return []
        return self._loader("tune", self.val_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.val_batch_size, shuffle=False)
