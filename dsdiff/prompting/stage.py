"""The prompts stage: a dataset's class labels + captions -> a prompts JSONL.

Each line is one generation request: ``{"id", "prompt", "class_ids", "class_words",
"class_prompt", "caption", "image_id"}`` with prompt ``"<caption>; <class words>"``.
``ensure_prompts(cfg)`` runs it for ``generate`` (config group ``prompts``: BLIP captions of
the VOC, Cityscapes or your own folder's train images, COCO's train captions, or a captions file;
cached and resumable);
``python -m dsdiff.prompts`` (dsdiff/prompts.py) runs it from the command line.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

from dsdiff.data.classes import COCO_ID_TO_TRAIN_ID, get_class_list
from dsdiff.diffusion.prompts import (
    DEFAULT_TEMPLATE,
    PromptRecord,
    build_records,
    image_key,
    load_captions,
    write_jsonl,
)
from dsdiff.prompting.checks import check_caption_coverage
from dsdiff.utils.config import to_plain
from dsdiff.utils.errors import MissingPathError, SettingError
from dsdiff.utils.io import write_json_atomic

log = logging.getLogger("dsdiff.prompts")

def dataset_image_labels(dataset: str, root: str, split: str) -> dict[str, list[int]]:
    """Image id -> class indices present, read from a VOC, COCO, Cityscapes or image folder."""
    if dataset in MASK_READERS:
        return _mask_images(dataset, root, split)[0]
    if dataset == "coco":
        # Read the instances JSON only: COCOSegmentation would also render every mask PNG.
        from dsdiff.data.coco import (
            load_annotations,  # here, not at the top: `--help` stays free of torch
        )

        images, by_image = load_annotations(Path(root).expanduser(), split)
        return {
            Path(im["file_name"]).stem: sorted(
                {COCO_ID_TO_TRAIN_ID[a["category_id"]] for a in by_image[im["id"]] if not a.get("iscrowd", 0)}
            )
            for im in images
        }
    raise SettingError(f"unknown dataset {dataset!r}: use voc, coco, cityscapes or folder, or pass --labels")


def load_tokenizer(path: str):
    """A CLIP tokenizer from a tokenizer folder or a diffusers pipeline folder / hub id."""
    from transformers import CLIPTokenizer

    sub = Path(path) / "tokenizer"
    try:
        if sub.is_dir():
            return CLIPTokenizer.from_pretrained(str(sub))
        if Path(path).is_dir():
            return CLIPTokenizer.from_pretrained(path)
        return CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    except OSError as e:
        raise MissingPathError(f"no CLIP tokenizer at {path!r}: pass --tokenizer <pipeline or tokenizer folder>") from e


# ---- the prompts stage (conf/prompts): what `generate` runs when no prompts file is given ---------

# Datasets whose labels are read from their masks (module, class); each also names its `paths` key.
MASK_READERS = {"voc": ("dsdiff.data.voc", "VOCSegmentation"),
                "cityscapes": ("dsdiff.data.cityscapes", "CityscapesSegmentation"),
                "folder": ("dsdiff.data.folder", "FolderSegmentation")}


def _mask_images(dataset: str, root: str | Path, split: str) -> tuple[dict[str, list[int]], dict[str, Path]]:
    """(image id -> class indices in its mask, image id -> image file) of a dataset split read from its masks."""
    import importlib  # the reader here, not at the top: `--help` stays free of torch

    module, name = MASK_READERS[dataset]
    reader = getattr(importlib.import_module(module), name)(root, split)
    return reader.image_labels(), {n: reader.image_path(n) for n in reader.ids}


def caption_dataset(class_list: str) -> str | None:
    """The dataset (and `paths` key) whose train images the captions stage reads for ``data.class_list``:
    voc, coco, cityscapes, or folder for a class list file; None for any other class list."""
    if class_list in ("voc", "coco", "cityscapes"):
        return class_list
    return "folder" if class_list.endswith(".txt") or Path(class_list).expanduser().is_file() else None


def stage_settings(cfg) -> dict:
    """Check ``cfg.prompts`` and return what decides the prompts (its digest names the cache); reads no dataset."""
    p = to_plain(cfg.prompts)
    source, class_list = p.get("source"), str(cfg.data.class_list)
    if source not in ("captions", "templates"):
        raise SettingError(f"prompts.source={source!r}: use captions (the paper's) or templates (class-only prompts)")
    dataset = caption_dataset(class_list)
    if dataset is None:
        raise SettingError(f"prompts.source=captions needs VOC, COCO, Cityscapes or folder labels, but data.class_list={class_list!r}: "
                         "pass prompts.source=templates, or synthetic.prompts=<file from python -m dsdiff.prompts --labels>")
    per_image = p.get("per_image")
    if per_image is not None and int(per_image) < 1:
        raise SettingError(f"prompts.per_image={per_image}: use 1 or more, or null for all")
    split = str(p.get("split") or "train")
    root = Path(str(cfg.paths[dataset])).expanduser()
    settings = {"class_list": class_list, "source": source, "root": str(root.resolve()), "split": split,
                "per_image": per_image, "template": p.get("template") or DEFAULT_TEMPLATE}
    if dataset == "folder":  # the prompts name its classes: an edited class list file makes new prompts
        class_file = Path(class_list).expanduser()
        if not class_file.is_file():
            raise MissingPathError(f"no class list file {class_file} (data.class_list): write one class name per line; "
                                   "see docs/datasets.md")
        settings["class_list"] = str(class_file.resolve())
        settings["classes_sha256"] = _file_digest(class_file)
    captions_file = p.get("captions")
    if class_list == "coco" and not captions_file:
        captions_file = root / "annotations" / f"captions_{split}2017.json"
        if not captions_file.is_file():
            raise MissingPathError(f"no COCO captions at {captions_file} (paths.coco={str(root)!r}): add COCO's "
                                    "annotations there, or pass prompts.captions=<captions file>, or prompts.source=templates")
    if captions_file:
        path = Path(str(captions_file)).expanduser()
        if not path.is_file():
            raise MissingPathError(f"prompts.captions={str(captions_file)!r}: no such file; pass a COCO captions JSON or "
                                    "a JSONL of {\"image\", \"caption\"}, or prompts.captions=null to caption with prompts.captioner")
        settings["captions"] = {"file": str(path.resolve()), "sha256": _file_digest(path)}
        return settings
    prefixes = [str(x).strip() for x in (p.get("prefixes") or []) if str(x).strip()]
    if not prefixes:
        raise SettingError("prompts.prefixes is empty: give the captioner at least one prefix, e.g. ['a photo of']")
    if per_image is not None:
        if int(per_image) > len(prefixes):
            raise SettingError(f"prompts.per_image={per_image} but prompts.prefixes has {len(prefixes)}: "
                             "one caption per prefix, so add prefixes or lower per_image")
        prefixes = prefixes[: int(per_image)]
    settings.update(captioner=str(p.get("captioner")), prefixes=prefixes, max_new_tokens=int(p.get("max_new_tokens", 30)))
    return settings


def stage_inputs(settings: dict) -> dict:
    """Read what ``settings`` needs, writing nothing: ``labels`` {image id: class ids}, ``class_names``,
    and either ``captions`` pairs (a captions file) or ``images`` {image id: path} to caption."""
    class_list, root, split = settings["class_list"], settings["root"], settings["split"]
    dataset = caption_dataset(class_list)
    inputs = {"class_names": get_class_list(class_list).classes}
    if "captions" in settings:
        inputs["captions"] = load_captions(settings["captions"]["file"])
        inputs["labels"] = dataset_image_labels(dataset, root, split)
        check_caption_coverage(inputs["captions"], inputs["labels"], inputs["class_names"], settings["captions"]["file"],
                               f"of {root} (split {split})", "pass prompts.source=templates for class-only prompts")
        return inputs
    labels, images = _mask_images(dataset, root, split)
    inputs["labels"] = labels
    inputs["images"] = {name: images[name] for name in sorted(labels) if labels[name]}  # background-only: no prompt
    return inputs


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def settings_digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def interleave(records: list[PromptRecord]) -> list[PromptRecord]:
    """Every image's first prompt, then every image's second, ...: generation takes record ``i mod R``,
    so a run shorter than the prompts file still covers as many images as it can."""
    rank: dict[str | None, int] = {}
    keyed = []
    for order, r in enumerate(records):
        k = rank[r.image_id] = rank.get(r.image_id, -1) + 1
        keyed.append((k, order, r))
    return [r for _, _, r in sorted(keyed, key=lambda t: t[:2])]


def _rank() -> int:
    return max(int(os.environ.get(k, 0) or 0) for k in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"))


def ensure_prompts(cfg, load_captioner=None, out: Path | None = None) -> Path | None:
    """The finished prompts JSONL for ``cfg.prompts`` (built, or finished, when needed); None for templates.

    The file is ``out``, by default ``<prompts.dir>/<class list>-<source>-<settings digest>.jsonl``,
    with the settings next to it (``<stem>.json``), so other settings build their own file and a
    file made with other settings is refused, never adopted.
    Captioning appends each finished image to ``<stem>.captions.partial.jsonl``: a rerun after a
    crash captions only the images left, then the prompts file is written atomically and the
    partial file renamed to ``<stem>.captions.jsonl`` (a captions file for ``prompts.captions``).
    """
    from dsdiff.prompting.captioner import (  # here, not at the top: `--help` stays free of torch
        Captioner,
        caption_images,
    )

    p = cfg.get("prompts")
    if p is None or p.get("source", "templates") == "templates":
        return None
    settings = stage_settings(cfg)
    if out is None:
        stem = f"{get_class_list(settings['class_list']).name}-{settings['source']}-{settings_digest(settings)}"
        out = Path(str(p.get("dir") or "prompts")).expanduser() / f"{stem}.jsonl"
    out = Path(out)
    meta, partial = out.with_suffix(".json"), out.with_name(f"{out.stem}.captions.partial.jsonl")
    if meta.is_file():
        made = json.loads(meta.read_text())
        if made != settings:
            diff = sorted(k for k in set(made) | set(settings) if made.get(k) != settings.get(k))
            raise SettingError(f"{meta} was made with other prompts settings ({', '.join(diff)}): "
                             f"delete {out.with_suffix('')}.* to rebuild, or write elsewhere")
    if out.is_file() and meta.is_file():
        log.info("prompts: %s is done (reuse it anywhere with synthetic.prompts=%s)", out, out)
        return out
    if _rank() != 0:
        return _wait_for(out)

    def mark_started() -> None:
        write_json_atomic(meta, settings)

    plan = stage_inputs(settings)
    captions = plan.get("captions")
    if captions is None:
        if load_captioner is None:
            def load_captioner():
                return Captioner.from_pretrained(settings["captioner"], device=p.get("device", "auto"),
                                                 max_new_tokens=settings["max_new_tokens"])
        done = caption_images(plan["images"], settings["prefixes"], partial, load_captioner,
                              batch_size=int(p.get("batch_size", 16)), before_write=mark_started)
        captions = [(image_key(name), c) for name in plan["images"] for c in done[name]]
    records = interleave(build_records(plan["labels"], plan["class_names"], captions, template=settings["template"],
                                       max_captions=settings["per_image"]))
    if not records:
        raise SettingError(f"no prompt records: no image of {settings['root']} (split {settings['split']}) has a class; "
                         "check paths and prompts.split")
    if not meta.is_file():
        mark_started()
    write_jsonl(records, out)
    if partial.is_file():
        os.replace(partial, out.with_name(f"{out.stem}.captions.jsonl"))
    n_images = len({r.image_id for r in records})
    log.info("prompts: wrote %d prompts for %d images to %s", len(records), n_images, out)
    return out


def _wait_for(path: Path, poll_s: float = 5.0) -> Path:
    """Other ranks wait for rank 0's prompts file (one process captions; a shared file system is assumed)."""
    waited = 0.0
    while not path.is_file():
        if waited % 60 < poll_s:
            log.info("prompts: waiting for rank 0 to write %s", path)
        time.sleep(poll_s)
        waited += poll_s
    return path
