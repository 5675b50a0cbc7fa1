"""Attention maps to label maps (the docs' method page, docs/method.md): pure tensor functions, no state.

Shapes use K classes of one prompt, an (h, w) cross-attention grid, an (hs, ws)
self-attention grid with N = hs * ws positions, and an output image size (H, W).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dsdiff.data.classes import IGNORE_INDEX
from dsdiff.diffusion.settings import check_thresholds


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize (align_corners=False) of (B, K, h, w) maps to (B, K, *size)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps  # bicubic at scale 1 samples pixel centres exactly: skip the work
    if maps.numel() == 0:
        return maps.new_zeros(*maps.shape[:-2], *size)
    return F.interpolate(maps, size=size, mode="bicubic", align_corners=False)


def refine(self_attn: torch.Tensor, cross: torch.Tensor, tau: int) -> torch.Tensor:
    """S^tau @ A as tau successive (B, N, N) @ (B, N, K) products: tau*N^2*K work, never N^3."""
    for _ in range(tau):
        cross = self_attn @ cross
    return cross


def minmax_normalise(maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale each (B, K, N) class map to [0, 1] over its N positions; a flat map becomes 0."""
    lo = maps.amin(dim=-1, keepdim=True)
    hi = maps.amax(dim=-1, keepdim=True)
    return (maps - lo) / (hi - lo).clamp_min(eps)


def labels_from_maps(
    maps: torch.Tensor, class_ids: torch.Tensor, alpha: float, beta: float, ignore_index: int, background: int = 0
) -> torch.Tensor:
    """(B, K, H, W) maps in [0, 1] -> (B, H, W) int64 labels: class if max >= alpha, ``background`` if < beta
    (0; ``ignore_index`` for a class list without background), else ignore."""
    batch, _, height, width = maps.shape
    if maps.shape[1] == 0:
        return torch.full((batch, height, width), background, dtype=torch.long, device=maps.device)
    best, index = maps.max(dim=1)
    labels = class_ids.to(maps.device)[index]
    labels = torch.where(best >= alpha, labels, torch.full_like(labels, ignore_index))
    return torch.where(best < beta, torch.full_like(labels, background), labels)


def _check_args(cross, self_attn, class_ids, tau, alpha, beta, self_hw):
    check_thresholds(tau, alpha, beta, where="attention_to_labels")
    if cross.ndim != self_attn.ndim + 1 or cross.ndim not in (3, 4):
        raise ValueError(
            f"cross must be (K, h, w) or (B, K, h, w) with self_attn (N, N) or (B, N, N); "
            f"got cross {tuple(cross.shape)} and self_attn {tuple(self_attn.shape)}"
        )
    n = self_attn.shape[-1]
    if self_attn.shape[-2] != n:
        raise ValueError(f"self_attn must be square (N, N), got {tuple(self_attn.shape)}")
    if cross.ndim == 4 and cross.shape[0] != self_attn.shape[0]:
        raise ValueError(
            f"batch sizes differ: cross has {cross.shape[0]}, self_attn has {self_attn.shape[0]}"
        )
    if cross.shape[-3] != len(class_ids):
        raise ValueError(
            f"cross has {cross.shape[-3]} class maps but class_ids has {len(class_ids)} entries"
        )
    if self_hw is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"self_attn has N={n} positions, not a square grid: pass self_hw=(hs, ws)")
        self_hw = (side, side)
    if self_hw[0] * self_hw[1] != n:
        raise ValueError(f"self_hw {tuple(self_hw)} has {self_hw[0] * self_hw[1]} positions, self_attn has N={n}")
    return tuple(self_hw)


def attention_to_labels(
    cross: torch.Tensor,
    self_attn: torch.Tensor,
    class_ids: Sequence[int] | torch.Tensor,
    *,
    tau: int = 4,
    alpha: float = 0.6,
    beta: float = 0.5,
    size: int | tuple[int, int],
    ignore_index: int = IGNORE_INDEX,
    self_hw: tuple[int, int] | None = None,
    background: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn averaged attention into a label map with an uncertainty band.

    Args:
        cross: (K, h, w) or (B, K, h, w) cross-attention, one map per class in ``class_ids`` order.
        self_attn: (N, N) or (B, N, N) row-stochastic self-attention, N = hs * ws.
        class_ids: K dataset class indices (background 0, where the list has one, is never one of them).
        tau: number of self-attention products; 0 means no refinement.
        alpha, beta: label = class where max >= alpha, ``background`` where max < beta, ``ignore_index`` between.
        size: output (H, W) (an int means square).
        self_hw: (hs, ws) of the self-attention grid; default square sqrt(N).
        background: the label below beta: 0, or ``ignore_index`` for a class list without background
            (``dsdiff.data.classes.unattended_label``).

    Returns:
        labels (…, H, W) int64 and maps (…, K, H, W) float32 in [0, 1] (refined, normalised, upsampled).

    Steps: bicubic A to (hs, ws); S^tau @ A by iterated products; min-max per class map;
    bicubic to ``size``; threshold.
    """
    class_ids = torch.as_tensor(class_ids, dtype=torch.long)
    self_hw = _check_args(cross, self_attn, class_ids, tau, alpha, beta, self_hw)
    size = (size, size) if isinstance(size, int) else tuple(size)
    batched = cross.ndim == 4
    if not batched:
        cross, self_attn = cross[None], self_attn[None]
    batch, k = cross.shape[:2]
    cross = upsample(cross.float(), self_hw).flatten(2)  # (B, K, N)
    refined = refine(self_attn.float(), cross.transpose(1, 2), tau).transpose(1, 2)  # (B, K, N)
    maps = minmax_normalise(refined).view(batch, k, *self_hw)
    maps = upsample(maps, size).clamp_(0.0, 1.0)  # bicubic overshoots; thresholds are unaffected
    labels = labels_from_maps(maps, class_ids, alpha, beta, ignore_index, background)
    return (labels, maps) if batched else (labels[0], maps[0])
