"""PASCAL VOC 2012 semantic segmentation (21 classes, 255 = void border), read from the standard layout."""
from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image

from dsdiff.data.classes import IGNORE_INDEX, VOC_CLASSES
from dsdiff.utils.errors import MissingPathError, SettingError

ROOT_HINT = "pass paths.voc=<folder containing JPEGImages/ and SegmentationClass/>"
# SBD-augmented training set: mmseg names its list aug.txt, most other tools train_aug.txt.
AUG_LISTS = ("train_aug.txt", "aug.txt")
SHOW = 5  # missing files named in an error
REDO = "download or copy it again, or remove its id from the split list"  # the fix for a damaged file


def draw_subset(ids: list[str], size: int | None, seed: int = 0) -> list[str]:
    """``size`` ids drawn without replacement with ``seed``, in list order (all of them when the list is shorter)."""
    if size is None or size >= len(ids):
        return list(ids)
    if size < 1:
        raise SettingError(f"subset={size}: expected a positive number of images, or null for all")
    keep = set(np.random.default_rng(seed).choice(len(ids), size=size, replace=False).tolist())
    return [name for i, name in enumerate(ids) if i in keep]


def missing_files(paths: list[Path]) -> list[Path]:
    """The paths that do not exist (one directory listing per folder, not one stat per file)."""
    listings: dict[Path, set[str]] = {}
    out = []
    for path in paths:
        if path.parent not in listings:
            listings[path.parent] = set(os.listdir(path.parent)) if path.parent.is_dir() else set()
        if path.name not in listings[path.parent]:
            out.append(path)
    return out


def resolve_voc_root(root: str | Path) -> Path:
    """The VOC2012 folder itself, given either it or a folder containing ``VOCdevkit/VOC2012``."""
    root = Path(root).expanduser()
    for candidate in (root, root / "VOCdevkit" / "VOC2012", root / "VOC2012"):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise MissingPathError(
        f"no PASCAL VOC 2012 folder at {root}: expected {root}/JPEGImages or "
        f"{root}/VOCdevkit/VOC2012/JPEGImages; {ROOT_HINT}"
    )


def read_label_png(path: Path) -> np.ndarray:
    """A label PNG as uint8 (H, W) class indices: palette indices for P-mode, values for L-mode."""
    if not path.is_file():
        raise MissingPathError(f"missing mask {path}: every listed id needs a mask PNG there")
    try:
        im = Image.open(path)
        im.load()
    except OSError as e:  # PIL's UnidentifiedImageError and truncated files are OSErrors
        raise MissingPathError(f"unreadable mask {path}: not a PNG of class indices that decodes ({e}); {REDO}") from e
    with im:
        if im.mode not in ("P", "L"):
            raise SettingError(f"mask {path} is a {im.mode} image; expected a palette (P) or grayscale (L) "
                             "PNG of class indices: convert colour masks to indices first")
        return np.array(im)


def check_labels(mask: np.ndarray, num_classes: int, path: Path) -> None:
    """Raise if a mask holds labels other than 0..num_classes-1 and 255."""
    bad = (mask >= num_classes) & (mask != IGNORE_INDEX)
    if bad.any():
        values = np.unique(mask[bad]).tolist()
        raise SettingError(f"mask {path} holds labels {values}; expected 0..{num_classes - 1} or "
                         f"{IGNORE_INDEX} (ignore): is it a mask for a different class list?")


def read_rgb(path: Path) -> torch.Tensor:
    """An image file as a uint8 (3, H, W) RGB tensor."""
    if not path.is_file():
        raise MissingPathError(f"missing image {path}: every listed id needs an image there")
    try:
        return decode_image(str(path), mode=ImageReadMode.RGB)
    except RuntimeError as e:  # torchvision names neither the file nor the fix ("Unsupported image file")
        reason = re.sub(r"^.*\.cpp:\d+, ", "", str(e).strip().splitlines()[0] if str(e).strip() else "")
        raise MissingPathError(f"unreadable image {path}: not a JPEG, PNG, WebP or GIF that decodes (a damaged "
                               f"or partial file?{'; ' + reason if reason else ''}); {REDO}") from e


def check_not_empty(paths: list[Path], listed_by: object) -> None:
    """Fail at setup, naming the first few, on listed files of 0 bytes (an interrupted download or copy).

    One ``stat`` per file, no decoding: a file that is damaged otherwise is named when it is read.
    """
    empty = []
    for path in paths:
        try:
            if os.stat(path).st_size == 0:
                empty.append(path)
        except OSError:  # missing: the callers' own checks name those
            continue
    if empty:
        shown = ", ".join(str(p) for p in empty[:SHOW])
        raise MissingPathError(f"{len(empty)} files listed by {listed_by} are empty (0 bytes: an interrupted download "
                               f"or copy?): {shown}{', ...' if len(empty) > SHOW else ''}; download or copy them again, "
                               "or remove their ids from the split list")


