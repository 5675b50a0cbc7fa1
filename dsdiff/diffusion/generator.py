"""Stable Diffusion generation with attention capture (METHOD.md sections 2-3).

``SyntheticGenerator`` wraps a diffusers pipeline: it installs the recording
processors, runs the pipeline with per-sample seeds and turns the recorded maps
into label maps. It keeps no global state; one instance per device.
"""
from __future__ import annotations

import hashlib
import inspect
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dsdiff.data.classes import IGNORE_INDEX, class_words
from dsdiff.diffusion.attention import AttentionStore, RecordingAttnProcessor, recording_processors
from dsdiff.diffusion.masks import attention_to_labels
from dsdiff.diffusion.pixels import latents_to_images, packing_factor
from dsdiff.diffusion.prompts import PromptRecord, class_token_spans, find_class_ids, fit_prompt, prompt_token_spans

log = logging.getLogger(__name__)

SCHEDULERS: dict[str, str] = {
    "ddim": "DDIMScheduler",
    "dpm-solver": "DPMSolverMultistepScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-ancestral": "EulerAncestralDiscreteScheduler",
    "pndm": "PNDMScheduler",
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """``"auto"`` is fp16 on CUDA and fp32 on CPU; half precision on CPU is refused."""
    on_cpu = torch.device(device).type == "cpu"
    if dtype == "auto":
        return torch.float32 if on_cpu else torch.float16
    resolved = dtype if isinstance(dtype, torch.dtype) else DTYPES.get(str(dtype))
    if resolved is None:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {['auto', *DTYPES]}")
    if on_cpu and resolved != torch.float32:
        raise ValueError(f"dtype {dtype} on CPU is unsupported or very slow: use dtype='fp32' (or 'auto') on CPU")
    return resolved


def set_scheduler(pipe, name: str | None) -> None:
    """Swap the pipeline's scheduler for one named in ``SCHEDULERS``, keeping its noise schedule."""
    if name is None:
        return
    check_settings(scheduler=name)
    key = name.lower().replace("_", "-")
    import diffusers

    cls = getattr(diffusers, SCHEDULERS[key])
    pipe.scheduler = cls.from_config(pipe.scheduler.config)


def is_pixel_space(pipe) -> bool:
    """True for a pipeline without a VAE: its UNet denoises (packed) pixels, see dsdiff.diffusion.pixels."""
    return getattr(pipe, "vae", None) is None


def image_to_latent_factor(pipe) -> int:
    """How many image pixels one UNet input position covers: the VAE's factor, or the pixel packing factor."""
    if is_pixel_space(pipe):
        return packing_factor(pipe.unet.config.in_channels)
    return getattr(pipe, "vae_scale_factor", 1)


def latent_size(pipe, height: int, width: int) -> tuple[int, int]:
    """The UNet's input grid for an image size (a pixel-space pipeline has no VAE: factor 1)."""
    factor = image_to_latent_factor(pipe)
    return height // factor, width // factor


def check_settings(*, scheduler: str | None = None, tau: float = 4, alpha: float = 0.6, beta: float = 0.5,
                   window: Sequence[float] = (0.0, 1.0)) -> None:
    """Raise on generator settings that need no weights to judge (names are the ``generator.*`` keys)."""
    if scheduler is not None and scheduler.lower().replace("_", "-") not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r} (generator.scheduler): use one of {sorted(SCHEDULERS)} or null (the checkpoint's own)")
    if alpha < beta:
        raise ValueError(f"generator.alpha={alpha} < generator.beta={beta}: pixels with max map >= alpha are labelled and < beta "
                         "background, so alpha must be >= beta")
    if tau < 0:
        raise ValueError(f"generator.tau={tau}: the self-attention power must be 0 or more")
    if len(window) != 2 or not 0.0 <= window[0] < window[1] <= 1.0:
        raise ValueError(f"generator.window={list(window)}: use fractions [start, end] with 0 <= start < end <= 1 of the steps")


def pipeline_config(model: str | Path) -> dict:
    """``model_index.json`` of a hub id or local diffusers folder (no weights loaded), with clear errors."""
    from diffusers import DiffusionPipeline

    fix = "pass generator.model=<hub id or local diffusers folder with model_index.json>"
    try:
        config = dict(DiffusionPipeline.load_config(str(model)))
    except (OSError, ValueError) as e:
        hint = " (a hub id needs network access; HF_HUB_OFFLINE=1 forbids downloads)" if not Path(str(model)).exists() else ""
        raise FileNotFoundError(f"no Stable Diffusion weights at {model!r}{hint}: {fix}. Cause: {e}") from e
    if "unet" not in config:
        raise ValueError(
            f"{model!r} is a {config.get('_class_name')} without a UNet: dsdiff records UNet attention "
            "(Stable Diffusion 1.x/2.x, SDXL)"
        )
    return config


def load_tokenizer(model: str | Path):
    """The pipeline's (first) tokenizer alone: enough to check that class names can be placed."""
    import transformers

    config = pipeline_config(model)
    entry = config.get("tokenizer")
    if not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
        raise ValueError(f"{model!r} has no tokenizer in its model_index.json: dsdiff needs a text-to-image pipeline")
    cls = getattr(transformers, entry[1], None) or transformers.AutoTokenizer
    try:
        return cls.from_pretrained(str(model), subfolder="tokenizer")
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"could not load the tokenizer of {model!r}: pass generator.model=<a complete diffusers folder>. Cause: {e}") from e


