"""Class lists, palettes and class-name-to-words maps: the one place they live.

Index 0 is always ``background``; label 255 means "ignore" (uncertain or void).
"""
from __future__ import annotations

from dataclasses import dataclass

from dsdiff.utils.errors import SettingError

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


def get_class_list(name: str) -> ClassList:
    """Look up a registered class list by name, with an error listing the known names."""
    try:
        return CLASS_LISTS[name]
    except KeyError:
        raise SettingError(f"unknown class list {name!r}; known: {sorted(CLASS_LISTS)}") from None

# The built-in procedural world (dsdiff.data.shapes): each class has its own shape and colour family.
SHAPES_CLASSES: tuple[str, ...] = ("background", "ball", "box", "leaf", "tent", "ring")
CLASS_LISTS["shapes"] = ClassList("shapes", SHAPES_CLASSES)
