"""The built-in procedural "shapes" world: tiny captioned images with exact label maps, no downloads.

Each class has a typical look a tiny text-to-image model can bind its word to, with variation
inside the class (size, exact hue, position, aspect):

    ball  red-orange disc, shaded darker towards its rim
    box   blue square-ish rectangle with a darker one-pixel frame
    leaf  green elongated ellipse (lying or standing) with a darker midrib
    tent  yellow triangle pointing up
    ring  purple annulus; its hole shows the background (and is background in the mask)

Backgrounds are low-saturation colours with a mild vertical gradient and light noise. An image
holds 1 or 2 objects of different classes whose boxes never touch, so every named object is
visible and the caption ("a ball and a leaf") names exactly the classes in the mask. Image and
mask come from the same boolean region (no anti-aliasing), so they agree pixel for pixel.
Everything is a pure function of (seed, split, index), generated on access (about 0.4 ms a sample).
"""
from __future__ import annotations

import colorsys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from dsdiff.data.classes import SHAPES_CLASSES, class_words
from dsdiff.utils.errors import SettingError

SPLIT_SIZES = {"train": 2000, "val": 200, "test": 200}
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
# Hue range (degrees) of each class's colour family; index = class id.
_HUES = {1: (0, 20), 2: (205, 235), 3: (95, 140), 4: (45, 60), 5: (275, 310)}


@dataclass(frozen=True)
class ShapeObject:
    """One object: class id, its bounding box (top, left, height, width) in pixels, and its RGB colour."""

    label: int
    top: int
    left: int
    height: int
    width: int
    color: tuple[int, int, int]

    @property
    def name(self) -> str:
        return SHAPES_CLASSES[self.label]


def shape_region(obj: ShapeObject) -> np.ndarray:
    """Boolean (height, width) region of an object inside its box, tested at pixel centres."""
    h, w = obj.height, obj.width
    y = (np.arange(h) + 0.5)[:, None] / h * 2 - 1  # -1..1 across the box
    x = (np.arange(w) + 0.5)[None, :] / w * 2 - 1
    if obj.name == "box":
        return np.ones((h, w), dtype=bool)
    if obj.name in ("ball", "leaf"):
        return x**2 + y**2 <= 1
    if obj.name == "tent":
        return np.abs(x) <= (y + 1) / 2
    if obj.name == "ring":
        d2 = x**2 + y**2
        return (d2 <= 1) & (d2 >= 0.5**2)
    raise ValueError(f"unknown shapes class {obj.label}; expected 1..{len(SHAPES_CLASSES) - 1}")


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v)) * 255


def _sample_object(rng: np.random.Generator, label: int, image_size: int) -> ShapeObject:
    name = SHAPES_CLASSES[label]
    side = int(rng.integers(max(6, round(0.3 * image_size)), round(0.5 * image_size) + 1))
    if name == "ring":
        side = max(side, 10)  # thinner rings lose their hole at 32 px
    height = width = side
    if name == "box":
        width = int(np.clip(round(side * rng.uniform(0.8, 1.25)), 4, image_size))
    elif name == "leaf":
        long, short = side, max(4, round(side / rng.uniform(1.8, 2.4)))
        height, width = (long, short) if rng.random() < 0.5 else (short, long)
    top = int(rng.integers(0, image_size - height + 1))
    left = int(rng.integers(0, image_size - width + 1))
    lo, hi = _HUES[label]
    color = _hsv(rng.uniform(lo, hi) / 360, rng.uniform(0.6, 0.9), rng.uniform(0.65, 0.95))
    return ShapeObject(label, top, left, height, width, tuple(int(c) for c in color.round()))


def _apart(a: ShapeObject, b: ShapeObject) -> bool:
    """True if the boxes are separated by at least one pixel."""
    return (a.top + a.height < b.top or b.top + b.height < a.top
            or a.left + a.width < b.left or b.left + b.width < a.left)


def sample_layout(seed: int, split: str, index: int, image_size: int = 32) -> list[ShapeObject]:
    """The objects of one image: 1 or 2 of different classes with non-touching boxes."""
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
    num = 1 if rng.random() < 0.4 else 2
    labels = rng.choice(np.arange(1, len(SHAPES_CLASSES)), size=num, replace=False)
    objects = [_sample_object(rng, int(labels[0]), image_size)]
    if num == 2:
        for _ in range(20):  # rejection sampling; almost always succeeds in a few tries
            other = _sample_object(rng, int(labels[1]), image_size)
            if _apart(objects[0], other):
                objects.append(other)
                break
    return objects


