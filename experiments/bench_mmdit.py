"""Benchmark: the cost of class-prompt recording on SD3.5-Medium- and FLUX.1-layout transformers (MMDiT).

One run measures, side by side on the same random-weight transformer, inputs and steps, the
denoising step (transformer forward, classifier-free guidance batch 2B) of plain diffusers
against dsdiff's recording (:class:`dsdiff.diffusion.mmdit.JointRecorder`: the class prompt's
tokens carried through the blocks, cross and self maps summed), for each batch size and each
choice of recorded blocks. The text encoders, VAE and label step are the same in both and
are left out. Layouts: SD3.5 Medium's (``--family sd3``: 24 joint blocks, dual attention in the
first 13, RMS q/k norm, 333 prompt tokens = 77 CLIP + 256 T5, guidance batch 2B) and FLUX.1's
(``--family flux``: 19 dual-stream + 38 single-stream blocks, rotary positions, 256 T5 tokens,
no guidance batch); on CPU at reduced width, on CUDA at full width.

    python experiments/bench_mmdit.py                                  # CPU: SD3 layout, width 4x32, 512 px
    python experiments/bench_mmdit.py --family flux --blocks 0-56 19-30
    python experiments/bench_mmdit.py --device cuda --dtype bf16 --image-size 1024 --batch 1 4
    python experiments/bench_mmdit.py --device cuda --dtype bf16 --image-size 1024 --batch 1 4 --family flux --blocks 0-56
    python experiments/bench_mmdit.py --write-results                  # into experiments/results/

Writes its section of ``bench_generation.md`` (``mmdit``) into ``outputs/experiments/bench_mmdit/<time>/``
or, with ``--write-results``, into experiments/results/bench_generation.md.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from dsdiff.diffusion.attention import AttentionStore
from dsdiff.diffusion.flux import FluxRecorder
from dsdiff.diffusion.mmdit import JointRecorder

from _results import add_write_results, run_folder, write_section  # noqa: E402  (experiments/_results.py)
from bench_generation import PeakMemory, sync  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PROMPT_TOKENS = {"sd3": 77 + 256, "flux": 256}


def build_transformer(*, family: str, heads: int, head_dim: int, joint_dim: int, image_size: int, device, dtype):
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # random weights made where and as they will run (FLUX.1: 12B parameters)
    try:
        with torch.device(device):
            return _transformer(family, heads, head_dim, joint_dim, image_size).to(device=device, dtype=dtype).eval()
    finally:
        torch.set_default_dtype(default)


def _transformer(family, heads, head_dim, joint_dim, image_size):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    if family == "flux":
        rope = (head_dim // 8, head_dim * 7 // 16, head_dim - head_dim // 8 - head_dim * 7 // 16)  # 16/56/56 of 128
        return FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=head_dim,
            num_attention_heads=heads, joint_attention_dim=joint_dim, pooled_projection_dim=768,
            guidance_embeds=False, axes_dims_rope=rope,
        )
    return SD3Transformer2DModel(
        sample_size=image_size // 8, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=joint_dim,
        caption_projection_dim=heads * head_dim, pooled_projection_dim=2 * joint_dim // 4,
        pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)),
    )


def inputs(model, args, device, dtype, batch: int):
    """The transformer's keyword arguments for one denoising step (SD3: the guidance batch 2B)."""
    side, tokens = args.image_size // 16, PROMPT_TOKENS[args.family]
    if args.family == "flux":  # packed 2x2 latents, position ids, timestep in [0, 1]
        img_ids = torch.zeros(side, side, 3)
        img_ids[..., 1], img_ids[..., 2] = torch.arange(side)[:, None], torch.arange(side)[None, :]
        img_ids = img_ids.reshape(-1, 3).to(device)
        return {"hidden_states": torch.randn(batch, side * side, 64, device=device, dtype=dtype),
                "encoder_hidden_states": torch.randn(batch, tokens, model.config.joint_attention_dim, device=device, dtype=dtype),
                "pooled_projections": torch.randn(batch, 768, device=device, dtype=dtype),
                "timestep": torch.full((batch,), 0.5, device=device, dtype=dtype),
                "img_ids": img_ids, "txt_ids": torch.zeros(tokens, 3, device=device)}
    return {"hidden_states": torch.randn(2 * batch, 16, 2 * side, 2 * side, device=device, dtype=dtype),
            "encoder_hidden_states": torch.randn(2 * batch, tokens, model.config.joint_attention_dim, device=device, dtype=dtype),
            "pooled_projections": torch.randn(2 * batch, model.config.pooled_projection_dim, device=device, dtype=dtype),
            "timestep": torch.full((2 * batch,), 500.0, device=device)}


@torch.no_grad()
def block_range(spec: str) -> list[int]:
    start, _, end = spec.partition("-")
    return list(range(int(start), int(end or start) + 1))


def span(blocks) -> str:
    return f"{blocks[0]}-{blocks[-1]}" if len(blocks) > 1 else str(blocks[0])


