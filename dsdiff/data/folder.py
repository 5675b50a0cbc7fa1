"""Your own dataset: a folder of images, index masks and a class list file (docs/datasets.md).

Layout::

    <paths.folder>/
      classes.txt            one class name per line; line 1 is mask value 0, line 2 value 1, ...
      images/<name>.jpg      (.jpg, .jpeg, .png or .webp)
      masks/<name>.png       class indices: a palette (P) or grayscale (L) PNG; 255 = ignore
      splits/train.txt       optional: one image name per line (file stem or file name)
      splits/val.txt         optional

With one of the two split files, the other split is every image it does not list; with neither,
the split is fixed by name: images sorted by name, every fifth (the 5th, 10th, ...) is ``val``
and the rest ``train`` (:func:`default_split`).
A class list whose first line is ``background`` works like VOC's (value 0 is never prompted);
any other first class is prompted like the rest (see ``dsdiff.data.classes.has_background``).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dsdiff.data.classes import first_prompt_class, read_class_file
from dsdiff.data.voc import (
    SHOW,
    ListedMasks,
    check_labels,
    draw_subset,
    check_not_empty,
    read_label_png,
)
from dsdiff.utils.errors import MissingPathError, SettingError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
CLASS_FILE = "classes.txt"
VAL_EVERY = 5  # without split files: every fifth image by name is val
SPLITS = ("train", "val")
LAYOUT = "classes.txt, images/<name>.jpg|.png and masks/<name>.png (optional splits/train.txt, splits/val.txt)"
ROOT_HINT = f"pass paths.folder=<folder holding {LAYOUT}>, see docs/datasets.md"


def check_root(root: str | Path) -> Path:
    """``root`` if it holds ``classes.txt``, ``images/`` and ``masks/``, else a MissingPathError naming the layout."""
    root = Path(root).expanduser()
    missing = [name for name, ok in ((CLASS_FILE, (root / CLASS_FILE).is_file()), ("images/", (root / "images").is_dir()),
                                     ("masks/", (root / "masks").is_dir())) if not ok]
    if missing:
        raise MissingPathError(f"no dataset folder at {root}: {', '.join(missing)} missing there; {ROOT_HINT}")
    return root


def list_images(image_dir: Path) -> dict[str, str]:
    """Image name (file stem) -> file name, for every image file in ``image_dir``."""
    found: dict[str, str] = {}
    for file_name in sorted(os.listdir(image_dir)):
        stem, ext = os.path.splitext(file_name)
        if ext.lower() not in IMAGE_EXTENSIONS:
            continue
        if stem in found:
            raise SettingError(f"{image_dir} holds two images named {stem!r} ({found[stem]}, {file_name}): "
                               "keep one per name, since masks/<name>.png pairs with one image")
        found[stem] = file_name
    if not found:
        raise MissingPathError(f"no images in {image_dir}: expected files ending in {', '.join(IMAGE_EXTENSIONS)}")
    return found


def default_split(names: list[str], split: str) -> list[str]:
    """The split without split files: names sorted, every fifth (positions 5, 10, ...) ``val``, the rest ``train``
    (a folder of fewer than five images: its last image is ``val``)."""
    names = sorted(names)
    if len(names) < 2:
        raise SettingError(f"a dataset folder of {len(names)} image cannot be split into train and val: "
                           "add images, or write splits/train.txt and splits/val.txt")
    every = min(VAL_EVERY, len(names))
    val = [n for i, n in enumerate(names) if i % every == every - 1]
    return val if split == "val" else [n for n in names if n not in set(val)]


def read_split(path: Path) -> list[str]:
    """Image names in a split file, one per line (a file stem, a file name or a path: its stem counts)."""
    names = [Path(line.split()[0]).stem for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise SettingError(f"split file {path} lists no images; expected one image name per line")
    return names


class FolderSegmentation(ListedMasks):
    """A folder of images, index masks and ``classes.txt``: ``{"image", "mask", "name"}`` per image.

    ``split`` is ``train``/``val`` (``splits/<split>.txt`` when present, else :func:`default_split`),
    another ``splits/<name>.txt``, or a path to a list file. ``subset=N`` keeps N images drawn with
    ``subset_seed`` (the tune split). Every listed image needs an image file and ``masks/<name>.png``:
    a gap fails here, naming the files; a mask value past the class list fails when it is read, naming the file.
    """

    def __init__(self, root: str | Path, split: str = "train",
                 transform: Callable[[torch.Tensor, torch.Tensor], tuple] | None = None,
                 subset: int | None = None, subset_seed: int = 0, class_file: str | Path | None = None) -> None:
        self.root = check_root(root)
        self.transform = transform
        self.class_file = Path(class_file).expanduser() if class_file is not None else self.root / CLASS_FILE
        self.classes = read_class_file(self.class_file)
        self.num_classes = len(self.classes)
        self.split = split
        self.image_dir, self.mask_dir = self.root / "images", self.root / "masks"
        self.files = list_images(self.image_dir)
        split_file = self._split_file(split)
        other = self.root / "splits" / f"{SPLITS[1 - SPLITS.index(split)]}.txt" if split in SPLITS else None
        if split_file is not None:
            ids = read_split(split_file)
            where = str(split_file)
        elif other is not None and other.is_file():  # one split file: the other split is every image it leaves out
            listed = set(read_split(other))
            ids = [n for n in sorted(self.files) if n not in listed]
            where = f"{self.image_dir} (split {split!r}: the images {other} does not list)"
        else:
            ids = default_split(list(self.files), split)
            where = f"{self.image_dir} (split {split!r} by name: every {VAL_EVERY}th image is val)"
        self.split_file = split_file
        self.ids = draw_subset(ids, subset, subset_seed)
        self._check_files(where)
        self._labels: dict[str, list[int]] | None = None

    def _split_file(self, split: str) -> Path | None:
        named = self.root / "splits" / f"{split}.txt"
        if named.is_file():
            return named
        path = Path(split).expanduser()
        if str(split).endswith(".txt") or path.is_file():
            if not path.is_file():
                raise MissingPathError(f"no split file {path}: pass an existing list of image names (one per line), "
                                       f"or one of {SPLITS}")
            return path
        if split not in SPLITS:
            known = sorted(p.stem for p in (self.root / "splits").glob("*.txt"))
            raise MissingPathError(f"no split file {named} for split {split!r}; split files found: {known}; "
                                   f"use one of {sorted(set(SPLITS) | set(known))} or a path to a list file")
        return None

    def _check_files(self, where: str) -> None:
        """Fail now, naming the first few, if a listed image has no image file or no mask."""
        no_image = [f"images/{n}.*" for n in self.ids if n not in self.files]
        present = set(os.listdir(self.mask_dir))
        no_mask = [f"masks/{n}.png" for n in self.ids if f"{n}.png" not in present]
        missing = no_image + no_mask
        if missing:
            raise MissingPathError(
                f"{len(missing)} files of the images listed by {where} are missing under {self.root} "
                f"({', '.join(missing[:SHOW])}{', ...' if len(missing) > SHOW else ''}): add them, or remove "
                "those names from the split file")
        check_not_empty([self.image_path(n) for n in self.ids] + [self.mask_path(n) for n in self.ids], where)

    @property
    def first_label(self) -> int:
        """A leading ``background`` class is never an image's label; any other class 0 is (image_labels)."""
        return first_prompt_class(self.classes)

    def image_path(self, name: str) -> Path:
        return self.image_dir / self.files[name]

    def mask_path(self, name: str) -> Path:
        return self.mask_dir / f"{name}.png"

    def read_mask(self, name: str) -> np.ndarray:
        """One image's class indices (uint8 (H, W)), validated against the class list."""
        path = self.mask_path(name)
        mask = read_label_png(path)
        check_labels(mask, self.num_classes, path)
        return mask
