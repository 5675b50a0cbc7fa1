"""Stable Diffusion generation with attention capture (docs/method.md).

``SyntheticGenerator`` wraps a diffusers pipeline. Its public recording API is what both
sampling (``__call__``) and real-image scoring (:mod:`dsdiff.diffusion.real_images`) use:

- :meth:`SyntheticGenerator.requests`: prompts -> (text fitted to the encoder, class ids, metadata);
- :meth:`SyntheticGenerator.recording`: a context that encodes the class prompts, installs the
  recorders for a latent size, resets the running sums, and clears them on exit; inside it, any
  UNet forward pass records (while ``store.recording`` is on) and :meth:`Recording.read` takes the means;
- :meth:`SyntheticGenerator.label`: one image's means -> label map and class maps (:class:`Sample`).

It keeps no global state; one instance per device.
"""
from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from dsdiff.data.classes import (
    IGNORE_INDEX,
    class_words,
    first_prompt_class,
    unattended_label,
)
from dsdiff.diffusion.attention import AttentionStore
from dsdiff.diffusion.family import family_of
from dsdiff.diffusion.masks import attention_to_labels
from dsdiff.diffusion.pipeline import (
    image_to_latent_factor,
    is_pixel_space,
    latent_size,
    load_pipeline,
    resolve_dtype,
    set_scheduler,
    unet_calls,
)
from dsdiff.diffusion.pixels import latents_to_images
from dsdiff.diffusion.prompts import (
    PromptRecord,
    find_class_ids,
    fit_prompt,
    prompt_token_spans,
)
from dsdiff.diffusion.settings import LabelSettings
from dsdiff.utils.errors import SettingError

log = logging.getLogger(__name__)
# the generator config keys that are sampling arguments of SyntheticGenerator (None: the pipeline's own)
SAMPLING_ARGS = ("num_inference_steps", "guidance_scale", "negative_prompt", "height", "width", "max_sequence_length")


@dataclass
class Sample:
    """One generated image with its labels; numpy arrays and a JSON-able metadata dict."""

    image: np.ndarray  # (H, W, 3) uint8
    label: np.ndarray  # (H, W) uint8: dataset class index, 0 background, 255 uncertain
    class_maps: np.ndarray  # (K, H, W) float32 in [0, 1], refined and normalised
    class_ids: list[int]  # K dataset class indices, in class_maps order
    metadata: dict
    attention: dict | None = None  # {"cross": (K, h, w), "self": (N, N)} float32 if asked for


class Request(NamedTuple):
    """One prompt made ready: its text (fitted to the text encoder), its class ids, record metadata."""

    text: str
    class_ids: list[int]
    extra: dict


@dataclass
class Recording:
    """One batch's recording: what the maps are taken over (class prompts and their token spans)
    and, after :meth:`read`, the mean maps: cross (B, Nc, L) and self (B, Ns, Ns)."""

    store: AttentionStore
    class_prompts: tuple[str, ...]
    spans: list = field(default_factory=list)
    cross: torch.Tensor | None = None
    self_attn: torch.Tensor | None = None

    def read(self) -> None:
        """Take the means of what the UNet passes recorded so far."""
        self.cross, self.self_attn = self.store.mean("cross"), self.store.mean("self")