def check_class_names(tokenizer, class_names: Sequence[str]) -> None:
    """Raise, naming the class, if the tokenizer cannot place a class name in a class prompt."""
    for name in class_names[1:]:
        try:
            class_token_spans(tokenizer, [class_words(name)])
        except ValueError as e:
            raise ValueError(f"class name {name!r} of data.class_list cannot be placed by this model's tokenizer: {e}") from e


WEIGHT_SUFFIXES = (".json", ".txt", ".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".model")
_CHUNK = 1 << 20


def folder_digest(folder: str | Path) -> str:
    """sha256 over a model folder's config and weight files: relative path, size, first and last MiB.

    Cheap for multi-GB checkpoints (2 MiB read per file) and independent of where the folder lives.
    """
    folder = Path(folder)
    h = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    for p in files:
        size = p.stat().st_size
        h.update(f"{p.relative_to(folder).as_posix()}\0{size}\0".encode())
        with p.open("rb") as f:
            h.update(f.read(_CHUNK))
            if size > 2 * _CHUNK:
                f.seek(size - _CHUNK)
            h.update(f.read())
    return "sha256:" + h.hexdigest()[:32]


def model_identity(model: str | Path) -> str | dict:
    """What ``dataset.json`` records of ``generator.model``: a hub id as it is; a local folder as its
    name and :func:`folder_digest` (so moving the folder keeps a cache valid, changing its weights does not)."""
    path = Path(str(model)).expanduser()
    if path.is_dir():
        return {"name": path.resolve().name, "digest": folder_digest(path)}
    return str(model)


def load_pipeline(model: str | Path, *, dtype: torch.dtype, safety_checker: bool = False):
    """A diffusers pipeline from a hub id or a local ``save_pretrained`` folder, with clear errors."""
    from diffusers import DiffusionPipeline

    fix = "pass generator.model=<hub id or local diffusers folder with model_index.json>"
    config = pipeline_config(model)
    # A component saved as [null, null] (a pixel-space model's vae) must be passed as None
    # explicitly: diffusers only fills in the optional ones (safety checker, feature extractor).
    extra = {name: None for name, value in config.items() if isinstance(value, list) and value == [None, None]}
    if "safety_checker" in config and not safety_checker:
        extra.update({"safety_checker": None, "requires_safety_checker": False})
    from diffusers.pipelines import pipeline_utils

    # diffusers renamed torch_dtype to dtype (and warns on the old name) where it has _resolve_dtype.
    extra["dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"] = dtype
    try:
        return DiffusionPipeline.from_pretrained(str(model), **extra)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"could not load the pipeline at {model!r}: {fix}. Cause: {e}") from e


