"""The segmentation network (a plain nn.Module): smp encoder-decoder plus an auxiliary FCN head."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsdiff.utils.config import check_number
from dsdiff.utils.errors import ModelLoadError, SettingError

ARCHS = ("deeplabv3", "deeplabv3plus")
HEADS = ("smp", "mmseg")  # smp's own decode head, or mmseg's ASPPHead (the original's, DeepLabV3 only)


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """mmcv's ``ConvModule`` with BN and ReLU: a bias-free conv (same padding), BatchNorm, ReLU."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class ASPPHead(nn.Module):
    """mmseg's ``ASPPHead`` up to its classifier: image pooling (resized back bilinearly, align_corners=False),
    a 1x1 branch and 3x3 branches at ``dilations[1:]``, concatenated, then one 3x3 conv-BN-ReLU bottleneck.

    smp's DeepLabV3 decoder differs: an extra 1x1 projection with dropout after the concatenation.
    Takes the encoder's feature list (it reads the last); the branches are smp's modules.
    """

    def __init__(self, in_channels: int, channels: int, dilations: tuple[int, ...] = (1, 12, 24, 36)):
        super().__init__()
        from segmentation_models_pytorch.decoders.deeplabv3.decoder import (
            ASPPConv,
            ASPPPooling,
        )

        branches = [ASPPPooling(in_channels, channels)]
        branches += [conv_bn_relu(in_channels, channels, 1) if d == 1 else ASPPConv(in_channels, channels, d) for d in dilations]
        self.branches = nn.ModuleList(branches)
        self.bottleneck = conv_bn_relu(len(branches) * channels, channels, 3)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = features[-1]
        return self.bottleneck(torch.cat([branch(x) for branch in self.branches], dim=1))


def mmseg_init(head: nn.Module, classifier: nn.Conv2d) -> None:
    """mmseg's initialisation of a decode head: convs Kaiming-normal (fan_out, ReLU), BatchNorm 1/0,
    the classifier ``conv_seg`` normal with std 0.01 and a zero bias."""
    for m in head.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    nn.init.normal_(classifier.weight, std=0.01)
    nn.init.zeros_(classifier.bias)


