"""The segmentation network (a plain nn.Module): smp encoder-decoder plus an auxiliary FCN head."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsdiff.utils.errors import ModelLoadError, SettingError

ARCHS = ("deeplabv3", "deeplabv3plus")


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


class SegmentationNet(nn.Module):
    """DeepLabV3 / DeepLabV3+ from segmentation-models-pytorch with an optional auxiliary head.

    ``forward(x)`` maps (B, 3, H, W) to logits (B, C, H, W); H and W must be multiples of
    ``output_stride`` (``dsdiff.models.inference`` pads for you). ``forward_train`` also
    returns the auxiliary logits (from the encoder's second-to-last stage), or None.
    """

    def __init__(
        self,
        num_classes: int,
        arch: str = "deeplabv3",
        encoder_name: str = "resnet101",
        encoder_weights: str | None = "imagenet",
        output_stride: int = 8,
        decoder_channels: int = 256,
        aux_head: bool = True,
        aux_channels: int = 256,
    ):
        super().__init__()
        import segmentation_models_pytorch as smp

        if arch not in ARCHS:
            raise SettingError(f"unknown arch {arch!r}: expected one of {ARCHS}")
        if output_stride not in (8, 16):
            raise SettingError(f"output_stride must be 8 or 16, got {output_stride}")
        self.num_classes = num_classes
        self.output_stride = output_stride
        try:
            self.model = smp.create_model(
                arch,
                encoder_name=encoder_name,
                encoder_weights=encoder_weights,
                classes=num_classes,
                encoder_output_stride=output_stride,
                decoder_channels=decoder_channels,
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
        self.aux = None
        if aux_head:
            in_ch = self.model.encoder.out_channels[-2]
            self.aux = FCNHead(in_ch, aux_channels, num_classes)

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
