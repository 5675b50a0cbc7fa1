"""The shapes world's tiny diffusion transformer: an SD3-layout pixel-space pipeline and its trainer.

All standard diffusers/transformers parts, saved as an ordinary ``StableDiffusion3Pipeline`` folder
without a VAE or T5, so the generator loads it like SD3.5 and records it with the class-prompt
stream (docs/mmdit.md):

- tokenizers: the shapes world's CLIP BPE (:func:`dsdiff.shapes_t2i.net.build_tokenizer`), twice
  (SD3 has two CLIP encoders);
- text encoders: two ``CLIPTextModelWithProjection`` with one causal layer and zero, frozen position
  embeddings. SD3 reads the penultimate hidden state, here the word embeddings: a class word's key is
  the same in the caption and in the class prompt; the pooled vector (end token after the layer) carries
  the whole caption, but it is switched off by default (``pooled=False``, see :func:`build_dit_pipeline`);
- transformer: ``SD3Transformer2DModel`` on RGB pixels (``in_channels=3``), patch 2: a 32 px image is a
  16x16 token grid; adaLN modulations start at zero (DiT's adaLN-Zero: every block starts as the identity);
- scheduler: ``FlowMatchEulerDiscreteScheduler`` (shift 1: 256 tokens), the flow-matching objective of SD3
  with logit-normal timesteps.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dsdiff.shapes_t2i.net import SHAPES_WORDS, build_tokenizer, freeze_positions
from dsdiff.shapes_t2i.system import TextToImage


def build_clip(tokenizer, dim: int, seed: int, heads: int = 4):
    """A ``CLIPTextModelWithProjection``: word embeddings, one causal layer, a LayerNorm and a projection."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    encoder = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=dim, intermediate_size=4 * dim, num_attention_heads=heads,
        num_hidden_layers=1, max_position_embeddings=int(tokenizer.model_max_length), projection_dim=dim,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    freeze_positions(encoder)
    return encoder


def build_dit_pipeline(
    *,
    words: Sequence[str] = SHAPES_WORDS,
    max_length: int = 16,
    image_size: int = 32,
    patch_size: int = 2,
    num_layers: int = 4,
    heads: int = 4,
    head_dim: int = 16,
    text_dim: int = 64,
    pooled: bool = False,
    seed: int = 0,
):
    """A random-weight pixel-space ``StableDiffusion3Pipeline`` (``vae=None``, no T5).

    ``pooled=False`` switches SD3's pooled text vector off (its projection into the time embedding zero and
    frozen): the text then reaches the image only through the joint attention, where the maps are read. With
    it on, this world's captions ("a ball and a leaf") are fully told by the pooled vector, and the shapes' own
    look tells which is which, so nothing makes the attention to a class word land on its object.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    if image_size % patch_size:
        raise ValueError(f"image_size={image_size} must be a multiple of patch_size={patch_size}")
    tokenizer = build_tokenizer(words, max_length)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=image_size, patch_size=patch_size, in_channels=3, out_channels=3, num_layers=num_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=2 * text_dim,
        caption_projection_dim=heads * head_dim, pooled_projection_dim=2 * text_dim,
        pos_embed_max_size=image_size // patch_size,
    )
    with torch.no_grad():  # adaLN-Zero: the modulations (shift, scale, gate) start at zero
        for module in transformer.modules():
            if type(module).__name__ in ("AdaLayerNormZero", "AdaLayerNormContinuous", "SD35AdaLayerNormZeroX"):
                module.linear.weight.zero_()
                module.linear.bias.zero_()
    if not pooled:
        projection = transformer.time_text_embed.text_embedder
        with torch.no_grad():
            projection.linear_2.weight.zero_()
            projection.linear_2.bias.zero_()
        projection.requires_grad_(False)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=None,
        text_encoder=build_clip(tokenizer, text_dim, seed), tokenizer=tokenizer,
        text_encoder_2=build_clip(tokenizer, text_dim, seed + 1), tokenizer_2=build_tokenizer(words, max_length),
        text_encoder_3=None, tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


class FlowTextToImage(TextToImage):
    """Trains a pixel-space ``StableDiffusion3Pipeline``'s transformer and both text encoders with SD3's
    flow-matching loss: x_s = (1 - s) x0 + s noise, target noise - x0, s logit-normal, timestep 1000 s.
    Texts are encoded by the pipeline's own ``encode_prompt``, as the generator encodes them."""

    def attach(self, pipeline) -> None:
        self.transformer = pipeline.transformer
        self.text_encoder = pipeline.text_encoder
        self.text_encoder_2 = pipeline.text_encoder_2
        self.tokenizer, self.tokenizer_2 = pipeline.tokenizer, pipeline.tokenizer_2
        self.scheduler = pipeline.scheduler
        for module in (self.transformer, self.text_encoder, self.text_encoder_2):
            module.train()
        self._pipe = None

    def encode(self, texts: Sequence[str]) -> dict:
        embeds, _, pooled, _ = self.pipeline().encode_prompt(
            prompt=list(texts), prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        return self.transformer(hidden_states=x, timestep=timesteps, return_dict=False, **self.encode(texts))[0]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x0 = batch["image"]
        noise = torch.randn_like(x0)
        s = torch.sigmoid(torch.randn(len(x0), device=self.device))  # logit-normal(0, 1), as SD3 trains
        s_ = s.view(-1, 1, 1, 1)
        pred = self((1 - s_) * x0 + s_ * noise, s * self.scheduler.config.num_train_timesteps, self.texts(batch))
        loss = F.mse_loss(pred, noise - x0)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def pipeline(self):
        """A ``StableDiffusion3Pipeline`` (no VAE, no T5) sharing this module's networks."""
        if self._pipe is None:
            from diffusers import StableDiffusion3Pipeline

            self._pipe = StableDiffusion3Pipeline(
                transformer=self.transformer, scheduler=self.scheduler, vae=None, text_encoder=self.text_encoder,
                tokenizer=self.tokenizer, text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2,
                text_encoder_3=None, tokenizer_3=None)
            self._pipe.set_progress_bar_config(disable=True)
        return self._pipe

    def to_pipeline(self):
        return self.pipeline()