class SyntheticGenerator:
    """Generate images and pixel labels from captions with a Stable Diffusion pipeline.

    A UNet pipeline's UNet gets recording processors (its other layers get SDPA); an SD3 pipeline's
    transformer carries the class prompt as its own token stream (:mod:`dsdiff.diffusion.family`). Defaults are
    the paper's: 100 steps, guidance 7.5, and :class:`LabelSettings`' defaults for the labels
    (``labels=``, or its fields as keywords: ``cross_res=8, tau=1``).
    """

    def __init__(
        self,
        pipe,
        class_names: Sequence[str],
        *,
        model_id: str | None = None,
        num_inference_steps: int = 100,
        guidance_scale: float = 7.5,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        max_sequence_length: int | None = None,
        labels: LabelSettings | Mapping | None = None,
        **label_fields: Any,
    ) -> None:
        self.labels = LabelSettings.of(labels, **label_fields)
        options = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        self.family = family_of(pipe, self.labels, **options)
        if self.family.name == "flux" and negative_prompt:
            raise SettingError(f"generator.negative_prompt={negative_prompt!r}: FLUX.1 is guidance-distilled and "
                               "dsdiff runs it without a negative branch; set it to null")
        for attr in (*self.family.components, "encode_prompt"):
            if getattr(pipe, attr, None) is None:
                raise TypeError(f"{type(pipe).__name__} has no {attr}: dsdiff needs a text-to-image pipeline "
                                "(SD 1.x/2.x, SDXL, SD3)")
        if "callback_on_step_end" not in inspect.signature(pipe.__call__).parameters:
            raise TypeError(f"{type(pipe).__name__} has no callback_on_step_end: update diffusers (>=0.30)")
        self.pipe, self.class_names, self.model_id = pipe, tuple(class_names), model_id
        self.num_inference_steps, self.guidance_scale, self.negative_prompt = num_inference_steps, guidance_scale, negative_prompt
        default_size = self.family.native_size()
        self.height, self.width = height or default_size, width or default_size
        self.store = AttentionStore()
        self.family.check_class_names(self.class_names)  # fail now, not mid-run
        self.family.check_size(self.height, self.width)
        self._install(latent_size(pipe, self.height, self.width))
        pipe.set_progress_bar_config(disable=True)

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path,
        class_names: Sequence[str],
        *,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device | None = None,
        scheduler: str | None = None,
        safety_checker: bool = False,
        **kwargs,
    ) -> SyntheticGenerator:
        """Load a hub id or a local diffusers folder onto ``device`` (default CUDA if present).

        The safety checker is off by default: it blacks out flagged images, which would
        leave black images with non-empty labels in the dataset; filter afterwards instead.
        """
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        labels = LabelSettings.of(kwargs.pop("labels", None), **{k: kwargs.pop(k) for k in list(kwargs) if k in LabelSettings.__dataclass_fields__})
        pipe = load_pipeline(model, dtype=resolve_dtype(dtype, device), safety_checker=safety_checker)
        set_scheduler(pipe, scheduler)
        return cls(pipe.to(device), class_names, model_id=str(model), labels=labels, **kwargs)

    @classmethod
    def from_settings(cls, generator: Mapping[str, Any], class_names: Sequence[str], device: str | torch.device | None = None,
                      labels: LabelSettings | None = None) -> SyntheticGenerator:
        """Load from a plain ``generator`` config node (conf/generator): model, dtype, scheduler, safety checker,
        the sampling settings it sets, and ``labels`` (default: its ``generator.labels``)."""
        sampling = {k: generator[k] for k in SAMPLING_ARGS if generator.get(k) is not None}
        return cls.from_pretrained(
            generator["model"], class_names, dtype=generator.get("dtype", "auto"), device=device,
            scheduler=generator.get("scheduler"), safety_checker=bool(generator.get("safety_checker", False)),
            labels=labels if labels is not None else LabelSettings.of(generator.get("labels")), **sampling,
        )

    @property
    def device(self) -> torch.device:
        return self.family.denoiser.device

    # -- the recording API ---------------------------------------------------------------------
    def requests(self, prompts: Sequence[str | Mapping | PromptRecord]) -> list[Request]:
        """One :class:`Request` per prompt: a PromptRecord, its dict, or a plain string (classes found in it)."""
        out = []
        for p in prompts:
            if isinstance(p, str):
                ids, extra = find_class_ids(p, self.class_names), {}
                if not ids:
                    log.warning("no class of the class list is named in %r: its label map is all background", p)
            else:
                rec = p if isinstance(p, PromptRecord) else PromptRecord.from_dict(p) if isinstance(p, Mapping) else None
                if rec is None:
                    raise TypeError(f"a prompt is a str, dict or PromptRecord, got {type(p).__name__}")
                p, ids, extra = rec.prompt, rec.class_ids, {"id": rec.id, "image_id": rec.image_id}
            bad = [i for i in ids if not first_prompt_class(self.class_names) <= i < len(self.class_names)]
            if bad:
                raise SettingError(f"class ids {bad} are not prompt classes of this {len(self.class_names)}-class list"
                                   f"{' (0 is background)' if first_prompt_class(self.class_names) else ''}")
            words = [class_words(self.class_names[i]) for i in ids]
            out.append(Request(fit_prompt(self.pipe.tokenizer, p, words), list(ids), extra))  # CLIP's 77
        return out

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """(B, L, D) conditional text embeddings, as the pipeline computes them."""
        return self.family.encode(texts, self.device)

    @contextmanager
    def recording(self, requests: Sequence[Request], height: int, width: int,
                  class_prompt: bool | None = None) -> Iterator[Recording]:
        """Record the attention of the UNet passes run inside, for ``requests`` at an image size.

        With the class prompt (``labels.class_prompt``, or ``class_prompt=True``) the maps are over the
        class names encoded alone; otherwise over the class words' tokens in the prompt itself.
        """
        use_class_prompt = self.labels.class_prompt if class_prompt is None else class_prompt
        words = [[class_words(self.class_names[i]) for i in r.class_ids] for r in requests]
        if use_class_prompt:
            class_prompts, spans = zip(*(self.family.spans(w) for w in words))
            class_embeds = self.encode(class_prompts)
        else:
            class_prompts = tuple(r.text for r in requests)
            spans = [prompt_token_spans(self.pipe.tokenizer, r.text, w) for r, w in zip(requests, words)]
            class_embeds = None
        self._install(latent_size(self.pipe, height, width))
        self.store.reset(class_embeds, batch_size=len(requests))
        try:
            yield Recording(self.store, tuple(class_prompts), list(spans))
        finally:
            self.store.clear()

    def label(self, image, recording: Recording, b: int, class_ids: Sequence[int], metadata: dict,
              return_attention: bool = False) -> Sample:
        """Sample ``b`` of a read recording -> its labels; ``image`` is (H, W, 3) in [0, 1]."""
        cross, self_attn, spans = recording.cross[b], recording.self_attn[b], recording.spans[b]
        height, width = image.shape[:2]
        res = self.labels.cross_res
        per_class = [cross[:, s].mean(-1) for s in spans]  # a name's map: the mean over all its tokens
        cross = torch.stack(per_class) if per_class else cross.new_zeros(0, cross.shape[0])
        cross = cross.view(len(class_ids), res, cross.shape[-1] // res)
        labels, maps = attention_to_labels(
            cross, self_attn, class_ids, tau=self.labels.tau, alpha=self.labels.alpha, beta=self.labels.beta,
            size=(height, width), ignore_index=IGNORE_INDEX, self_hw=(self.labels.self_res, self_attn.shape[-1] // self.labels.self_res),
            background=unattended_label(self.class_names),
        )
        attention = {"cross": cross.float().cpu().numpy(), "self": self_attn.cpu().numpy()} if return_attention else None
        return Sample(
            image=(np.asarray(image) * 255).round().clip(0, 255).astype(np.uint8),
            label=labels.to(torch.uint8).cpu().numpy(),
            class_maps=maps.cpu().numpy().astype(np.float32),
            class_ids=list(class_ids),
            metadata=metadata,
            attention=attention,
        )

    def _install(self, latent_hw: tuple[int, int]) -> None:
        """(Re)install the recorders when the latent size changed or someone replaced them."""
        self.family.install(self.store, latent_hw)

    # -- sampling ------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompts: Sequence[str | Mapping | PromptRecord],
        seeds: Sequence[int],
        *,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        return_attention: bool = False,
    ) -> list[Sample]:
        """Generate one sample per prompt; ``seeds[i]`` fixes sample i whatever else is in the batch."""
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds: pass one seed per prompt")
        steps = num_inference_steps or self.num_inference_steps
        guidance = self.guidance_scale if guidance_scale is None else guidance_scale
        negative = self.negative_prompt if negative_prompt is None else negative_prompt
        height, width = height or self.height, width or self.width
        factor = image_to_latent_factor(self.pipe)
        if height % factor or width % factor:
            raise ValueError(f"image size {height}x{width} is not a multiple of this pipeline's latent factor {factor}")
        if (height, width) != (self.height, self.width):  # the constructor checked its own size
            self.family.check_size(height, width)
        # the window is counted over the UNet calls the sampler makes (PNDM: steps + 1, its PLMS warm-up)
        record_steps = self.labels.record_steps(unet_calls(self.pipe.scheduler, steps))
        requests = self.requests(prompts)
        pixel_space = is_pixel_space(self.pipe)
        if pixel_space:
            # The pipeline sizes its latents as height // vae_scale_factor (8 without a VAE); ask
            # for the size whose latent grid is the packed image, and unpack the latents below.
            lat_h, lat_w = latent_size(self.pipe, height, width)
            scale = getattr(self.pipe, "vae_scale_factor", 8)
            call_h, call_w = lat_h * scale, lat_w * scale
        else:
            call_h, call_w = height, width

        def on_step_end(pipe, i, t, callback_kwargs):
            self.store.recording = (i + 1) in record_steps
            return callback_kwargs

        with self.recording(requests, height, width) as rec:
            self.store.recording = 0 in record_steps
            out = self.pipe(
                prompt=[r.text for r in requests],
                negative_prompt=None if negative is None else [negative] * len(requests),
                num_inference_steps=steps,
                guidance_scale=guidance,
                height=call_h,
                width=call_w,
                generator=[torch.Generator("cpu").manual_seed(int(s)) for s in seeds],
                output_type="latent" if pixel_space else "np",
                callback_on_step_end=on_step_end,
                **self.family.prompt_kwargs(),
            )
            rec.read()
        images = latents_to_images(out.images, factor).numpy() if pixel_space else out.images
        settings = {
            "model": self.model_id, "scheduler": type(self.pipe.scheduler).__name__, "steps": steps,
            "guidance_scale": guidance, "negative_prompt": negative, "height": height, "width": width,
            "dtype": str(self.family.denoiser.dtype).replace("torch.", ""), **self.labels.manifest_fields(),
            "recorded_steps": len(record_steps), **self.family.prompt_kwargs(),
        }
        nsfw = getattr(out, "nsfw_content_detected", None)
        samples = []
        for b, r in enumerate(requests):
            metadata = {**r.extra, "prompt": r.text, "class_prompt": rec.class_prompts[b], "seed": int(seeds[b]), **settings}
            if nsfw is not None:
                metadata["nsfw"] = bool(nsfw[b])
            samples.append(self.label(images[b], rec, b, r.class_ids, metadata, return_attention))
        return samples
