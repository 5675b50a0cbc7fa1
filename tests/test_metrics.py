"""Known-answer mIoU and the uncertainty-aware loss."""
import math

import torch

from dsdiff.models.metrics import iou_metric, mean_iou
from dsdiff.models.system import uncertainty_aware_ce


def test_miou_known_answer_ignores_255_and_absent_classes():
    # 4 classes; class 3 appears nowhere (excluded from the mean, not counted as 0)
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 3, 0]])
    # pixels under 255 are ignored entirely, so the 3 predicted there does not count.
    # class 0: tp=1 (0,0); fp=1 (1,1)->0; fn=1 (0,1)->1 => 1/3
    # class 1: tp=2; fp=1 (0,1); fn=0 => 2/3
    # class 2: tp=1; fn=1 => 1/2
    metric = iou_metric(4)
    metric.update(pred, target)
    per_class = metric.compute()
    expected = torch.tensor([1 / 3, 2 / 3, 1 / 2])
    torch.testing.assert_close(per_class[:3], expected)
    assert math.isnan(per_class[3].item())
    assert abs(mean_iou(per_class).item() - expected.mean().item()) < 1e-6


def test_miou_accumulates_over_batches_like_one_batch():
    torch.manual_seed(0)
    pred = torch.randint(0, 3, (4, 8, 8))
    target = torch.randint(0, 3, (4, 8, 8))
    target[:, 0] = 255
    a, b = iou_metric(3), iou_metric(3)
    a.update(pred, target)
    for i in range(4):
        b.update(pred[i : i + 1], target[i : i + 1])
    torch.testing.assert_close(a.compute(), b.compute())


def test_uncertain_pixels_give_no_gradient_and_no_nan():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    target = torch.tensor([[[1, 255], [255, 2]]])
    uncertainty_aware_ce(logits, target).backward()
    grad = logits.grad.abs().sum(1)[0]
    assert grad[0, 1] == 0 and grad[1, 0] == 0
    assert grad[0, 0] > 0 and grad[1, 1] > 0

    all_ignored = torch.full((1, 2, 2), 255)
    loss = uncertainty_aware_ce(logits, all_ignored)
    assert loss.item() == 0.0 and loss.requires_grad


def test_ema_warmup_tracks_short_runs_and_reaches_the_decay():
    from dsdiff.models.ema import ema_avg_fn

    fn = ema_avg_fn(0.999)
    avg, target = torch.zeros(1), torch.ones(1)
    for n in range(200):
        avg = fn(avg, target, torch.tensor(n))
    assert avg.item() > 0.99  # without warm-up: 1 - 0.999**200 = 0.18
    late = fn(torch.zeros(1), torch.ones(1), torch.tensor(10**6))
    assert abs(late.item() - 0.001) < 1e-6  # the configured decay once warm
    plain = ema_avg_fn(0.999, warmup=False)(torch.zeros(1), torch.ones(1), torch.tensor(0))
    assert abs(plain.item() - 0.001) < 1e-6