class ListedMasks(Dataset):
    """Listed images with index masks: ``{"image", "mask", "name"}`` for each id in ``self.ids``.

    A subclass sets ``ids``, ``transform``, ``num_classes`` and ``_labels = None`` and defines
    ``image_path(name)``, ``mask_path(name)`` and ``read_mask(name)`` (the validated label map).
    ``first_label`` is the first class :meth:`image_labels` reports (VOC's background 0 is none).
    """

    first_label = 1

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        name = self.ids[index]
        image = read_rgb(self.image_path(name))
        mask = torch.from_numpy(self.read_mask(name))
        if mask.shape != image.shape[1:]:
            raise SettingError(f"mask {self.mask_path(name)} is {tuple(mask.shape)} but image "
                               f"{self.image_path(name)} is {tuple(image.shape[1:])}; expected equal sizes")
        if self.transform is None:
            return {"image": image, "mask": mask.long(), "name": name}
        image, mask = self.transform(image, mask)
        return {"image": image, "mask": mask, "name": name}

    def image_labels(self) -> dict[str, list[int]]:
        """Id -> sorted class indices present in its mask, from ``first_label`` on (255 left out)."""
        if self._labels is None:
            labels = {}
            for name in self.ids:
                counts = np.bincount(self.read_mask(name).ravel(), minlength=256)
                labels[name] = [c for c in range(self.first_label, self.num_classes) if counts[c] and c != IGNORE_INDEX]
            self._labels = labels
        return dict(self._labels)


class VOCSegmentation(ListedMasks):
    """PASCAL VOC 2012 segmentation: ``{"image", "mask", "name"}`` per listed image id.

    Without a transform, ``image`` is uint8 (3, H, W) and ``mask`` int64 (H, W) as stored;
    with one, whatever ``transform(image, mask)`` returns. Split ``train_aug`` reads
    ``SegmentationClassAug/`` and ``ImageSets/Segmentation/train_aug.txt`` (or mmseg's ``aug.txt``);
    a ``split`` ending in ``.txt`` (or naming an existing file) is an id list of its own, read with
    ``SegmentationClass/``. ``subset=N`` keeps N ids drawn with ``subset_seed`` (the tune split).
    Every listed image and mask must exist: a gap fails here, naming the files, not mid-epoch.
    """

    classes = VOC_CLASSES
    num_classes = len(VOC_CLASSES)

    def __init__(self, root: str | Path, split: str = "train",
                 transform: Callable[[torch.Tensor, torch.Tensor], tuple] | None = None,
                 subset: int | None = None, subset_seed: int = 0) -> None:
        self.root = resolve_voc_root(root)
        self.split = split
        self.transform = transform
        lists = self.root / "ImageSets" / "Segmentation"
        if split == "train_aug":
            self.mask_dir = self.root / "SegmentationClassAug"
            found = [lists / name for name in AUG_LISTS if (lists / name).is_file()]
            if not self.mask_dir.is_dir() or not found:
                raise MissingPathError(
                    f"split 'train_aug' needs {self.mask_dir}/ and {lists}/train_aug.txt; "
                    "add the SBD-augmented masks and id list there, or use split='train'")
            split_file = found[0]
        elif str(split).endswith(".txt") or Path(split).expanduser().is_file():
            self.mask_dir = self.root / "SegmentationClass"
            split_file = Path(split).expanduser()
            if not split_file.is_file():
                raise MissingPathError(f"no split file {split_file}: pass an existing id list (one id per line), "
                                        "or a split name such as train")
        else:
            self.mask_dir = self.root / "SegmentationClass"
            split_file = lists / f"{split}.txt"
            if not split_file.is_file():
                known = sorted(p.stem for p in lists.glob("*.txt")) if lists.is_dir() else []
                raise MissingPathError(f"no split file {split_file} for split {split!r}; "
                                        f"splits found there: {known}; pass one of those")
        # Lines are ids ("2007_000032") or, in some train_aug lists, "/JPEGImages/<id>.jpg /Seg...png".
        lines = split_file.read_text().split("\n")
        self.ids = [Path(line.split()[0]).stem for line in lines if line.strip()]
        if not self.ids:
            raise SettingError(f"split file {split_file} lists no image ids; expected one id per line")
        self.split_file = split_file
        self.ids = draw_subset(self.ids, subset, subset_seed)
        self._check_files()
        self._labels: dict[str, list[int]] | None = None

    def _check_files(self) -> None:
        """Fail now, naming the first few, if a listed id has no image or no mask."""
        if not self.mask_dir.is_dir():
            raise MissingPathError(f"no mask folder {self.mask_dir} for the ids in {self.split_file}: "
                                    f"add the label PNGs there; {ROOT_HINT}")
        paths = [self.image_path(n) for n in self.ids] + [self.mask_path(n) for n in self.ids]
        missing = missing_files(paths)
        if missing:
            shown = ", ".join(str(p.relative_to(self.root)) for p in missing[:SHOW])
            raise MissingPathError(
                f"{len(missing)} files listed by {self.split_file} are missing under {self.root} "
                f"({shown}{', ...' if len(missing) > SHOW else ''}): add them, or remove their ids from the list")
        check_not_empty(paths, self.split_file)

    def image_path(self, name: str) -> Path:
        return self.root / "JPEGImages" / f"{name}.jpg"

    def mask_path(self, name: str) -> Path:
        return self.mask_dir / f"{name}.png"

    def read_mask(self, name: str) -> np.ndarray:
        """The stored label map of one image id, validated against the class list."""
        path = self.mask_path(name)
        mask = read_label_png(path)
        check_labels(mask, self.num_classes, path)
        return mask
