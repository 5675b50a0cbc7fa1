"""The original Dataset Diffusion recorder, run side by side with dsdiff (``bench_generation.py --original DIR``).

``DIR`` is a checkout of github.com/VinAIResearch/Dataset-Diffusion fetched by the person running the
benchmark; nothing of it is copied here. Its ``src/attn_processor.py`` (the processor that keeps every
map of every UNet layer at up to 64x64, an ``AttentionStore`` summing them per step) and
``src/pipeline_class_prompts.py`` (the pipeline that appends the class prompt's embeddings to the
batch) are imported from there and run on the same UNet, prompts, seeds and steps as plain diffusers
and dsdiff. Its label rule (``gen_data.py``: self-attention at 32, cross-attention at 16 upsampled
bicubically to 32, ``matrix_power(S, 4) @ A``, min-max per class, bicubic to the image, 0.6 / 0.5
thresholds) is restated in :func:`original_labels` from its description, for the label agreement.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dsdiff.data.classes import class_words
from dsdiff.diffusion.prompts import class_token_spans


def load_original(folder: Path):
    """The original's recorder and pipeline modules from a checkout, or SystemExit saying what is missing."""
    folder = Path(folder).expanduser().resolve()
    for part in ("src/attn_processor.py", "src/pipeline_class_prompts.py"):
        if not (folder / part).is_file():
            raise SystemExit(f"--original {folder}: no {part} there; pass a checkout of "
                             "https://github.com/VinAIResearch/Dataset-Diffusion")
    sys.path.insert(0, str(folder))
    try:
        from src import attn_processor, pipeline_class_prompts
    except Exception as err:  # an import that today's diffusers no longer provides, for one
        raise SystemExit(f"--original {folder}: its code does not import against this environment: "
                         f"{type(err).__name__}: {err}") from err
    finally:
        sys.path.remove(str(folder))
    return attn_processor, pipeline_class_prompts


def original_labels(controller, attn_mod, spans, class_ids, size, self_res, cross_res, alpha=0.6, beta=0.5):
    """Labels of each image of the last batch by the original's rule (``gen_data.py``), (B, H, W) uint8."""
    self_attn = attn_mod.aggregate_attention(controller, res=self_res, is_cross=False).float()
    cross = attn_mod.aggregate_attention(controller, res=cross_res, is_cross=True).float()
    cross = F.interpolate(cross.permute(0, 3, 1, 2), (self_res, self_res), mode="bicubic")
    out = []
    for j, (span_list, ids) in enumerate(zip(spans, class_ids)):
        affinity = torch.matrix_power(self_attn[j].reshape(self_res**2, self_res**2), 4)
        maps = []
        for span in span_list:
            a = cross[j][span].mean(0)
            m = (affinity @ a.reshape(-1, 1)).reshape(self_res, self_res)
            m = m - m.min()
            maps.append(m / m.max())
        maps = F.interpolate(torch.stack(maps)[None], size, mode="bicubic")[0].numpy()
        best = maps.max(0)
        lut = np.array([0, *ids], dtype=np.uint8)
        mask = np.where(best >= alpha, maps.argmax(0) + 1, 0)
        mask = lut[mask]
        mask[(best < alpha) & (best >= beta)] = 255
        out.append(mask)
    return np.stack(out)


def stored_bytes(controller) -> int:
    return sum(t.numel() * t.element_size() for maps in controller.attention_store.values() for t in maps)


