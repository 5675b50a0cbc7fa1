"""Attention on given (real) images: noise them, run the UNet (or SD3 / FLUX transformer) once per timestep, label them.

The same recorders, class-prompt cross-attention and attention-to-label rule as generation
(docs/method.md), but the image is given instead of sampled, so the maps can be scored
against true masks: how well a model's attention finds the objects its caption names.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from dsdiff.diffusion.generator import Sample, SyntheticGenerator
from dsdiff.diffusion.prompts import PromptRecord


@torch.no_grad()
def attention_on_images(
    gen: SyntheticGenerator,
    images: np.ndarray | torch.Tensor,
    prompts: Sequence[str | Mapping | PromptRecord],
    timesteps: Sequence[int],
    *,
    seed: int = 0,
    return_attention: bool = False,
    class_prompt: bool = True,
) -> list[Sample]:
    """Label maps for B given images from attention averaged over ``timesteps`` (each a noised copy).

    ``images`` is uint8 (B, H, W, 3); ``prompts[i]`` is image i's text (its classes are found
    in it, or given by a PromptRecord). The text conditions the UNet; the class prompt gives
    the maps, as in generation (``class_prompt=False``: the text's own class-word tokens give them,
    the ablation). Noise is drawn from ``seed``, one draw per timestep.
    """
    images = torch.as_tensor(np.asarray(images))
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 (B, H, W, 3), got {images.dtype} {tuple(images.shape)}")
    if len(prompts) != len(images):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts: pass one prompt per image")
    if not timesteps:
        raise ValueError("timesteps is empty: pass e.g. [200, 400, 600]")
    device = gen.device
    height, width = images.shape[1:3]
    requests = gen.requests(prompts)
    with gen.recording(requests, height, width, class_prompt=class_prompt) as rec:
        cond = gen.family.condition([r.text for r in requests], device)
        pixels = images.permute(0, 3, 1, 2).float().div(127.5).sub(1).to(device)
        latents = gen.family.image_latents(pixels)
        generator = torch.Generator("cpu").manual_seed(int(seed))
        for t in timesteps:
            noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
            gen.family.noised_forward(latents, noise, int(t), cond)
        rec.read()
    return _samples(gen, images, requests, rec, timesteps, seed, return_attention)


def _samples(gen, images, requests, rec, timesteps, seed, return_attention) -> list[Sample]:
    settings = {k: v for k, v in gen.labels.manifest_fields().items() if k not in ("window", "maps_from")}
    samples = []
    for b, r in enumerate(requests):
        metadata = {**r.extra, "prompt": r.text, "class_prompt": rec.class_prompts[b], "timesteps": [int(t) for t in timesteps],
                    "seed": int(seed), "model": gen.model_id, **settings}
        image = images[b].numpy().astype(np.float32) / 255.0
        samples.append(gen.label(image, rec, b, r.class_ids, metadata, return_attention))
    return samples
