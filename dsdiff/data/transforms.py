"""Segmentation transforms on (image, mask) tensor pairs: mmseg's training augmentation and plain eval.

Images come in as uint8 (3, H, W), masks as integer (H, W) with 255 = ignore. Randomness uses
torch's global RNG (no private ``torch.Generator``), so ``lightning.seed_everything`` plus
Lightning's per-worker seeding make a run reproducible.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from dsdiff.data.classes import IGNORE_INDEX
from dsdiff.utils.errors import SettingError


def keep_ratio_size(height: int, width: int, scale: Sequence[int] | None) -> tuple[int, int]:
    """mmseg's keep-ratio ``Resize(scale=(long, short))``: the (H, W) an image is resized to for inference.

    factor = min(long / max(H, W), short / min(H, W)); sides ``int(side * factor + 0.5)``. A
    500x375 VOC image in (2048, 512) becomes 683x512. ``scale=None`` keeps (H, W).
    """
    if scale is None:
        return height, width
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# mmseg PhotoMetricDistortion defaults, expressed on [0, 1] images.
BRIGHTNESS_DELTA = 32 / 255
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18 / 180  # mmseg shifts OpenCV hue (0..180) by up to 18, i.e. 0.1 of the hue circle


def _check_pair(image: Tensor, mask: Tensor) -> Tensor:
    """Validate an (image, mask) pair and return the mask as uint8 (H, W)."""
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a uint8 image of shape (3, H, W); found {image.dtype} "
                         f"{tuple(image.shape)}: decode images as uint8 RGB before transforming")
    if mask.ndim != 2 or mask.shape != image.shape[1:]:
        raise ValueError(f"expected a mask of shape {tuple(image.shape[1:])} (the image's H, W); "
                         f"found {tuple(mask.shape)}")
    if mask.dtype != torch.uint8:
        if mask.is_floating_point() or mask.numel() and (mask.min() < 0 or mask.max() > 255):
            raise ValueError(f"expected an integer mask with labels in 0..255; found {mask.dtype} "
                             f"with range {mask.min().item()}..{mask.max().item()}")
        mask = mask.to(torch.uint8)
    return mask


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * torch.rand(()).item()


def _coin() -> bool:
    return torch.rand(()).item() < 0.5


def photometric_distortion(image: Tensor) -> Tensor:
    """mmseg's PhotoMetricDistortion on a float image in [0, 1], shape (3, H, W).

    Brightness (additive), contrast (multiplicative), saturation and hue, each with probability
    0.5; contrast goes before or after the colour steps with equal chance, as in mmseg.
    Saturation blends with the grayscale image (torchvision) where mmseg scales HSV's S channel.
    """
    if _coin():
        image = (image + _uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA)).clamp_(0, 1)
    contrast_first = _coin()
    if contrast_first and _coin():
        image = (image * _uniform(*CONTRAST_RANGE)).clamp_(0, 1)
    if _coin():
        image = F.adjust_saturation(image, _uniform(*SATURATION_RANGE))
    if _coin():
        image = F.adjust_hue(image, _uniform(-HUE_DELTA, HUE_DELTA))
    if not contrast_first and _coin():
        image = (image * _uniform(*CONTRAST_RANGE)).clamp_(0, 1)
    return image


def crop_box(size: tuple[int, int], crop: tuple[int, int]) -> tuple[int, int, int, int]:
    """A uniformly random (top, left, height, width) crop of an (H, W) image, clipped to the image."""
    top = torch.randint(0, max(size[0] - crop[0], 0) + 1, ()).item()
    left = torch.randint(0, max(size[1] - crop[1], 0) + 1, ()).item()
    return top, left, min(crop[0], size[0]), min(crop[1], size[1])


def dominant_share(mask: Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[int, float]:
    """(number of classes, largest class's share) over a mask's non-ignored pixels."""
    counts = torch.bincount(mask.flatten().long(), minlength=256)
    counts[ignore_index] = 0
    counts = counts[counts > 0]
    if not len(counts):
        return 0, 1.0
    return len(counts), (counts.max() / counts.sum()).item()


def random_crop_box(mask: Tensor, crop: tuple[int, int], cat_max_ratio: float | None = None,
                    ignore_index: int = IGNORE_INDEX, tries: int = 10) -> tuple[int, int, int, int]:
    """mmseg's ``RandomCrop`` box for an (H, W) mask: with ``cat_max_ratio`` < 1, redraw the box up
    to ``tries`` times until the crop holds at least two classes and none covers ``cat_max_ratio``
    or more of its non-ignored pixels (mmseg keeps the last draw when no try passes).
    """
    box = crop_box(tuple(mask.shape), crop)
    if cat_max_ratio is None or cat_max_ratio >= 1:
        return box
    for _ in range(tries):
        top, left, h, w = box
        classes, share = dominant_share(mask[top:top + h, left:left + w], ignore_index)
        if classes > 1 and share < cat_max_ratio:
            break
        box = crop_box(tuple(mask.shape), crop)
    return box


def random_resize_size(height: int, width: int, ratio: float, scale: tuple[int, int] | None = None) -> tuple[int, int]:
    """The (H, W) an image is resized to for a drawn ``ratio``.

    ``scale=None``: relative to the image's own size, ``(round(H * ratio), round(W * ratio))``.
    ``scale=(long, short)``: mmseg's ``RandomResize(scale, ratio_range, keep_ratio=True)``: the target
    scale is ``(int(long * ratio), int(short * ratio))`` and the image is rescaled, keeping its ratio,
    to fit in it (:func:`keep_ratio_size`). A 500x375 VOC image at ratio 1 in (2048, 512)
    becomes 683x512; a 512x512 image gets the same size either way (to within a pixel's rounding).
    """
    if scale is None:
        return max(1, round(height * ratio)), max(1, round(width * ratio))

    return keep_ratio_size(height, width, (int(max(scale) * ratio), int(min(scale) * ratio)))


class TrainTransform:
    """Random resize, random crop, flip, photometric distortion, normalise, pad (mmseg order).

    ``cat_max_ratio`` (mmseg's, 0.75 in the paper's recipe) redraws a crop dominated by one class;
    see :func:`random_crop_box`. ``None`` takes the first random crop.

    Returns a float32 (3, ch, cw) normalised image and an int64 (ch, cw) mask. Images smaller
    than the crop are padded at the bottom/right after normalisation, as mmseg does: the image
    with 0 (the mean colour), the mask with ``ignore_index`` so padding gives no gradient.
    The resize ratio is relative to the image's own size; with ``scale=(long, short)`` it is relative
    to that scale, as mmseg's ``RandomResize(scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True)``
    (the real-label recipes; see :func:`random_resize_size`).
    """

    def __init__(
        self,
        crop_size: int | tuple[int, int],
        scale_range: tuple[float, float] = (0.5, 2.0),
        hflip: bool = True,
        photometric: bool = True,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        ignore_index: int = IGNORE_INDEX,
        cat_max_ratio: float | None = None,
        scale: tuple[int, int] | None = None,
    ) -> None:
        if cat_max_ratio is not None and not 0 < cat_max_ratio <= 1:
            raise SettingError(f"cat_max_ratio={cat_max_ratio}: expected a share in (0, 1] (mmseg: 0.75), or null for a plain random crop")
        self.cat_max_ratio = cat_max_ratio
        self.crop_size = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
        if len(self.crop_size) != 2 or min(self.crop_size) < 1:
            raise SettingError(f"expected crop_size as an int or (height, width) >= 1; found {crop_size}")
        if not 0 < scale_range[0] <= scale_range[1]:
            raise SettingError(f"expected scale_range (low, high) with 0 < low <= high; found {scale_range}")
        self.scale_range = tuple(scale_range)
        if scale is not None and (len(scale) != 2 or min(scale) < 1):
            raise SettingError(f"data.train_transform.scale={list(scale)}: expected [long, short] sides >= 1 "
                               "(mmseg: [2048, 512]), or null to resize relative to each image's own size")
        self.scale = None if scale is None else (int(scale[0]), int(scale[1]))
        self.hflip = hflip
        self.photometric = photometric
        self.mean = list(mean)
        self.std = list(std)
        self.ignore_index = ignore_index

    def __call__(self, image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        mask = _check_pair(image, mask)
        height, width = image.shape[1:]
        size = list(random_resize_size(height, width, _uniform(*self.scale_range), self.scale))
        image = F.resize(image, size, InterpolationMode.BILINEAR, antialias=True)
        mask = F.resize(mask[None], size, InterpolationMode.NEAREST)[0]

        crop_h, crop_w = self.crop_size
        top, left, h, w = random_crop_box(mask, self.crop_size, self.cat_max_ratio, self.ignore_index)
        image, mask = image[:, top:top + h, left:left + w], mask[top:top + h, left:left + w]

        if self.hflip and _coin():
            image, mask = image.flip(-1), mask.flip(-1)
        image = image.float().div_(255)
        if self.photometric:
            image = photometric_distortion(image)
        image = F.normalize(image, self.mean, self.std)

        pad_h, pad_w = crop_h - h, crop_w - w
        mask = mask.long()
        if pad_h or pad_w:
            image = torch.nn.functional.pad(image, (0, pad_w, 0, pad_h), value=0.0)
            mask = torch.nn.functional.pad(mask, (0, pad_w, 0, pad_h), value=self.ignore_index)
        return image.contiguous(), mask.contiguous()


class EvalTransform:
    """Full-size image, normalised only: float32 (3, H, W) image and int64 (H, W) mask."""

    def __init__(self, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> None:
        self.mean = list(mean)
        self.std = list(std)

    def __call__(self, image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        mask = _check_pair(image, mask)
        return F.normalize(image.float().div_(255), self.mean, self.std), mask.long()
