"""Benchmark: the cost of attention recording, and iterated refinement vs matrix_power.

One run measures, side by side on the same pipeline, seeds and steps:
1. time and peak memory per image of the plain diffusers pipeline (SDPA everywhere) vs
   dsdiff's SyntheticGenerator (recording processors + labels), per batch size, on a UNet
   with Stable Diffusion 2.1-base's exact layout (``--arch sd21``; reduced width on CPU)
   or SD 1.x's (``--arch sd1``), random weights (attention cost does not depend on them);
2. ``attention_to_labels`` with iterated products (dsdiff) vs ``torch.linalg.matrix_power``
   at N = 1024 and 4096 self-attention positions (N = 1024 is SD's 32x32 map: the labels'
   cost per image);
3. optionally (``--original DIR``, a checkout of the original repository fetched by you), the original's
   recorder and label rule on the same UNet, prompts and seeds: time, peak memory, stored-map volume
   per image and label agreement (``experiments/_original.py``; nothing of it is copied into dsdiff);
4. optional speed switches, each against the same run without it: channels-last UNet
   (``--channels-last``), ``torch.compile`` of the UNet with the recorders installed
   (``--compile``), and larger batches for dsdiff alone (``--probe-batches``).
Targets (GPU): recording <= 1.05x time and <= 1.10x peak memory of plain diffusers.

    python experiments/bench_generation.py                      # CPU: SD 2.1 layout at width 40, 512px
    python experiments/bench_generation.py --device cuda --dtype fp16 --batch 1 8 --steps 20
    python experiments/bench_generation.py --write-results      # update the shipped experiments/results/

Writes its section of ``bench_generation.md`` into ``outputs/experiments/bench_generation/<time>/``
(printed), or with ``--write-results`` of experiments/results/bench_generation.md (``--out``: another
path); the section names the command that made it.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor2_0  # noqa: E402

from dsdiff.data.classes import VOC_CLASSES  # noqa: E402
from dsdiff.diffusion import SyntheticGenerator, attention_to_labels  # noqa: E402
from dsdiff.diffusion import attention  # noqa: E402
from dsdiff.diffusion.attention import RecordingAttnProcessor  # noqa: E402
from dsdiff.diffusion.masks import labels_from_maps, minmax_normalise, refine, upsample  # noqa: E402
from dsdiff.utils.io import write_json_atomic  # noqa: E402
from dsdiff.testing.tiny_sd import build_sd_shaped_pipeline  # noqa: E402

from _results import add_write_results, run_folder, write_section  # noqa: E402  (experiments/_results.py)

RESULTS = "bench_generation.md"  # in the run's folder
PROMPTS = ["a photo of a dog on a sofa", "a person riding a horse", "a cat next to a bottle", "a bus in the street"]


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak, or the process's peak RSS (VmHWM) on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    @staticmethod
    def _rss(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no {field} in /proc/self/status")

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        else:
            gc.collect()
            try:  # hand freed heap back to the OS so the RSS peak reflects this call's own needs
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except (OSError, AttributeError):
                pass
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.before = self._rss("VmRSS:")
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.peak = self._rss("VmHWM:")
        self.extra = self.peak - self.before


def build_sd21_pipeline(*, width: int = 320, text_dim: int = 1024, text_layers: int = 23, vae_width: int = 128,
                        norm_groups: int = 32, image_size: int = 512, seed: int = 0):
    """Stable Diffusion 2.1-base's UNet, text encoder (OpenCLIP ViT-H text tower) and VAE, built from
    their published configuration values with random weights; smaller ``width``/``text_dim`` keep
    the block layout and head counts at reduced width (CPU). The tokenizer is the tiny test BPE: prompts
    are padded to 77 tokens either way, so the text encoder and cross-attention see SD's sequence length."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dsdiff.testing.tiny_sd import build_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=image_size // 8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(width, 2 * width, 4 * width, 4 * width),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=(5, 10, 20, 20),  # diffusers reads SD 2's value as the head count
        cross_attention_dim=text_dim, use_linear_projection=True, norm_num_groups=norm_groups,
        flip_sin_to_cos=True, freq_shift=0, act_fn="silu",
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408 if text_dim == 1024 else len(tokenizer), hidden_size=text_dim,
        intermediate_size=4 * text_dim, num_attention_heads=16, num_hidden_layers=text_layers,
        projection_dim=text_dim, hidden_act="gelu", max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    vae = AutoencoderKL(
        block_out_channels=(vae_width, 2 * vae_width, 4 * vae_width, 4 * vae_width),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4, layers_per_block=2, norm_num_groups=min(32, vae_width), sample_size=image_size,
        scaling_factor=0.18215,
    )
    scheduler = DDIMScheduler(  # SD 2.1-base's scheduler config (epsilon prediction)
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_pipeline(args, device, dtype):
    if args.arch == "sd21":
        full = device.type == "cuda" and not args.reduced
        sizes = dict(width=320, text_dim=1024, text_layers=23, vae_width=128, norm_groups=32) if full else \
            dict(width=args.width or 40, text_dim=args.text_dim or 64, text_layers=23, vae_width=16, norm_groups=8)
        args.layout = ("SD 2.1-base layout, full size" if full else
                       f"SD 2.1-base layout at reduced width: UNet base width {sizes['width']} (SD: 320), text dim "
                       f"{sizes['text_dim']} (SD: 1024), VAE width {sizes['vae_width']} (SD: 128); same blocks and head counts")
        with torch.device(device):  # initialise the random weights where they will run
            pipe = build_sd21_pipeline(image_size=args.image_size, **sizes)
    else:
        width, text_dim = args.width or (320 if device.type == "cuda" else 32), args.text_dim or (768 if device.type == "cuda" else 64)
        args.layout = f"SD 1.x block layout, base width {width} (SD: 320), text dim {text_dim}"
        with torch.device(device):
            pipe = build_sd_shaped_pipeline(width=width, image_size=args.image_size, text_dim=text_dim)
    return pipe.to(device) if dtype == torch.float32 else pipe.to(device=device, dtype=dtype)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


PLAIN, RECORDERS, DSDIFF = "plain diffusers", "plain + recorders (no labels)", "dsdiff (recording + labels)"
DSDIFF_FP16 = "dsdiff, fp16 scores"


def runners(pipe, gen, args, device, batch: int) -> dict:
    """Callables generating one batch: plain diffusers (SDPA everywhere), the plain call with dsdiff's
    recorders installed (per-step recording cost alone), and dsdiff's SyntheticGenerator (all of it)."""
    prompts, seeds = [PROMPTS[i % len(PROMPTS)] for i in range(batch)], list(range(batch))
    # The same processor objects every call: a compiled UNet then keeps one graph per variant
    # instead of recompiling for new objects.
    sdpa, recorders = AttnProcessor2_0(), dict(pipe.unet.attn_processors)
    class_embeds = pipe.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1,
                                      do_classifier_free_guidance=False)[0]

    def call():
        pipe(prompt=prompts, num_inference_steps=args.steps, guidance_scale=7.5, output_type="np",
             generator=[torch.Generator("cpu").manual_seed(s) for s in seeds])

    def plain():
        pipe.unet.set_attn_processor(sdpa)
        call()

    def recorders_only():
        pipe.unet.set_attn_processor(dict(recorders))  # (set_attn_processor empties the dict it gets)
        gen.store.reset(class_embeds)
        try:
            call()
        finally:
            gen.store.clear()

    def dsdiff():
        pipe.unet.set_attn_processor(dict(recorders))
        gen(prompts, seeds)

    def dsdiff_fp16():  # attention.FP16_SCORES on: Q K^T in fp16 (only differs for fp16 pipelines)
        default, attention.FP16_SCORES = attention.FP16_SCORES, True
        try:
            dsdiff()
        finally:
            attention.FP16_SCORES = default

    runs = {PLAIN: plain, RECORDERS: recorders_only, DSDIFF: dsdiff}
    if pipe.unet.dtype == torch.float16:
        runs[DSDIFF_FP16] = dsdiff_fp16
    return runs


