"""What differs between the generator families dsdiff records (docs/mmdit.md).

``unet``: SD 1.x / 2.x / SDXL-layout UNets, recorded by :mod:`dsdiff.diffusion.attention`
(cross-attention at ``cross_res``, self-attention at ``self_res``). ``sd3``: Stable Diffusion 3 /
3.5 (``SD3Transformer2DModel``, joint text-image attention), recorded by
:mod:`dsdiff.diffusion.mmdit` with the class prompt carried as its own token stream; its maps are
at the image-token grid, so ``cross_res`` and ``self_res`` are that grid's height. ``flux``:
FLUX.1 (``FluxTransformer2DModel``), recorded by :mod:`dsdiff.diffusion.flux` the same way.
:class:`~dsdiff.diffusion.generator.SyntheticGenerator` asks a family object for the rest.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from dsdiff.data.classes import class_words
from dsdiff.diffusion.attention import AttentionStore, RecordingAttnProcessor, recording_processors
from dsdiff.diffusion.flux import FluxRecorder
from dsdiff.diffusion.mmdit import JointRecorder, check_blocks
from dsdiff.diffusion.pipeline import (
    PIPELINE_FAMILIES,
    RECORDED,
    check_class_names,
    check_image_size,
    image_to_latent_factor,
    is_pixel_space,
)
from dsdiff.diffusion.pixels import pack
from dsdiff.diffusion.prompts import class_token_spans
from dsdiff.diffusion.settings import SETTING, LabelSettings
from dsdiff.utils.errors import SettingError


class UNetFamily:
    """SD 1.x / 2.x / SDXL: recording processors on the UNet's cross- and self-attention layers."""

    name = "unet"
    components = ("unet", "tokenizer", "text_encoder")

    def __init__(self, pipe, labels: LabelSettings) -> None:
        if labels.maps != "attention" and getattr(pipe, "unet", None) is not None:
            raise SettingError(f"{SETTING}.maps={labels.maps}: output-space maps need the class tokens' attention "
                               "outputs, which an SD3 or FLUX generator computes and a UNet generator does not: "
                               "leave maps=attention")
        for key in ("blocks", "self_blocks"):
            if getattr(labels, key) is not None and getattr(pipe, "unet", None) is not None:
                raise SettingError(f"{SETTING}.{key}={list(getattr(labels, key))}: picks the blocks of an SD3 or FLUX "
                                   f"generator; this UNet generator records by resolution ({SETTING}.cross_res / "
                                   f"self_res): leave {key} null")
        self.pipe, self.labels = pipe, labels
        self._installed: tuple | None = None  # (latent size, a recorder's name, that recorder)

    @property
    def denoiser(self):
        return self.pipe.unet

    def native_size(self) -> int:
        return self.denoiser.config.sample_size * image_to_latent_factor(self.pipe)

    def check_size(self, height: int, width: int) -> None:
        native = self.native_size()
        if (height, width) != (native, native):
            check_image_size(self.pipe, height, width, native, self.labels.cross_res, self.labels.self_res)

    def check_class_names(self, class_names: Sequence[str]) -> None:
        check_class_names(self.pipe.tokenizer, class_names)

    def spans(self, words: Sequence[str]) -> tuple[str, list[list[int]]]:
        return class_token_spans(self.pipe.tokenizer, words)

    def prompt_kwargs(self) -> dict:
        return {}

    def encode(self, texts: Sequence[str], device) -> torch.Tensor:
        """(B, L, D) conditional text embeddings, as the pipeline computes them."""
        return self.condition(texts, device)["encoder_hidden_states"]

    # -- real images (dsdiff.diffusion.real_images): the denoiser's inputs for given images at a noise level
    def condition(self, texts: Sequence[str], device) -> dict:
        """The denoiser's text inputs, as keyword arguments."""
        return {"encoder_hidden_states": self.pipe.encode_prompt(
            prompt=list(texts), device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)[0]}

    def image_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> UNet input: packed pixels without a VAE, else the VAE's scaled mean latent."""
        pipe = self.pipe
        if is_pixel_space(pipe):
            latents = pack(pixels, image_to_latent_factor(pipe))
        else:
            latents = pipe.vae.encode(pixels.to(pipe.vae.dtype)).latent_dist.mean * pipe.vae.config.scaling_factor
        return latents.to(self.denoiser.dtype)

    def noised_forward(self, latents: torch.Tensor, noise: torch.Tensor, timestep: int, cond: dict) -> None:
        """One denoiser pass on ``latents`` noised to ``timestep`` (the scheduler's own noising)."""
        t = torch.full((len(latents),), int(timestep), device=latents.device, dtype=torch.long)
        self.denoiser(self.pipe.scheduler.add_noise(latents, noise, t), t, **cond)

    def install(self, store: AttentionStore, latent_hw: tuple[int, int]) -> None:
        """(Re)install the recorders when the latent size changed or someone replaced them."""
        unet = self.denoiser
        if self._installed is not None:
            size, name, proc = self._installed
            if size == latent_hw and unet.attn_processors.get(name) is proc:
                return
        procs = recording_processors(unet, store, latent_hw, self.labels.cross_res, self.labels.self_res)
        name, proc = next((n, p) for n, p in procs.items() if isinstance(p, RecordingAttnProcessor))
        unet.set_attn_processor(procs)  # (empties the dict it is given)
        self._installed = (latent_hw, name, proc)


