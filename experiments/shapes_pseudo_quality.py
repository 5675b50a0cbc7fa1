"""What self-training does to the labels, measured: attention labels vs each round's pseudo-labels.

On the shapes world a generated image's colours say where each class was drawn
(`dsdiff.shapes_t2i.quality.colour_mask`; on real images these equal the true masks), so the
labels a segmenter trains on can be scored directly. For every study run with a `pseudo_1`
folder this scores, against the colour masks of the same synthetic images:

- the attention labels the first stage trained on (the synthetic folder's masks);
- the pseudo-labels the second stage trained on (`<run>/pseudo_1/masks`);

as mIoU over certain pixels (background included), the certain share, and how the attention
labels' wrong certain pixels and uncertain pixels fared (still wrong, fixed, made uncertain).

    python experiments/shapes_pseudo_quality.py --out logs/shapes_study   # the study's --out
    python experiments/shapes_pseudo_quality.py --out logs/shapes_study --write-results

and writes its section (its `pseudo` block) of ``<--out>/shapes.md``, or with ``--write-results`` of
the shipped experiments/results/shapes.md; the section names the command that made it.
"""
from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from dsdiff.data.classes import IGNORE_INDEX, SHAPES_CLASSES
from dsdiff.diffusion.quality import confusion, mean_iou
from dsdiff.utils.io import read_jsonl_lines
from dsdiff.shapes_t2i.quality import colour_mask

from _results import add_write_results, run_folder, write_section  # experiments/_results.py


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def score(labels: list[np.ndarray], truths: list[np.ndarray]) -> dict[str, float]:
    conf = sum(confusion(label, truth, len(SHAPES_CLASSES)) for label, truth in zip(labels, truths))
    certain = sum(int((label != IGNORE_INDEX).sum()) for label in labels) / sum(label.size for label in labels)
    return {"mIoU": mean_iou(conf)[0], "certain": certain}


def transitions(attention: list[np.ndarray], pseudo: list[np.ndarray], truths: list[np.ndarray]) -> dict[str, float]:
    """Where the attention label was wrong (certain) or uncertain: what the pseudo-label made of it."""
    a, p, t = (np.concatenate([x.ravel() for x in xs]) for xs in (attention, pseudo, truths))
    wrong, unsure = (a != IGNORE_INDEX) & (a != t), a == IGNORE_INDEX
    right = (a != IGNORE_INDEX) & (a == t)
    return {
        "wrong_fixed": float(((p == t) & wrong).sum() / max(wrong.sum(), 1)),
        "wrong_kept": float(((p != IGNORE_INDEX) & (p != t) & wrong).sum() / max(wrong.sum(), 1)),
        "unsure_right": float(((p == t) & unsure).sum() / max(unsure.sum(), 1)),
        "unsure_wrong": float(((p != IGNORE_INDEX) & (p != t) & unsure).sum() / max(unsure.sum(), 1)),
        "right_broken": float(((p != IGNORE_INDEX) & (p != t) & right).sum() / max(right.sum(), 1)),
    }


def _ids(folder: Path) -> tuple[str, ...]:
    return tuple(row["id"] for row in read_jsonl_lines(folder / "manifest.jsonl"))


@functools.lru_cache(maxsize=None)
def _labels_and_truths(folder: Path, ids: tuple[str, ...]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A synthetic folder's attention labels of ``ids`` and its images' colour masks (runs that share a
    folder share them: read and derived once per process)."""
    return ([_png(folder / "masks" / f"{i}.png") for i in ids],
            [colour_mask(_png(folder / "images" / f"{i}.png")) for i in ids])


def folder_score(folder: Path, limit: int | None = None) -> dict[str, float]:
    """A synthetic folder's attention labels against its images' colour masks: mIoU over certain pixels, certain share."""
    return score(*_labels_and_truths(folder, _ids(folder)[:limit]))


def run_rows(run: Path) -> dict:
    pseudo_dir = run / "pseudo_1"
    settings = json.loads((pseudo_dir / "dataset.json").read_text())
    ids = _ids(pseudo_dir)
    attention, truths = _labels_and_truths(Path(settings["source"]), ids)
    pseudo = [_png(pseudo_dir / "masks" / f"{i}.png") for i in ids]
    mode = settings["selftrain"]["mode"] + (" + TTA" if settings["selftrain"].get("tta") else "")
    return {"run": run.name, "mode": mode, "images": len(ids), "attention": score(attention, truths),
            "pseudo": score(pseudo, truths), **transitions(attention, pseudo, truths)}


def section(rows: list[dict], out: Path, minutes: float, write_results: bool = False) -> str:
    lines = ["### What self-training does to the labels", "",
             f"`python experiments/shapes_pseudo_quality.py --out {out}{' --write-results' if write_results else ''}` ({minutes:.1f} min): each study run's attention "
             "labels and its round-1 pseudo-labels, scored against the colour masks of the same synthetic images. "
             "mIoU over certain pixels; 'wrong → fixed / kept': of the attention labels' certain but wrong pixels, the "
             "share the pseudo-label gets right / keeps certain and wrong; 'band → right / wrong': the same for the "
             "attention labels' uncertain pixels; 'right → wrong': certain, right attention pixels the pseudo-label "
             "makes wrong.", "",
             "| run | mode | attention mIoU | attention certain | pseudo mIoU | pseudo certain | wrong → fixed | wrong → kept | band → right | band → wrong | right → wrong |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['mode']} | {r['attention']['mIoU']:.3f} | {r['attention']['certain']:.3f} | "
                     f"{r['pseudo']['mIoU']:.3f} | {r['pseudo']['certain']:.3f} | {r['wrong_fixed']:.3f} | {r['wrong_kept']:.3f} | "
                     f"{r['unsure_right']:.3f} | {r['unsure_wrong']:.3f} | {r['right_broken']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("logs/shapes_study"), help="the study's --out")
    parser.add_argument("--runs", nargs="*", default=None, help="run names under <out>/runs (default: every run with pseudo_1)")
    add_write_results(parser)  # without it the section goes to <--out>/shapes.md
    args = parser.parse_args()
    runs_dir = args.out / "runs"
    if not runs_dir.is_dir():
        parser.error(f"--out {args.out}: no runs/ folder; run experiments/shapes_study.py --out {args.out} first")
    names = args.runs or sorted(p.name for p in runs_dir.iterdir() if (p / "pseudo_1" / "manifest.jsonl").is_file())
    t0 = time.time()
    rows = [run_rows(runs_dir / name) for name in names]
    text = section(rows, args.out, (time.time() - t0) / 60, args.write_results)
    results = run_folder("shapes_pseudo_quality", args.write_results, args.out) / "shapes.md"
    write_section(results, "pseudo", text, "The shapes world: measurements")
    print(text)
    print(f"wrote {results}")


if __name__ == "__main__":
    main()