def compare_original(pipe, gen, args, device, batch: int, prompts_all) -> dict:
    """Time, peak memory, stored-map volume and label agreement: plain diffusers, dsdiff, the original."""
    from bench_generation import PeakMemory, sync
    from diffusers.models.attention_processor import AttnProcessor2_0

    attn_mod, pipe_mod = load_original(args.original)
    prompts, seeds = [prompts_all[i % len(prompts_all)] for i in range(batch)], list(range(batch))
    requests = gen.requests(prompts)
    words = [[class_words(gen.class_names[c]) for c in r.class_ids] for r in requests]
    texts, spans = zip(*(class_token_spans(pipe.tokenizer, w) for w in words))
    orig = pipe_mod.StableDiffusionClassPromptsPipeline(**pipe.components)
    orig.set_progress_bar_config(disable=True)
    controller = attn_mod.AttentionStoreClassPrompts(start=0, end=10**6)
    size = (args.image_size, args.image_size)
    res = {"self": args.image_size // 16, "cross": args.image_size // 32}
    kept = {}

    def generators():
        return [torch.Generator("cpu").manual_seed(s) for s in seeds]

    def plain():
        pipe.unet.set_attn_processor(AttnProcessor2_0())
        kept["plain"] = pipe(prompt=prompts, num_inference_steps=args.steps, guidance_scale=7.5, output_type="np",
                             generator=generators()).images

    def dsdiff():
        clear = gen.store.clear
        gen.store.clear = lambda: (kept.__setitem__("dsdiff_bytes", gen.store.nbytes()), clear())[1]
        try:
            kept["dsdiff"] = gen(prompts, seeds, return_attention=True)
        finally:
            del gen.store.clear  # the class's own method again

    def original():
        controller.reset()
        attn_mod.register_attention_control(orig, controller, attn_mod.StoredAttnClassPromptsProcessor)
        images = orig(prompts, class_prompts=list(texts), num_inference_steps=args.steps, guidance_scale=7.5,
                      generator=generators(), output_type="numpy").images
        kept["original"] = images
        kept["original_bytes"] = stored_bytes(controller)
        kept["original_labels"] = original_labels(controller, attn_mod, spans, [r.class_ids for r in requests],
                                                  size, res["self"], res["cross"])
        cross = attn_mod.aggregate_attention(controller, res=res["cross"], is_cross=True).float()  # (B, h, w, 77)
        kept["original_maps"] = (
            [torch.stack([cross[j][..., span].mean(-1) for span in spans[j]]).numpy() for j in range(batch)],
            attn_mod.aggregate_attention(controller, res=res["self"], is_cross=False).float().flatten(1, 2).numpy())

    runs = {"plain diffusers": plain, "dsdiff (recording + labels)": dsdiff, "original (recording + labels)": original}
    times = {k: [] for k in runs}
    peaks = {k: [] for k in runs}
    for fn in runs.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for name, fn in runs.items():
            with PeakMemory(device) as mem:
                start = time.perf_counter()
                fn()
                sync(device)
                times[name].append(time.perf_counter() - start)
            peaks[name].append(mem.extra)
    base_t, base_m = statistics.median(times["plain diffusers"]), max(peaks["plain diffusers"])
    ours = np.stack([s.label for s in kept["dsdiff"]])
    theirs = kept["original_labels"]
    plain_u8 = (np.asarray(kept["plain"]) * 255).round().clip(0, 255).astype(np.uint8)
    orig_u8 = (np.asarray(kept["original"]) * 255).round().clip(0, 255).astype(np.uint8)
    rows = [{"batch": batch, "name": name, "s_per_image": statistics.median(times[name]) / batch,
             "t_ratio": statistics.median(times[name]) / base_t, "extra_mib": max(peaks[name]) / 2**20,
             "extra_ratio": max(peaks[name]) / max(base_m, 1)} for name in runs]
    rows[1]["stored_mib_per_image"] = kept["dsdiff_bytes"] / batch / 2**20
    rows[2]["stored_mib_per_image"] = kept["original_bytes"] / batch / 2**20
    for r in rows:
        print(f"  [original, batch {batch}] {r['name']}: {r['s_per_image']:.2f} s/image, {r['t_ratio']:.2f}x time, "
              f"above start {r['extra_mib']:.0f} MiB", flush=True)
    their_cross, their_self = kept["original_maps"]
    spread = []  # how flat the refined maps are: (max - min) / mean of S^4 A, per class map
    for sample in kept["dsdiff"]:
        side = int(sample.attention["self"].shape[0] ** 0.5)
        a = F.interpolate(torch.as_tensor(sample.attention["cross"])[None], (side, side), mode="bicubic")[0]
        refined = torch.linalg.matrix_power(torch.as_tensor(sample.attention["self"]), 4) @ a.flatten(1).T
        spread += ((refined.amax(0) - refined.amin(0)) / refined.mean(0)).tolist()
    cross_diff = max(float(np.abs(s.attention["cross"] - c).max()) for s, c in zip(kept["dsdiff"], their_cross))
    self_diff = max(float(np.abs(s.attention["self"] - their_self[j]).max()) for j, s in enumerate(kept["dsdiff"]))
    return {"rows": rows, "label_agreement": float((ours == theirs).mean()), "cross_diff": cross_diff,
            "self_diff": self_diff, "refined_spread": max(spread),
            "image_max_diff": int(np.abs(plain_u8.astype(int) - orig_u8).max()),
            "dsdiff_image_equal": bool(all(np.array_equal(s.image, p) for s, p in zip(kept["dsdiff"], plain_u8)))}


def render_original(args, results: list[dict]) -> str:
    lines = [
        "## The original's recorder, side by side", "",
        f"Written by `python experiments/bench_generation.py {' '.join(args.argv)}`: the same UNet ({args.layout}), "
        f"prompts, seeds and {args.steps} DDIM steps at {args.image_size} px for plain diffusers, dsdiff and the "
        "original repository's `src/attn_processor.py` + `src/pipeline_class_prompts.py` imported from "
        f"`--original` (its label rule restated from `gen_data.py`). Median of {args.repeats} alternating runs. "
        "'stored' is what the recorder keeps per image at the end of the steps (the original: every map of "
        "every layer up to 64x64, per head; dsdiff: one cross and one self running sum).", "",
        "| batch | pipeline | s / image | time vs plain | above start MiB | vs plain | stored MiB / image |",
        "|---|---|---|---|---|---|---|",
    ]
    for res in results:
        for r in res["rows"]:
            stored = f"{r['stored_mib_per_image']:.1f}" if "stored_mib_per_image" in r else ""
            lines.append(f"| {r['batch']} | {r['name']} | {r['s_per_image']:.2f} | {r['t_ratio']:.2f}x | "
                         f"{r['extra_mib']:.0f} | {r['extra_ratio']:.2f}x | {stored} |")
    lines.append("")
    for res in results:
        b = res["rows"][0]["batch"]
        lines.append(f"- batch {b}: the recorded mean maps differ by at most {res['cross_diff']:.1e} (class cross maps) "
                     f"and {res['self_diff']:.1e} (self maps); the labels agree on {100 * res['label_agreement']:.2f}% "
                     f"of pixels (the refined maps S^4 A vary by at most {100 * res['refined_spread']:.2g}% of their mean: "
                     "near-flat maps, where min-max normalisation turns differences at the 1e-9 level into different "
                     "labels; with trained weights the maps have structure and the labels follow them); the original's images differ from plain diffusers' by at most "
                     f"{res['image_max_diff']}/255 (its attention is baddbmm + softmax, not SDPA); dsdiff's equal "
                     f"plain diffusers': {res['dsdiff_image_equal']}")
    return "\n".join(lines) + "\n"
