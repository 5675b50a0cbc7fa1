"""What a label-scoring run is: its checked settings (``score.*``), the tune-split images it scores
with their prompts, and the fixed groups it scores them in.

Image ``i`` of the selection (the tune split's images that have a class, in the split's order) is
scored in group ``[kB, (k+1)B)`` of ``B = score.batch_size`` with noise seed ``score.seed + kB``,
one forward pass per timestep and group, so a resumed run makes the same bits as an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsdiff.diffusion.pipeline import check_scheduler, generator_source, model_identity
from dsdiff.diffusion.prompts import DEFAULT_TEMPLATE, build_records, load_captions
from dsdiff.diffusion.settings import LabelSettings
from dsdiff.utils.errors import MissingPathError, NotAFolderError, SettingError

SETTING = "score"


def _whole(value: Any, minimum: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= minimum


@dataclass(frozen=True)
class ScoreSettings:
    """``conf/score/default.yaml``: how many tune images, at which noise levels, in which batches, where."""

    images: int
    timesteps: tuple[int, ...]
    batch_size: int
    seed: int
    dir: str
    captions: str | None = None
    template: str = DEFAULT_TEMPLATE
    grid_rows: int = 4
    min_certain: float = 0.5

    @classmethod
    def of(cls, score: Mapping[str, Any]) -> ScoreSettings:
        """Checked settings from the ``score`` config node; every error names the key and the fix."""
        score = dict(score)
        unknown = sorted(set(score) - set(cls.__dataclass_fields__))
        if unknown:
            raise SettingError(f"unknown {SETTING} keys {unknown}: use {sorted(cls.__dataclass_fields__)}")
        if not _whole(score.get("images"), 1):
            raise SettingError(f"{SETTING}.images={score.get('images')!r}: how many tune-split images to score, a whole number >= 1")
        steps = score.get("timesteps")
        if not isinstance(steps, Sequence) or isinstance(steps, str) or not steps or not all(_whole(t, 0) for t in steps):
            raise SettingError(f"{SETTING}.timesteps={steps!r}: a non-empty list of whole noise levels, e.g. [100,300,500]")
        if len(set(steps)) != len(steps):
            raise SettingError(f"{SETTING}.timesteps={list(steps)} repeats a noise level: list each once")
        if not _whole(score.get("batch_size"), 1):
            raise SettingError(f"{SETTING}.batch_size={score.get('batch_size')!r}: images per forward pass, a whole number >= 1")
        if not _whole(score.get("seed"), 0):
            raise SettingError(f"{SETTING}.seed={score.get('seed')!r}: the noise seed, a whole number >= 0")
        if not _whole(score.get("grid_rows", 4), 0):
            raise SettingError(f"{SETTING}.grid_rows={score.get('grid_rows')!r}: rows of the overlay grid, a whole number >= 0")
        floor = score.get("min_certain", 0.5)
        if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 <= floor <= 1:
            raise SettingError(f"{SETTING}.min_certain={floor!r}: the certain-pixel share below which the objective is scaled down, in [0, 1]")
        template = score.get("template") or DEFAULT_TEMPLATE
        if "{}" not in template:
            raise SettingError(f"{SETTING}.template={template!r} has no '{{}}' for the class names: e.g. 'a photo of {{}}'")
        captions = score.get("captions")
        if captions and not Path(str(captions)).expanduser().is_file():
            raise MissingPathError(f"{SETTING}.captions={captions}: no such file; pass a COCO captions JSON or a JSONL "
                                    "of {\"image\", \"caption\"}, or null for the dataset's captions / class templates")
        out = Path(str(score.get("dir") or "")).expanduser()
        if not score.get("dir") or any(p.exists() and not p.is_dir() for p in (out, *out.parents)):
            raise NotAFolderError(f"{SETTING}.dir={score.get('dir')!r} is not a usable folder: pass score.dir=<a folder path>")
        return cls(int(score["images"]), tuple(int(t) for t in steps), int(score["batch_size"]), int(score["seed"]),
                   str(out), str(Path(captions).expanduser()) if captions else None, template,
                   int(score.get("grid_rows", 4)), float(floor))


def check_generator(generator: Mapping[str, Any]) -> LabelSettings:
    """The generator settings scoring uses, checked as generation checks them; returns the labelling settings."""
    if not generator.get("model"):
        raise SettingError("generator.model is not set: pass generator.model=<hub id or local diffusers folder>")
    check_scheduler(generator.get("scheduler"))
    return LabelSettings.of(generator.get("labels"))


def train_timesteps(model: str | Path) -> int:
    """The noise schedule's length (``num_train_timesteps``) from the model's scheduler config, no weights loaded."""
    from diffusers import DDIMScheduler

    model = generator_source(model)
    try:
        config = DDIMScheduler.load_config(str(model), subfolder="scheduler")
    except (OSError, ValueError) as e:
        raise MissingPathError(f"could not read the scheduler config of {model!r}: pass generator.model=<a complete "
                                f"diffusers folder or hub id>. Cause: {e}") from e
    return int(config.get("num_train_timesteps", 1000))


def scored_timesteps(settings: ScoreSettings, labels: LabelSettings, num_train_timesteps: int) -> list[int]:
    """The noise levels whose attention is averaged: ``score.timesteps`` ordered from the noisiest (a
    sampler's first step) to the cleanest, cut by ``generator.labels.window`` as it cuts denoising steps."""
    bad = [t for t in settings.timesteps if not 0 <= t < num_train_timesteps]
    if bad:
        raise SettingError(f"{SETTING}.timesteps has {bad} outside this model's noise schedule [0, {num_train_timesteps - 1}]: "
                         f"use levels below {num_train_timesteps}")
    order = sorted(settings.timesteps, reverse=True)
    return [order[i] for i in labels.record_steps(len(order))]


def dataset_names(dataset) -> list[str]:
    """The tune split's image names in its own order (``ids`` of VOC/COCO, ``name(i)`` of the shapes world)."""
    if hasattr(dataset, "ids"):
        return [str(n) for n in dataset.ids]
    return [dataset.name(i) for i in range(len(dataset))]


def select_items(dataset, class_names: Sequence[str], settings: ScoreSettings) -> list[dict]:
    """The first ``score.images`` images of the tune split that have a class: ``{"index", "name", "record"}``.

    The text is the image's caption (``score.captions``, else the dataset's own captions, as the shapes
    world has) or else a class template, with the class names appended; its classes come from the true mask.
    """
    names = dataset_names(dataset)
    labels = dataset.image_labels()
    if settings.captions:
        captions = load_captions(settings.captions)
    elif hasattr(dataset, "captions"):
        captions = list(dataset.captions().items())
    else:
        captions = []
    first: dict[str, dict] = {}
    for record in build_records(labels, class_names, captions, template=settings.template):
        first.setdefault(record.image_id, record.to_dict())
    usable = [(i, n) for i, n in enumerate(names) if n in first]
    if len(usable) < settings.images:
        raise SettingError(f"{SETTING}.images={settings.images}, but the tune split (data.tune) has {len(usable)} images "
                         f"with a class (of {len(names)}): lower {SETTING}.images or enlarge data.tune (e.g. data.tune.subset)")
    return [{"index": i, "name": n, "record": first[n]} for i, n in usable[: settings.images]]


def score_groups(count: int, batch_size: int) -> list[list[int]]:
    """The fixed groups of selection positions ``[kB, min((k+1)B, N))``, one forward pass each."""
    return [list(range(s, min(s + batch_size, count))) for s in range(0, count, batch_size)]


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def results_config(generator: Mapping, labels: LabelSettings, settings: ScoreSettings, timesteps: Sequence[int],
                   tune: Any, class_names: Sequence[str]) -> dict:
    """Everything that decides the per-image results (not how many images: more images extend the folder)."""
    return {
        "class_names": list(class_names),
        "model": model_identity(generator["model"]),
        "scheduler": generator.get("scheduler"),
        "dtype": generator.get("dtype", "auto"),
        "height": generator.get("height"),
        "width": generator.get("width"),
        "labels": labels.to_dict(),
        "timesteps": list(settings.timesteps),
        "scored_timesteps": list(timesteps),
        "seed": settings.seed,
        "batch_size": settings.batch_size,
        "tune": tune,
        "captions": {"file": settings.captions, "digest": file_digest(settings.captions) if settings.captions else None,
                     "template": settings.template},
    }


def results_dir(settings: ScoreSettings, config: Mapping) -> Path:
    """``<score.dir>/<digest of the results config>``: other settings (a sweep's trials) get folders of their own."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return Path(settings.dir) / digest
