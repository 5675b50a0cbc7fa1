"""Cityscapes semantic segmentation (the 19 evaluation classes, 255 = ignore), read from the raw download.

Layout (``leftImg8bit_trainvaltest.zip`` and ``gtFine_trainvaltest.zip`` unpacked side by side)::

    <paths.cityscapes>/leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    <paths.cityscapes>/gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

Label ids become train ids here, by cityscapesScripts' table (``CITYSCAPES_ID_TO_TRAIN_ID``:
road 7 -> 0 ... bicycle 33 -> 18, every other id -> 255), so no conversion script is needed;
a ``*_gtFine_labelTrainIds.png`` next to the label ids (what ``createTrainIdLabelImgs`` writes)
is read as it is when present.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dsdiff.data.classes import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_ID_TO_TRAIN_ID,
    IGNORE_INDEX,
)
from dsdiff.data.voc import (
    SHOW,
    ListedMasks,
    check_labels,
    draw_subset,
    check_not_empty,
    read_label_png,
)
from dsdiff.utils.errors import MissingPathError, SettingError

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"
TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds.png"
LAYOUT = "leftImg8bit/{train,val}/<city>/*_leftImg8bit.png and gtFine/{train,val}/<city>/*_gtFine_labelIds.png"
ROOT_HINT = f"pass paths.cityscapes=<folder holding {LAYOUT}>"
SPLITS = ("train", "val", "test")


def label_id_table() -> np.ndarray:
    """A 256-entry uint8 lookup table: Cityscapes label id -> train id (255 for ids that are not evaluated)."""
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label_id, train_id in CITYSCAPES_ID_TO_TRAIN_ID.items():
        table[label_id] = train_id
    return table


LABEL_ID_TABLE = label_id_table()


def to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """A ``*_labelIds.png`` array (uint8 label ids) as train ids 0..18, 255 for the rest."""
    return LABEL_ID_TABLE[label_ids]


def check_root(root: str | Path) -> Path:
    """``root`` if it holds ``leftImg8bit/`` and ``gtFine/``, else a MissingPathError naming the layout."""
    root = Path(root).expanduser()
    missing = [sub for sub in ("leftImg8bit", "gtFine") if not (root / sub).is_dir()]
    if missing:
        raise MissingPathError(f"no Cityscapes folder at {root}: {' and '.join(f'{root}/{m}/' for m in missing)} "
                               f"missing; expected {LAYOUT}; {ROOT_HINT}")
    return root


def list_split(root: Path, split: str) -> list[tuple[str, str]]:
    """(city, frame id) of every ``leftImg8bit/<split>/<city>/*_leftImg8bit.png``, sorted."""
    folder = root / "leftImg8bit" / split
    if not folder.is_dir():
        known = sorted(p.name for p in (root / "leftImg8bit").iterdir() if p.is_dir())
        raise MissingPathError(f"no Cityscapes split folder {folder} for split {split!r}; splits found: {known}; "
                               f"expected {LAYOUT}")
    frames = []
    for city in sorted(os.listdir(folder)):
        if (folder / city).is_dir():
            frames += [(city, name[: -len(IMAGE_SUFFIX)]) for name in sorted(os.listdir(folder / city))
                       if name.endswith(IMAGE_SUFFIX)]
    if not frames:
        raise MissingPathError(f"no *{IMAGE_SUFFIX} under {folder}/<city>/: unpack leftImg8bit_trainvaltest.zip "
                               f"into {root}; {ROOT_HINT}")
    return frames


def read_split_file(path: Path, frames: dict[str, str]) -> list[str]:
    """Frame ids listed in ``path`` (one per line: ``aachen_000000_000019``, a city/frame path or an image file
    name), each one of ``frames``."""
    names = []
    for line in path.read_text().splitlines():
        if line.strip():
            name = Path(line.split()[0]).name
            names.append(name.removesuffix(IMAGE_SUFFIX))
    if not names:
        raise SettingError(f"split file {path} lists no frames; expected one frame id (aachen_000000_000019) per line")
    unknown = [n for n in names if n not in frames]
    if unknown:
        raise MissingPathError(f"{path} lists {len(unknown)} frames that are not in leftImg8bit/train "
                               f"({', '.join(unknown[:SHOW])}{', ...' if len(unknown) > SHOW else ''}): "
                               "list train frame ids, one per line")
    return names


class CityscapesSegmentation(ListedMasks):
    """Cityscapes fine annotations: ``{"image", "mask", "name"}`` per frame, 19 classes (train ids).

    ``name`` is the frame id (``aachen_000000_000019``); ``mask`` holds train ids 0..18 and 255 for
    every other label id (unlabeled, ego vehicle, license plate, ...). ``split`` is ``train``,
    ``val`` (the test split: Cityscapes' test labels are not public) or a ``.txt`` list of train
    frame ids; ``subset=N`` keeps N frames drawn with ``subset_seed`` (the tune split). Every
    image needs its label file: a gap fails here, naming the files, not mid-epoch.
    """

    classes = CITYSCAPES_CLASSES
    num_classes = len(CITYSCAPES_CLASSES)

    def __init__(self, root: str | Path, split: str = "train",
                 transform: Callable[[torch.Tensor, torch.Tensor], tuple] | None = None,
                 subset: int | None = None, subset_seed: int = 0) -> None:
        self.root = check_root(root)
        self.transform = transform
        listed = None
        if split not in SPLITS and (str(split).endswith(".txt") or Path(split).expanduser().is_file()):
            listed = Path(split).expanduser()
            if not listed.is_file():
                raise MissingPathError(f"no split file {listed}: pass an existing list of train frame ids "
                                       f"(one per line), or one of {SPLITS[:2]}")
            split = "train"
        self.split = split
        frames = {frame: city for city, frame in list_split(self.root, split)}
        ids = read_split_file(listed, frames) if listed is not None else list(frames)
        self.ids = draw_subset(ids, subset, subset_seed)
        self.cities = {name: frames[name] for name in self.ids}
        self._masks = self._find_masks()
        check_not_empty([self.image_path(n) for n in self.ids] + [self._masks[n][0] for n in self.ids],
                        f"{self.root}/leftImg8bit/{split}" if listed is None else listed)
        self._labels: dict[str, list[int]] | None = None

    def _find_masks(self) -> dict[str, tuple[Path, bool]]:
        """Frame id -> (label file, whether it holds train ids); fails naming the first few frames without one."""
        out, missing = {}, []
        listings: dict[str, set[str]] = {}
        for name in self.ids:
            city = self.cities[name]
            folder = self.root / "gtFine" / self.split / city
            if city not in listings:
                listings[city] = set(os.listdir(folder)) if folder.is_dir() else set()
            if name + TRAIN_IDS_SUFFIX in listings[city]:
                out[name] = (folder / (name + TRAIN_IDS_SUFFIX), True)
            elif name + LABEL_IDS_SUFFIX in listings[city]:
                out[name] = (folder / (name + LABEL_IDS_SUFFIX), False)
            else:
                missing.append(f"gtFine/{self.split}/{city}/{name}{LABEL_IDS_SUFFIX}")
        if missing:
            raise MissingPathError(
                f"{len(missing)} Cityscapes images under {self.root}/leftImg8bit/{self.split} have no label file "
                f"({', '.join(missing[:SHOW])}{', ...' if len(missing) > SHOW else ''}): unpack "
                "gtFine_trainvaltest.zip next to leftImg8bit/")
        return out

    first_label = 0  # road, train id 0, is a class here (image_labels)

    def image_path(self, name: str) -> Path:
        return self.root / "leftImg8bit" / self.split / self.cities[name] / (name + IMAGE_SUFFIX)

    def mask_path(self, name: str) -> Path:
        return self._masks[name][0]

    def read_mask(self, name: str) -> np.ndarray:
        """One frame's train ids (uint8 (H, W), 0..18 and 255)."""
        path, train_ids = self._masks[name]
        mask = read_label_png(path)
        if not train_ids:
            return to_train_ids(mask)
        check_labels(mask, self.num_classes, path)
        return mask
