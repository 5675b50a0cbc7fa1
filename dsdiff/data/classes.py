"""Class lists, palettes and class-name-to-words maps: the one place they live.

Index 0 is ``background`` (never prompted) in VOC, COCO and the shapes world; a list whose index 0
is not ``background`` (Cityscapes' 19 classes, a folder's own list) names every pixel's class, so
index 0 is prompted like any other and attention below beta is ignored instead (:func:`has_background`).
Label 255 means "ignore" (uncertain or void).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dsdiff.utils.errors import MissingPathError, SettingError

IGNORE_INDEX = 255

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)

# COCO 2017 "thing" categories in id order; the id is the COCO category id (sparse, 1..90).
COCO_CATEGORIES: tuple[tuple[int, str], ...] = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"),
    (7, "train"), (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"),
    (13, "stop sign"), (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"),
    (18, "dog"), (19, "horse"), (20, "sheep"), (21, "cow"), (22, "elephant"), (23, "bear"),
    (24, "zebra"), (25, "giraffe"), (27, "backpack"), (28, "umbrella"), (31, "handbag"),
    (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"), (36, "snowboard"),
    (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"),
    (46, "wine glass"), (47, "cup"), (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"),
    (52, "banana"), (53, "apple"), (54, "sandwich"), (55, "orange"), (56, "broccoli"),
    (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake"), (62, "chair"),
    (63, "couch"), (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"),
    (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"),
    (77, "cell phone"), (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"),
    (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"),
    (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
)
COCO_CLASSES: tuple[str, ...] = ("background",) + tuple(name for _, name in COCO_CATEGORIES)
# COCO category id -> contiguous train id (1..80); 0 is background.
COCO_ID_TO_TRAIN_ID: dict[int, int] = {cid: i + 1 for i, (cid, _) in enumerate(COCO_CATEGORIES)}

# Cityscapes' 19 evaluation classes in train-id order (cityscapesScripts' labels table).
CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)
# Cityscapes label id -> train id (cityscapesScripts' labels.py); every other id (unlabeled 0, ego
# vehicle 1, rectification border 2, out of roi 3, static 4, dynamic 5, ground 6, parking 9,
# rail track 10, guard rail 14, bridge 15, tunnel 16, polegroup 18, caravan 29, trailer 30,
# license plate -1) is 255.
CITYSCAPES_ID_TO_TRAIN_ID: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
    26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
# Cityscapes' colours by train id (cityscapesScripts' labels.py).
CITYSCAPES_COLORS: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)

# Dataset class names whose prompt words differ from the name itself.
CLASS_WORDS: dict[str, str] = {
    "aeroplane": "aeroplane",
    "diningtable": "dining table",
    "pottedplant": "potted plant",
    "tvmonitor": "tv monitor",
    "motorbike": "motorbike",
}


def class_words(name: str) -> str:
    """The words a prompt uses for a dataset class name (``diningtable`` -> ``dining table``)."""
    return CLASS_WORDS.get(name, name.replace("_", " "))


def has_background(class_names: Sequence[str]) -> bool:
    """Whether index 0 is ``background``: a class no prompt names, where attention below beta goes."""
    return len(class_names) > 0 and class_names[0] == "background"


def first_prompt_class(class_names: Sequence[str]) -> int:
    """The lowest class index a prompt may name: 1 past a background, else 0."""
    return 1 if has_background(class_names) else 0


def unattended_label(class_names: Sequence[str]) -> int:
    """The label of a generated pixel no class attends to (max map below beta): 0 (background) when
    the list has one, else 255 (ignored: a list without background has no class for it)."""
    return 0 if has_background(class_names) else IGNORE_INDEX


def voc_palette(num_colors: int = 256) -> list[tuple[int, int, int]]:
    """The PASCAL VOC colour map (the bit-interleaved palette used by VOC's PNG masks)."""
    palette = []
    for i in range(num_colors):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette.append((r, g, b))
    return palette


def flat_palette() -> list[int]:
    """A 768-long flat palette for ``PIL.Image.putpalette`` (VOC colours; 255 is white-ish cream)."""
    return [v for rgb in voc_palette(256) for v in rgb]


@dataclass(frozen=True)
class ClassList:
    """A named class list: what a dataset, a model and a prompt builder must agree on."""

    name: str
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def words(self) -> tuple[str, ...]:
        return tuple(class_words(c) for c in self.classes)


CLASS_LISTS: dict[str, ClassList] = {
    "voc": ClassList("voc", VOC_CLASSES),
    "coco": ClassList("coco", COCO_CLASSES),
}


def read_class_file(path: str | Path) -> tuple[str, ...]:
    """A class list file: one class name per line, line i (from 0) is mask value i; blank lines and
    ``#`` comments are skipped. Names may hold spaces (``traffic light``); the prompt words are the name."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingPathError(f"no class list file {path}: write one class name per line (line 1 is mask value 0, "
                               "e.g. background), see docs/datasets.md")
    names = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    names = [n for n in names if n]
    if not names:
        raise SettingError(f"class list file {path} names no class; expected one class name per line")
    if len(names) > IGNORE_INDEX:
        raise SettingError(f"class list file {path} names {len(names)} classes; at most {IGNORE_INDEX} "
                           f"(mask value {IGNORE_INDEX} is ignore)")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise SettingError(f"class list file {path} names {repeated} more than once; each class once")
    return tuple(names)


def get_class_list(name: str) -> ClassList:
    """Look up a registered class list by name, or read a class list file (a path ending in .txt or
    naming a file: one class per line, :func:`read_class_file`), with an error listing the known names."""
    if name in CLASS_LISTS:
        return CLASS_LISTS[name]
    path = Path(str(name)).expanduser()
    if str(name).endswith(".txt") or path.is_file():
        return ClassList(path.parent.name or "folder", read_class_file(path))
    raise SettingError(f"unknown class list {name!r}; known: {sorted(CLASS_LISTS)}, or a class list file "
                       "(one class name per line)")

# The built-in procedural world (dsdiff.data.shapes): each class has its own shape and colour family.
SHAPES_CLASSES: tuple[str, ...] = ("background", "ball", "box", "leaf", "tent", "ring")
CLASS_LISTS["shapes"] = ClassList("shapes", SHAPES_CLASSES)
CLASS_LISTS["cityscapes"] = ClassList("cityscapes", CITYSCAPES_CLASSES)
