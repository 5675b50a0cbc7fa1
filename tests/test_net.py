"""The segmentation network: shapes, stride, aux head, clear errors."""
import pytest
import torch

from dsdiff.models.inference import predict_logits
from dsdiff.models.net import SegmentationNet


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return SegmentationNet(num_classes=5, encoder_name="resnet18", encoder_weights=None, decoder_channels=16, aux_channels=8).eval()


def test_logits_at_input_resolution_and_aux_only_in_training(net):
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        out, aux = net.forward_train(x)
    assert out.shape == (2, 5, 64, 48) and aux is None
    net.train()
    out, aux = net.forward_train(x)
    net.eval()
    assert aux.shape == (2, 5, 64, 48)


def test_output_stride_is_8(net):
    assert net.model.encoder.output_stride == 8


def test_unpadded_size_gives_a_clear_error(net):
    with pytest.raises(ValueError, match="not a multiple of the output stride 8"):
        net(torch.randn(1, 3, 60, 64))


def test_predict_logits_pads_and_crops_any_size(net):
    x = torch.randn(1, 3, 61, 45)
    with torch.no_grad():
        out = predict_logits(net, x)
        slid = predict_logits(net, x, crop_size=32)
    assert out.shape == (1, 5, 61, 45) and slid.shape == (1, 5, 61, 45)
    assert torch.isfinite(slid).all()


def test_sliding_window_with_one_window_equals_whole_image(net):
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(predict_logits(net, x, crop_size=32), predict_logits(net, x))


def test_backbone_and_head_parameters_partition_the_net(net):
    backbone, head = net.backbone_parameters(), net.head_parameters()
    assert len(backbone) + len(head) == len(list(net.parameters()))
    assert {id(p) for p in backbone}.isdisjoint({id(p) for p in head})


def test_missing_pretrained_weights_name_the_fix(monkeypatch):
    import segmentation_models_pytorch as smp

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(smp, "create_model", offline)
    with pytest.raises(RuntimeError, match="encoder_weights=null"):
        SegmentationNet(num_classes=3, encoder_name="resnet50", encoder_weights="imagenet")
