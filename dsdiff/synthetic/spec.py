"""What a synthetic dataset is: its ids and generation groups, its prompt records, the configuration
written to ``dataset.json``, and the checked plan that generation (cached or on the fly) follows.

Sample ``i`` (id ``f"{i:07d}"``) is prompt record ``i mod R`` with seed ``synthetic.seed + i``.
Samples are made in fixed groups ``[kB, (k+1)B)`` of ``B = generator.batch_size`` ids, one group per
forward pass, because batched kernels round differently for different batch mates: that is what
makes a resumed folder bit-identical to an uninterrupted one, however many processes made it.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import permutations
from pathlib import Path

import torch

from dsdiff.data.classes import class_words, first_prompt_class
from dsdiff.diffusion.generator import SyntheticGenerator
from dsdiff.diffusion.pipeline import check_scheduler, model_identity
from dsdiff.diffusion.prompts import (
    DEFAULT_TEMPLATE,
    PromptRecord,
    template_prompt,
)
from dsdiff.diffusion.settings import LabelSettings
from dsdiff.prompting.checks import check_prompts_file
from dsdiff.synthetic.store import SyntheticStore, WriteOptions
from dsdiff.utils.config import to_plain
from dsdiff.utils.errors import SettingError

# generator settings that change what is sampled, besides the labelling settings (the device and
# dtype="auto" do not; the batch size does, in the last bits: it decides which ids share a forward pass)
SAMPLING_KEYS = ("model", "scheduler", "num_inference_steps", "guidance_scale", "negative_prompt", "height", "width", "batch_size")
EXPORTS = (None, "voc", "hf")


def sample_id(index: int) -> str:
    return f"{index:07d}"


def sample_groups(num_images: int, batch_size: int) -> list[list[int]]:
    """The fixed generation groups: ids ``[kB, min((k+1)B, N))``, one forward pass each."""
    return [list(range(s, min(s + batch_size, num_images))) for s in range(0, num_images, batch_size)]


def prompt_records(prompts: str | Path | None, class_names: Sequence[str], template: str = DEFAULT_TEMPLATE,
                   max_classes: int = 1) -> list[PromptRecord]:
    """Records from a prompts JSONL (``python -m dsdiff.prompts``), or class-only templates.

    Templates name one class each, then (``max_classes`` >= 2) every ordered pair of distinct
    classes, and so on: ``"a photo of a dog and a cat"``.
    """
    if prompts:  # every record that cannot be generated, as FILE:LINE (empty class lists: the filters' call)
        return check_prompts_file(prompts, class_names, drop_empty=False)
    if max_classes < 1:
        raise SettingError(f"synthetic.max_classes_per_prompt={max_classes}: use 1 or more")
    records = []
    for k in range(1, max_classes + 1):
        for ids in permutations(range(first_prompt_class(class_names), len(class_names)), k):
            words = [class_words(class_names[c]) for c in ids]
            records.append(PromptRecord("class_" + "_".join(map(str, ids)), template_prompt(words, template), list(ids), words))
    return records


def records_digest(records: Sequence[PromptRecord]) -> str:
    text = "\n".join(json.dumps(r.to_dict(), sort_keys=True) for r in records)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def settings_config(generator: Mapping, synthetic: Mapping, class_names: Sequence[str]) -> dict:
    """``dataset.json`` less its ``prompts`` block: what the configuration alone decides (no weights, no records)."""
    generator, synthetic = dict(to_plain(generator)), dict(to_plain(synthetic))
    settings = {k: generator.get(k) for k in SAMPLING_KEYS}
    if generator.get("max_sequence_length") is not None:  # SD3's T5 prompt length (UNet configs have none)
        settings["max_sequence_length"] = generator["max_sequence_length"]
    settings.update(LabelSettings.of(generator.get("labels")).to_dict())
    settings["model"] = model_identity(generator["model"]) if generator.get("model") else None
    settings["batch_size"] = int(generator.get("batch_size") or 1)
    return {
        "class_names": list(class_names),
        "generator": settings,
        "dtype": generator.get("dtype", "auto"),
        "seed": int(synthetic.get("seed", 0)),
        "image_format": synthetic.get("image_format", "png"),
        **({"jpeg_quality": WriteOptions.from_synthetic(synthetic).jpeg_quality} if synthetic.get("image_format") == "jpg" else {}),
        "filters": synthetic.get("filters", {}),
    }


def prompts_config(synthetic: Mapping, records: Sequence[PromptRecord]) -> dict:
    """``dataset.json``'s ``prompts`` block: ``synthetic.prompts`` as configured, the template, the records' count and digest."""
    return {"file": str(synthetic.get("prompts")) if synthetic.get("prompts") else None,
            "template": synthetic.get("template"), "max_classes": synthetic.get("max_classes_per_prompt", 1),
            "records": len(records), "digest": records_digest(records)}


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_sampling(generator: Mapping) -> None:
    """Raise, naming the key, on a ``generator`` sampling value of the wrong type or out of range (null: the default)."""
    batch_size = generator.get("batch_size")
    if batch_size is not None and (not _whole(batch_size) or batch_size < 1):
        raise SettingError(f"generator.batch_size={batch_size!r}: prompts per forward pass, a whole number >= 1")
    steps = generator.get("num_inference_steps")
    if steps is not None and (not _whole(steps) or steps < 1):
        raise SettingError(f"generator.num_inference_steps={steps!r}: denoising steps, a whole number >= 1 "
                           "(conf/generator/sd21.yaml: 100, shapes.yaml: 20)")
    guidance = generator.get("guidance_scale")
    if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, int | float) or not guidance >= 0):
        raise SettingError(f"generator.guidance_scale={guidance!r}: the classifier-free guidance scale, a number >= 0 "
                           "(1 or less: no guidance; the paper: 7.5)")
    length = generator.get("max_sequence_length")
    if length is not None and (not _whole(length) or length < 1):
        raise SettingError(f"generator.max_sequence_length={length!r}: T5 prompt tokens of an SD3 generator, a whole "
                           "number >= 1 (conf/generator/sd3.yaml: 256)")
    for key in ("height", "width"):
        side = generator.get(key)
        if side is not None and (not _whole(side) or side < 1):
            raise SettingError(f"generator.{key}={side!r}: the image side in pixels, a whole number >= 1, "
                               "or null for the model's native size")


def check_settings(generator: Mapping, synthetic: Mapping) -> None:
    """Raise, naming the setting, on ``generator`` / ``synthetic`` values that need no weights or files to judge."""
    export = synthetic.get("export")
    if export not in EXPORTS:
        raise SettingError(f"synthetic.export={export!r}: use null, 'voc' (a VOC-layout copy) or 'hf' (a Hugging Face datasets folder)")
    if export == "hf" and importlib.util.find_spec("datasets") is None:
        raise ModuleNotFoundError("synthetic.export=hf needs the `datasets` package: pip install datasets (or dsdiff[hf])")
    num_images = synthetic.get("num_images")
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images <= 0:
        raise SettingError(f"synthetic.num_images={num_images!r}: how many samples to make, a whole number >= 1")
    seed = synthetic.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise SettingError(f"synthetic.seed={seed!r}: the first sample's seed (sample i uses seed + i), a whole number >= 0")
    check_sampling(generator)
    check_scheduler(generator.get("scheduler"))
    negative = generator.get("negative_prompt")
    if negative is not None and (not isinstance(negative, str) or not negative.strip()):
        raise SettingError(f"generator.negative_prompt={negative!r}: the text the sampler steers away from "
                           "(conf/generator/sd21.yaml holds the original's), or null for none")
    LabelSettings.of(generator.get("labels"))
    WriteOptions.from_synthetic(synthetic)


@dataclass(frozen=True)
class GenerationPlan:
    """A synthetic dataset to make: plain ``generator`` and ``synthetic`` settings (conf/generator,
    conf/synthetic), the class list and the prompt records; checked when it is built."""

    generator: dict
    synthetic: dict
    class_names: tuple[str, ...]
    records: tuple[PromptRecord, ...]

    def __post_init__(self) -> None:
        for name in ("generator", "synthetic"):
            object.__setattr__(self, name, dict(to_plain(getattr(self, name))))
        object.__setattr__(self, "class_names", tuple(self.class_names))
        object.__setattr__(self, "records", tuple(self.records))
        if not self.records:
            raise SettingError("no prompt records: pass synthetic.prompts=<a prompts file> or class templates")

    @classmethod
    def from_settings(cls, generator: Mapping, synthetic: Mapping, class_names: Sequence[str],
                      prompts: str | Path | None = None) -> GenerationPlan:
        """The plan for ``prompts`` (a prompts file the prompts stage made), else ``synthetic.prompts``, else
        class templates. ``dataset.json`` records ``synthetic.prompts`` as configured and the records' digest."""
        synthetic = dict(to_plain(synthetic))
        records = prompt_records(prompts or synthetic.get("prompts"), class_names, synthetic.get("template") or DEFAULT_TEMPLATE,
                                 synthetic.get("max_classes_per_prompt", 1))
        return cls(generator, synthetic, tuple(class_names), tuple(records))

    @cached_property
    def labels(self) -> LabelSettings:
        return LabelSettings.of(self.generator.get("labels"))

    @cached_property
    def options(self) -> WriteOptions:
        return WriteOptions.from_synthetic(self.synthetic)

    @property
    def store(self) -> SyntheticStore:
        return SyntheticStore(self.synthetic["dir"])

    @property
    def num_images(self) -> int:
        return int(self.synthetic["num_images"])

    @property
    def batch_size(self) -> int:
        return int(self.generator.get("batch_size") or 1)

    @property
    def seed(self) -> int:
        return int(self.synthetic.get("seed", 0))

    def requests(self, group: Sequence[int]) -> list[dict]:
        """``[{"id", "seed", "record"}]`` for a group of sample indices (record ``i mod R``, seed ``seed + i``)."""
        return [{"id": sample_id(i), "seed": self.seed + i, "record": self.records[i % len(self.records)].to_dict()} for i in group]

    def dataset_config(self) -> dict:
        """What ``dataset.json`` records: everything that decides the samples, nothing that does not."""
        settings = settings_config(self.generator, self.synthetic, self.class_names)
        order = ["class_names", "generator", "dtype", "seed", "prompts"]  # the order dataset.json has always had
        settings["prompts"] = prompts_config(self.synthetic, self.records)
        return {**{k: settings[k] for k in order}, **settings}

    def build_generator(self, device: torch.device) -> SyntheticGenerator:
        """Load the pipeline onto ``device`` with these settings."""
        return SyntheticGenerator.from_settings(self.generator, self.class_names, device, labels=self.labels)
