"""The prompts stage: a dataset's class labels + captions -> a prompts JSONL.

Each line is one generation request: ``{"id", "prompt", "class_ids", "class_words",
"class_prompt", "caption", "image_id"}`` with prompt ``"<caption>; <class words>"``.
``ensure_prompts(cfg)`` runs it for ``generate`` (config group ``prompts``: BLIP captions of
the VOC train images, COCO's train captions, or a captions file; cached and resumable);
``python -m dsdiff.prompts`` runs it from the command line.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from omegaconf import OmegaConf

from dsdiff.config import config_dir, to_plain
from dsdiff.data.classes import COCO_ID_TO_TRAIN_ID, get_class_list
from dsdiff.diffusion.prompts import (DEFAULT_TEMPLATE, PromptRecord, build_records, fit_prompt, image_key, load_captions,
                                     read_jsonl, write_jsonl)
from dsdiff.io import write_json_atomic

log = logging.getLogger("dsdiff.prompts")

EXAMPLES = """examples:
  python -m dsdiff.prompts --dataset voc --root data/VOCdevkit/VOC2012 --split train \\
      --captions voc_blip_captions.jsonl --out prompts/voc_train.jsonl
  python -m dsdiff.prompts --dataset coco --root data/coco --split train \\
      --captions data/coco/annotations/captions_train2017.json --max-captions 2 --out prompts/coco.jsonl
  python -m dsdiff.prompts --labels labels.json --classes voc --out prompts/templates.jsonl
  python -m dsdiff.prompts --dataset voc --root data/VOCdevkit/VOC2012 --split train \\
      --captioner Salesforce/blip-image-captioning-large --out prompts/voc_blip.jsonl