def measure(model, args, device, dtype, batch: int, blocks, self_blocks=None) -> dict:
    """Plain and recorded steps alternated ``args.repeats`` times (so drift hits both alike), medians."""
    side = args.image_size // 8
    kwargs = inputs(model, args, device, dtype, batch)
    store = AttentionStore()
    store.reset(torch.randn(batch, PROMPT_TOKENS[args.family], model.config.joint_attention_dim, device=device, dtype=dtype))
    recorder = (FluxRecorder if args.family == "flux" else JointRecorder)(model, store, blocks, self_blocks)

    def forward():
        return model(**kwargs, return_dict=False)[0]

    def recorded():
        store.cross_sum = store.self_sum = None
        store.cross_count = store.self_count = 0
        store.recording = True
        with recorder:
            return forward()

    plain_out = forward()  # first calls of the process: lazy allocations stay out of the peaks
    same = torch.equal(recorded(), plain_out)
    with PeakMemory(device) as mem_plain:
        forward()
    with PeakMemory(device) as mem_rec:
        recorded()
    times = {"plain": [], "rec": []}
    for _ in range(args.repeats):
        for name, fn in (("plain", forward), ("rec", recorded)):
            times[name].append(_once(fn, device))
    t_plain, t_rec = statistics.median(times["plain"]), statistics.median(times["rec"])
    label = span(blocks) if self_blocks is None else f"{span(blocks)}, self maps {span(self_blocks)}"
    return {"batch": batch, "blocks": label,
            "n_blocks": len(recorder.blocks), "tokens": side * side // 4, "class_tokens": recorder.extra_tokens(),
            "plain_s": t_plain, "rec_s": t_rec, "time_ratio": t_rec / t_plain,
            "plain_mb": mem_plain.extra / 2**20, "rec_mb": mem_rec.extra / 2**20,
            "maps_mb": store.nbytes() / 2**20, "same": same}


def _once(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def render(args, device, dtype, rows) -> str:
    width = f"{args.heads} heads x {args.head_dim}, joint dim {args.joint_dim}"
    layout = "FLUX.1" if args.family == "flux" else "SD3.5-Medium"
    batch = "batch B, no guidance branch" if args.family == "flux" else "guidance batch 2B"
    cuda = device.type == "cuda"
    memory = ("Peak memory: the CUDA allocator's peak above the start of one step. " if cuda else
              "Peak memory is left out on the CPU: one step's RSS peak is dominated by the allocator's growth. ")
    lines = [
        f"## MMDiT recording ({layout} layout, {device.type})", "",
        f"`python experiments/bench_mmdit.py {' '.join(sys.argv[1:])}`: {device.type} ({platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads), {str(dtype).replace('torch.', '')}, "
        f"{args.image_size} px, {width}, random weights, median of {args.repeats} denoising steps, plain and recorded "
        f"alternated, the recorder's install and removal inside the recorded time (transformer forward, {batch}). "
        f"{memory}`maps MB`: the running sums per batch. `same`: the recorded step's output equals plain diffusers' "
        "bit for bit.", "",
        "| batch | recorded blocks | image tokens | class tokens | plain s/step | dsdiff s/step | time ratio | "
        + ("plain peak MB | dsdiff peak MB | " if cuda else "") + "maps MB | same |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | " + ("---: | ---: | " if cuda else "") + "---: | --- |",
    ]
    for r in rows:
        mem = f"{r['plain_mb']:.0f} | {r['rec_mb']:.0f} | " if cuda else ""
        lines.append(f"| {r['batch']} | {r['blocks']} ({r['n_blocks']}) | {r['tokens']} | {r['class_tokens']} | "
                     f"{r['plain_s']:.3f} | {r['rec_s']:.3f} | {r['time_ratio']:.2f}x | {mem}{r['maps_mb']:.1f} | {r['same']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--family", choices=("sd3", "flux"), default="sd3")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--heads", type=int, default=None, help="default 24 on CUDA (SD3.5 Medium, FLUX.1), 4 on CPU")
    p.add_argument("--head-dim", type=int, default=None, help="default 64 (SD3) / 128 (FLUX) on CUDA, 32 on CPU")
    p.add_argument("--joint-dim", type=int, default=None, help="prompt embedding width: 4096 on CUDA, 256 on CPU")
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--blocks", nargs="+", default=None, help="recorded block ranges, one row each; "
                   "CROSS/SELF (e.g. 0-56/19-30) records self maps at SELF only "
                   "(default sd3: 0-23 8-15; flux: 0-56 19-30)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="the folder for bench_generation.md (default: this run's own)")
    add_write_results(p)
    args = p.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    args.heads = args.heads or (24 if cuda else 4)
    args.head_dim = args.head_dim or ((128 if args.family == "flux" else 64) if cuda else 32)
    args.joint_dim = args.joint_dim or (4096 if cuda else 256)
    args.blocks = args.blocks or (["0-56", "19-30"] if args.family == "flux" else ["0-23", "8-15"])
    model = build_transformer(family=args.family, heads=args.heads, head_dim=args.head_dim, joint_dim=args.joint_dim,
                              image_size=args.image_size, device=device, dtype=dtype)
    rows = []
    for batch in args.batch:
        for spec in args.blocks:
            cross, _, self_part = spec.partition("/")
            rows.append(measure(model, args, device, dtype, batch, block_range(cross),
                                block_range(self_part) if self_part else None))
            r = rows[-1]
            print(f"batch {batch}, blocks {spec}: plain {r['plain_s']:.3f} s, dsdiff {r['rec_s']:.3f} s "
                  f"({r['time_ratio']:.2f}x), same={r['same']}", flush=True)
    text = render(args, device, dtype, rows)
    folder = run_folder("bench_mmdit", args.write_results, args.out)
    write_section(folder / "bench_generation.md", f"mmdit-{args.family}-{device.type}", text, "Generation benchmarks")
    print(text)
    print(f"results: {folder / 'bench_generation.md'}")


if __name__ == "__main__":
    main()
