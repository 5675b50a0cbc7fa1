"""The shapes world as a measuring stick: synthetic-only vs real-label segmenters, and ablations.

Runs `python -m dsdiff.train` once per variant (each a config override of `shapes_deeplab`),
reads each run's metrics.json, and writes the segmentation section of ``<--out>/shapes.md``, or with
``--write-results`` of the shipped experiments/results/shapes.md (between `<!-- segmentation -->`
markers; the attention section written by experiments/shapes_attention.py is kept). The table names
the command that made it, ``--write-results`` included, so rerunning that command remakes it:

    python experiments/shapes_study.py                       # every variant, 1000 images, 300 steps, 1 seed
    python experiments/shapes_study.py --seeds 3 --write-results   # and update experiments/results/shapes.md
    python experiments/shapes_study.py --seeds 3             # 3 training seeds each: mean, sd, paired 95% intervals
    python experiments/shapes_study.py --images 2000 --steps 600 --variants full real

Variants that share generation settings share a synthetic folder (`images_4x` extends the
`full` folder; training reads samples 0..N-1 of it). With ``--seeds N`` every variant trains with
seeds ``--seed``, ``--seed + 1``, ...; the synthetic folders are the same for every seed, so the
spread is the training's. Each ablation is compared with ``full`` seed by seed (a paired 95% t
interval over the per-seed differences), and the table says "better", "worse" or "no evidence"
from that interval. Every run keeps its own dir (``runs/<variant>-s<seed>``), so an interrupted
study resumes where it stopped.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from dsdiff.utils.io import write_json_atomic

from _results import add_write_results, run_folder, write_section  # experiments/_results.py
from shapes_pseudo_quality import folder_score
from _stats import mean_sd, paired_interval, spearman, spearman_p, verdict

RESULTS = Path(__file__).parent / "results" / "shapes.md"

# Every synthetic variant starts from shapes_deeplab with the paper's self-training (whatever the shapes
# default is), then applies its own overrides.
PAPER_SELFTRAIN = ["selftrain.mode=replace", "selftrain.tta=false", "selftrain.init=scratch"]
# name: (overrides, synthetic folder key or None for real labels, what the paper claims)
VARIANTS = {
    "real": (["+experiment=shapes_real"], None, "upper bound"),
    "full": ([], "base",
             "the paper's method with this world's labelling settings: cross 8, self 16, tau 1, band 0.5-0.6, class prompt, "
             "1 self-training round (replace)"),
    "tau_0": (["generator.labels.tau=0"], "tau0", "no self-attention refinement: worse (paper: about -15 mIoU)"),
    "tau_2": (["generator.labels.tau=2"], "tau2", "(paper uses tau 4)"),
    "tau_4": (["generator.labels.tau=4"], "tau4", "the paper's tau"),
    "no_band": (["generator.labels.alpha=0.5", "generator.labels.beta=0.5"], "noband", "no uncertainty band: worse"),
    "caption_tokens": (["generator.labels.class_prompt=false"], "captok", "caption tokens instead of the class prompt: worse"),
    "no_selftrain": (["selftrain.rounds=0"], "base", "no self-training: worse"),
    "selftrain_agree": (["selftrain.mode=agree"], "base", "(not the paper's) self-training that keeps agreeing labels, fills the band"),
    "selftrain_agree_tta": (["selftrain.mode=agree", "selftrain.tta=true"], "base", "(not the paper's) agree, the teacher predicting with TTA"),
    "selftrain_teacher": (["selftrain.mode=agree", "selftrain.tta=true", "selftrain.init=teacher"], "base",
                          "(not the paper's) agree + TTA, the student fine-tuned from the teacher instead of from scratch"),
    "images_4x": (["synthetic.num_images={images4}"], "base", "4x the synthetic images: better"),
    "mask2former": (["selftrain.rounds=0", "model=mask2former_small"], "base",
                    "(another segmenter) a small Mask2Former on the same labels, no self-training; compared with no_selftrain "
                    "(paper, R50 on VOC: 60.2 vs DeepLabV3's 61.6)"),
    "dit": (["selftrain.rounds=0", "generator=shapes_dit"], "dit",
            "(another generator) labels from the tiny diffusion transformer (generator=shapes_dit, SD3 layout) for the "
            "same captions and seeds, no self-training; compared with no_selftrain (the UNet model's labels)"),
}


# variants that change only how attention becomes labels: `--score-labels` scores each on the tune split
LABELLING = [name for name, (overrides, folder, _) in VARIANTS.items()
             if name == "full" or (folder is not None and overrides and all(o.startswith("generator.labels.") for o in overrides))]


def _run(cmd: list[str], args, log_file: Path, what: str) -> float:
    """Run one job with the study's environment, keep its log; returns its minutes."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    t0 = time.time()
    print(f"[{what}] {' '.join(cmd[2:])}", flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (log: {log_file}):\n{proc.stderr[-2000:]}")
    return round((time.time() - t0) / 60, 1)


def _model(args) -> list[str]:
    """The generator override of ``--model`` (none: the experiment's own, the shipped shapes model)."""
    return [f"generator.model={Path(args.model).resolve()}"] if args.model else []


def check_study(out: Path, args) -> None:
    """An --out holds one generator's study: record the model's digest on first use, refuse another model
    later (its synthetic folders, runs and scores would mix two models)."""
    from dsdiff.diffusion.pipeline import folder_digest
    from dsdiff.shapes_t2i.assets import SHAPES_T2I

    model = Path(args.model).resolve() if args.model else Path(SHAPES_T2I)
    if not (model / "model_index.json").is_file():
        sys.exit(f"--model {model}: not a diffusers pipeline folder (no model_index.json)")
    here = {"model": str(model), "model_digest": folder_digest(model)}
    record = out / "study.json"
    if record.is_file():
        was = json.loads(record.read_text())
        if was.get("model_digest") != here["model_digest"]:
            sys.exit(f"--out {out} holds a study of the generator {was.get('model')} (digest "
                     f"{str(was.get('model_digest'))[:12]}), not {model} ({here['model_digest'][:12]}): pass that "
                     "--model, or another --out")
    elif not args.no_train or args.score_labels:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(record, here)
    args.model_digest = here["model_digest"]


def score_variant(name: str, args, out: Path) -> dict:
    """``python -m dsdiff.score_labels`` with the variant's labelling settings: its label_scores.json."""
    run_dir = out / "scores" / name
    result_file = run_dir / "label_scores.json"
    if result_file.is_file() and not args.rerun:
        return json.loads(result_file.read_text())
    cmd = [sys.executable, "-m", "dsdiff.score_labels", "+experiment=shapes_deeplab", *_model(args), *VARIANTS[name][0],
           f"score.images={args.score_images}", f"score.dir={out / 'scores' / 'results'}", f"hydra.run.dir={run_dir}",
           f"paths.data_dir={out / 'data'}", "logger=csv"]
    minutes = _run(cmd, args, out / "logs" / f"score-{name}.log", f"score {name}")
    result = json.loads(result_file.read_text())
    result["minutes"] = minutes
    write_json_atomic(result_file, result)
    print(f"[score {name}] labels/mIoU {result['labels/mIoU']:.3f}  uncertain {result['labels/uncertain']:.3f} ({minutes} min)",
          flush=True)
    return result


def _fmt(value) -> str:
    return "" if value is None else f"{value:.3f}"


def correlation_table(scores: dict[str, dict], results: dict[str, dict[int, dict]], args) -> list[str]:
    """labels/mIoU (tune split, minutes) against the segmenter's mean test mIoU (hours): is the cheap score a proxy?"""
    names = [n for n in scores if results.get(n)]
    generated = {n: folder_score(args.out.resolve() / "synthetic" / VARIANTS[n][1], args.images) for n in names
                 if (args.out.resolve() / "synthetic" / VARIANTS[n][1] / "manifest.jsonl").is_file()}
    rows = ["", "### Label scores as a proxy for the segmenter",
            "",
            f"`python experiments/shapes_study.py --score-labels --score-images {args.score_images}` runs "
            f"`python -m dsdiff.score_labels +experiment=shapes_deeplab {'generator.model=<--model> ' if args.model else ''}"
            f"<variant's overrides> score.images={args.score_images}` "
            "for every variant that changes only the labelling settings: the first tune (val) images, noised at t = "
            "100/300/500, labelled with the variant's settings and scored against the true masks. The segmenter "
            "column is the table above's mean plain test mIoU. 'generated' scores the labels the segmenter trained on "
            "instead: the variant's synthetic folder against its images' colour masks (experiments/shapes_pseudo_quality.py; "
            "a check only the shapes world allows).",
            "",
            "| variant | labels/mIoU | uncertain | pointing | right_object | generated: mIoU | generated: certain | segmenter test mIoU (mean) | minutes |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for n in names:
        s, seg = scores[n], mean_sd([m["test/mIoU"] for m in results[n].values()])[0]
        rows.append(f"| {n} | {_fmt(s['labels/mIoU'])} | {_fmt(s['labels/uncertain'])} | {_fmt(s.get('labels/pointing'))} | "
                    f"{_fmt(s.get('labels/right_object'))} | {_fmt(generated.get(n, {}).get('mIoU'))} | "
                    f"{_fmt(generated.get(n, {}).get('certain'))} | {100 * seg:.1f} | {s.get('minutes', '')} |")
    if len(names) >= 3:
        x = [scores[n]["labels/mIoU"] for n in names]
        y = [mean_sd([m["test/mIoU"] for m in results[n].values()])[0] for n in names]
        p = f", one-sided exact permutation p = {spearman_p(x, y):.4f}" if len(names) <= 8 else ""
        rows += ["", f"Spearman rank correlation over {len(names)} variants: rho = {spearman(x, y):.3f}{p} (target >= 0.8)."]
        if len(generated) == len(names):
            g = [generated[n]["mIoU"] for n in names]
            rows.append(f"The generated images' label mIoU against the same segmenter means: rho = {spearman(g, y):.3f}, "
                        f"one-sided exact permutation p = {spearman_p(g, y):.4f}.")
    return rows


def _metrics_file(out: Path, name: str, seed: int) -> Path:
    return out / "runs" / f"{name}-s{seed}" / "metrics.json"


def _finished(out: Path, todo: list[tuple[int, str]]) -> dict[str, dict[int, dict]]:
    results: dict[str, dict[int, dict]] = {}
    for seed, name in todo:
        if _metrics_file(out, name, seed).is_file():
            results.setdefault(name, {})[seed] = json.loads(_metrics_file(out, name, seed).read_text())
    return results


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _folder_ready(out: Path, name: str, args) -> bool:
    """The variant's synthetic folder holds every sample the variant reads (its runs only read it)."""
    manifest = out / "synthetic" / VARIANTS[name][1] / "manifest.jsonl"
    needed = 4 * args.images if name == "images_4x" else args.images
    return manifest.is_file() and sum(1 for _ in manifest.open()) >= needed


def _claim(out: Path, key: str, folder: str | None, ready: bool) -> bool:
    """Claim job ``key`` (a run ``<variant>-s<seed>``, or ``score-<variant>``) for this worker (``<out>/locks``):
    not if another worker holds it. A run that must still write its synthetic ``folder`` (not ``ready``) waits
    until no other run uses that folder; a run that only reads it waits while another writes it. Stale
    claims (their worker is gone) are dropped."""
    locks = out / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / "claims", "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # one worker decides at a time
        held: list[tuple[str, str]] = []  # (folder, "r" | "w") of the live claims
        for lock in locks.glob("*.lock"):
            pid, their_folder, their_mode = (lock.read_text().split() + ["0", "-", "r"])[:3]
            if _alive(int(pid)):
                held.append((their_folder, their_mode))
            else:
                lock.unlink(missing_ok=True)
        mode = "r" if folder is None or ready else "w"
        lock = locks / f"{key}.lock"
        if lock.exists() or any(f == folder and (mode == "w" or m == "w") for f, m in held):
            return False
        lock.write_text(f"{os.getpid()} {folder or '-'} {mode}")
        return True


def _release(out: Path, key: str) -> None:
    (out / "locks" / f"{key}.lock").unlink(missing_ok=True)


def _scores(out: Path, names: list[str]) -> dict[str, dict]:
    files = {name: out / "scores" / name / "label_scores.json" for name in names}
    return {name: json.loads(f.read_text()) for name, f in files.items() if f.is_file()}


def run_variant(name: str, seed: int, args, out: Path) -> dict:
    overrides, folder, _ = VARIANTS[name]
    run_dir = out / "runs" / f"{name}-s{seed}"
    metrics_file = run_dir / "metrics.json"
    if metrics_file.is_file() and not args.rerun:
        return json.loads(metrics_file.read_text())
    cmd = [sys.executable, "-m", "dsdiff.train"]
    if folder is not None:
        cmd += ["+experiment=shapes_deeplab", *_model(args), *PAPER_SELFTRAIN, f"synthetic.num_images={args.images}",
                f"synthetic.dir={out / 'synthetic' / folder}"]
    cmd += [o.format(images4=4 * args.images) for o in overrides]
    cmd += [f"max_steps={args.steps}", f"val_every={max(1, args.steps // 3)}", f"hydra.run.dir={run_dir}",
            f"paths.data_dir={out / 'data'}", "logger=csv", f"seed={seed}"]
    if "resume" not in " ".join(cmd) and (run_dir / "stages.json").is_file():
        cmd.append(f"resume={run_dir}")
    minutes = _run(cmd, args, out / "logs" / f"{name}-s{seed}.log", f"{name} seed {seed}")
    metrics = json.loads(metrics_file.read_text())
    metrics["minutes"] = minutes
    write_json_atomic(metrics_file, metrics)
    print(f"[{name} seed {seed}] test/mIoU {metrics.get('test/mIoU'):.3f}  TTA {metrics.get('test/mIoU_tta'):.3f}  "
          f"({metrics['minutes']} min)", flush=True)
    return metrics


def _cell(values: list[float]) -> str:
    if not values:  # a metric the runs did not record (tune/mIoU without a tune split)
        return ""
    mean, sd = mean_sd(values)
    return f"{100 * mean:.1f}" + ("" if sd is None else f" ± {100 * sd:.1f}")


def _paired(results: dict[str, dict[int, dict]], name: str, ref: str, key: str = "test/mIoU", ref_key: str | None = None):
    """(delta cell, verdict) of ``name`` against ``ref`` over the seeds both have (pairs share a seed)."""
    seeds = sorted(set(results.get(name, {})) & set(results.get(ref, {})))
    a = [results[name][s][key] for s in seeds]
    b = [results[ref][s][ref_key or key] for s in seeds]
    if len(seeds) >= 2:
        mean, low, high = paired_interval(a, b)
        return f"{100 * mean:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]", verdict(low, high)
    return (f"{100 * (a[0] - b[0]):+.1f}", "") if seeds else ("", "")


SELFTRAIN = ("full", "selftrain_agree", "selftrain_agree_tta", "selftrain_teacher")  # one round each; compared with no_selftrain
SEGMENTERS = ("mask2former", "dit")  # another segmenter, or another generator's labels; compared with no_selftrain


def table(results: dict[str, dict[int, dict]], args, scores: dict[str, dict] | None = None) -> str:
    """``results[variant][seed]``: the run's metrics."""
    def col(name, key):
        return [m[key] for _, m in sorted(results.get(name, {}).items()) if m.get(key) is not None]

    seeds = [args.seed + k for k in range(args.seeds)]
    rows = [
        "## Segmentation: synthetic-only vs real labels, and ablations"
        + ("" if args.section == "segmentation" else f" (`--section {args.section}`)"),
        "",
        f"`python experiments/shapes_study.py --images {args.images} --steps {args.steps} --seeds {args.seeds}"
        + (f" --model {args.model}" if args.model else "")
        + (f" --section {args.section}" if args.section != "segmentation" else "")
        + (f" --variants {' '.join(args.variants)}" if list(args.variants) != list(VARIANTS) else "")
        + (" --score-labels" if args.score_labels else "")
        + (" --write-results" if getattr(args, "write_results", False) else "")
        + f"` (generator: {'`' + args.model + '`' if args.model else 'the shipped shapes model'}, digest "
        f"`{getattr(args, 'model_digest', '?')}`): "
        f"each variant trains the small DeepLabV3+ of `shapes_deeplab` for {args.steps} steps per stage on "
        f"{args.images} synthetic images (images_4x: {4 * args.images}), training seeds {seeds} (the synthetic "
        "folders are the same for every seed), and tests on the real shapes test split (500 images). `real` "
        "trains on the true train labels instead. 'tune mIoU' is the final stage's mIoU on the tune split (the world's "
        "val split, disjoint from test): what a choice between variants may read. Cells are the mean ± sd over seeds; 'vs full' is the mean "
        "per-seed difference in plain test mIoU (points) with its paired 95% t interval, and the verdict reads "
        "that interval (one seed: no interval, no verdict).",
        "",
        "| variant | seeds | tune mIoU | test mIoU | test mIoU (TTA) | vs full [95% CI] | verdict | synthetic/real (TTA) | minutes | paper's claim |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |",
    ]
    real_tta = col("real", "test/mIoU_tta")
    for name, runs in results.items():
        miou, tta = col(name, "test/mIoU"), col(name, "test/mIoU_tta")
        if not miou:
            continue
        delta, call = _paired(results, name, "full") if name not in ("full", "real") else ("", "")
        ratio = "" if name == "real" or not real_tta or not tta else f"{mean_sd(tta)[0] / mean_sd(real_tta)[0]:.3f}"
        minutes = round(sum(m.get("minutes", 0) or 0 for m in runs.values()), 1)
        rows.append(f"| {name} | {len(miou)} | {_cell(col(name, 'tune/mIoU'))} | {_cell(miou)} | {_cell(tta)} | {delta} | {call} | {ratio} | {minutes} | {VARIANTS[name][2]} |")
    full, real = col("full", "test/mIoU"), col("real", "test/mIoU")
    if full and real:
        rows += ["", f"Synthetic-only / real-label mIoU (means): {mean_sd(full)[0] / mean_sd(real)[0]:.3f} plain, "
                     f"{mean_sd(col('full', 'test/mIoU_tta'))[0] / mean_sd(real_tta)[0]:.3f} with TTA (target >= 0.90 with TTA)."]
    rows += ["", "'better' / 'worse': the variant's interval against full lies wholly above / below zero. For an "
                 "ablation that removes a part, 'worse' is evidence that the part helps, as the paper claims."]
    paired = ([(n, "no_selftrain", key, None) for n in SELFTRAIN + SEGMENTERS for key in ("test/mIoU", "test/mIoU_tta")]
              + [(n, n, "test/mIoU_tta", "test/mIoU") for n in ("full", "real")])
    paired = [p for p in paired if results.get(p[0]) and results.get(p[1])]
    if paired:
        rows += ["", "### Self-training against none, another segmenter or generator, and TTA against none", "",
                 "Paired over seeds as above: one self-training round against `no_selftrain` (the same first stage: same "
                 "seed, same labels), plain and with TTA on both sides; a Mask2Former trained on the same labels with the "
                 "same seed and steps against `no_selftrain`'s DeepLabV3+; DeepLabV3+ on the diffusion "
                 "transformer's labels (`dit`) against the same on the UNet model's; and each run's TTA test mIoU against its own "
                 "plain test mIoU.", "",
                 "| comparison | seeds | difference [95% CI] | verdict |", "| --- | ---: | ---: | --- |"]
        for name, ref, key, ref_key in paired:
            delta, call = _paired(results, name, ref, key, ref_key)
            what = (f"{name}: TTA vs plain" if ref == name else
                    f"{name} vs no_selftrain" + (", both with TTA" if key == "test/mIoU_tta" else ""))
            n = len(set(results[name]) & set(results[ref]))
            rows.append(f"| {what} | {n} | {delta} | {call} |")
    if scores:
        rows += correlation_table(scores, results, args)
    return "\n".join(rows)


def write_results(text: str, section: str = "segmentation", path: Path = RESULTS) -> None:
    write_section(path, section, text, "The shapes world: measurements")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=42, help="the first training seed")
    parser.add_argument("--seeds", type=int, default=1, help="training seeds per variant (2 or more for intervals)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path("logs/shapes_study"))
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for the runs (0: leave as is)")
    parser.add_argument("--rerun", action="store_true", help="run variants again even if they have metrics")
    parser.add_argument("--score-labels", action="store_true",
                        help=f"also score each labelling variant ({', '.join(LABELLING)}) with dsdiff.score_labels, and "
                             "rank-correlate labels/mIoU with the segmenter's mean test mIoU")
    parser.add_argument("--score-images", type=int, default=200, help="tune images per score_labels run")
    parser.add_argument("--model", default=None, help="generator: a diffusers pipeline folder for every synthetic "
                        "variant and score (default: the experiment's own, the shipped shapes model); use its own --out")
    parser.add_argument("--section", default="segmentation",
                        help="the marked section of shapes.md to write (a study of another --model "
                             "keeps the main study's table)")
    parser.add_argument("--no-train", action="store_true", help="train nothing: tabulate the runs that have metrics")
    add_write_results(parser)  # without it the table goes to <--out>/shapes.md
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: use 1 or more")
    out = args.out.resolve()
    check_study(out, args)
    results = run_folder("shapes_study", args.write_results, out) / "shapes.md"
    print(f"results -> {results}", flush=True)
    labelling = [name for name in LABELLING if name in args.variants] if args.score_labels else []
    for name in labelling:  # minutes each; workers split them as they split the runs
        if (args.rerun or not (out / "scores" / name / "label_scores.json").is_file()) and _claim(out, f"score-{name}", None, True):
            try:
                score_variant(name, args, out)
            finally:
                _release(out, f"score-{name}")
    todo = [(seed, name) for seed in range(args.seed, args.seed + args.seeds) for name in args.variants]  # seed by seed
    done: set[tuple[int, str]] = set()  # run by this worker now (--rerun: once)
    while not args.no_train:
        left = [(seed, name) for seed, name in todo
                if (seed, name) not in done and (args.rerun or not _metrics_file(out, name, seed).is_file())]
        claimed = next(((seed, name) for seed, name in left
                        if _claim(out, f"{name}-s{seed}", VARIANTS[name][1], VARIANTS[name][1] is None or _folder_ready(out, name, args))),
                       None)
        if claimed is None:
            if not left:
                break
            time.sleep(15)  # what is left runs in another worker (or waits for a synthetic folder another one writes)
            continue
        seed, name = claimed
        try:
            run_variant(name, seed, args, out)
        finally:
            _release(out, f"{name}-s{seed}")
        done.add(claimed)
        write_results(table(_finished(out, todo), args, _scores(out, labelling)), args.section, results)  # a partial table survives an interruption
    text = table(_finished(out, todo), args, _scores(out, labelling))
    write_results(text, args.section, results)
    print(text)
    print(f"wrote {results}")


if __name__ == "__main__":
    main()
