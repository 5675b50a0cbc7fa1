"""`python -m dsdiff.export ckpt_path=FILE format=smp|onnx output=DIR` (or `dsdiff-export ...`): share what you trained.

``format=smp`` writes segmentation_models_pytorch's ``save_pretrained`` folder (``config.json`` +
``model.safetensors``, the checkpoint's EMA weights) that ``smp.from_pretrained(DIR)`` loads; only for
a net with smp's own head (``model.net.head=smp``). ``format=onnx`` writes ``model.onnx`` (input
``image`` (1, 3, H, W) normalised, output ``logits`` (1, C, H, W), H and W dynamic), checked with
onnxruntime against PyTorch on random 64x64 and 96x80 inputs (``export.json``: the argmax agreement
and max |diff|; under 99.9 % agreement the export fails). Both add ``dsdiff.json`` (classes, palette,
mean/std, eval_scale) and a Hugging Face model card, ``README.md``.

The folder is built beside ``output`` and swapped in when finished: a failed export leaves no output.
"""
from __future__ import annotations

import logging
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from dsdiff.chain.config import config_dir
from dsdiff.utils.errors import MissingPathError, SettingError, exits_cleanly
from dsdiff.utils.io import replace_dir, write_text_atomic

log = logging.getLogger("dsdiff")
MARKER = "dsdiff.json"  # a folder holding it was made by dsdiff.export and may be replaced


def check_export(cfg: DictConfig) -> None:
    """Every setting, before the checkpoint is read or anything is written."""
    from dsdiff.deploy.export import FORMATS, check_onnx_installed

    ckpt = Path(str(cfg.ckpt_path)).expanduser()
    if not ckpt.is_file():
        raise MissingPathError(f"ckpt_path={cfg.ckpt_path}: no such file (a checkpoint written by dsdiff.train, e.g. "
                               "logs/<task>/runs/<time>/checkpoints/last.ckpt)")
    if cfg.format not in FORMATS:
        raise SettingError(f"format={cfg.format}: expected one of {', '.join(FORMATS)} (smp: smp's save_pretrained "
                           "folder; onnx: model.onnx)")
    if not isinstance(cfg.get("opset"), int) or isinstance(cfg.get("opset"), bool) or not 11 <= cfg.opset <= 21:
        raise SettingError(f"opset={cfg.get('opset')!r}: an ONNX opset between 11 and 21 (default 17)")
    out = Path(str(cfg.output)).expanduser()
    if out.exists() and not out.is_dir():
        raise SettingError(f"output={cfg.output} is a file: point output at a folder (new, or made by dsdiff.export)")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise SettingError(f"output={cfg.output} is a folder with other files in it (no {MARKER}): point output at a new "
                           "folder, or one an earlier dsdiff.export made")
    if cfg.format == "onnx":
        check_onnx_installed()


def command_line() -> str:
    args = [a for a in sys.argv[1:]]
    return " ".join(["python -m dsdiff.export", *(shlex.quote(a) for a in args)])


def export(cfg: DictConfig) -> dict[str, Any]:
    """Export ``cfg.ckpt_path``'s net into ``cfg.output``; returns what ``export.json`` / the check holds."""
    from dsdiff.deploy import card, export as ex
    from dsdiff.deploy.segmenter import Segmenter

    check_export(cfg)
    ckpt = Path(str(cfg.ckpt_path)).expanduser()
    segmenter = Segmenter.from_checkpoint(ckpt, device="cpu")
    net, info = segmenter.module.net.eval(), segmenter.info
    ex.check_format(cfg.format, net)
    out = Path(str(cfg.output)).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.export-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        result = ex.export_smp(net, tmp) if cfg.format == "smp" else ex.export_onnx(net, tmp, opset=int(cfg.opset))
        ex.write_dsdiff_json(tmp, info, net, cfg.format)
        metrics, source = ex.read_metrics(ckpt)
        text = card.model_card(info, cfg.format, command_line(), metrics, source, result)
        write_text_atomic(tmp / "README.md", text)  # after smp's save_pretrained, which writes its own README.md
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)
    if cfg.format == "onnx":
        for row in result["checks"]:
            log.info("export: onnxruntime vs PyTorch at %dx%d: argmax agreement %.4f%%, max |diff| %.3g",
                     row["input"][2], row["input"][3], 100 * row["argmax_agreement"], row["max_abs_diff"])
    else:
        log.info("export: smp.from_pretrained vs the checkpoint's net: max |diff| %.3g", result["check"]["max_abs_diff"])
    log.info("export: format=%s written to %s", cfg.format, out)
    return result


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="export")
@exits_cleanly  # a ConfigError: one "dsdiff: error:" block and exit status 2, no traceback
def main(cfg: DictConfig) -> None:
    export(cfg)


if __name__ == "__main__":
    main()