@dataclass
class Sample:
    """One generated image with its labels; numpy arrays and a JSON-able metadata dict."""

    image: np.ndarray  # (H, W, 3) uint8
    label: np.ndarray  # (H, W) uint8: dataset class index, 0 background, 255 uncertain
    class_maps: np.ndarray  # (K, H, W) float32 in [0, 1], refined and normalised
    class_ids: list[int]  # K dataset class indices, in class_maps order
    metadata: dict
    attention: dict | None = None  # {"cross": (K, h, w), "self": (N, N)} float32 if asked for


class SyntheticGenerator:
    """Generate images and pixel labels from captions with a Stable Diffusion pipeline.

    The pipeline's UNet gets recording processors (its other layers get SDPA). Defaults
    are METHOD.md's: 100 steps, guidance 7.5, cross-attention at 16, self-attention at 32,
    tau 4, alpha 0.6, beta 0.5, maps averaged over all steps (``window=(0.0, 1.0)``, a
    fraction range of the denoising steps).
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
        cross_res: int = 16,
        self_res: int = 32,
        tau: int = 4,
        alpha: float = 0.6,
        beta: float = 0.5,
        window: tuple[float, float] = (0.0, 1.0),
        class_prompt: bool = True,
    ) -> None:
        for attr in ("unet", "tokenizer", "text_encoder", "encode_prompt"):
            if getattr(pipe, attr, None) is None:
                raise TypeError(f"{type(pipe).__name__} has no {attr}: dsdiff needs a UNet text-to-image pipeline (SD 1.x/2.x, SDXL)")
        if "callback_on_step_end" not in inspect.signature(pipe.__call__).parameters:
            raise TypeError(f"{type(pipe).__name__} has no callback_on_step_end: update diffusers (>=0.30)")
        check_settings(tau=tau, alpha=alpha, beta=beta, window=window)
        self.pipe, self.class_names, self.model_id = pipe, tuple(class_names), model_id
        self.num_inference_steps, self.guidance_scale, self.negative_prompt = num_inference_steps, guidance_scale, negative_prompt
        default_size = pipe.unet.config.sample_size * image_to_latent_factor(pipe)
        self.height, self.width = height or default_size, width or default_size
        self.cross_res, self.self_res, self.window = cross_res, self_res, tuple(window)
        self.tau, self.alpha, self.beta = tau, alpha, beta
        self.class_prompt = class_prompt  # False: maps from the prompt's own class-word tokens (ablation)
        self.store = AttentionStore()
        self._installed_for: tuple | None = None  # (latent size, a recorder's name, that recorder)
        check_class_names(pipe.tokenizer, self.class_names)  # fail now, not mid-run
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
        pipe = load_pipeline(model, dtype=resolve_dtype(dtype, device), safety_checker=safety_checker)
        set_scheduler(pipe, scheduler)
        return cls(pipe.to(device), class_names, model_id=str(model), **kwargs)

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    def _install(self, latent_hw: tuple[int, int]) -> None:
        """(Re)install the recorders when the latent size changed or someone replaced them."""
        unet = self.pipe.unet
        if self._installed_for is not None:
            size, name, proc = self._installed_for
            if size == latent_hw and unet.attn_processors.get(name) is proc:
                return
        procs = recording_processors(unet, self.store, latent_hw, self.cross_res, self.self_res)
        name, proc = next((n, p) for n, p in procs.items() if isinstance(p, RecordingAttnProcessor))
        unet.set_attn_processor(procs)  # (empties the dict it is given)
        self._installed_for = (latent_hw, name, proc)

    def _requests(self, prompts) -> list[tuple[str, list[int], dict]]:
        """(text, class ids, extra metadata) per prompt: a PromptRecord, a dict, or a plain string."""
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
            bad = [i for i in ids if not 0 < i < len(self.class_names)]
            if bad:
                raise ValueError(f"class ids {bad} are not prompt classes of this {len(self.class_names)}-class list (0 is background)")
            words = [class_words(self.class_names[i]) for i in ids]
            out.append((fit_prompt(self.pipe.tokenizer, p, words), list(ids), extra))
        return out

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
        record_steps = range(math.ceil(self.window[0] * steps), math.ceil(self.window[1] * steps))
        if not record_steps:
            raise ValueError(f"window {self.window} holds none of {steps} steps: widen it or add steps")
        requests = self._requests(prompts)
        if self.class_prompt:
            class_prompts, spans = zip(*(
                class_token_spans(self.pipe.tokenizer, [class_words(self.class_names[i]) for i in ids])
                for _, ids, _ in requests
            ))
            class_embeds = self.pipe.encode_prompt(
                prompt=list(class_prompts), device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )[0]
        else:
            class_prompts = tuple(text for text, _, _ in requests)
            spans = [prompt_token_spans(self.pipe.tokenizer, text, [class_words(self.class_names[i]) for i in ids])
                     for text, ids, _ in requests]
            class_embeds = None
        self._install(latent_size(self.pipe, height, width))
        self.store.reset(class_embeds, batch_size=len(requests))
        self.store.recording = 0 in record_steps

        def on_step_end(pipe, i, t, callback_kwargs):
            self.store.recording = (i + 1) in record_steps
            return callback_kwargs

        pixel_space = is_pixel_space(self.pipe)
        if pixel_space:
            # The pipeline sizes its latents as height // vae_scale_factor (8 without a VAE); ask
            # for the size whose latent grid is the packed image, and unpack the latents below.
            lat_h, lat_w = latent_size(self.pipe, height, width)
            scale = getattr(self.pipe, "vae_scale_factor", 8)
            call_h, call_w = lat_h * scale, lat_w * scale
        else:
            call_h, call_w = height, width
        try:
            out = self.pipe(
                prompt=[r[0] for r in requests],
                negative_prompt=None if negative is None else [negative] * len(requests),
                num_inference_steps=steps,
                guidance_scale=guidance,
                height=call_h,
                width=call_w,
                generator=[torch.Generator("cpu").manual_seed(int(s)) for s in seeds],
                output_type="latent" if pixel_space else "np",
                callback_on_step_end=on_step_end,
            )
            cross_all, self_all = self.store.mean("cross"), self.store.mean("self")
        finally:
            self.store.clear()
        images = latents_to_images(out.images, factor).numpy() if pixel_space else out.images
        settings = {
            "model": self.model_id, "scheduler": type(self.pipe.scheduler).__name__, "steps": steps,
            "guidance_scale": guidance, "negative_prompt": negative, "height": height, "width": width,
            "dtype": str(self.pipe.unet.dtype).replace("torch.", ""), "tau": self.tau, "alpha": self.alpha,
            "beta": self.beta, "cross_res": self.cross_res, "self_res": self.self_res,
            "window": list(self.window), "recorded_steps": len(record_steps),
            "maps_from": "class_prompt" if self.class_prompt else "prompt_tokens",
        }
        nsfw = getattr(out, "nsfw_content_detected", None)
        samples = []
        for b, (text, ids, extra) in enumerate(requests):
            metadata = {**extra, "prompt": text, "class_prompt": class_prompts[b], "seed": int(seeds[b]), **settings}
            if nsfw is not None:
                metadata["nsfw"] = bool(nsfw[b])
            samples.append(self._sample(images[b], cross_all[b], self_all[b], spans[b], ids, metadata, return_attention))
        return samples

    def _sample(self, image, cross, self_attn, spans, class_ids, metadata, return_attention) -> Sample:
        """Labels for one image from its mean maps: cross (Nc, L) over class-prompt tokens, self (Ns, Ns)."""
        height, width = image.shape[:2]
        per_class = [cross[:, s].mean(-1) for s in spans]  # a name's map: the mean over all its tokens
        cross = torch.stack(per_class) if per_class else cross.new_zeros(0, cross.shape[0])
        cross = cross.view(len(class_ids), self.cross_res, cross.shape[-1] // self.cross_res)
        labels, maps = attention_to_labels(
            cross, self_attn, class_ids, tau=self.tau, alpha=self.alpha, beta=self.beta,
            size=(height, width), ignore_index=IGNORE_INDEX, self_hw=(self.self_res, self_attn.shape[-1] // self.self_res),
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
