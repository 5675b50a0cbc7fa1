"""The shapes world as a measuring stick: synthetic-only vs real-label segmenters, and ablations.

Runs `python -m dsdiff.train` once per variant (each a config override of `shapes_deeplab`),
reads each run's metrics.json, and writes the segmentation section of
experiments/results/shapes.md (between `<!-- segmentation -->` markers; the attention section
written by experiments/shapes_attention.py is kept):

    python experiments/shapes_study.py                       # every variant, 1000 images, 300 steps
    python experiments/shapes_study.py --images 2000 --steps 600 --variants full real

Variants that share generation settings share a synthetic folder (`images_4x` extends the
`full` folder; training reads samples 0..N-1 of it).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "shapes.md"
START, END = "<!-- segmentation:start -->", "<!-- segmentation:end -->"

# name: (overrides, synthetic folder key or None for real labels, what the paper claims)
VARIANTS = {
    "real": (["+experiment=shapes_real"], None, "upper bound"),
    "full": ([], "base", "the method with this world's settings: cross 8, self 16, tau 1, band 0.5-0.6, class prompt, 1 self-training round"),
    "tau_0": (["generator.labels.tau=0"], "tau0", "no self-attention refinement: worse (paper: about -15 mIoU)"),
    "tau_2": (["generator.labels.tau=2"], "tau2", "(paper uses tau 4)"),
    "tau_4": (["generator.labels.tau=4"], "tau4", "the paper's tau"),
    "no_band": (["generator.labels.alpha=0.5", "generator.labels.beta=0.5"], "noband", "no uncertainty band: worse"),
    "caption_tokens": (["generator.labels.class_prompt=false"], "captok", "caption tokens instead of the class prompt: worse"),
    "no_selftrain": (["selftrain.rounds=0"], "base", "no self-training: worse"),
    "images_4x": (["synthetic.num_images={images4}"], "base", "4x the synthetic images: better"),
}


def run_variant(name: str, args, out: Path) -> dict:
    overrides, folder, _ = VARIANTS[name]
    run_dir = out / "runs" / name
    metrics_file = run_dir / "metrics.json"
    if metrics_file.is_file() and not args.rerun:
        return json.loads(metrics_file.read_text())
    cmd = [sys.executable, "-m", "dsdiff.train"]
    if folder is not None:
        cmd += ["+experiment=shapes_deeplab", f"synthetic.num_images={args.images}", f"synthetic.dir={out / 'synthetic' / folder}"]
    cmd += [o.format(images4=4 * args.images) for o in overrides]
    cmd += [f"max_steps={args.steps}", f"val_every={max(1, args.steps // 3)}", f"hydra.run.dir={run_dir}",
            f"paths.data_dir={out / 'data'}", "logger=csv", f"seed={args.seed}"]
    if "resume" not in " ".join(cmd) and (run_dir / "stages.json").is_file():
        cmd.append(f"resume={run_dir}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    t0 = time.time()
    print(f"[{name}] {' '.join(cmd[2:])}", flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "logs" / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"variant {name} failed (log: {out / 'logs' / f'{name}.log'}):\n{proc.stderr[-2000:]}")
    metrics = json.loads(metrics_file.read_text())
    metrics["minutes"] = round((time.time() - t0) / 60, 1)
    metrics_file.write_text(json.dumps(metrics, indent=2, sort_keys=True))
    print(f"[{name}] test/mIoU {metrics.get('test/mIoU'):.3f}  TTA {metrics.get('test/mIoU_tta'):.3f}  "
          f"({metrics['minutes']} min)", flush=True)
    return metrics


def table(results: dict[str, dict], args) -> str:
    real = results.get("real", {}).get("test/mIoU")
    full = results.get("full", {})
    rows = [
        START,
        "## Segmentation: synthetic-only vs real labels, and ablations",
        "",
        f"`python experiments/shapes_study.py --images {args.images} --steps {args.steps}`: "
        f"each variant trains the small DeepLabV3+ of `shapes_deeplab` for {args.steps} steps per stage on "
        f"{args.images} synthetic images (images_4x: {4 * args.images}), seed {args.seed}, and tests on the "
        "real shapes test split (500 images). `real` trains on the true train labels instead.",
        "",
        "| variant | test mIoU | test mIoU (TTA) | vs full | synthetic/real | minutes | paper's claim |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, metrics in results.items():
        miou, tta = metrics.get("test/mIoU"), metrics.get("test/mIoU_tta")
        delta = "" if name in ("full", "real") or "test/mIoU" not in full else f"{100 * (miou - full['test/mIoU']):+.1f}"
        ratio = "" if name == "real" or not real else f"{miou / real:.3f}"
        rows.append(f"| {name} | {100 * miou:.1f} | {100 * tta:.1f} | {delta} | {ratio} | {metrics.get('minutes', '')} | {VARIANTS[name][2]} |")
    if full and real:
        rows += ["", f"Synthetic-only / real-label mIoU: {full['test/mIoU'] / real:.3f} plain, "
                     f"{full['test/mIoU_tta'] / results['real']['test/mIoU_tta']:.3f} with TTA (target >= 0.85). "
                     f"TTA changes the full method's mIoU by {100 * (full['test/mIoU_tta'] - full['test/mIoU']):+.1f}."]
    rows += ["", "'vs full' is the change in plain test mIoU (points) against the full method; a negative number "
                 "means the ablated part helps here, as the paper claims.", END]
    return "\n".join(rows)


def write_section(text: str) -> None:
    old = RESULTS.read_text() if RESULTS.is_file() else "# The shapes world: measurements\n"
    if START in old and END in old:
        new = old[: old.index(START)] + text + old[old.index(END) + len(END):]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path("logs/shapes_study"))
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for the runs (0: leave as is)")
    parser.add_argument("--rerun", action="store_true", help="run variants again even if they have metrics")
    args = parser.parse_args()
    results = {}
    for name in args.variants:
        results[name] = run_variant(name, args, args.out.resolve())
        write_section(table(results, args))  # a partial table survives an interrupted study
    print(table(results, args))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