def score_precision(pipe, gen, batch: int) -> dict:
    """Recorded maps and labels with fp16 Q K^T vs fp32, same prompts and seeds (fp16 pipelines)."""
    prompts, seeds = [PROMPTS[i % len(PROMPTS)] for i in range(batch)], list(range(batch))
    out, default = {}, attention.FP16_SCORES
    for fp16 in (True, False):
        attention.FP16_SCORES = fp16
        out[fp16] = gen(prompts, seeds, return_attention=True)
    attention.FP16_SCORES = default
    diff = {kind: max(float(abs(a.attention[kind] - b.attention[kind]).max()) for a, b in zip(out[True], out[False]))
            for kind in ("cross", "self")}
    agree = sum(float((a.label == b.label).mean()) for a, b in zip(out[True], out[False])) / batch
    return {"max_abs_diff_cross": diff["cross"], "max_abs_diff_self": diff["self"], "label_agreement": agree}


def compare(pipe, gen, args, device, batch: int, label: str, plain_too: bool = True, repeats: int | None = None,
            warmups: int = 1) -> list[dict]:
    """Median time per image and peak memory of plain diffusers vs dsdiff at one batch size."""
    runs = runners(pipe, gen, args, device, batch)
    if not args.decompose:
        runs.pop(RECORDERS)
        runs.pop(DSDIFF_FP16, None)
    if not plain_too:
        runs = {DSDIFF: runs[DSDIFF]}
    times = {k: [] for k in runs}
    peaks = {k: [] for k in runs}
    for _ in range(warmups):
        for name, fn in runs.items():  # warm-up: kernels, allocator (and compilation with --compile)
            start = time.perf_counter()
            fn()
            sync(device)
            print(f"  [{label}, batch {batch}] warm-up {name}: {time.perf_counter() - start:.1f} s", flush=True)
    for _ in range(repeats or args.repeats):
        for name, fn in runs.items():  # alternate so load drifts hit both alike
            with PeakMemory(device) as mem:
                start = time.perf_counter()
                fn()
                sync(device)
                times[name].append(time.perf_counter() - start)
            peaks[name].append((mem.peak, mem.extra))
    base = PLAIN if plain_too else DSDIFF
    base_t = statistics.median(times[base])
    base_peak = max(p for p, _ in peaks[base])
    base_extra = max(e for _, e in peaks[base])
    rows = []
    for name in runs:
        t = statistics.median(times[name])
        peak, extra = max(p for p, _ in peaks[name]), max(e for _, e in peaks[name])
        row = {"setting": label, "batch": batch, "name": name, "steps": args.steps, "s_per_batch": t,
               "s_per_image": t / batch, "images_per_s": batch / t, "ms_per_step_image": 1e3 * t / batch / args.steps,
               "t_ratio": t / base_t, "peak_mib": peak / 2**20, "peak_ratio": peak / base_peak,
               "extra_mib": extra / 2**20, "extra_ratio": extra / max(base_extra, 1),
               "spread": [min(times[name]) / batch, max(times[name]) / batch]}
        rows.append(row)
        print(f"  [{label}, batch {batch}] {name}: {row['images_per_s']:.3f} img/s, {row['t_ratio']:.3f}x time, "
              f"peak {row['peak_mib']:.0f} MiB ({row['peak_ratio']:.3f}x)", flush=True)
    return rows


