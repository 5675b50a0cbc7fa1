"""EMA of the weights through Lightning's WeightAveraging, with a warm-up for short runs."""
from __future__ import annotations

from collections.abc import Callable

import torch
from lightning.pytorch.callbacks import WeightAveraging

from dsdiff.utils.errors import SettingError


def ema_avg_fn(decay: float, warmup: bool = True) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """avg_fn for torch's AveragedModel: averaged <- d * averaged + (1 - d) * current.

    With ``warmup``, d = min(decay, (1 + n) / (10 + n)) after n updates (as timm's ModelEma), so
    a run of a few hundred steps is not stuck near its initial weights with decay 0.999.
    """
    if not 0.0 <= decay < 1.0:
        raise SettingError(f"EMA decay must be in [0, 1), got {decay}")

    def avg_fn(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        d = torch.clamp((1 + num_averaged) / (10 + num_averaged), max=decay) if warmup else decay
        return averaged + (current - averaged) * (1 - d)

    return avg_fn


def ema_multi_avg_fn(decay: float, warmup: bool = True) -> Callable[[list, list, torch.Tensor], None]:
    """``ema_avg_fn`` for whole lists of tensors in a few foreach kernels (one per device and dtype)
    instead of a few kernels per tensor; integer buffers (BN's step counts) take the current value."""
    if not 0.0 <= decay < 1.0:
        raise SettingError(f"EMA decay must be in [0, 1), got {decay}")

    def multi_avg_fn(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        if not averaged[0].is_floating_point():
            torch._foreach_copy_(averaged, current)
            return
        d = torch.clamp((1 + num_averaged) / (10 + num_averaged), max=decay) if warmup else torch.tensor(decay)
        weight = (1 - d).to(device=averaged[0].device, dtype=averaged[0].dtype)
        try:
            torch._foreach_lerp_(averaged, current, weight)
        except (RuntimeError, TypeError):  # torch without the tensor-weight overload
            torch._foreach_lerp_(averaged, current, float(weight))

    return multi_avg_fn


class EMAWeights(WeightAveraging):
    """Keeps an EMA of the weights, updated every optimizer step; validation and checkpoints use it."""

    def __init__(self, decay: float = 0.999, warmup: bool = True, use_buffers: bool = True):
        super().__init__(use_buffers=use_buffers, multi_avg_fn=ema_multi_avg_fn(decay, warmup))
        self.decay = decay
