"""What differs between the generator families dsdiff records (docs/mmdit.md).

``unet``: SD 1.x / 2.x / SDXL-layout UNets, recorded by :mod:`dsdiff.diffusion.attention`
(cross-attention at ``cross_res``, self-attention at ``self_res``). ``sd3``: Stable Diffusion 3 /
3.5 (``SD3Transformer2DModel``, joint text-image attention), recorded by
:mod:`dsdiff.diffusion.mmdit` with the class prompt carried as its own token stream; its maps are
at the image-token grid, so ``cross_res`` and ``self_res`` are that grid's height.
:class:`~dsdiff.diffusion.generator.SyntheticGenerator` asks a family object for the rest.
"""
from __future__ import annotations

from collections.abc import Sequence

from dsdiff.data.classes import class_words
from dsdiff.diffusion.attention import AttentionStore, RecordingAttnProcessor, recording_processors
from dsdiff.diffusion.mmdit import JointRecorder, RecordingJointAttnProcessor, check_blocks
from dsdiff.diffusion.pipeline import PIPELINE_FAMILIES, RECORDED, check_image_size, image_to_latent_factor
from dsdiff.diffusion.prompts import class_token_spans
from dsdiff.diffusion.settings import SETTING, LabelSettings
from dsdiff.utils.errors import SettingError

class UNetFamily:
    """SD 1.x / 2.x / SDXL: recording processors on the UNet's cross- and self-attention layers."""

    name = "unet"
    components = ("unet", "tokenizer", "text_encoder")

    def __init__(self, pipe, labels: LabelSettings) -> None:
        if labels.blocks is not None and getattr(pipe, "unet", None) is not None:
            raise SettingError(f"{SETTING}.blocks={list(labels.blocks)}: picks the joint blocks of an SD3 generator; "
                               f"this UNet generator records by resolution ({SETTING}.cross_res / self_res): "
                               "leave blocks null")
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
        from dsdiff.diffusion.pipeline import check_class_names

        check_class_names(self.pipe.tokenizer, class_names)

    def spans(self, words: Sequence[str]) -> tuple[str, list[list[int]]]:
        return class_token_spans(self.pipe.tokenizer, words)

    def prompt_kwargs(self) -> dict:
        return {}

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

    The class prompt is encoded by the pipeline's three text encoders; a class name's tokens are
    its CLIP positions (0..76) and its T5 positions (77 + offset), found by each tokenizer's offsets.
    """

    name = "sd3"
    components = ("transformer", "tokenizer", "text_encoder", "tokenizer_3", "text_encoder_3")

    def __init__(self, pipe, labels: LabelSettings, max_sequence_length: int | None = None) -> None:
        super().__init__(pipe, labels)
        if not labels.class_prompt:
            raise SettingError(f"{SETTING}.class_prompt=false: an SD3 generator's maps come from the class-prompt "
                               "stream only (the caption-token ablation is for UNet generators); set it to true")
        self.max_sequence_length = max_sequence_length
        n_blocks = len(pipe.transformer.transformer_blocks)
        self.blocks = check_blocks(labels.blocks if labels.blocks is not None else range(n_blocks), n_blocks)
        self.recorder: JointRecorder | None = None

    @property
    def denoiser(self):
        return self.pipe.transformer

    def check_size(self, height: int, width: int) -> None:
        factor = image_to_latent_factor(self.pipe) * self.denoiser.config.patch_size
        for key, side in (("height", height), ("width", width)):
            if side % factor:
                raise SettingError(f"generator.{key}={side}: an SD3 image side is a multiple of {factor} "
                                   "(VAE factor x patch size)")
        grid = (height // factor, width // factor)
        for key in ("cross_res", "self_res"):
            if getattr(self.labels, key) != grid[0]:
                raise SettingError(
                    f"{SETTING}.{key}={getattr(self.labels, key)}: an SD3 generator's maps are at its image-token "
                    f"grid, {grid[0]}x{grid[1]} for {height}x{width} images: set {SETTING}.{key}={grid[0]}")

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

    def install(self, store: AttentionStore, latent_hw: tuple[int, int]) -> None:
        first = self.denoiser.transformer_blocks[0].attn.processor
        if self.recorder is not None and isinstance(first, RecordingJointAttnProcessor):
            return
        if self.recorder is not None:
            self.recorder.remove()
        self.recorder = JointRecorder(self.denoiser, store, self.blocks).install()


def family_of(pipe, labels: LabelSettings, **options):
    """The family object for a loaded pipeline: SD3 (a ``transformer`` with joint blocks) or a UNet."""
    if getattr(pipe, "unet", None) is not None:
        if options.get("max_sequence_length") is not None:
            raise SettingError("generator.max_sequence_length: the T5 prompt length of an SD3 generator; a UNet "
                               "generator's prompts are fitted to its text encoder: leave it null")
        return UNetFamily(pipe, labels)
    if type(pipe).__name__ in PIPELINE_FAMILIES and getattr(pipe, "transformer", None) is not None:
        return SD3Family(pipe, labels, **options)
    raise TypeError(f"{type(pipe).__name__}: dsdiff records the attention of {RECORDED}")
