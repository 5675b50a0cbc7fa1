"""The shapes world's tiny diffusion transformer (``generator=shapes_dit``): which blocks, map kind and tau label best.

Every setting is scored on real **val-split** images (the tune split: the choice reads nothing of the
test split) noised at a few timesteps and read with `<caption>; <class words>`, against their true masks:
pointing, right-object rate and pseudo-mask mIoU, with the shipped UNet model beside it. The best
setting by val mIoU (among those meeting right-object >= 0.95 and pointing >= 0.9; the cross maps' blocks
and kind first, then the self maps' blocks and tau) is then reported once on the test split and on generated images (colour-derived masks):

    python experiments/shapes_dit.py                                  # the shipped model, minutes on CPU
    python experiments/shapes_dit.py --model logs/shapes_dit/run/pipeline --real 100
    python experiments/shapes_dit.py --write-results                  # update experiments/results/shapes.md

Writes its section of ``shapes.md`` and ``shapes_dit_samples.png`` (real val rows, then generated rows).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402

from dsdiff.data.classes import SHAPES_CLASSES  # noqa: E402
from dsdiff.data.shapes import ShapesDataset  # noqa: E402
from dsdiff.diffusion import SyntheticGenerator  # noqa: E402
from dsdiff.shapes_t2i.assets import SHAPES_DIT, SHAPES_T2I  # noqa: E402
from dsdiff.shapes_t2i.scoring import score_generated, score_real, world_records  # noqa: E402
from dsdiff.viz.samples import save_sample_grid  # noqa: E402

from _results import QUALITY_COLUMNS as COLUMNS, add_write_results, fmt, quality_table, run_folder, write_section  # noqa: E402  (experiments/_results.py)

RESULTS, GRID = "shapes.md", "shapes_dit_samples.png"
CONF = Path(__file__).parents[1] / "conf" / "generator"
log = logging.getLogger("dsdiff")


def preset(name: str) -> dict:
    """conf/generator/<name>.yaml's label settings and sampling, as SyntheticGenerator keywords."""
    cfg = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    labels = {k: v for k, v in cfg["labels"].items() if not k.startswith("_")}
    return {**labels, "num_inference_steps": cfg["num_inference_steps"], "guidance_scale": cfg["guidance_scale"]}


def variants(n_blocks: int) -> list[dict]:
    """For both map kinds: cross maps from every block alone, adjacent pairs and all blocks, the self maps
    (the refinement's) from all blocks in every case, so each row varies the cross maps only."""
    every = f"0-{n_blocks - 1}"
    blocks = [[b] for b in range(n_blocks)] + [f"{b}-{b + 1}" for b in range(n_blocks - 1)] + [every]
    return [dict(blocks=b, self_blocks=every, maps=m) for m in ("attention", "output") for b in blocks]