def draw(objects: list[ShapeObject], rng: np.random.Generator, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw objects over a background: uint8 (H, W, 3) image and uint8 (H, W) label map."""
    base = _hsv(rng.random(), rng.uniform(0, 0.15), rng.uniform(0.35, 0.85))
    ramp = np.linspace(-1, 1, image_size)[:, None, None] * rng.uniform(-20, 20)
    image = np.broadcast_to(base + ramp, (image_size, image_size, 3)).copy()
    mask = np.zeros((image_size, image_size), dtype=np.uint8)
    for obj in objects:
        region = shape_region(obj)
        h, w = obj.height, obj.width
        patch = np.broadcast_to(np.array(obj.color, dtype=float), (h, w, 3)).copy()
        if obj.name == "ball":  # shading: darker towards the rim
            y = (np.arange(h) + 0.5)[:, None] / h * 2 - 1
            x = (np.arange(w) + 0.5)[None, :] / w * 2 - 1
            patch *= (1 - 0.35 * np.sqrt(np.clip(x**2 + y**2, 0, 1)))[..., None]
        elif obj.name == "box":  # a darker frame
            frame = np.ones((h, w), dtype=bool)
            frame[1:-1, 1:-1] = False
            patch[frame] *= 0.6
        elif obj.name == "leaf":  # a darker midrib along the long axis
            if h >= w:
                patch[:, w // 2] *= 0.65
            else:
                patch[h // 2, :] *= 0.65
        window = (slice(obj.top, obj.top + h), slice(obj.left, obj.left + w))
        image[window][region] = patch[region]
        mask[window][region] = obj.label
    image += rng.normal(0, 3, image.shape)
    return image.clip(0, 255).round().astype(np.uint8), mask


def caption(objects: list[ShapeObject]) -> str:
    """'a ball' or 'a ball and a leaf', in drawing order."""
    return " and ".join(f"a {class_words(obj.name)}" for obj in objects)


class ShapesDataset(Dataset):
    """Procedural shapes world: ``{"image", "mask", "name", "caption"}``, deterministic per (seed, split, index).

    ``size`` is the number of images in this split (default ``SPLIT_SIZES[split]``). Without a
    transform, ``image`` is uint8 (3, H, W) and ``mask`` int64 (H, W); with one, its outputs.
    """

    classes = SHAPES_CLASSES
    num_classes = len(SHAPES_CLASSES)

    def __init__(self, split: str = "train", size: int | None = None, image_size: int = 32, seed: int = 0,
                 transform: Callable[[torch.Tensor, torch.Tensor], tuple] | None = None) -> None:
        if split not in _SPLIT_CODES:
            raise SettingError(f"unknown shapes split {split!r}; expected one of {tuple(_SPLIT_CODES)}")
        if image_size < 16:
            raise SettingError(f"expected image_size >= 16 (rings need 10 px); found {image_size}")
        self.split = split
        self.size = SPLIT_SIZES[split] if size is None else int(size)
        self.image_size = image_size
        self.seed = seed
        self.transform = transform

    def __len__(self) -> int:
        return self.size

    def name(self, index: int) -> str:
        return f"{self.split}_{index:06d}"

    def layout(self, index: int) -> list[ShapeObject]:
        """The objects drawn in image ``index``."""
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for a shapes split of size {self.size}")
        return sample_layout(self.seed, self.split, index, self.image_size)

    def render(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Image ``index`` as uint8 (H, W, 3) and its uint8 (H, W) label map."""
        # Drawing noise has its own stream so layouts (labels, captions) never depend on it.
        rng = np.random.default_rng([self.seed, _SPLIT_CODES[self.split], index, 1])
        return draw(self.layout(index), rng, self.image_size)

    def __getitem__(self, index: int) -> dict:
        image, mask = self.render(index)
        image = torch.from_numpy(image).permute(2, 0, 1).contiguous()
        mask = torch.from_numpy(mask)
        item = {"name": self.name(index), "caption": caption(self.layout(index))}
        if self.transform is None:
            return {"image": image, "mask": mask.long(), **item}
        image, mask = self.transform(image, mask)
        return {"image": image, "mask": mask, **item}

    def image_labels(self) -> dict[str, list[int]]:
        """Image name -> sorted class ids present (background left out)."""
        return {self.name(i): sorted(o.label for o in self.layout(i)) for i in range(self.size)}

    def captions(self) -> dict[str, str]:
        """Image name -> caption naming exactly its objects."""
        return {self.name(i): caption(self.layout(i)) for i in range(self.size)}
