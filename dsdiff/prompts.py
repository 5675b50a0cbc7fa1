"""``python -m dsdiff.prompts``: a dataset's class labels + captions -> a prompts JSONL.

Each line is one generation request: ``{"id", "prompt", "class_ids", "class_words",
"class_prompt", "caption", "image_id"}`` with prompt ``"<caption>; <class words>"``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from dsdiff.data.classes import get_class_list
from dsdiff.diffusion.prompts import DEFAULT_TEMPLATE, build_records, fit_prompt, load_captions, write_jsonl

log = logging.getLogger("dsdiff.prompts")

EXAMPLES = """examples:
  python -m dsdiff.prompts --dataset voc --root data/VOCdevkit/VOC2012 --split train \\
      --captions voc_blip_captions.jsonl --out prompts/voc_train.jsonl
  python -m dsdiff.prompts --dataset coco --root data/coco --split train \\
      --captions data/coco/annotations/captions_train2017.json --max-captions 2 --out prompts/coco.jsonl
  python -m dsdiff.prompts --labels labels.json --classes voc --out prompts/templates.jsonl

captions: COCO captions JSON, JSONL lines {"image": ..., "caption": ...}, or text with
one "<image>\\t<caption>" (or a bare caption, whose classes are read from its words) per line.
Images without captions get a class template ("a photo of a dog and a person; dog person").
"""


def dataset_image_labels(dataset: str, root: str, split: str) -> dict[str, list[int]]:
    """Image id -> class indices present, read from a VOC or COCO folder."""
    if dataset == "voc":
        from dsdiff.data.voc import VOCSegmentation

        return VOCSegmentation(root, split).image_labels()
    if dataset == "coco":
        # Read the instances JSON only: COCOSegmentation would also render every mask PNG.
        from dsdiff.data.classes import COCO_ID_TO_TRAIN_ID
        from dsdiff.data.coco import load_annotations

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
    args = p.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
