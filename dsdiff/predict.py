"""`python -m dsdiff.predict ckpt_path=FILE input=PATH output=DIR` (or `dsdiff-predict ...`): segment your images.

``input`` is an image file, a folder (searched recursively for common image extensions) or a glob.
For each image, ``<output>/<its relative path>.png`` is a palette PNG at the image's own size whose
values are class indices; ``predictions.jsonl`` lists each image with its size and the share of each
class, ``skipped.jsonl`` the inputs that could not be read (with the reason). ``overlay=true`` adds
``overlays/<path>.jpg`` and ``legend.png``; ``tta=true`` predicts with the paper's multi-scale + flip
augmentation. Images of any PIL mode are read as RGB after their EXIF orientation is applied.

A rerun skips the images whose mask is already there (every file is written atomically), so an
interrupted run resumes. The run exits 0 when at least one image was segmented (or all were done
before); ``strict=true`` makes any unreadable input an error.
"""
from __future__ import annotations

import glob
import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig
from PIL import Image, ImageOps

from dsdiff.chain.config import config_dir
from dsdiff.data.classes import flat_palette
from dsdiff.utils.errors import MissingPathError, SettingError, exits_cleanly
from dsdiff.utils.io import save_image_atomic, write_text_atomic
from dsdiff.utils.progress import format_progress

log = logging.getLogger("dsdiff")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
PREDICTIONS, SKIPPED = "predictions.jsonl", "skipped.jsonl"


def list_inputs(spec: str | Path) -> list[tuple[Path, Path]]:
    """``(file, path relative to the input)`` for an image file, a folder (recursive) or a glob."""
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_file():
        return [(path, Path(path.name))]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        return [(p, p.relative_to(path)) for p in files]
    if glob.has_magic(text):
        matches = sorted(Path(p) for p in glob.glob(str(Path(text).expanduser()), recursive=True) if Path(p).is_file())
        base = Path(_glob_base(str(Path(text).expanduser())))
        return [(p, p.relative_to(base) if p.is_relative_to(base) else Path(p.name)) for p in matches]
    raise MissingPathError(f"input={text}: no such file or folder (an image file, a folder of images, or a glob such as "
                           "'photos/*.jpg' in quotes)")


