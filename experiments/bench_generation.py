"""Benchmark: the cost of attention recording, and iterated refinement vs matrix_power.

One run measures, side by side on the same pipeline, seeds and steps:
1. time and peak memory per image of the plain diffusers pipeline (SDPA everywhere) vs
   dsdiff's SyntheticGenerator (recording processors + labels), on an SD 1.x-shaped
   UNet (real block layout; reduced width on CPU) with random weights;
2. ``attention_to_labels`` with iterated products (dsdiff) vs ``torch.linalg.matrix_power``
   at N = 1024 and 4096 self-attention positions.
Targets: recording <= +15% time and <= +20% peak memory; iterated >= 20x faster at N = 1024.

    python experiments/bench_generation.py                # CPU, width 32, 512px, 10 steps
    python experiments/bench_generation.py --device cuda --width 320 --text-dim 768
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor2_0  # noqa: E402

from dsdiff.data.classes import VOC_CLASSES  # noqa: E402
from dsdiff.diffusion import SyntheticGenerator, attention_to_labels  # noqa: E402
from dsdiff.diffusion.masks import labels_from_maps, minmax_normalise, refine, upsample  # noqa: E402
from dsdiff.diffusion.testing import build_sd_shaped_pipeline  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "bench_generation.md"
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


def time_generation(args, device, dtype) -> list[dict]:
    pipe = build_sd_shaped_pipeline(width=args.width, image_size=args.image_size, text_dim=args.text_dim)
    pipe = pipe.to(device) if dtype == torch.float32 else pipe.to(device=device, dtype=dtype)
    gen = SyntheticGenerator(pipe, VOC_CLASSES, num_inference_steps=args.steps)
    prompts, seeds = PROMPTS[: args.batch], list(range(args.batch))

    def plain():
        pipe.unet.set_attn_processor(AttnProcessor2_0())
        pipe(prompt=prompts, num_inference_steps=args.steps, guidance_scale=7.5, output_type="np",
             generator=[torch.Generator("cpu").manual_seed(s) for s in seeds])

    def dsdiff():
        gen(prompts, seeds)  # reinstalls the recorders that plain() replaced

    runs = {"plain diffusers": plain, "dsdiff (recording + labels)": dsdiff}
    times = {k: [] for k in runs}
    peaks = {k: [] for k in runs}
    for fn in runs.values():  # warm-up: kernels, allocator
        fn()
    for _ in range(args.repeats):
        for name, fn in runs.items():  # alternate so load drifts hit both alike
            with PeakMemory(device) as mem:
                start = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append((time.perf_counter() - start) / args.batch)
            peaks[name].append((mem.peak, mem.extra))
    rows = []
    base_t = statistics.median(times["plain diffusers"])
    base_peak = max(p for p, _ in peaks["plain diffusers"])
    base_extra = max(e for _, e in peaks["plain diffusers"])
    for name in runs:
        t = statistics.median(times[name])
        peak, extra = max(p for p, _ in peaks[name]), max(e for _, e in peaks[name])
        rows.append({"name": name, "t": t, "t_ratio": t / base_t, "peak": peak, "peak_ratio": peak / base_peak,
                     "extra": extra, "extra_ratio": extra / max(base_extra, 1),
                     "spread": (min(times[name]), max(times[name]))})
    return rows


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


def render(args, device, dtype, gen_rows, ref_rows) -> str:
    mib = 2 ** 20
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} thread(s)"
    mem_kind = "CUDA allocator peak" if device.type == "cuda" else "process peak RSS (VmHWM)"
    lines = [
        "# bench_generation",
        "",
        f"- device: {device.type} ({where}); dtype {str(dtype).replace('torch.', '')}; torch {torch.__version__}",
        f"- SD 1.x block layout, base width {args.width} (SD: 320), text dim {args.text_dim}, random weights; "
        f"{args.image_size}px, {args.steps} DDIM steps, guidance 7.5, batch {args.batch}, median of {args.repeats} "
        "alternating runs after one warm-up each",
        f"- memory: {mem_kind}; 'above start' = peak minus the level when the call began (activations, no weights)",
        "",
        "| pipeline | s / image | time vs plain | peak MiB | peak vs plain | above start MiB | above start vs plain |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in gen_rows:
        lines.append(
            f"| {r['name']} | {r['t']:.3f} (min {r['spread'][0]:.3f}, max {r['spread'][1]:.3f}) | {r['t_ratio']:.3f}x "
            f"| {r['peak'] / mib:.0f} | {r['peak_ratio']:.3f}x | {r['extra'] / mib:.1f} | {r['extra_ratio']:.2f}x |"
        )
    lines += [
        "",
        f"attention_to_labels (K=3 classes, tau=4, 16x16 cross maps, output 512x512), median of {args.repeats}. "
        "'refine' is S^4 @ A alone (N x 3); 'whole' is the whole function, where the bicubic "
        "upsampling to 512x512 is common to both. Target: iterated refinement >= 20x faster at N=1024.",
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
    p.add_argument("--width", type=int, default=None, help="UNet base width (default 32 on CPU, 320 on CUDA)")
    p.add_argument("--text-dim", type=int, default=None, help="text embedding size (default 64 CPU, 768 CUDA)")
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: steadiest on a shared machine)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.width = args.width or (320 if cuda else 32)
    args.text_dim = args.text_dim or (768 if cuda else 64)
    if not cuda:
        torch.set_num_threads(args.threads)
    dtype = torch.float16 if cuda else torch.float32
    ref_rows = time_refinement(args, device)
    gen_rows = time_generation(args, device, dtype)
    text = render(args, device, dtype, gen_rows, ref_rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
