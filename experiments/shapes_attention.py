"""Attention quality of the tiny shapes text-to-image model (targets: right-object
>= 0.9, pointing >= 0.8, pseudo-mask mIoU >= 0.6).

One run scores the model's class-prompt attention on the shapes world, side by side:
1. real test images, noised at a few timesteps and read with their captions: pointing
   (a class map's peak on its object), right-object rate (two objects of different classes:
   each class map stronger on its own object; chance 0.5), pseudo-mask mIoU vs the true masks;
2. generated images (maps averaged over the denoising steps, as the method does), scored
   against their colour-derived masks (each class has its own colour family), plus how often
   the prompted classes were drawn at all.
Targets: right-object >= 0.9, pointing >= 0.8, pseudo-mask mIoU >= 0.6.

    python experiments/shapes_attention.py                        # the shipped model, a few minutes on CPU
    python experiments/shapes_attention.py --sampler-study --generated 200 --dpm-steps 10,20
                                                                  # preset sampler vs DPM-Solver++: label mIoU, time
    python experiments/shapes_attention.py --model logs/shapes_t2i/run/pipeline --real 100 --generated 32
    python experiments/shapes_attention.py --write-results        # update the shipped experiments/results/

Writes its section of ``shapes.md`` (``--sampler-study``: of ``bench_generation.md``) and the sample
grid ``shapes_attention_samples.png`` into ``outputs/experiments/shapes_attention/<time>/`` (printed),
or with ``--write-results`` into the shipped experiments/results/ (``--out``, ``--sampler-out``,
``--grid``: other paths). The section names the command that made it, ``--write-results`` included.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from dsdiff.data.classes import SHAPES_CLASSES  # noqa: E402
from dsdiff.data.shapes import ShapesDataset  # noqa: E402
from dsdiff.diffusion import SyntheticGenerator  # noqa: E402
from dsdiff.shapes_t2i.assets import SHAPES_T2I  # noqa: E402
from dsdiff.shapes_t2i.scoring import score_generated, score_real, world_records  # noqa: E402
from dsdiff.viz.samples import save_sample_grid  # noqa: E402

from _results import QUALITY_COLUMNS as COLUMNS, add_write_results, fmt, quality_table, run_folder, write_section  # noqa: E402  (experiments/_results.py)

RESULTS, SAMPLER_RESULTS, GRID = "shapes.md", "bench_generation.md", "shapes_attention_samples.png"  # in the run's folder
log = logging.getLogger("dsdiff")


def sampler_study(args, world) -> None:
    """conf/generator/shapes.yaml's settings with its own sampler vs DPM-Solver++ at fewer steps, on the
    same captions and seeds: label quality against the colour-derived masks, and seconds per image."""
    import yaml

    preset = yaml.safe_load((Path(__file__).parents[1] / "conf" / "generator" / "shapes.yaml").read_text())
    keys = ("cross_res", "self_res", "tau", "alpha", "beta", "guidance_scale")
    settings = {k: {**preset, **preset.get("labels", {})}[k] for k in keys}  # the label settings live under generator.labels
    records = world_records(world, list(range(args.generated)))
    seeds = list(range(1000, 1000 + len(records)))
    variants = [(f"model's own ({preset['scheduler'] or 'DDIM'})", preset["scheduler"], preset["num_inference_steps"])]
    variants += [("DPM-Solver++ (dpm-solver)", "dpm-solver", int(n)) for n in args.dpm_steps.split(",")]
    gens, summaries = [], []
    for name, scheduler, steps in variants:
        gen = SyntheticGenerator.from_pretrained(args.model, SHAPES_CLASSES, device="cpu", scheduler=scheduler,
                                                 num_inference_steps=steps, **settings)
        summary, _ = score_generated(gen, records, seeds)
        gens.append(gen)
        summaries.append(summary)
        print(f"{name}, {steps} steps: mIoU {summary['mIoU']:.3f}", flush=True)
    # Timing apart from scoring, interleaved over rounds, so a shared machine's load hits all alike.
    batch = records[:32]
    times = [[] for _ in gens]
    for _ in range(args.timing_rounds + 1):
        for i, gen in enumerate(gens):
            start = time.perf_counter()
            gen(batch, seeds[: len(batch)])
            times[i].append((time.perf_counter() - start) / len(batch))
    rows = [(name, type(gen.pipe.scheduler).__name__, steps, statistics.median(t[1:]), summary)
            for (name, _, steps), gen, t, summary in zip(variants, gens, times, summaries)]
    base_t, base_miou = rows[0][3], rows[0][4]["mIoU"]
    lines = [
        "## Faster sampler, equal labels (shapes world)",
        "",
        f"Written by `python experiments/shapes_attention.py --sampler-study --generated {args.generated} "
        f"--dpm-steps {args.dpm_steps} --timing-rounds {args.timing_rounds}{' --write-results' if args.write_results else ''}` (CPU, {args.threads} thread(s)). The shipped tiny model with "
        f"conf/generator/shapes.yaml's settings ({', '.join(f'{k} {settings[k]}' for k in keys)}), maps "
        f"averaged over all steps; {len(records)} test-split captions, the same seeds for every sampler; labels "
        "scored against the colour-derived masks (mIoU over certain pixels, background included), as the "
        "generated rows of experiments/results/shapes.md. Time: generation + labels per image, batch of 32, "
        f"median of {args.timing_rounds} interleaved rounds after a warm-up round.",
        "",
        "| sampler | scheduler class | steps | ms / image | speed-up | label mIoU | mIoU - preset | uncertain | pointing | right_object | drawn |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, cls, steps, seconds, s in rows:
        lines.append(f"| {name} | {cls} | {steps} | {seconds * 1e3:.1f} | {base_t / seconds:.2f}x | {s['mIoU']:.3f} "
                     f"| {s['mIoU'] - base_miou:+.3f} | {fmt(s['uncertain'])} | {fmt(s['pointing'])} "
                     f"| {fmt(s['right_object'])} | {fmt(s.get('drawn', ''))} |")
    write_section(Path(args.sampler_out), "sampler_study", "\n".join(lines), "bench_generation")
    print("\n".join(lines))
    print(f"wrote {args.sampler_out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(SHAPES_T2I), help="diffusers pipeline folder (default: the shipped model)")
    ap.add_argument("--real", type=int, default=200, help="test-split images to score")
    ap.add_argument("--timesteps", default="100,300,500", help="noise levels for real images (comma-separated)")
    ap.add_argument("--generated", type=int, default=64, help="images to generate (test-split captions)")
    ap.add_argument("--steps", type=int, default=25, help="denoising steps for generated images")
    ap.add_argument("--guidance", default="1,3", help="guidance scales for generated images (comma-separated)")
    ap.add_argument("--scheduler", default=None, help="sampler for generated images (dsdiff.diffusion.pipeline."
                    "SCHEDULERS, e.g. dpm-solver); default: the model's own (DDIM)")
    ap.add_argument("--sampler-study", action="store_true", help="only compare the generator preset's sampler with "
                    "DPM-Solver++ at --dpm-steps on generated images (label mIoU, time); writes a section of "
                    "bench_generation.md")
    ap.add_argument("--dpm-steps", default="10,15", help="DPM-Solver++ step counts for --sampler-study")
    ap.add_argument("--timing-rounds", type=int, default=3, help="interleaved timing rounds for --sampler-study")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help=f"the results file (default: {RESULTS} in the run's folder)")
    ap.add_argument("--sampler-out", default=None, help=f"--sampler-study's results file (default: {SAMPLER_RESULTS} there)")
    ap.add_argument("--grid", default=None, help=f"the sample grid (default: {GRID} there)")
    add_write_results(ap)
    args = ap.parse_args()
    logging.basicConfig(format="%(message)s")  # dsdiff's info lines (picture: ...) on stderr; other libraries stay quiet
    log.setLevel(logging.INFO)
    if None in ([args.sampler_out] if args.sampler_study else [args.out, args.grid]):  # a run folder for what has no path
        folder = run_folder("shapes_attention", args.write_results)
        print(f"results -> {folder}", flush=True)
        args.out = args.out or str(folder / RESULTS)
        args.sampler_out = args.sampler_out or str(folder / SAMPLER_RESULTS)
        args.grid = args.grid or str(folder / GRID)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    timesteps = [int(t) for t in args.timesteps.split(",")]
    guidances = [float(g) for g in args.guidance.split(",")]
    world = ShapesDataset("test", size=max(args.real, args.generated))

    def generator(cross_res=16, self_res=16, tau=4):
        return SyntheticGenerator.from_pretrained(args.model, SHAPES_CLASSES, device="cpu", cross_res=cross_res,
                                                  self_res=self_res, tau=tau, num_inference_steps=args.steps,
                                                  scheduler=args.scheduler)

    if args.sampler_study:
        sampler_study(args, world)
        return

    def setting(cross_res=16, self_res=16, tau=4):
        return f"cross {cross_res}, self {self_res}, tau {tau}"

    # (cross_res, self_res, tau). SD at 512 px reads cross-attention at 1/32 of the image and
    # self-attention at 1/16; the 32 px analogue is cross 8 (1/4), self 16 (1/2).
    variants = [dict(cross_res=8), dict(cross_res=8, tau=1), dict(cross_res=8, tau=0), dict(),
                dict(tau=0), dict(cross_res=8, self_res=8)]
    GRID_VARIANTS = (variants[0], variants[2])
    rows, grid = [], []
    real = list(range(args.real))
    for kw in variants:
        summary, samples = score_real(generator(**kw), world, real, timesteps)
        rows.append(("real", f"{setting(**kw)}; t = {args.timesteps}", summary))
        if kw in GRID_VARIANTS:
            grid += samples[:3]
    for t in timesteps:
        for kw in (dict(cross_res=8), dict(cross_res=8, tau=0)):
            summary, _ = score_real(generator(**kw), world, real, [t])
            rows.append(("real", f"{setting(**kw)}; t = {t} only", summary))
    records = world_records(world, list(range(args.generated)))
    seeds = list(range(1000, 1000 + len(records)))
    for g in guidances:
        for kw in variants[:5]:
            summary, samples = score_generated(generator(**kw), records, seeds, guidance_scale=g)
            rows.append(("generated", f"{setting(**kw)}; guidance {g:g}, {args.steps} steps", summary))
            if g == guidances[-1] and kw in GRID_VARIANTS:
                grid += samples[:3]
    minutes = (time.perf_counter() - started) / 60

    training = Path(args.model) / "training.json"
    trained = json.loads(training.read_text()) if training.is_file() else {}
    lines = [
        "## Attention quality of the tiny text-to-image model",
        "",
        f"Written by `{' '.join(['python experiments/shapes_attention.py', *sys.argv[1:]])}` ({minutes:.1f} min on CPU, {args.threads} thread(s)).",
        f"Model: `{os.path.relpath(args.model)}`" + (f" ({trained.get('steps')} steps, {trained.get('train_minutes')} training minutes)" if trained else "") + ".",
        f"Real: the first {args.real} test-split images, noised at t in {{{args.timesteps}}} (one noise draw each, attention "
        "averaged over them), read with `<caption>; <class words>`; truth = the true masks.",
        f"Generated: {len(records)} images from test-split captions, {args.steps} DDIM steps, maps averaged over all "
        "steps; truth = colour-derived masks (each class has its own colour family; on real images they equal the true masks).",
        "Grids are of the 32 px image's 16x16 / 8x8 UNet levels (self 16: N = 256); alpha 0.6, beta 0.5. right_object: two objects of different classes, is each "
        "class map's mean stronger on its own object (chance 0.5); mIoU over certain pixels (uncertain ones are "
        "ignored, their share is `uncertain`), background included. drawn: prompted classes whose colours appear "
        "(>= 8 px); extra: images showing an unprompted class colour.",
        "Targets: right-object >= 0.9, pointing >= 0.8, pseudo-mask mIoU >= 0.6.",
        "",
        *quality_table(rows),
    ]
    lines += ["", f"Sample grid `{Path(args.grid).name}` (image | class maps | label): 3 real rows for "
              "cross 8, self 16 with tau 4 then tau 0, then the same for generated images (last guidance)."]
    write_section(Path(args.out), "shapes_attention", "\n".join(lines), "The shapes world: measurements")
    log.info("picture: attention samples -> %s", save_sample_grid(grid, args.grid, SHAPES_CLASSES))
    print("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
