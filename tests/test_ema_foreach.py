"""The EMA callback's foreach update equals the per-tensor formula, integer buffers included."""
import torch
from torch.optim.swa_utils import AveragedModel

from dsdiff.models.ema import EMAWeights, ema_avg_fn, ema_multi_avg_fn


def test_foreach_update_equals_the_per_tensor_formula():
    g = torch.Generator().manual_seed(0)
    averaged = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    current = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    for n in (0, 3, 10_000):
        for warmup in (True, False):
            expected = [ema_avg_fn(0.999, warmup)(a, c, torch.tensor(n)) for a, c in zip(averaged, current)]
            got = [a.clone() for a in averaged]
            ema_multi_avg_fn(0.999, warmup)(got, current, torch.tensor(n))
            for e, o in zip(expected, got):
                torch.testing.assert_close(o, e)


def test_averaged_batchnorm_model_follows_the_weights_and_counts():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    ema = AveragedModel(net, multi_avg_fn=ema_multi_avg_fn(0.5, warmup=False), use_buffers=True)
    ema.update_parameters(net)  # the first update copies
    net(torch.randn(2, 3, 8, 8))  # moves BN's running stats and its integer step count
    with torch.no_grad():
        net[0].weight.add_(1.0)
    before, mean_before = ema.module[0].weight.clone(), ema.module[1].running_mean.clone()
    ema.update_parameters(net)
    torch.testing.assert_close(ema.module[0].weight, before + 0.5 * (net[0].weight - before))
    torch.testing.assert_close(ema.module[1].running_mean, mean_before + 0.5 * (net[1].running_mean - mean_before))
    assert ema.module[1].num_batches_tracked.item() == net[1].num_batches_tracked.item() == 1


def test_the_callback_uses_the_foreach_update():
    from lightning.pytorch.callbacks import WeightAveraging

    ema = EMAWeights(decay=0.9)
    assert isinstance(ema, WeightAveraging)
    assert any(getattr(v, "__name__", "") == "multi_avg_fn" for v in vars(ema).get("_kwargs", {}).values())
