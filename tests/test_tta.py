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


# ---------------------------------------------------------------- evaluation scale (mmseg's keep-ratio resize)


class Recording(nn.Module):
    """A 1x1 conv that records the input sizes it sees (output stride 8, like the real nets)."""

    output_stride = 8
    num_classes = 3

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 3, 1)
        self.seen = []

    def forward(self, x):
        self.seen.append(tuple(x.shape[-2:]))
        return self.conv(x)


def _segmenter(eval_scale, tta_scales=(1.0,)):
    from functools import partial

    from dsdiff.models.system import Segmenter

    return Segmenter(Recording(), ["a", "b", "c"], optimizer=partial(torch.optim.AdamW, lr=1e-3),
                     eval_scale=eval_scale, tta_scales=tta_scales)


def test_keep_ratio_size_is_mmsegs_rescale():
    from dsdiff.models.tta import keep_ratio_size

    assert keep_ratio_size(375, 500, (2048, 512)) == (512, 683)  # METHOD.md: a VOC image becomes 683x512
    assert keep_ratio_size(40, 50, (2048, 512)) == (512, 640)  # short side bound: factor 512/40
    assert keep_ratio_size(100, 3000, (2048, 512)) == (68, 2048)  # long side bound: factor 2048/3000
    assert keep_ratio_size(40, 50, None) == (40, 50)


def test_a_50x40_image_is_predicted_at_the_eval_scale_and_scored_at_50x40():
    from dsdiff.data.transforms import EvalTransform

    image = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    mask = torch.randint(0, 3, (40, 50), dtype=torch.uint8)
    x, y = EvalTransform()(image, mask)
    model = _segmenter([2048, 512], tta_scales=(0.5, 1.0)).eval()
    with torch.no_grad():
        logits = model(x[None])
        # factor min(2048/50, 512/40) = 12.8: 40x50 -> 512x640 (multiples of 8: no padding)
        assert model.net.seen == [(512, 640)] and logits.shape == (1, 3, 40, 50)
        model.net.seen.clear()
        assert model.forward_tta(x[None]).shape == (1, 3, 40, 50)
        assert model.net.seen == [(256, 320), (256, 320), (512, 640), (512, 640)]  # TTA ratios of the eval scale
        model.test_step({"image": x[None], "mask": y[None]}, 0)  # the metric takes the 40x50 label as is
    per_class = model.test_iou.compute()
    reference = torch.nn.functional.interpolate(
        model.net.conv(torch.nn.functional.interpolate(x[None], size=(512, 640), mode="bilinear", align_corners=False)),
        size=(40, 50), mode="bilinear", align_corners=False).argmax(1)
    from dsdiff.models.metrics import iou_metric

    expected = iou_metric(3)(reference, y[None].long())
    torch.testing.assert_close(per_class, expected, equal_nan=True)
    native = _segmenter(None).eval()
    with torch.no_grad():
        native(x[None])
    assert native.net.seen == [(40, 56)]  # null: the native size (padded to the stride)
    with pytest.raises(ValueError, match=r"model.eval_scale=\[512\]"):
        _segmenter([512])