class SD3Family(UNetFamily):
    """SD3 / SD3.5: the class prompt as an extra token stream through the joint blocks.

    The class prompt is encoded by the pipeline's text encoders; a class name's tokens are its CLIP
    positions (0..76) and, when the pipeline has T5 (SD3 runs without it too), its T5 positions
    (77 + offset), found by each tokenizer's offsets.
    """

    name = "sd3"
    components = ("transformer", "tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")  # T5 is optional
    recorder_class = JointRecorder

    def __init__(self, pipe, labels: LabelSettings, max_sequence_length: int | None = None) -> None:
        super().__init__(pipe, labels)
        if not labels.class_prompt:
            raise SettingError(f"{SETTING}.class_prompt=false: {self.name.upper()}'s maps come from the class-prompt "
                               "stream only (the caption-token ablation is for UNet generators); set it to true")
        self.max_sequence_length = max_sequence_length
        n_blocks = len(self.recorder_class.block_list(pipe.transformer))
        self.blocks = check_blocks(labels.blocks if labels.blocks is not None else range(n_blocks), n_blocks)
        self.self_blocks = None if labels.self_blocks is None else check_blocks(labels.self_blocks, n_blocks, "self_blocks")
        self.recorder: JointRecorder | None = None

    @property
    def denoiser(self):
        return self.pipe.transformer

    def check_size(self, height: int, width: int) -> None:
        self._check_grid(height, width, image_to_latent_factor(self.pipe) * self.denoiser.config.patch_size, "SD3")

    def _check_grid(self, height: int, width: int, factor: int, family: str) -> None:
        for key, side in (("height", height), ("width", width)):
            if side % factor:
                raise SettingError(f"generator.{key}={side}: {family} image sides are multiples of {factor} "
                                   "(the VAE's factor times the patch size)")
        grid = (height // factor, width // factor)
        if self.labels.cross_res != grid[0]:
            raise SettingError(
                f"{SETTING}.cross_res={self.labels.cross_res}: {family}'s maps are at its image-token grid, "
                f"{grid[0]}x{grid[1]} for {height}x{width} images: set {SETTING}.cross_res={grid[0]}")
        pools = [p for p in range(1, grid[0] + 1) if grid[0] % p == 0 and grid[1] % p == 0]
        if self.labels.self_res not in [grid[0] // p for p in pools]:
            raise SettingError(
                f"{SETTING}.self_res={self.labels.self_res}: {family}'s self maps are at its image-token grid, "
                f"{grid[0]}x{grid[1]} for {height}x{width} images, or pooled to a grid that divides it: set "
                f"{SETTING}.self_res to one of {[grid[0] // p for p in pools]}")

    def token_grid(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        patch = self.denoiser.config.patch_size
        return latent_hw[0] // patch, latent_hw[1] // patch

    def check_class_names(self, class_names: Sequence[str]) -> None:
        for name in class_names[1:]:
            try:
                self.spans([class_words(name)])
            except ValueError as e:
                raise SettingError(f"class name {name!r} of data.class_list cannot be placed by this model's "
                                   f"tokenizers: {e}") from e

    def spans(self, words: Sequence[str]) -> tuple[str, list[list[int]]]:
        text, spans = class_token_spans(self.pipe.tokenizer, words)
        if getattr(self.pipe, "tokenizer_3", None) is not None and getattr(self.pipe, "text_encoder_3", None) is not None:
            offset = self.pipe.tokenizer_max_length  # the CLIP part of SD3's prompt_embeds comes first
            _, t5 = class_token_spans(self.pipe.tokenizer_3, words)
            spans = [clip + [offset + i for i in t] for clip, t in zip(spans, t5)]
        return text, spans

    def prompt_kwargs(self) -> dict:
        return {} if self.max_sequence_length is None else {"max_sequence_length": int(self.max_sequence_length)}

    # -- real images: flow matching noises x0 as (1 - s) x0 + s noise, s = t / T
    def condition(self, texts: Sequence[str], device) -> dict:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=list(texts), prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, **self.prompt_kwargs())
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def image_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> the transformer's latents: the VAE's mean, shifted and scaled as the pipeline
        undoes them before decoding; packed pixels for a pipeline without a VAE."""
        if is_pixel_space(self.pipe):
            return pack(pixels, image_to_latent_factor(self.pipe)).float()
        vae = self.pipe.vae
        latent = vae.encode(pixels.to(vae.dtype)).latent_dist.mean
        return ((latent - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor).float()  # mixed in fp32

    def noised_forward(self, latents: torch.Tensor, noise: torch.Tensor, timestep: int, cond: dict) -> None:
        sigma = timestep / self.pipe.scheduler.config.num_train_timesteps
        noised = ((1.0 - sigma) * latents + sigma * noise).to(self.denoiser.dtype)
        t = torch.full((len(latents),), float(timestep), device=latents.device)
        self.denoiser(hidden_states=noised, timestep=t, return_dict=False, **cond)

    def install(self, store: AttentionStore, latent_hw: tuple[int, int]) -> None:
        """Install the class-stream recorder once (any size: the maps take the grid they are given), again
        when someone replaced the processors; tell it how much to pool the self maps at this size."""
        first = self.denoiser.transformer_blocks[0].attn
        if self.recorder is None or first.processor is not self._first:
            if self.recorder is not None:
                self.recorder.remove()
            self.recorder = self.recorder_class(self.denoiser, store, self.blocks, self.self_blocks,
                                                maps=self.labels.maps).install()
            self._first = first.processor
        grid = self.token_grid(latent_hw)
        pool = grid[0] // self.labels.self_res
        self.recorder.stream.self_pool = None if pool == 1 else (pool, grid[1])


class FluxFamily(SD3Family):
    """FLUX.1: dual-stream then single-stream blocks (:mod:`dsdiff.diffusion.flux`); its prompt embeddings are
    T5's alone (CLIP gives only the pooled vector), so a class name's tokens are its T5 positions."""

    name = "flux"
    components = ("transformer", "tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")
    recorder_class = FluxRecorder

    def native_size(self) -> int:
        return self.pipe.default_sample_size * self.pipe.vae_scale_factor

    def check_size(self, height: int, width: int) -> None:
        factor = 2 * self.pipe.vae_scale_factor  # the VAE, then FLUX's 2x2 latent packing
        self._check_grid(height, width, factor, "FLUX")

    def spans(self, words: Sequence[str]) -> tuple[str, list[list[int]]]:
        return class_token_spans(self.pipe.tokenizer_2, words)

    def token_grid(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        return latent_hw[0] // 2, latent_hw[1] // 2  # FLUX packs 2x2 latent patches into a token

    def condition(self, texts: Sequence[str], device) -> dict:
        embeds, pooled, text_ids = self.pipe.encode_prompt(prompt=list(texts), prompt_2=None, device=device,
                                                           num_images_per_prompt=1, **self.prompt_kwargs())
        cond = {"encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": text_ids}
        if self.denoiser.config.guidance_embeds:  # FLUX.1 [dev]: the distilled guidance strength
            cond["guidance"] = torch.full((len(texts),), self.DEV_GUIDANCE, device=device)
        return cond

    DEV_GUIDANCE = 3.5  # FLUX.1 [dev]'s model-card guidance scale, for its embedded guidance on real images

    def noised_forward(self, latents: torch.Tensor, noise: torch.Tensor, timestep: int, cond: dict) -> None:
        """FLUX packs 2x2 latent patches into tokens with position ids, and takes the timestep as s in [0, 1]."""
        sigma = timestep / self.pipe.scheduler.config.num_train_timesteps
        b, c, h, w = latents.shape
        noised = ((1.0 - sigma) * latents + sigma * noise).to(self.denoiser.dtype)
        packed = self.pipe._pack_latents(noised, b, c, h, w)
        img_ids = self.pipe._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, noised.dtype)
        t = torch.full((b,), sigma, device=latents.device, dtype=noised.dtype)
        self.denoiser(hidden_states=packed, timestep=t, img_ids=img_ids, return_dict=False, **cond)


def family_of(pipe, labels: LabelSettings, **options):
    """The family object for a loaded pipeline: a UNet's, SD3's or FLUX's (by the pipeline's class)."""
    if getattr(pipe, "unet", None) is not None:
        if options.get("max_sequence_length") is not None:
            raise SettingError("generator.max_sequence_length: the T5 prompt length of an SD3 generator; a UNet "
                               "generator's prompts are fitted to its text encoder: leave it null")
        return UNetFamily(pipe, labels)
    family = PIPELINE_FAMILIES.get(type(pipe).__name__)
    if family is not None and getattr(pipe, "transformer", None) is not None:
        return {"sd3": SD3Family, "flux": FluxFamily}[family](pipe, labels, **options)
    raise TypeError(f"{type(pipe).__name__}: dsdiff records the attention of {RECORDED}")