class FCNHead(nn.Module):
    """The auxiliary head of DeepLab/PSPNet training: conv3x3-BN-ReLU-dropout-conv1x1."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Dropout2d(dropout),
            nn.Conv2d(channels, num_classes, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def plain_init_args(arguments: dict) -> dict:
    """A net's ``__init__`` arguments (its ``locals()`` on entry) as plain Python values: OmegaConf
    containers become lists and dicts, so a checkpoint holding them loads with ``weights_only=True``."""
    def plain(value):
        if hasattr(value, "_content"):  # an OmegaConf DictConfig / ListConfig
            from omegaconf import OmegaConf

            value = OmegaConf.to_container(value, resolve=True)
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return {k: plain(v) for k, v in arguments.items() if k not in ("self", "__class__")}


class SegmentationNet(nn.Module):
    """DeepLabV3 / DeepLabV3+ from segmentation-models-pytorch with an optional auxiliary head.

    ``forward(x)`` maps (B, 3, H, W) to logits (B, C, H, W); H and W must be multiples of
    ``output_stride`` (``dsdiff.models.inference`` pads for you). ``forward_train`` also
    returns the auxiliary logits (from the encoder's second-to-last stage), or None.

    ``head="smp"`` keeps smp's decode head (``decoder_dropout``: its ASPP dropout, null for smp's 0.5);
    ``head="mmseg"`` (DeepLabV3 only) replaces it with mmseg's :class:`ASPPHead`, ``decoder_channels``
    wide, then Dropout2d(``decoder_dropout``, null: 0.1) and a 1x1 classifier, the logits resized to the
    input bilinearly with align_corners=False, initialised as mmseg does: the original's decode head.
    """

    def __init__(
        self,
        num_classes: int,
        arch: str = "deeplabv3",
        encoder_name: str = "resnet101",
        encoder_weights: str | bool | None = "imagenet",
        output_stride: int = 8,
        decoder_channels: int = 256,
        aux_head: bool = True,
        aux_channels: int = 256,
        head: str = "smp",
        decoder_dropout: float | None = None,
    ):
        super().__init__()
        self.init_args = plain_init_args(locals())  # what a checkpoint records to rebuild this net
        import segmentation_models_pytorch as smp

        if arch not in ARCHS:
            raise SettingError(f"unknown arch {arch!r}: expected one of {ARCHS}")
        if output_stride not in (8, 16):
            raise SettingError(f"output_stride must be 8 or 16, got {output_stride}")
        if head not in HEADS:
            raise SettingError(f"model.net.head={head!r}: expected one of {HEADS}")
        if head == "mmseg" and arch != "deeplabv3":
            raise SettingError(f"model.net.head=mmseg is mmseg's DeepLabV3 ASPPHead; arch={arch!r} takes head=smp")
        for name, value in (("decoder_channels", decoder_channels), ("aux_channels", aux_channels)):
            check_number(f"model.net.{name}", value, 1, whole=True, hint=" (channels; the recipe: 512 for head=mmseg)")
        if decoder_dropout is not None and not 0 <= decoder_dropout < 1:
            raise SettingError(f"model.net.decoder_dropout={decoder_dropout}: a probability in [0, 1), or null for the head's default")
        self.num_classes = num_classes
        self.output_stride = output_stride
        extra = {"decoder_aspp_dropout": decoder_dropout} if head == "smp" and decoder_dropout is not None else {}
        try:
            self.model = smp.create_model(
                arch,
                encoder_name=encoder_name,
                encoder_weights=encoder_weights,
                classes=num_classes,
                encoder_output_stride=output_stride,
                decoder_channels=decoder_channels,
                **extra,
            )
        except Exception as err:  # smp raises many kinds (KeyError, OSError, HTTP errors)
            if encoder_weights is None:
                raise
            raise ModelLoadError(
                f"could not build {arch} with encoder {encoder_name!r} and encoder_weights="
                f"{encoder_weights!r} ({type(err).__name__}: {err}). Pretrained weights are downloaded "
                "from the Hugging Face hub on first use and cached: check the network or the cache, or "
                "pass model.net.encoder_weights=null to train from scratch."
            ) from err
        if head == "mmseg":  # the decoder and its classifier become mmseg's; the encoder stays smp's
            self.model.decoder = ASPPHead(self.model.encoder.out_channels[-1], decoder_channels)
            classifier = nn.Conv2d(decoder_channels, num_classes, 1)
            self.model.segmentation_head = nn.Sequential(nn.Dropout2d(0.1 if decoder_dropout is None else decoder_dropout), classifier)
            mmseg_init(self.model.decoder, classifier)
        self.aux = None
        if aux_head:
            in_ch = self.model.encoder.out_channels[-2]
            self.aux = FCNHead(in_ch, aux_channels, num_classes)
            if head == "mmseg":  # mmseg's FCNHead, initialised as mmseg does
                mmseg_init(self.aux, self.aux.block[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_train(x)[0]

    def forward_train(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 3, H, W) -> (main logits (B, C, H, W), aux logits (B, C, H, W) or None)."""
        h, w = x.shape[-2:]
        if h % self.output_stride or w % self.output_stride:
            raise SettingError(
                f"input size {h}x{w} is not a multiple of the output stride {self.output_stride}: "
                "pad the image (dsdiff.models.inference.predict_logits does) or change the crop size"
            )
        features = self.model.encoder(x)
        out = self.model.segmentation_head(self.model.decoder(features))
        if out.shape[-2:] != (h, w):
            out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
        aux = None
        if self.aux is not None and self.training:
            aux = F.interpolate(self.aux(features[-2]), size=(h, w), mode="bilinear", align_corners=False)
        return out, aux

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.model.encoder.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        backbone = {id(p) for p in self.backbone_parameters()}
        return [p for p in self.parameters() if id(p) not in backbone]