def profile_runs(pipe, gen, args, device, batch: int) -> None:
    """torch.profiler tables of one plain and one dsdiff batch (top ops by self device time, and the
    host-device syncs), written to --profile DIR."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    args.profile.mkdir(parents=True, exist_ok=True)
    for name, fn in runners(pipe, gen, args, device, batch).items():
        fn()  # warm
        sync(device)
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            fn()
            sync(device)
            wall = time.perf_counter() - start
        events = prof.key_averages()
        syncs = {e.key: e.count for e in events if any(w in e.key for w in ("Synchronize", "Memcpy", "item", "_local_scalar_dense"))}
        text = (f"{name}, batch {batch}, {args.steps} steps: wall {wall * 1e3:.1f} ms under the profiler\n"
                f"syncs/copies: {syncs}\n\n" + events.table(sort_by=sort, row_limit=35, max_name_column_width=60))
        slug = {PLAIN: "plain", RECORDERS: "recorders", DSDIFF: "dsdiff", DSDIFF_FP16: "dsdiff_fp16"}[name]
        (args.profile / f"profile_{slug}_b{batch}.txt").write_text(text)
        print(f"  profiled {name}: wall {wall * 1e3:.1f} ms; syncs/copies {syncs}", flush=True)


def processor_census(gen) -> dict:
    """How many attention layers record and how many keep SDPA (AttnProcessor2_0)."""
    procs = gen.pipe.unet.attn_processors.values()
    return {"recording": sum(isinstance(p, RecordingAttnProcessor) for p in procs),
            "sdpa": sum(isinstance(p, AttnProcessor2_0) for p in procs), "total": len(procs),
            "cross_res": gen.labels.cross_res, "self_res": gen.labels.self_res}


def matrix_power_labels(cross, self_attn, class_ids, *, tau, size):
    """attention_to_labels with S^tau formed by torch.linalg.matrix_power (the N^3 way)."""
    k, n = cross.shape[0], self_attn.shape[-1]
    side = int(n ** 0.5)
    a = upsample(cross[None].float(), (side, side)).flatten(2)[0].T  # (N, K)
    refined = (torch.linalg.matrix_power(self_attn.float(), tau) @ a).T[None]
    maps = upsample(minmax_normalise(refined).view(1, k, side, side), (size, size)).clamp_(0, 1)
    return labels_from_maps(maps, torch.as_tensor(class_ids), 0.6, 0.5, 255)[0], maps[0]


def _median_time(fn, repeats: int, device) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - start)
    return statistics.median(ts)


def time_refinement(args, device) -> list[dict]:
    rows = []
    for n in args.sizes:
        g = torch.Generator().manual_seed(n)
        self_attn = torch.softmax(torch.randn(n, n, generator=g) * 4, dim=-1).to(device)
        cross = torch.rand(3, 16, 16, generator=g).to(device)
        a = torch.rand(n, 3, generator=g).to(device)
        call = {"size": 512, "tau": 4}
        row = {
            "n": n,
            "full_iter": _median_time(lambda: attention_to_labels(cross, self_attn, [1, 2, 3], **call), args.repeats, device),
            "full_mp": _median_time(lambda: matrix_power_labels(cross, self_attn, [1, 2, 3], **call), args.repeats, device),
            "ref_iter": _median_time(lambda: refine(self_attn, a, 4), args.repeats, device),
            "ref_mp": _median_time(lambda: torch.linalg.matrix_power(self_attn, 4) @ a, args.repeats, device),
        }
        ours = attention_to_labels(cross, self_attn, [1, 2, 3], **call)[0]
        theirs = matrix_power_labels(cross, self_attn, [1, 2, 3], **call)[0]
        row["agree"] = (ours == theirs).float().mean().item()
        rows.append(row)
    return rows


def render(args, device, dtype, gen_rows, ref_rows, census) -> str:
    import diffusers

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} thread(s)"
    mem_kind = "CUDA allocator peak" if device.type == "cuda" else "process peak RSS (VmHWM)"
    lines = [
        f"## {device.type.upper()}, {args.arch} layout, {str(dtype).replace('torch.', '')}" + (", torch.compile" if args.compile else ""),
        "",
        f"Written by `python experiments/bench_generation.py {' '.join(args.argv)}`.",
        "",
        f"- device: {device.type} ({where}); dtype {str(dtype).replace('torch.', '')}; torch {torch.__version__}; diffusers {diffusers.__version__}",
        f"- {args.layout}; random weights; {args.image_size}px, {args.steps} DDIM steps, guidance 7.5; "
        f"median of {args.repeats} alternating runs after one warm-up each",
        f"- recording: {census['recording']} of {census['total']} attention layers record (cross-attention at {census['cross_res']}² "
        f"over the class prompt's keys and self-attention at {census['self_res']}², conditional half only); the other {census['sdpa']} keep SDPA (AttnProcessor2_0)",
        f"- memory: {mem_kind}; 'above start' = peak minus the level when the call began (activations, no weights)",
        *([f"- fp16 vs fp32 Q K^T in the recorders (batch of {args.batch[-1]}, same seeds): max abs difference of the mean maps "
           f"{census['fp16_vs_fp32_scores']['max_abs_diff_cross']:.2e} (cross), {census['fp16_vs_fp32_scores']['max_abs_diff_self']:.2e} "
           f"(self); labels equal on {100 * census['fp16_vs_fp32_scores']['label_agreement']:.3f}% of pixels"]
          if "fp16_vs_fp32_scores" in census else []),
        "",
        "| setting | batch | pipeline | images/s | ms / step / image | time vs plain | peak MiB | peak vs plain | above start MiB | above start vs plain |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in gen_rows:
        if r.get("oom"):
            lines.append(f"| {r['setting']} | {r['batch']} | {r['name']} | out of memory | | | | | | |")
            continue
        lines.append(
            f"| {r['setting']} | {r['batch']} | {r['name']} | {r['images_per_s']:.3f} | {r['ms_per_step_image']:.1f} | {r['t_ratio']:.3f}x "
            f"| {r['peak_mib']:.0f} | {r['peak_ratio']:.3f}x | {r['extra_mib']:.1f} | {r['extra_ratio']:.2f}x |"
        )
    lines += [
        "",
        "Settings other than 'baseline' compare against the same run without the switch in their own rows "
        "(ratios within a setting are dsdiff vs plain under that setting); compare images/s across settings. "
        "'probe' rows run dsdiff alone (ratios against its own first batch).",
        "",
        f"attention_to_labels (K=3 classes, tau=4, 16x16 cross maps, output {args.image_size}x{args.image_size}), median of {args.repeats}. "
        "N = 1024 is SD's 32x32 self-attention: its 'whole iterated' time is the labels' cost per image. "
        "'refine' is S^4 @ A alone (N x 3); 'whole' is the whole function, where the bicubic "
        "upsampling is common to both. Target: iterated refinement >= 20x faster at N=1024.",
        "",
        "| N | refine iterated ms | refine matrix_power ms | refine speedup | whole iterated ms | whole matrix_power ms | whole speedup | labels equal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in ref_rows:
        lines.append(
            f"| {r['n']} | {r['ref_iter'] * 1e3:.2f} | {r['ref_mp'] * 1e3:.1f} | {r['ref_mp'] / r['ref_iter']:.0f}x "
            f"| {r['full_iter'] * 1e3:.1f} | {r['full_mp'] * 1e3:.1f} | {r['full_mp'] / r['full_iter']:.1f}x | {100 * r['agree']:.3f}% |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arch", choices=("sd21", "sd1"), default="sd21", help="UNet/text encoder/VAE layout")
    p.add_argument("--reduced", action="store_true", help="reduced width on CUDA too (always so on CPU)")
    p.add_argument("--width", type=int, default=None, help="reduced UNet base width (sd21: 40, sd1: 32 on CPU)")
    p.add_argument("--text-dim", type=int, default=None, help="reduced text embedding size (default 64)")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default=None, help="default fp16 on CUDA, fp32 on CPU")
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--steps", type=int, default=10, help="denoising steps per image (the table reports per step)")
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--channels-last", action="store_true", help="also measure a channels-last UNet (last batch size)")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile of the UNet (first batch size)")
    p.add_argument("--decompose", action="store_true", help="also time the plain call with the recorders "
                   "installed (per-step recording cost without dsdiff's per-batch work)")
    p.add_argument("--profile", type=Path, default=None, help="write torch.profiler tables of one plain and one "
                   "dsdiff batch (first batch size) to this folder")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend ('eager': a quick logic check)")
    p.add_argument("--original", type=Path, default=None, help="a checkout of the original repository "
                   "(github.com/VinAIResearch/Dataset-Diffusion): also run its recorder side by side (time, peak "
                   "memory, stored maps, label agreement); see experiments/_original.py")
    p.add_argument("--probe-batches", type=int, nargs="*", default=[], help="dsdiff alone at these larger batches")
    p.add_argument("--probe-repeats", type=int, default=1, help="timed runs per probe batch")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: steadiest on a shared machine)")
    p.add_argument("--out", type=Path, default=None, help=f"the results file (default: {RESULTS} in the run's folder)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    add_write_results(p)
    args = p.parse_args()
    if args.out is None:
        args.out = run_folder("bench_generation", args.write_results) / RESULTS
        print(f"results -> {args.out}", flush=True)
    args.argv = sys.argv[1:]
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(args.threads)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("fp16" if cuda else "fp32")]
    if not cuda and dtype != torch.float32:
        p.error("--dtype fp16/bf16 needs --device cuda")
    ref_rows = time_refinement(args, device)
    print(f"refinement timed: {[(r['n'], round(r['full_iter'] * 1e3, 2)) for r in ref_rows]} ms", flush=True)
    started = time.perf_counter()
    pipe = build_pipeline(args, device, dtype)
    print(f"built {args.layout} on {device} in {time.perf_counter() - started:.1f} s", flush=True)
    # SD at 512 px: cross-attention at 16x16 (1/32 of the image), self-attention at 32x32 (1/16)
    gen = SyntheticGenerator(pipe, VOC_CLASSES, num_inference_steps=args.steps,
                             cross_res=args.image_size // 32, self_res=args.image_size // 16)
    census = processor_census(gen)
    gen_rows: list[dict] = []

    def save() -> None:  # after every section, so a run cut short keeps what it measured
        text = render(args, device, dtype, gen_rows, ref_rows, census)
        section = f"bench_generation:{device.type}:{args.arch}" + (":compile" if args.compile else "")
        write_section(args.out, section, text, "bench_generation")
        if args.json:
            write_json_atomic(args.json, {"device": device.type, "dtype": str(dtype), "torch": torch.__version__,
                                          "layout": args.layout, "census": census, "generation": gen_rows,
                                          "refinement": ref_rows})

    for batch in args.batch:
        gen_rows += compare(pipe, gen, args, device, batch, "baseline")
        save()
    if args.original:
        from _original import compare_original, render_original

        results = [compare_original(pipe, gen, args, device, batch, PROMPTS) for batch in args.batch]
        write_section(args.out, f"bench_generation:{device.type}:{args.arch}:original", render_original(args, results),
                      "bench_generation")
        print(render_original(args, results))
    if args.decompose and dtype == torch.float16:
        census["fp16_vs_fp32_scores"] = score_precision(pipe, gen, args.batch[-1])
        print(f"  fp16 vs fp32 scores: {census['fp16_vs_fp32_scores']}", flush=True)
        save()
    if args.profile:
        profile_runs(pipe, gen, args, device, args.batch[0])
    if args.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        gen_rows += compare(pipe, gen, args, device, args.batch[-1], "channels-last UNet")
        pipe.unet.to(memory_format=torch.contiguous_format)
        save()
    for batch in args.probe_batches:
        try:
            gen_rows += compare(pipe, gen, args, device, batch, "probe", plain_too=False, repeats=args.probe_repeats)
        except torch.cuda.OutOfMemoryError:
            print(f"  [probe, batch {batch}] out of memory", flush=True)
            gen_rows.append({"setting": "probe", "batch": batch, "name": DSDIFF, "oom": True})
            torch.cuda.empty_cache()
            save()
            break
        save()
    if args.compile:
        from torch._dynamo import config as dynamo_config

        # The recorders' sums run eagerly (a graph break at each recording layer); the frames
        # resumed after a break are compiled once per feature-map shape, more than the default limit.
        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, knob):
                setattr(dynamo_config, knob, 64)
        pipe.unet.compile(backend=args.compile_backend)
        gen_rows += compare(pipe, gen, args, device, args.batch[0], "torch.compile UNet", warmups=2)
        from torch._dynamo.utils import counters

        print(f"  dynamo: {dict(counters['stats'])}; graph breaks: {dict(counters['graph_break'])}", flush=True)
        save()
    print(render(args, device, dtype, gen_rows, ref_rows, census))


if __name__ == "__main__":
    main()
