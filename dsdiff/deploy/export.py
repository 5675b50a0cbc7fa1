"""A checkpoint's net as files other tools load: the library's ``save_pretrained`` folder (smp for a
DeepLab, transformers for a Mask2Former), or an ONNX graph.

Both take the net alone: a normalised (1, 3, H, W) float tensor in (``(x / 255 - mean) / std``,
the values in ``dsdiff.json``), logits (1, C, H, W) at the input's size out. The keep-ratio resize
to ``eval_scale``, the sliding window and TTA that ``Segmenter.predict`` adds are not part of it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dsdiff.utils.errors import SettingError
from dsdiff.utils.io import write_json_atomic

FORMATS = ("smp", "onnx")
MIN_AGREEMENT = 0.999  # argmax agreement of onnxruntime with PyTorch, per check input
CHECK_SIZES = ((64, 64), (96, 80))  # (H, W): two sizes, so the dynamic axes are exercised
INSTALL_HINT = "pip install 'dsdiff[export]'"


def net_kind(net: torch.nn.Module) -> str:
    """``smp`` (a plain smp model), ``mmseg`` (smp's encoder with dsdiff's mmseg head), ``mask2former`` or ``other``."""
    from dsdiff.models.net import SegmentationNet

    if isinstance(net, SegmentationNet):
        return str(net.init_args.get("head", "smp"))
    if type(net).__name__ == "Mask2FormerNet":
        return "mask2former"
    return "other"


def check_format(fmt: str, net: torch.nn.Module) -> None:
    """Refuse a format the net cannot be written in, before anything is written."""
    if fmt not in FORMATS:
        raise SettingError(f"format={fmt}: expected one of {', '.join(FORMATS)}")
    kind = net_kind(net)
    if fmt == "smp" and kind not in ("smp", "mask2former"):
        what = ("a DeepLabV3 with dsdiff's mmseg-style ASPP head (model.net.head=mmseg, the VOC/COCO recipes'), which "
                "smp's save_pretrained/from_pretrained cannot rebuild" if kind == "mmseg" else f"a {type(net).__name__}")
        raise SettingError(f"format=smp: this checkpoint's net is {what}; export it with format=onnx instead")


def library(net: torch.nn.Module) -> str:
    """The library whose ``from_pretrained`` loads ``format=smp``'s folder."""
    return "transformers" if net_kind(net) == "mask2former" else "segmentation-models-pytorch"


def preprocessing(info: dict) -> dict[str, Any]:
    return {"mean": list(info["mean"]), "std": list(info["std"]), "eval_scale": info.get("eval_scale"),
            "input": "RGB, float (x / 255 - mean) / std, shape (1, 3, H, W); H and W multiples of the output stride"}


def describe(info: dict, net: torch.nn.Module, fmt: str) -> dict[str, Any]:
    """What ``dsdiff.json`` holds: classes, palette, preprocessing and the net it was made from."""
    stride = getattr(net, "output_stride", None)
    return {"format": fmt, "class_names": list(info["class_names"]), "palette": list(info["palette"]),
            "ignore_index": info.get("ignore_index"), "preprocessing": preprocessing(info), "output_stride": stride,
            "net": {"class": info["net"]["class"], "args": info["net"]["args"]},
            "tta": {"scales": info.get("tta_scales"), "flip": info.get("tta_flip")}, "slide_crop": info.get("slide_crop")}


def export_smp(net: torch.nn.Module, folder: Path) -> dict[str, Any]:
    """The library's own ``save_pretrained`` folder (config.json + model.safetensors): smp's for a DeepLab
    (``net.model``), transformers' for a Mask2Former; loaded back and compared with ``net``."""
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    net.model.save_pretrained(str(folder))
    if net_kind(net) == "mask2former":
        from transformers import Mask2FormerForUniversalSegmentation

        from dsdiff.models.mask2former import semantic_scores

        loaded = Mask2FormerForUniversalSegmentation.from_pretrained(str(folder)).eval()
        loader = "transformers' Mask2FormerForUniversalSegmentation.from_pretrained"
        with torch.no_grad():
            out = loaded(pixel_values=x)
            theirs = semantic_scores(out.class_queries_logits, out.masks_queries_logits, x.shape[-2:]).clamp_min(1e-6).log()
    else:
        import segmentation_models_pytorch as smp

        loaded, loader = smp.from_pretrained(str(folder)).eval(), "smp.from_pretrained"
        with torch.no_grad():
            theirs = loaded(x)
    with torch.no_grad():
        ours = net(x)
    diff = float((ours - theirs).abs().max())
    if diff > 1e-5:
        raise RuntimeError(f"format=smp: {loader}({folder}) gives logits {diff:.3g} away from the checkpoint's "
                           "net on a 64x64 input (at most 1e-5 expected)")
    return {"format": "smp", "library": library(net), "check": {"loader": loader, "input": [1, 3, 64, 64],
                                                                "max_abs_diff": diff}}