captions: COCO captions JSON, JSONL lines {"image": ..., "caption": ...}, or text with
one "<image>\\t<caption>" (or a bare caption, whose classes are read from its words) per line.
Images without captions get a class template ("a photo of a dog and a person; dog person").
"""


def dataset_image_labels(dataset: str, root: str, split: str) -> dict[str, list[int]]:
    """Image id -> class indices present, read from a VOC or COCO folder."""
    if dataset == "voc":
        from dsdiff.data.voc import VOCSegmentation  # here, not at the top: `--help` stays free of torch

        return VOCSegmentation(root, split).image_labels()
    if dataset == "coco":
        # Read the instances JSON only: COCOSegmentation would also render every mask PNG.
        from dsdiff.data.coco import load_annotations  # here, not at the top: `--help` stays free of torch

        images, by_image = load_annotations(Path(root).expanduser(), split)
        return {
            Path(im["file_name"]).stem: sorted(
                {COCO_ID_TO_TRAIN_ID[a["category_id"]] for a in by_image[im["id"]] if not a.get("iscrowd", 0)}
            )
            for im in images
        }
    raise ValueError(f"unknown dataset {dataset!r}: use voc or coco, or pass --labels")


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
        raise FileNotFoundError(f"no CLIP tokenizer at {path!r}: pass --tokenizer <pipeline or tokenizer folder>") from e


# ---- the prompts stage (conf/prompts): what `generate` runs when no prompts file is given ---------

def _voc_images(root: str | Path, split: str) -> tuple[dict[str, list[int]], dict[str, Path]]:
    from dsdiff.data.voc import VOCSegmentation  # here, not at the top: `--help` stays free of torch

    voc = VOCSegmentation(root, split)
    return voc.image_labels(), {name: voc.image_path(name) for name in voc.ids}


def stage_settings(cfg) -> dict:
    """Check ``cfg.prompts`` and return what decides the prompts (its digest names the cache); reads no dataset."""
    p = to_plain(cfg.prompts)
    source, class_list = p.get("source"), str(cfg.data.class_list)
    if source not in ("captions", "templates"):
        raise ValueError(f"prompts.source={source!r}: use captions (the paper's) or templates (class-only prompts)")
    if class_list not in ("voc", "coco"):
        raise ValueError(f"prompts.source=captions needs VOC or COCO labels, but data.class_list={class_list!r}: "
                         "pass prompts.source=templates, or synthetic.prompts=<file from python -m dsdiff.prompts --labels>")
    per_image = p.get("per_image")
    if per_image is not None and int(per_image) < 1:
        raise ValueError(f"prompts.per_image={per_image}: use 1 or more, or null for all")
    split = str(p.get("split") or "train")
    root = Path(str(cfg.paths[class_list])).expanduser()
    settings = {"class_list": class_list, "source": source, "root": str(root.resolve()), "split": split,
                "per_image": per_image, "template": p.get("template") or DEFAULT_TEMPLATE}
    captions_file = p.get("captions")
    if class_list == "coco" and not captions_file:
        captions_file = root / "annotations" / f"captions_{split}2017.json"
        if not captions_file.is_file():
            raise FileNotFoundError(f"no COCO captions at {captions_file} (paths.coco={str(root)!r}): add COCO's "
                                    "annotations there, or pass prompts.captions=<captions file>, or prompts.source=templates")
    if captions_file:
        path = Path(str(captions_file)).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"prompts.captions={str(captions_file)!r}: no such file; pass a COCO captions JSON or "
                                    "a JSONL of {\"image\", \"caption\"}, or prompts.captions=null to caption with prompts.captioner")
        settings["captions"] = {"file": str(path.resolve()), "sha256": _file_digest(path)}
        return settings
    prefixes = [str(x).strip() for x in (p.get("prefixes") or []) if str(x).strip()]
    if not prefixes:
        raise ValueError("prompts.prefixes is empty: give the captioner at least one prefix, e.g. ['a photo of']")
    if per_image is not None:
        if int(per_image) > len(prefixes):
            raise ValueError(f"prompts.per_image={per_image} but prompts.prefixes has {len(prefixes)}: "
                             "one caption per prefix, so add prefixes or lower per_image")
        prefixes = prefixes[: int(per_image)]
    settings.update(captioner=str(p.get("captioner")), prefixes=prefixes, max_new_tokens=int(p.get("max_new_tokens", 30)))
    return settings


def stage_inputs(settings: dict) -> dict:
    """Read what ``settings`` needs, writing nothing: ``labels`` {image id: class ids}, ``class_names``,
    and either ``captions`` pairs (a captions file) or ``images`` {image id: path} to caption."""
    class_list, root, split = settings["class_list"], settings["root"], settings["split"]
    inputs = {"class_names": get_class_list(class_list).classes}
    if "captions" in settings:
        inputs["captions"] = load_captions(settings["captions"]["file"])
        inputs["labels"] = (dataset_image_labels("coco", root, split) if class_list == "coco" else _voc_images(root, split)[0])
        return inputs
    labels, images = _voc_images(root, split)
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
    from dsdiff.captioner import Captioner, caption_images  # here, not at the top: `--help` stays free of torch

    p = cfg.get("prompts")
    if p is None or p.get("source", "templates") == "templates":
        return None
    settings = stage_settings(cfg)
    if out is None:
        stem = f"{settings['class_list']}-{settings['source']}-{settings_digest(settings)}"
        out = Path(str(p.get("dir") or "prompts")).expanduser() / f"{stem}.jsonl"
    out = Path(out)
    meta, partial = out.with_suffix(".json"), out.with_name(f"{out.stem}.captions.partial.jsonl")
    if meta.is_file():
        made = json.loads(meta.read_text())
        if made != settings:
            diff = sorted(k for k in set(made) | set(settings) if made.get(k) != settings.get(k))
            raise ValueError(f"{meta} was made with other prompts settings ({', '.join(diff)}): "
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
        raise ValueError(f"no prompt records: no image of {settings['root']} (split {settings['split']}) has a class; "
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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m dsdiff.prompts",
        description="Build the prompts JSONL for synthetic-data generation from a dataset's labels and captions.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_argument_group("class labels (one of)")
    src.add_argument("--dataset", choices=["voc", "coco"], help="read labels from a dataset folder (needs --root)")
    src.add_argument("--labels", help="JSON file {image_id: [class indices]} for any class list (with --classes)")
    p.add_argument("--root", help="dataset root (VOC2012 folder or COCO folder with annotations/)")
    p.add_argument("--split", default="train", help="dataset split (default: train)")
    p.add_argument("--classes", help="class list name (voc, coco); default: the dataset's")
    p.add_argument("--captions", help="captions file; without it every image gets a class template")
    p.add_argument("--out", required=True, help="output JSONL path (written atomically)")
    p.add_argument("--template", default=DEFAULT_TEMPLATE, help=f"class-only template (default: {DEFAULT_TEMPLATE!r})")
    p.add_argument("--max-captions", type=int, default=None, help="captions used per image (default: all)")
    p.add_argument("--no-append-classes", action="store_true", help="do not append '; <class words>' to prompts")
    p.add_argument("--tokenizer", help="pipeline/tokenizer folder or hub id: truncate prompts over its limit now")
    cap = p.add_argument_group("captioning a VOC folder (the prompts stage of `generate`, resumable)")
    cap.add_argument("--captioner", help="BLIP hub id or local folder: caption the images, one caption per prefix")
    cap.add_argument("--prefixes", nargs="+", default=None, help="conditional text per caption (default: conf/prompts)")
    cap.add_argument("--batch-size", type=int, default=16, help="images per captioner forward pass")
    cap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1")
    args = p.parse_args(argv)
    if args.captioner and (args.dataset != "voc" or args.captions or args.labels or args.no_append_classes):
        p.error("--captioner captions a VOC folder: use it with --dataset voc --root DIR, without --captions/--labels")
    if bool(args.dataset) == bool(args.labels):
        p.error("pass exactly one of --dataset (with --root) or --labels")
    if args.dataset and not args.root:
        p.error("--dataset needs --root")
    if args.labels and not args.classes:
        p.error("--labels needs --classes (voc, coco)")
    return args


def main(argv: Sequence[str] | None = None) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.captioner:
        return _caption_cli(args)
    class_names = get_class_list(args.classes or args.dataset).classes
    if args.labels:
        image_labels = {str(k): list(v) for k, v in json.loads(Path(args.labels).read_text()).items()}
    else:
        image_labels = dataset_image_labels(args.dataset, args.root, args.split)
    captions = load_captions(args.captions) if args.captions else []
    records = build_records(
        image_labels, class_names, captions, template=args.template,
        append_classes=not args.no_append_classes, max_captions=args.max_captions,
    )
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
        for r in records:
            r.prompt = fit_prompt(tokenizer, r.prompt, r.class_words if not args.no_append_classes else [])
    out = write_jsonl(records, args.out)
    n_images = len({r.image_id for r in records if r.image_id is not None})
    log.info("wrote %d prompts for %d of %d images to %s", len(records), n_images, len(image_labels), out)
    return out


def _caption_cli(args: argparse.Namespace) -> Path:
    """``--captioner``: the prompts stage with conf/prompts' defaults and an explicit output file."""
    prompts = OmegaConf.load(config_dir() / "prompts" / "default.yaml")
    overrides = {"source": "captions", "captioner": args.captioner, "split": args.split, "template": args.template,
                 "per_image": args.max_captions, "batch_size": args.batch_size, "device": args.device, "dir": None}
    if args.prefixes:
        overrides["prefixes"] = args.prefixes
    cfg = OmegaConf.create({"data": {"class_list": "voc"}, "paths": {"voc": args.root},
                            "prompts": OmegaConf.merge(prompts, overrides)})
    out = ensure_prompts(cfg, out=Path(args.out))
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
        records = read_jsonl(out)
        for r in records:
            r.prompt = fit_prompt(tokenizer, r.prompt, r.class_words)
        write_jsonl(records, out)
    return out


def cli() -> None:
    """The ``dsdiff-prompts`` console script: its wrapper exits with what this returns, so nothing."""
    main()


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
