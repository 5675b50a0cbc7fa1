"""Score a generator's attention on the shapes world: real test images and generated images.

Real images are noised at a few timesteps and labelled from the attention with their
captions (:func:`dsdiff.diffusion.real_images.attention_on_images`); generated images are
labelled as the method does (maps averaged over the denoising steps) and scored against
their colour-derived masks (:func:`dsdiff.shapes_t2i.quality.colour_mask`).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dsdiff.data.classes import SHAPES_CLASSES
from dsdiff.data.shapes import ShapesDataset, caption
from dsdiff.diffusion.prompts import PromptRecord, build_records
from dsdiff.diffusion.quality import QualityTally
from dsdiff.diffusion.real_images import attention_on_images
from dsdiff.shapes_t2i.quality import colour_mask

DRAWN_MIN_PIXELS = 8  # a prompted class counts as drawn when this many pixels have its colours


def world_records(world: ShapesDataset, indices: Sequence[int]) -> list[PromptRecord]:
    """The method's prompts for world images: ``"<caption>; <class words>"`` with the image's class ids."""
    labels = {world.name(i): sorted(o.label for o in world.layout(i)) for i in indices}
    captions = [(world.name(i), caption(world.layout(i))) for i in indices]
    by_id = {r.image_id: r for r in build_records(labels, SHAPES_CLASSES, captions)}
    return [by_id[world.name(i)] for i in indices]


def score_real(gen, world: ShapesDataset, indices: Sequence[int], timesteps: Sequence[int], *,
               batch_size: int = 50, seed: int = 0) -> tuple[dict, list]:
    """(summary, samples): pointing / right-object / pseudo-mask mIoU against the true masks."""
    tally, samples = QualityTally(len(gen.class_names)), []
    records = world_records(world, indices)
    for start in range(0, len(indices), batch_size):
        chunk = list(indices[start:start + batch_size])
        renders = [world.render(i) for i in chunk]
        images = np.stack([image for image, _ in renders])
        out = attention_on_images(gen, images, records[start:start + len(chunk)], timesteps, seed=seed + start)
        for sample, (_, truth) in zip(out, renders):
            tally.add(sample.class_maps, sample.class_ids, sample.label, truth)
        samples += out
    return tally.summary(), samples


def score_generated(gen, records: Sequence[PromptRecord], seeds: Sequence[int], *, batch_size: int = 32,
                    **call_kwargs) -> tuple[dict, list]:
    """(summary, samples) against colour-derived masks, plus ``drawn`` (prompted classes whose
    colours appear) and ``extra`` (images showing a class colour that was not prompted)."""
    tally, samples = QualityTally(len(gen.class_names)), []
    drawn, extra = [], []
    for start in range(0, len(records), batch_size):
        out = gen(list(records[start:start + batch_size]), list(seeds[start:start + batch_size]), **call_kwargs)
        for sample in out:
            truth = colour_mask(sample.image)
            counts = np.bincount(truth.ravel(), minlength=len(gen.class_names))
            drawn += [bool(counts[c] >= DRAWN_MIN_PIXELS) for c in sample.class_ids]
            others = [c for c in range(1, len(counts)) if c not in sample.class_ids]
            extra.append(bool((counts[others] >= DRAWN_MIN_PIXELS).any()))
            tally.add(sample.class_maps, sample.class_ids, sample.label, truth)
        samples += out
    return {**tally.summary(), "drawn": float(np.mean(drawn)), "extra": float(np.mean(extra))}, samples
