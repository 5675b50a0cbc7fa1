"""Pixel-space pipelines (no VAE): the UNet sees RGB in [-1, 1] packed by ``pixel_unshuffle``.

A packing factor r turns a (3, H, W) image into a (3 r^2, H / r, W / r) "latent", so a
UNet trained on packed pixels runs its attention on a grid r times smaller than the image,
as Stable Diffusion's UNet runs on a grid 8 times smaller. The factor is recorded in the
saved pipeline itself: the UNet's ``in_channels`` is 3 r^2 (3: plain pixels, 12: r = 2).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def packing_factor(in_channels: int) -> int:
    """r for a pixel-space UNet with ``in_channels`` = 3 r^2; a clear error for anything else."""
    r = math.isqrt(max(in_channels // 3, 1))
    if 3 * r * r != in_channels:
        raise ValueError(
            f"a pipeline without a VAE must denoise RGB pixels packed by pixel_unshuffle (UNet in_channels "
            f"3*r^2: 3, 12, 27, ...); this UNet has in_channels={in_channels}: add its VAE to the pipeline"
        )
    return r


def pack(images: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, 3 r^2, H / r, W / r)."""
    if images.shape[-1] % factor or images.shape[-2] % factor:
        raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of the packing factor {factor}")
    return F.pixel_unshuffle(images, factor) if factor > 1 else images


def unpack(latents: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, 3 r^2, h, w) -> (B, 3, h r, w r): the inverse of :func:`pack`."""
    return F.pixel_shuffle(latents, factor) if factor > 1 else latents


def latents_to_images(latents: torch.Tensor, factor: int) -> torch.Tensor:
    """Denoised packed latents -> (B, H, W, 3) float32 images in [0, 1], like ``output_type="np"``."""
    images = unpack(latents.float(), factor)
    return (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu()
