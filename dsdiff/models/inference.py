"""Whole-image and sliding-window inference with padding to the network's stride."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsdiff.utils.errors import SettingError


def pad_to_multiple(images: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad (B, C, H, W) at the bottom/right so H and W are multiples of ``multiple``."""
    h, w = images.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    return F.pad(images, (0, pw, 0, ph)) if ph or pw else images


def predict_logits(
    net: nn.Module, images: torch.Tensor, crop_size: int | None = None, overlap: float = 1 / 3
) -> torch.Tensor:
    """Logits (B, C, H, W) for normalised images (B, 3, H, W) of any size.

    Whole image by default (padded to ``net.output_stride``, then cropped back). With
    ``crop_size``, a sliding window of that size whose overlapping logits are averaged.
    """
    stride = getattr(net, "output_stride", 8)
    h, w = images.shape[-2:]
    if crop_size is None or (h <= crop_size and w <= crop_size):
        return net(pad_to_multiple(images, stride))[..., :h, :w]
    if crop_size % stride:
        raise SettingError(f"sliding-window crop_size {crop_size} must be a multiple of the output stride {stride}")
    step = max(stride, int(crop_size * (1 - overlap)))
    padded = pad_to_multiple(images, stride)
    ph, pw = padded.shape[-2:]
    out = counts = None
    ys = sorted({*range(0, max(ph - crop_size, 0) + 1, step), max(ph - crop_size, 0)})
    xs = sorted({*range(0, max(pw - crop_size, 0) + 1, step), max(pw - crop_size, 0)})
    for y in ys:
        for x in xs:
            tile = padded[..., y : y + crop_size, x : x + crop_size]
            logits = net(pad_to_multiple(tile, stride))[..., : tile.shape[-2], : tile.shape[-1]]
            if out is None:
                out = logits.new_zeros(logits.shape[0], logits.shape[1], ph, pw)
                counts = logits.new_zeros(1, 1, ph, pw)
            out[..., y : y + tile.shape[-2], x : x + tile.shape[-1]] += logits
            counts[..., y : y + tile.shape[-2], x : x + tile.shape[-1]] += 1
    return (out / counts)[..., :h, :w]
