"""`python -m dsdiff.prompts`: a dataset's labels + captions (or a captioner) -> a prompts JSONL (or `dsdiff-prompts`)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from omegaconf import OmegaConf

from dsdiff.chain.config import config_dir
from dsdiff.data.classes import get_class_list
from dsdiff.diffusion.prompts import (
    DEFAULT_TEMPLATE,
    build_records,
    fit_prompt,
    load_captions,
    read_jsonl,
    write_jsonl,
)
from dsdiff.prompting.checks import check_caption_coverage
from dsdiff.prompting.stage import dataset_image_labels, ensure_prompts, load_tokenizer
from dsdiff.utils.errors import ConfigError, exits_cleanly

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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m dsdiff.prompts",
        description="Build the prompts JSONL for synthetic-data generation from a dataset's labels and captions.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_argument_group("class labels (one of)")
    src.add_argument("--dataset", choices=["voc", "coco", "cityscapes", "folder"],
                     help="read labels from a dataset folder (needs --root; folder: docs/datasets.md)")
    src.add_argument("--labels", help="JSON file {image_id: [class indices]} for any class list (with --classes)")
    p.add_argument("--root", help="dataset root (VOC2012 folder, COCO folder with annotations/, Cityscapes folder with "
                                  "leftImg8bit/ and gtFine/, or an image folder with classes.txt)")
    p.add_argument("--split", default="train", help="dataset split (default: train)")
    p.add_argument("--classes", help="class list name (voc, coco, cityscapes) or class list file; default: the dataset's")
    p.add_argument("--captions", help="captions file; without it every image gets a class template")
    p.add_argument("--out", required=True, help="output JSONL path (written atomically)")
    p.add_argument("--template", default=DEFAULT_TEMPLATE, help=f"class-only template (default: {DEFAULT_TEMPLATE!r})")
    p.add_argument("--max-captions", type=int, default=None, help="captions used per image (default: all)")
    p.add_argument("--no-append-classes", action="store_true", help="do not append '; <class words>' to prompts")
    p.add_argument("--tokenizer", help="pipeline/tokenizer folder or hub id: truncate prompts over its limit now")
    cap = p.add_argument_group("captioning a VOC, Cityscapes or image folder (the prompts stage of `generate`, resumable)")
    cap.add_argument("--captioner", help="BLIP hub id or local folder: caption the images, one caption per prefix")
    cap.add_argument("--prefixes", nargs="+", default=None, help="conditional text per caption (default: conf/prompts)")
    cap.add_argument("--batch-size", type=int, default=16, help="images per captioner forward pass")
    cap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1")
    args = p.parse_args(argv)
    if args.captioner and (args.dataset not in CAPTIONED or args.captions or args.labels or args.no_append_classes):
        p.error("--captioner captions a VOC, Cityscapes or image folder: use it with --dataset voc|cityscapes|folder "
                "--root DIR, without --captions/--labels")
    if bool(args.dataset) == bool(args.labels):
        p.error("pass exactly one of --dataset (with --root) or --labels")
    if args.dataset and not args.root:
        p.error("--dataset needs --root")
    if args.labels and not args.classes:
        p.error("--labels needs --classes (voc, coco)")
    return args


CAPTIONED = ("voc", "cityscapes", "folder")  # datasets whose images the captioner reads (COCO has its captions)


def _class_list(dataset: str, root: str) -> str:
    """The class list of ``--dataset``: its name, or for an image folder its ``classes.txt``."""
    return str(Path(root).expanduser() / "classes.txt") if dataset == "folder" else dataset


def main(argv: Sequence[str] | None = None) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.captioner:
        return _caption_cli(args)
    class_names = get_class_list(args.classes or _class_list(args.dataset, args.root)).classes
    if args.labels:
        image_labels = {str(k): list(v) for k, v in json.loads(Path(args.labels).read_text()).items()}
    else:
        image_labels = dataset_image_labels(args.dataset, args.root, args.split)
    captions = load_captions(args.captions) if args.captions else []
    where = f"in {args.labels}" if args.labels else f"of {args.root} (split {args.split})"
    check_caption_coverage(captions, image_labels, class_names, args.captions, where, "leave out --captions for class templates")
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
    cfg = OmegaConf.create({"data": {"class_list": _class_list(args.dataset, args.root)}, "paths": {args.dataset: args.root},
                            "prompts": OmegaConf.merge(prompts, overrides)})
    out = ensure_prompts(cfg, out=Path(args.out))
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
        records = read_jsonl(out)
        for r in records:
            r.prompt = fit_prompt(tokenizer, r.prompt, r.class_words)
        write_jsonl(records, out)
    return out


# the prompts stage's errors name its config keys; this command takes them as flags
FLAGS = {"prompts.captioner": "--captioner", "prompts.captions": "--captions", "prompts.source=templates": "leave out --captioner",
         "paths.voc": "--root", "paths.coco": "--root", "prompts.split": "--split", "prompts.prefixes": "--prefixes",
         "prompts.per_image": "--max-captions"}


def as_flags(error: ConfigError) -> ConfigError:
    """``error`` with the config keys it names replaced by this command's flags."""
    text = str(error)
    for key, flag in FLAGS.items():
        text = text.replace(key, flag)
    return type(error)(text)


@exits_cleanly
def run(argv: Sequence[str] | None = None) -> Path:
    """:func:`main` as the command runs it: a ConfigError is one ``dsdiff: error:`` block (flags named), exit 2."""
    try:
        return main(argv)
    except ConfigError as e:
        raise as_flags(e) from e


def cli() -> None:
    """The ``dsdiff-prompts`` console script: its wrapper exits with what this returns, so nothing."""
    run()


if __name__ == "__main__":
    sys.exit(0 if run() else 1)
