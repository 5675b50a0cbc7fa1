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


def test_mmseg_head_is_the_originals_aspp_head():
    """head=mmseg: ASPPHead (pool + 1x1 + 3 dilated 3x3, 3x3 bottleneck) 512 wide, Dropout2d 0.1, a 1x1
    conv_seg, logits resized bilinearly with align_corners=False (smp: x8 Upsample with align_corners=True)."""
    from dsdiff.models.net import ASPPHead

    torch.manual_seed(0)
    net = SegmentationNet(num_classes=21, encoder_name="resnet18", encoder_weights=None, decoder_channels=512,
                          head="mmseg", decoder_dropout=0.1, aux_channels=8).eval()
    decoder, seg = net.model.decoder, net.model.segmentation_head
    assert isinstance(decoder, ASPPHead) and len(decoder.branches) == 5
    dilations = sorted(m.dilation[0] for m in decoder.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
    assert dilations == [1, 12, 24, 36]  # the bottleneck's 3x3 and the three atrous branches
    assert decoder.bottleneck[0].in_channels == 5 * 512 and decoder.bottleneck[0].out_channels == 512
    assert isinstance(seg[0], torch.nn.Dropout2d) and seg[0].p == 0.1
    assert seg[1].kernel_size == (1, 1) and seg[1].in_channels == 512 and seg[1].out_channels == 21
    assert 0.005 < seg[1].weight.std().item() < 0.015 and not seg[1].bias.any()  # mmseg's normal_init(std=0.01)
    assert not any(isinstance(m, torch.nn.Upsample) for m in net.modules())
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        low = seg(decoder(net.model.encoder(x)))
        torch.testing.assert_close(net(x), torch.nn.functional.interpolate(low, size=(64, 48), mode="bilinear", align_corners=False))
    assert low.shape[-2:] == (8, 6)


def test_smp_head_keeps_its_dropout_unless_set():
    net = SegmentationNet(num_classes=3, encoder_name="resnet18", encoder_weights=None, decoder_channels=16, aux_head=False)
    assert net.model.decoder.aspp.project[-1].p == 0.5
    net = SegmentationNet(num_classes=3, encoder_name="resnet18", encoder_weights=None, decoder_channels=16, aux_head=False,
                          decoder_dropout=0.1)
    assert net.model.decoder.aspp.project[-1].p == 0.1
    with pytest.raises(ValueError, match="model.net.head=mmseg"):
        SegmentationNet(num_classes=3, arch="deeplabv3plus", encoder_name="resnet18", encoder_weights=None, head="mmseg")
    with pytest.raises(ValueError, match="model.net.head="):
        SegmentationNet(num_classes=3, encoder_name="resnet18", encoder_weights=None, head="mmcv")


def test_voc_recipe_uses_the_mmseg_head_and_the_deep_stem_option_has_weights():
    """voc_deeplab/coco_deeplab: head=mmseg, 512 channels, dropout 0.1; model=deeplabv3_r101c names timm's
    resnet101c, whose ImageNet weights timm lists; the shapes recipe keeps smp's head."""
    import timm
    from hydra import compose, initialize_config_dir

    from dsdiff.chain.config import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        for experiment in ("voc_deeplab", "coco_deeplab", "voc_real", "coco_real"):
            net = compose("train", overrides=[f"+experiment={experiment}"]).model.net
            assert (net.head, net.decoder_channels, net.decoder_dropout) == ("mmseg", 512, 0.1), experiment
        assert compose("train", overrides=["+experiment=shapes_deeplab"]).model.net.head == "smp"
        deep = compose("train", overrides=["+experiment=voc_deeplab", "model=deeplabv3_r101c"]).model.net
    assert deep.head == "mmseg" and deep.encoder_name == "tu-resnet101c.gluon_in1k"
    assert timm.models.get_pretrained_cfg(deep.encoder_name[3:]) is not None
    net = SegmentationNet(num_classes=3, encoder_name="tu-resnet50c", encoder_weights=None, decoder_channels=16, head="mmseg",
                          aux_channels=8)
    stem = [m for m in net.model.encoder.model.conv1 if isinstance(m, torch.nn.Conv2d)]
    assert [m.kernel_size for m in stem] == [(3, 3)] * 3 and net.model.encoder.output_stride == 8