def _glob_base(pattern: str) -> str:
    """The folder part of a glob before its first wildcard: outputs keep the paths below it."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return str(Path(*fixed)) if fixed else "."


def mask_paths(inputs: list[tuple[Path, Path]]) -> list[Path]:
    """``<relative path>.png`` for each input (``name.jpg.png`` where two inputs would share a mask)."""
    first = [rel.with_suffix(".png") for _, rel in inputs]
    seen: dict[Path, int] = {}
    for p in first:
        seen[p] = seen.get(p, 0) + 1
    return [p if seen[p] == 1 else rel.with_name(rel.name + ".png") for p, (_, rel) in zip(first, inputs)]


def read_image(path: Path) -> Image.Image:
    """An RGB image with its EXIF orientation applied; raises OSError/ValueError on a file that does not decode."""
    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit / float greyscale: scale to 8 bits
            arr = np.asarray(im, dtype=np.float64)
            top = arr.max() or 1.0
            im = Image.fromarray(np.clip(arr / top * 255, 0, 255).astype(np.uint8), "L")
        return im.convert("RGB")


def class_shares(mask: np.ndarray, class_names: list[str]) -> dict[str, float]:
    counts = np.bincount(mask.ravel(), minlength=len(class_names))[: len(class_names)]
    return {name: round(float(n) / mask.size, 4) for name, n in zip(class_names, counts) if n}


def _read_jsonl(path: Path) -> dict[str, dict]:
    rows = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn line of a killed run: its image is predicted again
            rows[row["file"]] = row
    return rows


def _write_jsonl(path: Path, rows: dict[str, dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(rows[k], sort_keys=True) + "\n" for k in sorted(rows)))


def check_predict(cfg: DictConfig) -> None:
    """Every setting, before anything is read or written."""
    ckpt = Path(str(cfg.ckpt_path)).expanduser()
    if not ckpt.is_file():
        raise MissingPathError(f"ckpt_path={cfg.ckpt_path}: no such file (a checkpoint written by dsdiff.train, e.g. "
                               "logs/<task>/runs/<time>/checkpoints/last.ckpt)")
    for key in ("tta", "overlay", "strict"):
        if not isinstance(cfg.get(key), bool):
            raise SettingError(f"{key}={cfg.get(key)!r}: true or false")
    out = Path(str(cfg.output)).expanduser()
    if out.exists() and not out.is_dir():
        raise SettingError(f"output={cfg.output} is a file: point output at a folder (new, or made by dsdiff.predict)")


def predict(cfg: DictConfig) -> dict[str, Any]:
    """Segment ``cfg.input`` into ``cfg.output``; returns the counts."""
    from dsdiff.deploy.segmenter import Segmenter

    check_predict(cfg)
    inputs = list_inputs(cfg.input)
    if not inputs:
        raise MissingPathError(f"input={cfg.input}: no images there (files ending in {', '.join(IMAGE_EXTENSIONS)})")
    out = Path(str(cfg.output)).expanduser()
    masks = mask_paths(inputs)
    todo = [(src, rel, m) for (src, rel), m in zip(inputs, masks) if not (out / m).is_file()]
    log.info("predict: %d images in %s, %d done before, %d to segment into %s", len(inputs), cfg.input,
             len(inputs) - len(todo), len(todo), out)
    segmenter = Segmenter.from_checkpoint(str(cfg.ckpt_path), device=cfg.get("device"))
    names = list(segmenter.class_names)
    out.mkdir(parents=True, exist_ok=True)
    predictions, skipped = _read_jsonl(out / PREDICTIONS), _read_jsonl(out / SKIPPED)
    palette, seen, start, step = flat_palette(), set(), time.monotonic(), max(1, len(todo) // 20)
    made = 0
    for k, (src, rel, mask_rel) in enumerate(todo, 1):
        try:
            image = read_image(src)
        except Exception as err:  # noqa: BLE001 - any decoder failure: the file is skipped, with its reason
            reason = f"{type(err).__name__}: {err}"
            log.warning("predict: skipped %s (%s)", src, reason)
            skipped[rel.as_posix()] = {"file": rel.as_posix(), "path": str(src), "reason": reason}
            if cfg.strict:
                _write_jsonl(out / SKIPPED, skipped)
                raise SettingError(f"strict=true: {src} is not an image that decodes ({reason}); remove it from the input "
                                   "or pass strict=false to skip it") from None
            continue
        mask = segmenter.predict(image, tta=cfg.tta)
        label = Image.fromarray(mask.astype(np.uint8), mode="P")
        label.putpalette(palette)
        (out / mask_rel).parent.mkdir(parents=True, exist_ok=True)
        if cfg.overlay:
            blend = Image.blend(image, label.convert("RGB"), 0.5)
            (out / "overlays" / mask_rel).parent.mkdir(parents=True, exist_ok=True)
            save_image_atomic(blend, (out / "overlays" / mask_rel).with_suffix(".jpg"), format="JPEG", quality=90)
        save_image_atomic(label, out / mask_rel, format="PNG")  # last: its presence marks the image done
        shares = class_shares(mask, names)
        seen.update(shares)
        skipped.pop(rel.as_posix(), None)
        predictions[rel.as_posix()] = {"file": rel.as_posix(), "mask": mask_rel.as_posix(), "size": [image.width, image.height],
                                       "classes": shares}
        made += 1
        if k % step == 0 or k == len(todo):
            _write_jsonl(out / PREDICTIONS, predictions)
            log.info("%s", format_progress("predict", k, len(todo), time.monotonic() - start, "images"))
    _write_jsonl(out / PREDICTIONS, predictions)
    _write_jsonl(out / SKIPPED, skipped)
    if cfg.overlay and seen:
        from dsdiff.viz.panel import legend

        save_image_atomic(legend([names.index(n) for n in names if n in seen], names, 480), out / "legend.png", format="PNG")
    summary = {"images": len(inputs), "segmented": made, "done_before": len(inputs) - len(todo), "skipped": len(skipped),
               "output": str(out)}
    log.info("predict: %s", summary)
    if not predictions:
        raise SettingError(f"no image of input={cfg.input} could be read ({len(skipped)} skipped, listed in {out / SKIPPED})")
    return summary


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="predict")
@exits_cleanly  # a ConfigError: one "dsdiff: error:" block and exit status 2, no traceback
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