class LogitsAtInputSize(torch.nn.Module):
    """The net with its logits resized (bilinear) to the input's size: what the ONNX graph computes."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _onnx_modules():
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise SettingError(f"format=onnx needs the onnx and onnxruntime packages ({err}): {INSTALL_HINT}") from None
    return onnx, onnxruntime


def check_onnx_installed() -> None:
    _onnx_modules()


def compare_onnx(wrapper: torch.nn.Module, path: Path, sizes=CHECK_SIZES, seed: int = 0) -> list[dict[str, Any]]:
    """onnxruntime against PyTorch on random normalised inputs: per size the argmax agreement and max |diff|."""
    _, ort = _onnx_modules()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    rng, rows = np.random.default_rng(seed), []
    for h, w in sizes:
        x = rng.standard_normal((1, 3, h, w)).astype(np.float32)
        with torch.no_grad():
            ref = wrapper(torch.from_numpy(x)).numpy()
        got = session.run(None, {name: x})[0]
        if got.shape != ref.shape:
            raise RuntimeError(f"format=onnx: onnxruntime gives logits of shape {got.shape} for a {h}x{w} input, "
                               f"PyTorch {ref.shape}")
        agree = float((got.argmax(1) == ref.argmax(1)).mean())
        rows.append({"input": [1, 3, h, w], "argmax_agreement": agree, "max_abs_diff": float(np.abs(got - ref).max())})
    return rows


def export_onnx(net: torch.nn.Module, folder: Path, opset: int = 17) -> dict[str, Any]:
    """``model.onnx`` (input ``image`` (1, 3, H, W), output ``logits`` (1, C, H, W), H and W dynamic), checked
    with onnxruntime; fails when the argmax agreement on a check input is under ``MIN_AGREEMENT``."""
    onnx, _ = _onnx_modules()
    wrapper = LogitsAtInputSize(net).eval()
    path = folder / "model.onnx"
    h, w = CHECK_SIZES[0]
    with torch.no_grad():
        torch.onnx.export(wrapper, (torch.zeros(1, 3, h, w),), str(path), input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {2: "height", 3: "width"}, "logits": {2: "height", 3: "width"}},
                          opset_version=opset, dynamo=False)
    onnx.checker.check_model(str(path))
    rows = compare_onnx(wrapper, path)
    result = {"format": "onnx", "file": path.name, "opset": opset, "min_agreement": MIN_AGREEMENT, "checks": rows,
              "torch": torch.__version__}
    write_json_atomic(folder / "export.json", result)
    bad = [r for r in rows if r["argmax_agreement"] < MIN_AGREEMENT]
    if bad:
        text = "; ".join(f"{r['input'][2]}x{r['input'][3]}: agreement {r['argmax_agreement']:.4%}, max |diff| "
                         f"{r['max_abs_diff']:.3g}" for r in bad)
        raise RuntimeError(f"format=onnx: onnxruntime disagrees with PyTorch ({text}; at least {MIN_AGREEMENT:.1%} "
                           f"expected); the numbers are in {folder / 'export.json'}")
    return result


def write_dsdiff_json(folder: Path, info: dict, net: torch.nn.Module, fmt: str) -> Path:
    return write_json_atomic(folder / "dsdiff.json", describe(info, net, fmt))


def _same_file(recorded: str, ckpt: Path) -> bool:
    """Whether a metrics file's ``ckpt_path`` is ``ckpt`` (paths are recorded as run, so compare their tails too)."""
    path = Path(recorded).expanduser()
    try:
        if path.resolve() == ckpt.resolve():
            return True
    except OSError:
        pass
    return path.parts[-3:] == ckpt.resolve().parts[-3:]


def read_metrics(ckpt: Path) -> tuple[dict[str, float], Path | None]:
    """The test metrics of ``ckpt``: the run's ``metrics.json`` (in a folder up to three levels above it) whose
    ``ckpt_path`` is this checkpoint; nothing when the checkpoint was copied away or another one was tested."""
    for candidate in (ckpt.parent / "metrics.json", *(p / "metrics.json" for p in list(ckpt.resolve().parents)[:3])):
        if not candidate.is_file():
            continue
        try:
            data = json.loads(candidate.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(data, dict) or (data.get("ckpt_path") and not _same_file(str(data["ckpt_path"]), ckpt)):
            continue
        found = {k: float(v) for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                 and str(k).startswith("test/")}
        return found, candidate
    return {}, None
