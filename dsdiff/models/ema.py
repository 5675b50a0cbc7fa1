"""EMA of the weights through Lightning's WeightAveraging, with a warm-up for short runs."""
from __future__ import annotations

from collections.abc import Callable

import torch
from lightning.pytorch.callbacks import WeightAveraging


def ema_avg_fn(decay: float, warmup: bool = True) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """avg_fn for torch's AveragedModel: averaged <- d * averaged + (1 - d) * current.

    With ``warmup``, d = min(decay, (1 + n) / (10 + n)) after n updates (as timm's ModelEma), so
    a run of a few hundred steps is not stuck near its initial weights with decay 0.999.
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"EMA decay must be in [0, 1), got {decay}")

    def avg_fn(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        d = torch.clamp((1 + num_averaged) / (10 + num_averaged), max=decay) if warmup else decay
        return averaged + (current - averaged) * (1 - d)

    return avg_fn


class EMAWeights(WeightAveraging):
    """Keeps an EMA of the weights, updated every optimizer step; validation and checkpoints use it."""

    def __init__(self, decay: float = 0.999, warmup: bool = True, use_buffers: bool = True):
        super().__init__(use_buffers=use_buffers, avg_fn=ema_avg_fn(decay, warmup))
        self.decay = decay
