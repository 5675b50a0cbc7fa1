"""TTA merge: equivariant models are unchanged by it; a known asymmetric case averages as expected."""
import pytest
import torch
from torch import nn

from dsdiff.models.tta import tta_logits


class Pointwise(nn.Module):
    """A 1x1 conv: flip-equivariant, and scale-equivariant on constant images."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x)


def test_equivariant_model_unchanged_by_tta():
    model = Pointwise()
    image = torch.ones(2, 3, 20, 28) * torch.tensor([0.3, -1.0, 2.0]).view(1, 3, 1, 1)
    plain = model(image)
    merged = tta_logits(model, image, scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75), flip=True)
    assert merged.shape == plain.shape
    torch.testing.assert_close(merged, plain, atol=1e-5, rtol=1e-5)


def _ramp(x):
    """Class 1's logit rises left to right; class 0 is flat zero. Not flip-equivariant."""
    w = x.shape[-1]
    ramp = torch.linspace(-1, 1, w).expand(x.shape[0], 1, x.shape[-2], w)
    return torch.cat([torch.zeros_like(ramp), ramp], dim=1)


def test_flip_tta_cancels_a_left_right_ramp():
    image = torch.zeros(1, 3, 8, 16)
    plain = _ramp(image)
    assert (plain.argmax(1)[0, :, -1] == 1).all()  # right side is class 1 without TTA
    merged = tta_logits(_ramp, image, scales=(1.0,), flip=True)
    # the ramp and its mirror average to exactly zero
    torch.testing.assert_close(merged[:, 1], torch.zeros(1, 8, 16))
    no_flip = tta_logits(_ramp, image, scales=(1.0,), flip=False)
    torch.testing.assert_close(no_flip, plain)


def test_multiscale_views_are_resized_back_and_averaged():
    calls = []

    def predict(x):
        calls.append(tuple(x.shape[-2:]))
        return torch.full((x.shape[0], 2, *x.shape[-2:]), float(x.shape[-1]))

    out = tta_logits(predict, torch.zeros(1, 3, 10, 20), scales=(0.5, 1.0, 2.0), flip=False)
    assert calls == [(5, 10), (10, 20), (20, 40)]
    assert out.shape == (1, 2, 10, 20)
    torch.testing.assert_close(out, torch.full_like(out, (10 + 20 + 40) / 3))


def test_needs_a_scale():
    with pytest.raises(ValueError, match="at least one scale"):
        tta_logits(_ramp, torch.zeros(1, 3, 4, 4), scales=())
