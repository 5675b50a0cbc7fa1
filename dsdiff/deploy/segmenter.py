"""Inference from a checkpoint file alone: no run folder, no Hydra config, no download.

A checkpoint written by training holds a ``dsdiff`` entry (see ``dsdiff.models.system.Segmenter.describe``):
the net's class and arguments, the class names, palette, normalisation and inference settings.
:class:`Segmenter` rebuilds the net from it and predicts with the very path evaluation uses
(keep-ratio ``eval_scale``, sliding window, multi-scale + flip TTA).
"""
from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dsdiff.models import system
from dsdiff.utils.errors import ModelLoadError, SettingError

ALLOWED_PREFIX = "dsdiff.models."


def _net_class(dotted: str) -> type:
    """The recorded net class; only classes under ``dsdiff.models.`` are ever imported."""
    module, _, name = str(dotted).rpartition(".")
    if not str(dotted).startswith(ALLOWED_PREFIX) or not module or not name.isidentifier():
        raise SettingError(f"the checkpoint names the net class {dotted!r}; only classes under {ALLOWED_PREFIX} "
                           "are loaded (a checkpoint written by dsdiff training names one)")
    cls = getattr(importlib.import_module(module), name, None)
    if not isinstance(cls, type) or not issubclass(cls, torch.nn.Module):
        raise SettingError(f"the checkpoint names the net class {dotted!r}, which is not a network class of dsdiff")
    return cls


class Segmenter:
    """A trained segmentation model for inference: ``Segmenter.from_checkpoint(path).predict(image)``."""

    def __init__(self, net: torch.nn.Module, info: dict, device: str | torch.device | None = None):
        self.info = info
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.module = system.Segmenter(
            net, info["class_names"], optimizer=None, ignore_index=info["ignore_index"],
            tta_scales=info["tta_scales"], tta_flip=info["tta_flip"], slide_crop=info["slide_crop"],
            eval_scale=info["eval_scale"],
        ).to(self.device).eval()
        self.mean = torch.tensor(info["mean"], dtype=torch.float32, device=self.device).view(3, 1, 1)
        self.std = torch.tensor(info["std"], dtype=torch.float32, device=self.device).view(3, 1, 1)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device | None = None) -> "Segmenter":
        path = Path(path).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"no checkpoint file {path}")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated, not a torch file, or holding non-plain objects
            raise ModelLoadError(f"cannot read the checkpoint {path}: {type(err).__name__}: {err}") from err
        info = checkpoint.get("dsdiff") if isinstance(checkpoint, dict) else None
        if info is None:
            raise SettingError(
                f"the checkpoint {path} was made by an older dsdiff: it does not record its network, classes "
                "and inference settings, so it cannot be loaded from the file alone. Evaluate it with its run "
                f"folder (python -m dsdiff.evaluate ckpt_path={path}, the checkpoint still inside the run's "
                "checkpoints/ folder), or retrain (or resume) it with this dsdiff to get a self-describing checkpoint"
            )
        if info.get("format") != 1:
            raise SettingError(f"the checkpoint {path} has dsdiff format {info.get('format')!r}; this dsdiff reads "
                               "format 1: use the dsdiff version that wrote it")
        net = _net_class(info["net"]["class"])(**info["net"]["args"])
        state = {k[len("net."):]: v for k, v in checkpoint.get("state_dict", {}).items() if k.startswith("net.")}
        try:
            net.load_state_dict(state)
        except RuntimeError as err:
            raise ModelLoadError(f"the weights in {path} do not fit the recorded network: {err}") from err
        return cls(net, info, device)

    @property
    def class_names(self) -> list[str]:
        return list(self.info["class_names"])

    @property
    def num_classes(self) -> int:
        return len(self.info["class_names"])

    @property
    def palette(self) -> list[int]:
        """A flat RGB palette (``PIL.Image.putpalette``): class i is ``palette[3 * i : 3 * i + 3]``."""
        return list(self.info["palette"])

    def preprocess(self, image) -> torch.Tensor:
        """A normalised (1, 3, H, W) float tensor, as evaluation feeds the network, from a PIL image
        (any mode; EXIF orientation applied) or an HxWx3 uint8 array."""
        from PIL import Image, ImageOps

        if isinstance(image, Image.Image):
            array = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
        else:
            array = np.asarray(image)
            if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
                raise SettingError(f"expected a PIL image or an HxWx3 uint8 array, got an array of shape "
                                   f"{array.shape} and dtype {array.dtype}")
        tensor = torch.from_numpy(np.array(array, copy=True)).permute(2, 0, 1).to(self.device)
        return ((tensor.float() / 255 - self.mean) / self.std).unsqueeze(0)

    @torch.no_grad()
    def logits(self, image, tta: bool = False) -> torch.Tensor:
        """Logits (1, C, H, W) at the image's own size, at the recorded ``eval_scale`` (and TTA)."""
        images = self.preprocess(image)
        out = self.module.forward_tta(images) if tta else self.module(images)
        if out.shape[-2:] != images.shape[-2:]:
            out = F.interpolate(out, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return out

    def predict(self, image, tta: bool = False) -> np.ndarray:
        """Class indices (H, W) uint8 at the image's own size (``tta``: the recorded multi-scale + flip)."""
        return self.logits(image, tta).argmax(1)[0].to(torch.uint8).cpu().numpy()