def name(kw: dict) -> str:
    def blocks(value):
        return "all" if value is None else "-".join(map(str, value)) if isinstance(value, list) else value

    return ", ".join(f"{k} {blocks(v) if k.endswith('blocks') else v}" for k, v in kw.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(SHAPES_DIT), help="an SD3-layout pixel-space pipeline folder (default: the shipped one)")
    ap.add_argument("--real", type=int, default=200, help="real images per split")
    ap.add_argument("--timesteps", default="100,300,500", help="noise levels for real images (t / 1000 = flow-matching s)")
    ap.add_argument("--generated", type=int, default=64, help="images to generate with the chosen setting")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help=f"the results file (default: {RESULTS} in the run's folder)")
    ap.add_argument("--grid", default=None, help=f"the sample grid (default: {GRID} there)")
    add_write_results(ap)
    args = ap.parse_args()
    logging.basicConfig(format="%(message)s")
    log.setLevel(logging.INFO)
    if args.out is None or args.grid is None:
        folder = run_folder("shapes_dit", args.write_results)
        args.out, args.grid = args.out or str(folder / RESULTS), args.grid or str(folder / GRID)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    timesteps = [int(t) for t in args.timesteps.split(",")]
    base = preset("shapes_dit")
    unet = preset("shapes")
    val, test = ShapesDataset("val", size=args.real), ShapesDataset("test", size=max(args.real, args.generated))
    indices = list(range(args.real))

    def generator(model, settings, **kw):
        return SyntheticGenerator.from_pretrained(model, SHAPES_CLASSES, device="cpu", **{**settings, **kw})

    n_blocks = len(generator(args.model, base).pipe.transformer.transformer_blocks)
    rows, scored = [], []
    summary, _ = score_real(generator(SHAPES_T2I, unet), val, indices, timesteps)
    rows.append(("val", "UNet model (generator=shapes)", summary))
    def score(kw):
        summary, samples = score_real(generator(args.model, base, **kw), val, indices, timesteps)
        rows.append(("val", name(kw), summary))
        scored.append((kw, summary, samples))
        print(f"val {name(kw)}: " + ", ".join(f"{c} {fmt(summary[c])}" for c in COLUMNS), flush=True)

    def best(candidates):
        meets = [s for s in candidates if s[1]["right_object"] >= 0.95 and s[1]["pointing"] >= 0.9] or candidates
        return max(meets, key=lambda s: s[1]["mIoU"])

    for kw in variants(n_blocks):
        score(kw)
    chosen = best(scored)[0]  # then, at the best cross maps: the self maps' blocks, and tau
    more = [{**chosen, "self_blocks": [b]} for b in range(n_blocks)] + [{**chosen, "self_blocks": chosen["blocks"]}]
    more += [{**chosen, "tau": tau} for tau in sorted({0, 1, 2, 4} - {base["tau"]})]
    for kw in [kw for k, kw in enumerate(more) if kw not in more[:k] and kw != chosen]:
        score(kw)
    best_kw, _, best_samples = best(scored)
    summary, _ = score_real(generator(SHAPES_T2I, unet), test, indices, timesteps)
    rows.append(("test", "UNet model (generator=shapes)", summary))
    summary, _ = score_real(generator(args.model, base, **best_kw), test, indices, timesteps)
    rows.append(("test", f"chosen: {name(best_kw)}", summary))
    records = world_records(test, list(range(args.generated)))
    seeds = list(range(1000, 1000 + len(records)))
    summary, generated = score_generated(generator(args.model, base, **best_kw), records, seeds)
    rows.append(("generated", f"chosen: {name(best_kw)}; guidance {base['guidance_scale']}, "
                              f"{base['num_inference_steps']} steps", summary))
    minutes = (time.perf_counter() - started) / 60

    training = Path(args.model) / "training.json"
    trained = json.loads(training.read_text()) if training.is_file() else {}
    shown = {k: v for k, v in base.items() if k not in ("num_inference_steps", "guidance_scale")}
    lines = [
        "## Attention quality of the tiny diffusion transformer (`generator=shapes_dit`)",
        "",
        f"Written by `{' '.join(['python experiments/shapes_dit.py', *sys.argv[1:]])}` ({minutes:.1f} min on CPU, "
        f"{args.threads} thread(s)). Model: `{os.path.relpath(args.model)}`"
        + (f" ({trained.get('steps')} steps, {trained.get('train_minutes')} training minutes)" if trained else "") + ".",
        f"Real: the first {args.real} images of a split, noised at t in {{{args.timesteps}}} (flow matching: "
        "s = t / 1000, one noise draw each, maps averaged over them), read with `<caption>; <class words>`; truth = "
        "the true masks. Settings are chosen on **val** only (the best mIoU among those with right-object >= 0.95 "
        "and pointing >= 0.9); the test rows report the choice once, beside the UNet model at its own settings "
        "(conf/generator/shapes.yaml). Generated: test-split captions, truth = colour-derived masks.",
        f"Base settings (conf/generator/shapes_dit.yaml as this ran): {', '.join(f'{k} {v}' for k, v in shown.items())}; each row "
        "changes what it names. Maps at the 16x16 token grid; `maps output`: ConceptAttention's output-space maps.",
        "Targets: right-object >= 0.95, pointing >= 0.9, pseudo-mask mIoU >= 0.6.",
        "",
        *quality_table(rows),
    ]
    lines += ["", f"Sample grid `{Path(args.grid).name}` (image | class maps | label): 3 real val rows, then 3 "
              "generated rows, at the chosen setting."]
    write_section(Path(args.out), "shapes_dit", "\n".join(lines), "The shapes world: measurements")
    log.info("picture: attention samples -> %s", save_sample_grid(best_samples[:3] + generated[:3], args.grid, SHAPES_CLASSES))
    print("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
