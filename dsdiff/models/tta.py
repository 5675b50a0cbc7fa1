"""Inference scales: mmseg's keep-ratio rescale, and test-time augmentation (multi-scale + flip)."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from dsdiff.utils.errors import SettingError
from dsdiff.data.transforms import keep_ratio_size  # noqa: F401  (mmseg's keep-ratio resize; re-exported)

PAPER_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def tta_logits(
    predict: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    scales: Sequence[float] = PAPER_SCALES,
    flip: bool = True,
    base_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Average the logits of ``predict`` over rescaled and flipped copies of ``images``.

    images: (B, 3, H, W). ``predict`` maps (B, 3, h, w) to logits (B, C, h, w) for any h, w.
    View ``s`` is ``images`` resized (bilinear) to ``s * base_size`` (default (H, W); the
    evaluation scale, see :func:`keep_ratio_size`). Each view's logits are resized back to
    (H, W) (bilinear) and un-flipped before the mean. Returns (B, C, H, W).
    """
    if not scales:
        raise SettingError("tta_logits needs at least one scale")
    h, w = images.shape[-2:]
    bh, bw = base_size or (h, w)
    total = None
    count = 0
    for scale in scales:
        size = (max(1, int(bh * scale + 0.5)), max(1, int(bw * scale + 0.5)))
        view = images if size == (h, w) else F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        views = [(view, False), (view.flip(-1), True)] if flip else [(view, False)]
        for x, flipped in views:
            logits = predict(x)
            if flipped:
                logits = logits.flip(-1)
            if logits.shape[-2:] != (h, w):
                logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
            total = logits if total is None else total + logits
            count += 1
    return total / count
