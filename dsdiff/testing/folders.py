"""Writers of tiny VOC-, COCO-, Cityscapes- and image-folder datasets for tests and smoke runs; each returns what it drew.

Every class is painted in its own colour plus noise, so a model can learn the folders.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from dsdiff.data.classes import (
    CITYSCAPES_COLORS,
    CITYSCAPES_ID_TO_TRAIN_ID,
    COCO_CATEGORIES,
    COCO_ID_TO_TRAIN_ID,
    IGNORE_INDEX,
    flat_palette,
)

# VOC classes the fixture draws, each with its colour: aeroplane, cat, dog, person.
VOC_FIXTURE_COLORS = {1: (210, 50, 40), 8: (40, 170, 60), 12: (50, 70, 210), 15: (230, 200, 40)}
VOC_BORDER = 2  # width of the 255 "void" band VOC draws around each object


def _box(size: int, top: int, left: int, height: int, width: int, pad: int = 0) -> np.ndarray:
    region = np.zeros((size, size), dtype=bool)
    region[max(top - pad, 0):top + height + pad, max(left - pad, 0):left + width + pad] = True
    return region


def _ellipse(size: int, top: int, left: int, height: int, width: int, pad: int = 0) -> np.ndarray:
    y, x = np.mgrid[:size, :size] + 0.5
    ry, rx = height / 2 + pad, width / 2 + pad
    return ((y - top - height / 2) / ry) ** 2 + ((x - left - width / 2) / rx) ** 2 <= 1


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    return rng.integers(90, 140) + rng.normal(0, 8, (size, size, 3))


def _paint(image: np.ndarray, region: np.ndarray, color: tuple[int, int, int], rng: np.random.Generator) -> None:
    image[region] = np.array(color) + rng.normal(0, 8, (int(region.sum()), 3))


def _save_jpeg(image: np.ndarray, path: Path) -> np.ndarray:
    pixels = image.clip(0, 255).round().astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=95, subsampling=0)  # 4:4:4 keeps small objects' colours
    return pixels


def write_voc_folder(root: str | Path, n_train: int = 6, n_val: int = 4, size: int = 64, seed: int = 0) -> dict:
    """Write a VOC 2012-layout folder of rectangles/ellipses with 255 borders.

    Returns ``{"root", "splits": {split: [ids]}, "masks": {id: uint8 (H, W)},
    "images": {id: uint8 (H, W, 3) before JPEG}, "labels": {id: sorted class ids}}``.
    """
    root = Path(root)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    classes = sorted(VOC_FIXTURE_COLORS)
    out = {"root": root, "splits": {}, "masks": {}, "images": {}, "labels": {}}
    counter = 0
    for split, count in (("train", n_train), ("val", n_val)):
        ids = []
        for _ in range(count):
            name = f"2007_{counter:06d}"
            counter += 1
            image, mask = _background(rng, size), np.zeros((size, size), dtype=np.uint8)
            for label in rng.choice(classes, size=int(rng.integers(1, 3)), replace=False):
                h, w = (int(v) for v in rng.integers(size // 4, size // 2, 2))
                top, left = int(rng.integers(0, size - h)), int(rng.integers(0, size - w))
                shape = _box if rng.random() < 0.5 else _ellipse
                region = shape(size, top, left, h, w)
                # Like VOC: a void band around the object, over whatever was there before.
                mask[shape(size, top, left, h, w, pad=VOC_BORDER) & ~region] = IGNORE_INDEX
                mask[region] = label
                _paint(image, region, VOC_FIXTURE_COLORS[int(label)], rng)
            out["images"][name] = _save_jpeg(image, root / "JPEGImages" / f"{name}.jpg")
            png = Image.fromarray(mask)
            png.putpalette(flat_palette())  # an L image with a palette becomes P, as VOC stores it
            png.save(root / "SegmentationClass" / f"{name}.png")
            out["masks"][name] = mask
            out["labels"][name] = sorted(int(c) for c in np.unique(mask) if c not in (0, IGNORE_INDEX))
            ids.append(name)
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        out["splits"][split] = ids
    return out


def uncompressed_rle(region: np.ndarray) -> dict:
    """A boolean (H, W) region as COCO's uncompressed RLE (column-major run lengths, zeros first)."""
    flat = region.ravel(order="F").astype(np.uint8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    return {"size": list(region.shape), "counts": ([0] + counts) if flat[0] else counts}


def _coco_instances(template: int, size: int, rng: np.random.Generator) -> list[dict]:
    """Instances for one image: category id, region, segmentation and crowd flag.

    Templates cover what a COCO reader must get right: 0 a small RLE object listed before the
    large polygon it lies on; 1 a crowd region (uncompressed RLE) partly under a dog, and a
    compressed-RLE car; 2 a two-polygon bicycle and a cat; 3 no annotations at all.
    """
    jitter = [int(v) for v in rng.integers(0, 4, size=2)]  # keeps images of one template distinct
    if template == 0:
        t, l = 8 + jitter[0], 8 + jitter[1]
        cup = _ellipse(size, t + 10, l + 10, 12, 14)
        table = (t, l, 40, 44)
        return [
            {"category_id": 47, "region": cup, "segmentation": "rle"},
            {"category_id": 67, "region": _box(size, *table), "segmentation": [table]},
        ]
    if template == 1:
        t, l = 4 + jitter[0], 4 + jitter[1]
        crowd = _box(size, t, l, 30, 50)
        dog = (t + 20, l + 6, 24, 20)
        return [
            {"category_id": 1, "region": crowd, "segmentation": "uncompressed", "iscrowd": 1},
            {"category_id": 18, "region": _box(size, *dog), "segmentation": [dog]},
            {"category_id": 3, "region": _ellipse(size, 44, 36 + jitter[0], 16, 24), "segmentation": "rle"},
        ]
    if template == 2:
        a, b = (6 + jitter[0], 4, 14, 20), (6 + jitter[1], 30, 14, 20)
        return [
            {"category_id": 2, "region": _box(size, *a) | _box(size, *b), "segmentation": [a, b]},
            {"category_id": 17, "region": _ellipse(size, 34, 10 + jitter[0], 24, 30), "segmentation": "rle"},
        ]
    return []


def _segmentation(spec: list | str, region: np.ndarray) -> list | dict:
    if spec == "rle":
        rle = mask_utils.encode(np.asfortranarray(region.astype(np.uint8)))
        return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    if spec == "uncompressed":
        return uncompressed_rle(region)
    # Polygon corners on pixel edges: pycocotools fills rows top..top+h-1, columns left..left+w-1.
    return [[l, t, l + w, t, l + w, t + h, l, t + h] for t, l, h, w in spec]


def write_coco_folder(root: str | Path, n_train: int = 4, n_val: int = 3, size: int = 64, seed: int = 0) -> dict:
    """Write a COCO 2017-layout folder (images, instances JSON with the real 80 categories, captions JSON).

    Returns ``{"root", "masks": {split: {name: uint8 (H, W) expected semantic mask}},
    "labels": {split: {name: sorted train ids of non-crowd instances}},
    "captions": {split: {name: [captions in captions_<split>2017.json]}}}``, the masks built by the
    rule of ``dsdiff.data.coco``: crowd 255 first, then instances from largest to smallest.
    """
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colors = {cid: tuple(int(v) for v in np.random.default_rng(cid).integers(30, 230, 3))
              for cid, _ in COCO_CATEGORIES}
    out = {"root": root, "masks": {}, "labels": {}, "captions": {}}
    image_id = ann_id = 0
    for split, count in (("train", n_train), ("val", n_val)):
        (root / f"{split}2017").mkdir(exist_ok=True)
        images, annotations = [], []
        out["masks"][split], out["labels"][split] = {}, {}
        for k in range(count):
            image_id += 1
            name = f"{image_id:012d}"
            instances = _coco_instances(k % 4, size, rng)
            for inst in instances:
                ann_id += 1
                inst["id"] = ann_id
            # Expected mask and image, by the documented painting rule (sort is stable: ties by id).
            image, mask = _background(rng, size), np.zeros((size, size), dtype=np.uint8)
            crowd = [i for i in instances if i.get("iscrowd")]
            things = sorted((i for i in instances if not i.get("iscrowd")), key=lambda i: -int(i["region"].sum()))
            for inst in crowd + things:
                mask[inst["region"]] = IGNORE_INDEX if inst.get("iscrowd") else COCO_ID_TO_TRAIN_ID[inst["category_id"]]
                _paint(image, inst["region"], colors[inst["category_id"]], rng)
            _save_jpeg(image, root / f"{split}2017" / f"{name}.jpg")
            images.append({"id": image_id, "file_name": f"{name}.jpg", "height": size, "width": size})
            for inst in instances:
                ys, xs = np.nonzero(inst["region"])
                annotations.append({
                    "id": inst["id"], "image_id": image_id, "category_id": inst["category_id"],
                    "segmentation": _segmentation(inst["segmentation"], inst["region"]),
                    "area": float(inst["region"].sum()), "iscrowd": int(inst.get("iscrowd", 0)),
                    "bbox": [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)],
                })
            out["masks"][split][name] = mask
            out["labels"][split][name] = sorted({COCO_ID_TO_TRAIN_ID[i["category_id"]] for i in things})
        data = {
            "info": {"description": "dsdiff test fixture"}, "licenses": [], "images": images,
            "annotations": annotations,
            "categories": [{"id": cid, "name": n, "supercategory": ""} for cid, n in COCO_CATEGORIES],
        }
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(data))
        # captions_<split>2017.json: two captions per image, as COCO's (which has five)
        captions = [{"id": 10 * im["id"] + k, "image_id": im["id"], "caption": f"A test scene number {im['id']} view {k}."}
                    for im in images for k in range(2)]
        out["captions"][split] = {Path(im["file_name"]).stem: [c["caption"] for c in captions if c["image_id"] == im["id"]]
                                  for im in images}
        (root / "annotations" / f"captions_{split}2017.json").write_text(json.dumps({"images": images, "annotations": captions}))
    return out


