"""COCO 2017 semantic segmentation (background + 80 things) from instance annotations, masks cached as PNG.

Painting rule for a semantic mask: start from background 0, paint crowd regions 255 (ignore), then
paint the non-crowd instances from the largest pixel area to the smallest (ties: lower annotation
id first), each over what is there. Small objects lying on big ones so stay visible, and a labelled
instance wins over a crowd region that covers it.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset
from tqdm import tqdm

from dsdiff.data.classes import (
    COCO_CATEGORIES,
    COCO_CLASSES,
    COCO_ID_TO_TRAIN_ID,
    IGNORE_INDEX,
)
from dsdiff.data.voc import (
    SHOW,
    check_labels,
    check_not_empty,
    draw_subset,
    missing_files,
    read_label_png,
    read_rgb,
)
from dsdiff.utils.errors import MissingPathError, NotWritableError, SettingError
from dsdiff.utils.io import save_image_atomic

SPLITS = ("train", "val")
ROOT_HINT = "pass paths.coco=<folder containing train2017/, val2017/ and annotations/>"


def annotation_rle(segmentation: list | dict, height: int, width: int) -> dict:
    """One annotation's segmentation (polygons, uncompressed or compressed RLE) as compressed RLE."""
    if isinstance(segmentation, list):
        # pycocotools reads a 4-number list as a box, and fewer than 3 points is no area at all.
        polygons = [p for p in segmentation if len(p) >= 6]
        if not polygons:
            return mask_utils.encode(np.zeros((height, width), dtype=np.uint8, order="F"))
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation


def semantic_mask(annotations: list[dict], height: int, width: int) -> np.ndarray:
    """Instance annotations of one image -> uint8 (H, W) train ids, by the module's painting rule."""
    out = np.zeros((height, width), dtype=np.uint8)
    instances = []
    for ann in annotations:
        rle = annotation_rle(ann["segmentation"], height, width)
        if ann.get("iscrowd", 0):
            out[mask_utils.decode(rle).astype(bool)] = IGNORE_INDEX
        else:
            instances.append((-int(mask_utils.area(rle)), ann["id"], rle, ann["category_id"]))
    for _, _, rle, category_id in sorted(instances, key=lambda t: t[:2]):
        out[mask_utils.decode(rle).astype(bool)] = COCO_ID_TO_TRAIN_ID[category_id]
    return out


def check_categories(categories: list[dict], path: Path) -> None:
    """Raise unless the JSON's categories are exactly COCO 2017's 80 things (ids and names)."""
    found = {c["id"]: c["name"] for c in categories}
    expected = dict(COCO_CATEGORIES)
    if found != expected:
        diff = sorted(set(found.items()) ^ set(expected.items()))[:6]
        raise SettingError(f"categories in {path} differ from COCO 2017's 80 thing classes "
                         f"(dsdiff.data.classes.COCO_CLASSES); first differences (id, name): {diff}; "
                         "expected an unmodified instances_<split>2017.json")


def load_annotations(root: Path, split: str) -> tuple[list[dict], dict[int, list[dict]]]:
    """Images (sorted by id) and their annotations from ``annotations/instances_<split>2017.json``."""
    if split not in SPLITS:
        raise SettingError(f"unknown COCO split {split!r}; expected one of {SPLITS}")
    path = root / "annotations" / f"instances_{split}2017.json"
    if not path.is_file():
        raise MissingPathError(f"no COCO annotations at {path}: expected root/annotations/"
                                f"instances_{split}2017.json; {ROOT_HINT}")
    with open(path) as f:
        data = json.load(f)
    check_categories(data["categories"], path)
    images = sorted(data["images"], key=lambda im: im["id"])
    by_image: dict[int, list[dict]] = {im["id"]: [] for im in images}
    for ann in data["annotations"]:
        by_image[ann["image_id"]].append(ann)
    return images, by_image


def resolve_split(split: str) -> tuple[str, Path | None]:
    """(COCO split, id-list file or None): a ``split`` ending in .txt (or naming a file) lists train2017 images."""
    if split in SPLITS:
        return split, None
    path = Path(split).expanduser()
    if str(split).endswith(".txt") or path.is_file():
        if not path.is_file():
            raise MissingPathError(f"no split file {path}: pass an existing list of train2017 image names "
                                    f"(one file stem such as 000000000139 per line), or one of {SPLITS}")
        return "train", path
    raise SettingError(f"unknown COCO split {split!r}; expected one of {SPLITS} or a .txt list of train2017 images")


def select_images(images: list[dict], subset: int | None, seed: int, listed: Path | None = None) -> list[dict]:
    """The images named in ``listed`` (all of them), else ``subset`` drawn with ``seed`` (``voc.draw_subset``); id order."""
    if listed is not None:
        names = [Path(line.split()[0]).stem for line in listed.read_text().splitlines() if line.strip()]
        by_stem = {Path(im["file_name"]).stem: im for im in images}
        unknown = [n for n in names if n not in by_stem]
        if unknown or not names:
            raise SettingError(f"{listed} lists {len(unknown)} images that are not in the train2017 annotations "
                             f"({', '.join(unknown[:SHOW])}{', ...' if len(unknown) > SHOW else ''}): list train2017 "
                             "file stems, one per line" if names else f"{listed} lists no images; expected one per line")
        keep = set(names)
        return [im for im in images if Path(im["file_name"]).stem in keep]
    keep = set(draw_subset([str(im["id"]) for im in images], subset, seed))
    return [im for im in images if str(im["id"]) in keep]


