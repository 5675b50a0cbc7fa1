"""An image-captioning model (BLIP via transformers) that writes the captions prompts are made of.

As in the paper, VOC's prompts are captions of its train images written by a BLIP-style
captioner, several per image, each started with a prefix ("a photo of", "a picture of") given
to the text decoder as conditional text. The random-weight BLIP that tests caption with is in
:mod:`dsdiff.testing.tiny_blip`.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from dsdiff.diffusion.prompts import parse_jsonl_line
from dsdiff.utils.errors import ModelLoadError, SettingError
from dsdiff.utils.hub import model_source
from dsdiff.utils.io import write_text_atomic

log = logging.getLogger("dsdiff")

FIX_HINT = ("Pass prompts.captioner=<hub id or local BLIP folder (save_pretrained layout)>, or "
            "prompts.captions=<captions file: COCO captions JSON or JSONL {\"image\", \"caption\"}>, "
            "or prompts.source=templates for class-only prompts")


def pick_device(device: str | None) -> torch.device:
    """``auto``/None: the first GPU when there is one, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def clean_caption(text: str, prefix: str) -> str:
    """One line of caption text; the prefix alone when the model added nothing usable after it."""
    text = re.sub(r"\s+", " ", text.replace(";", ",")).strip(" .,")
    return text if text and text.lower() != prefix.lower().strip() else prefix.strip()


class Captioner:
    """``captioner(images, prefix) -> captions``: conditional captioning, one caption per image."""

    def __init__(self, model, processor, device: torch.device, max_new_tokens: int = 30) -> None:
        self.model, self.processor, self.device = model.eval(), processor, device
        self.max_new_tokens = int(max_new_tokens)

    @classmethod
    def from_pretrained(cls, name: str, device: str | None = "auto", max_new_tokens: int = 30) -> Captioner:
        """Load a BLIP captioner from a hub id or a local folder; a clear error when it cannot be had."""
        from transformers import BlipForConditionalGeneration, BlipProcessor

        device_ = pick_device(device)
        dtype = torch.float16 if device_.type == "cuda" else torch.float32
        local = Path(str(name)).expanduser()
        source = model_source(name, "prompts.captioner", FIX_HINT[0].lower() + FIX_HINT[1:], probe="config.json")
        try:
            processor = BlipProcessor.from_pretrained(source)
            model = BlipForConditionalGeneration.from_pretrained(source)
        except (OSError, ValueError) as e:  # not cached and offline, no such repo, not a BLIP folder
            where = (f"the local folder {local} is not a BLIP model" if local.is_dir() else
                     "it is no local folder, and the Hugging Face hub did not give it (offline, or no such repo)")
            reason = (str(e).split(". ")[0] or type(e).__name__).strip()
            raise ModelLoadError(f"cannot load the image captioner prompts.captioner={name!r}: {where} ({reason}). "
                               f"{FIX_HINT}") from e
        log.info("captioner %s on %s", name, device_)
        return cls(model.to(device_, dtype=dtype), processor, device_, max_new_tokens)

    @torch.inference_mode()
    def __call__(self, images: Sequence, prefix: str) -> list[str]:
        """Captions of PIL ``images`` that continue ``prefix`` (one prefix per call keeps the batch unpadded)."""
        inputs = self.processor(images=list(images), text=[prefix] * len(images), return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        return [clean_caption(t, prefix) for t in self.processor.batch_decode(out, skip_special_tokens=True)]


# ---- captioning a folder, resumably ----------------------------------------------------------

def _read_partial(path: Path) -> dict[str, list[str]]:
    """Captions already written (``{"image", "caption"}`` lines); a line cut by a kill is dropped."""
    if not path.is_file():
        return {}
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    if text and not text.endswith("\n"):  # killed mid-line: keep the appends that follow on lines of their own
        write_text_atomic(path, text + "\n")
    done: dict[str, list[str]] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = parse_jsonl_line(line, path, n)
        except ValueError:
            if n < len(lines):
                raise
            log.warning("%s:%d: dropping a line cut short by an interrupted run", path, n)
            write_text_atomic(path, "".join(x + "\n" for x in lines[: n - 1]))
            break
        if not isinstance(row.get("caption"), list) or "image" not in row:
            raise SettingError(f"{path}:{n}: expected {{\"image\", \"caption\": [...]}}: delete {path} to caption again")
        done[str(row["image"])] = list(row["caption"])
    return done


def caption_images(images: dict[str, Path], prefixes: list[str], partial: Path, load_captioner,
                   batch_size: int = 16, before_write=None) -> dict[str, list[str]]:
    """Caption each image once per prefix, appending ``{"image", "caption": [...]}`` lines to ``partial``.

    Images already in ``partial`` are not captioned again. ``load_captioner()`` is called (and
    ``before_write()`` after it) only when something is left, before anything is written.
    """
    from PIL import Image

    done = _read_partial(partial)
    pending = [name for name in images if name not in done]
    log.info("prompts: %d of %d images captioned, %d to caption", len(images) - len(pending), len(images), len(pending))
    if not pending:
        return done
    captioner = load_captioner()
    if before_write is not None:
        before_write()
    partial.parent.mkdir(parents=True, exist_ok=True)
    start, step, next_log = time.monotonic(), max(1, int(batch_size)), 0.0
    with open(partial, "a", encoding="utf-8") as f:
        for b in range(0, len(pending), step):
            names = pending[b : b + step]
            pics = [Image.open(images[n]).convert("RGB") for n in names]
            per_prefix = [captioner(pics, prefix) for prefix in prefixes]
            for k, name in enumerate(names):
                done[name] = [caps[k] for caps in per_prefix]
                f.write(json.dumps({"image": name, "caption": done[name]}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            finished = b + len(names)
            if finished / len(pending) >= next_log or finished == len(pending):
                rate = finished / max(time.monotonic() - start, 1e-9)
                log.info("prompts: captioned %d/%d images (%.2f img/s, ETA %.0f s)", finished, len(pending), rate,
                         (len(pending) - finished) / rate)
                next_log = finished / len(pending) + 0.05
    return done