# Cityscapes label ids the fixture draws: sky, building, vegetation, road, sidewalk, car, person; and
# ids that are not evaluated: unlabeled 0, ego vehicle 1, static 4, trailer 30 (all read as 255).
CITYSCAPES_FIXTURE_CITIES = {"train": ("aachen", "bochum"), "val": ("frankfurt",)}
CITYSCAPES_IGNORED_IDS = (0, 1, 4, 30)


def write_cityscapes_folder(root: str | Path, per_city: int = 2, size: tuple[int, int] = (64, 128), seed: int = 0) -> dict:
    """Write a Cityscapes-layout folder (``leftImg8bit/<split>/<city>/``, ``gtFine/<split>/<city>/``) holding
    only ``*_gtFine_labelIds.png`` label files: bands of sky / building / road, a car and a person, an ego
    vehicle strip at the bottom, unlabeled pixels and two other unevaluated ids.

    Returns ``{"root", "splits": {split: [frame ids]}, "label_ids": {id: uint8 (H, W)}, "train_ids":
    {id: uint8 (H, W) expected train ids}, "labels": {id: sorted train ids present}}``.
    """
    root = Path(root)
    height, width = size
    rng = np.random.default_rng(seed)
    out = {"root": root, "splits": {}, "label_ids": {}, "train_ids": {}, "labels": {}}
    colors = {lid: CITYSCAPES_COLORS[tid] for lid, tid in CITYSCAPES_ID_TO_TRAIN_ID.items()}
    y, x = np.mgrid[:height, :width]
    for split, cities in CITYSCAPES_FIXTURE_CITIES.items():
        out["splits"][split] = []
        for city in cities:
            (root / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
            (root / "gtFine" / split / city).mkdir(parents=True, exist_ok=True)
            for k in range(per_city):
                name = f"{city}_{k:06d}_{19 + k:06d}"
                sky, road = int(rng.integers(height // 5, height // 3)), int(rng.integers(height // 2, 2 * height // 3))
                ids = np.full((height, width), 11, dtype=np.uint8)  # building
                ids[:sky] = 23
                ids[sky:road, : width // 6] = 21  # vegetation on the left
                ids[road:] = 7
                ids[road:road + height // 12, width - width // 5:] = 8  # a strip of sidewalk
                top, left = road - height // 8, int(rng.integers(width // 5, width // 2))
                ids[top:top + height // 5, left:left + width // 5] = 26  # a car on the road
                px = int(rng.integers(width // 2 + 8, width - width // 4))
                ids[((y - (road - height // 10)) / (height / 8)) ** 2 + ((x - px) / (width / 40)) ** 2 <= 1] = 24
                ids[height - height // 10:] = 1  # the ego vehicle's bonnet
                ids[:2, :] = 0  # an unlabeled border
                ids[sky + 2:sky + 6, width // 2:width // 2 + 6] = 4
                ids[height // 2:height // 2 + 3, width - 8:] = 30
                image = rng.integers(90, 140) + rng.normal(0, 8, (height, width, 3))
                for lid in np.unique(ids):
                    region = ids == lid
                    image[region] = np.array(colors.get(int(lid), (60, 60, 60))) + rng.normal(0, 8, (int(region.sum()), 3))
                pixels = image.clip(0, 255).round().astype(np.uint8)
                Image.fromarray(pixels).save(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png")
                Image.fromarray(ids, mode="L").save(root / "gtFine" / split / city / f"{name}_gtFine_labelIds.png")
                train_ids = np.full_like(ids, IGNORE_INDEX)
                for lid, tid in CITYSCAPES_ID_TO_TRAIN_ID.items():
                    train_ids[ids == lid] = tid
                out["label_ids"][name], out["train_ids"][name] = ids, train_ids
                out["labels"][name] = sorted(int(c) for c in np.unique(train_ids) if c != IGNORE_INDEX)
                out["splits"][split].append(name)
    return out


# The image folder's classes (classes.txt) and colours: value 0 is background.
FOLDER_FIXTURE_CLASSES = ("background", "cat", "dog", "traffic cone")
FOLDER_FIXTURE_COLORS = {1: (210, 50, 40), 2: (40, 170, 60), 3: (50, 70, 210)}


def write_image_folder(root: str | Path, n_images: int = 10, size: int = 48, mask_format: str = "palette",
                       split_files: bool = True, seed: int = 0, classes: tuple[str, ...] = FOLDER_FIXTURE_CLASSES) -> dict:
    """Write a dataset folder for ``data=folder``: ``classes.txt``, ``images/<name>.jpg`` (every third a
    ``.png``), ``masks/<name>.png`` as palette (``mask_format="palette"``, VOC's colours) or plain
    grayscale index PNGs (``"index"``), and with ``split_files`` ``splits/train.txt`` / ``splits/val.txt``
    (the last third val). Boxes and ellipses of each class in its own colour, a 255 band around some.

    Returns ``{"root", "classes", "splits": {split: [names]} (None without split files), "masks": {name: uint8 (H, W)},
    "labels": {name: sorted class ids present, background and 255 left out}}``.
    """
    if mask_format not in ("palette", "index"):
        raise ValueError(f"mask_format={mask_format!r}: palette or index")
    root = Path(root)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    rng = np.random.default_rng(seed)
    first = 1 if classes[0] == "background" else 0
    drawn = list(range(first, len(classes)))
    out = {"root": root, "classes": tuple(classes), "splits": None, "masks": {}, "labels": {}}
    names = []
    for i in range(n_images):
        name = f"img_{i:03d}"
        image = _background(rng, size)
        mask = np.full((size, size), 0, dtype=np.uint8)
        for label in rng.choice(drawn, size=min(len(drawn), int(rng.integers(1, 3))), replace=False):
            h, w = (int(v) for v in rng.integers(size // 4, size // 2, 2))
            top, left = int(rng.integers(0, size - h)), int(rng.integers(0, size - w))
            region = (_box if rng.random() < 0.5 else _ellipse)(size, top, left, h, w)
            if i % 2:
                mask[_box(size, top, left, h, w, pad=1) & ~region] = IGNORE_INDEX
            mask[region] = label
            _paint(image, region, FOLDER_FIXTURE_COLORS.get(int(label), (200, 200, 200)), rng)
        if i % 3 == 2:
            Image.fromarray(image.clip(0, 255).round().astype(np.uint8)).save(root / "images" / f"{name}.png")
        else:
            _save_jpeg(image, root / "images" / f"{name}.jpg")
        png = Image.fromarray(mask)
        if mask_format == "palette":
            png.putpalette(flat_palette())
        png.save(root / "masks" / f"{name}.png")
        out["masks"][name] = mask
        out["labels"][name] = sorted(int(c) for c in np.unique(mask) if c != IGNORE_INDEX and c >= first)
        names.append(name)
    if split_files:
        (root / "splits").mkdir(exist_ok=True)
        cut = n_images - max(1, n_images // 3)
        out["splits"] = {"train": names[:cut], "val": names[cut:]}
        for split, listed in out["splits"].items():
            (root / "splits" / f"{split}.txt").write_text("\n".join(listed) + "\n")
    return out