def default_cache_dir(root: Path, split: str) -> Path:
    return root / "dsdiff_masks" / f"{split}2017"


def missing_masks(images: list[dict], cache_dir: Path) -> list[dict]:
    """The images whose mask PNG is not yet in ``cache_dir``."""
    present = set(os.listdir(cache_dir)) if cache_dir.is_dir() else set()
    return [im for im in images if f"{Path(im['file_name']).stem}.png" not in present]


def check_images(image_dir: Path, images: list[dict]) -> None:
    """Fail, naming the first few, if the images folder or a listed image file is missing."""
    if not image_dir.is_dir():
        raise MissingPathError(f"no COCO images folder {image_dir}: unpack {image_dir.name}.zip there; {ROOT_HINT}")
    missing = missing_files([image_dir / im["file_name"] for im in images])
    if missing:
        shown = ", ".join(p.name for p in missing[:SHOW])
        raise MissingPathError(f"{len(missing)} images listed in the {image_dir.name} annotations are missing from "
                                f"{image_dir} ({shown}{', ...' if len(missing) > SHOW else ''}): "
                                "add them (a complete unpack of the zip), or point paths.coco at a complete copy")
    check_not_empty([image_dir / im["file_name"] for im in images], f"the {image_dir.name} annotations")


def write_masks(images: list[dict], by_image: dict[int, list[dict]], cache_dir: Path, split: str) -> None:
    """Write each image's semantic mask to ``cache_dir/<stem>.png`` atomically (temp file + rename)."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(cache_dir, os.W_OK):
            raise NotWritableError(f"{cache_dir} is not writable")
    except OSError as e:
        raise NotWritableError(f"cannot write COCO masks to {cache_dir} ({e}): "
                              "pass cache_dir=<a writable folder>") from e
    for im in tqdm(images, desc=f"COCO {split}2017 masks", unit="mask", dynamic_ncols=True):
        final = cache_dir / f"{Path(im['file_name']).stem}.png"
        # a pid-specific temp name (dsdiff.utils.io), so concurrent writers (one per DDP rank) never share one
        save_image_atomic(Image.fromarray(semantic_mask(by_image[im["id"]], im["height"], im["width"])), final, format="PNG")


class COCOSegmentation(Dataset):
    """COCO 2017 semantic segmentation with 81 classes: ``{"image", "mask", "name"}`` per image.

    ``name`` is the file stem ("000000000139"). Masks come from the PNG cache that
    ``prepare_data`` writes (default ``root/dsdiff_masks/<split>2017``); crowd regions are 255.
    ``subset=N`` keeps N images drawn with ``subset_seed`` (the tune split), and only their masks
    are built; a ``split`` ending in ``.txt`` lists train2017 images to use (all of them).
    A missing images folder or image file fails here, naming them.
    """

    classes = COCO_CLASSES
    num_classes = len(COCO_CLASSES)

    def __init__(self, root: str | Path, split: str = "val",
                 transform: Callable[[torch.Tensor, torch.Tensor], tuple] | None = None,
                 cache_dir: str | Path | None = None, subset: int | None = None, subset_seed: int = 0) -> None:
        self.root = Path(root).expanduser()
        split, listed = resolve_split(split)
        self.split = split
        self.transform = transform
        self.image_dir = self.root / f"{split}2017"
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(self.root, split)
        images, by_image = load_annotations(self.root, split)
        images = select_images(images, subset, subset_seed, listed)
        check_images(self.image_dir, images)
        todo = missing_masks(images, self.cache_dir)
        if todo:  # what prepare_data does, without reading the JSON a second time
            write_masks(todo, by_image, self.cache_dir, split)
        self.files = [im["file_name"] for im in images]
        self.ids = [Path(name).stem for name in self.files]
        self._labels = {
            Path(im["file_name"]).stem: sorted({COCO_ID_TO_TRAIN_ID[a["category_id"]]
                                                for a in by_image[im["id"]] if not a.get("iscrowd", 0)})
            for im in images
        }

    @classmethod
    def prepare_data(cls, root: str | Path, split: str = "val", cache_dir: str | Path | None = None,
                     subset: int | None = None, subset_seed: int = 0) -> Path:
        """Write the missing semantic-mask PNGs of a split (idempotent, atomic); return the cache dir."""
        root = Path(root).expanduser()
        split, listed = resolve_split(split)
        cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(root, split)
        images, by_image = load_annotations(root, split)
        images = select_images(images, subset, subset_seed, listed)
        check_images(root / f"{split}2017", images)
        todo = missing_masks(images, cache_dir)
        if todo:
            write_masks(todo, by_image, cache_dir, split)
        return cache_dir

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        file_name = self.files[index]
        name = Path(file_name).stem
        image = read_rgb(self.image_dir / file_name)
        mask_path = self.cache_dir / f"{name}.png"
        mask = read_label_png(mask_path)
        check_labels(mask, self.num_classes, mask_path)
        if mask.shape != tuple(image.shape[1:]):
            raise SettingError(f"mask {mask_path} is {mask.shape} but image {self.image_dir / file_name} "
                             f"is {tuple(image.shape[1:])}; delete {self.cache_dir} to rebuild the masks")
        mask = torch.from_numpy(mask)
        if self.transform is None:
            return {"image": image, "mask": mask.long(), "name": name}
        image, mask = self.transform(image, mask)
        return {"image": image, "mask": mask, "name": name}

    def image_labels(self) -> dict[str, list[int]]:
        """Image name -> sorted train ids of its non-crowd annotations (background left out)."""
        return dict(self._labels)
