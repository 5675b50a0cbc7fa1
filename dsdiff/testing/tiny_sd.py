"""Tiny random-weight Stable Diffusion pipelines built offline from configs (tests, benchmarks).

Nothing here downloads: the tokenizer is a real CLIP BPE made from a small vocab and
merges (:mod:`dsdiff.diffusion.tokenizer`), so class names tokenize as one or several sub-tokens.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from dsdiff.diffusion import tokenizer as bpe

# Words merged into single tokens; any other word falls apart into characters (multi-token).
TINY_WORDS: tuple[str, ...] = (
    "a", "an", "and", "the", "of", "on", "in", "with", "photo", "picture", "sitting", "standing",
    "next", "to", "near", "street", "room", "grass", "table", "dining", "potted", "plant",
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "dog",
    "horse", "motorbike", "person", "sheep", "sofa", "train",
)


def build_tokenizer(words: Sequence[str] = TINY_WORDS, max_length: int = 77):
    """A real ``CLIPTokenizer`` over a tiny vocabulary."""
    return bpe.build_tokenizer(words, max_length)


def build_tiny_pipeline(
    *,
    block_out_channels: Sequence[int] = (8, 16),
    image_size: int = 64,
    text_dim: int = 32,
    heads: int = 2,
    words: Sequence[str] = TINY_WORDS,
    seed: int = 0,
):
    """A random-weight ``StableDiffusionPipeline``: every UNet block has cross-attention.

    The VAE halves the image (64 -> 32 latent); the UNet runs attention at 32x32 (N=1024)
    and 16x16, so dsdiff's defaults (self_res=32, cross_res=16) apply as for SD at 512px.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(words)
    n_blocks = len(block_out_channels)
    unet = UNet2DConditionModel(
        sample_size=image_size // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * n_blocks,
        up_block_types=("CrossAttnUpBlock2D",) * n_blocks,
        cross_attention_dim=text_dim,
        attention_head_dim=heads,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(4, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=image_size,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=text_dim,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    return _sd_pipeline(vae, text_encoder, tokenizer, unet)


def _sd_pipeline(vae, text_encoder, tokenizer, unet):
    """A ``StableDiffusionPipeline`` of the given parts with SD's DDIM schedule, no safety checker, no progress bar."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(out_dir: str | Path, **kwargs) -> Path:
    """Build a tiny pipeline and ``save_pretrained`` it: a local diffusers folder users could pass."""
    out_dir = Path(out_dir)
    build_tiny_pipeline(**kwargs).save_pretrained(out_dir)
    return out_dir


def build_sd_shaped_pipeline(width: int = 32, image_size: int = 512, text_dim: int = 64, seed: int = 0):
    """Stable Diffusion 1.x block layout (3 cross-attention down blocks + 1 plain, 2 layers per
    block, 8 heads, mid block with cross-attention) at reduced width, for CPU benchmarks."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    chans = (width, 2 * width, 4 * width, 4 * width)
    unet = UNet2DConditionModel(
        sample_size=image_size // 8,
        block_out_channels=chans,
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=text_dim,
        attention_head_dim=8,
        norm_num_groups=min(32, width),
    )
    vae = AutoencoderKL(
        block_out_channels=(width // 2, width, 2 * width, 2 * width),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        norm_num_groups=min(32, width // 2),
        sample_size=image_size,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=text_dim, intermediate_size=4 * text_dim,
            num_attention_heads=4, num_hidden_layers=4, max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    return _sd_pipeline(vae, text_encoder, tokenizer, unet)


def build_tiny_sdxl_pipeline(seed: int = 0):
    """A random-weight ``StableDiffusionXLPipeline`` with SDXL's layout: two text encoders, no
    attention in the first block; attention at 16x16 and 8x8 for 64px images (SDXL at 1024px: 64, 32)."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_config = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    unet = UNet2DConditionModel(
        sample_size=32,
        block_out_channels=(8, 16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=2,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 size/crop ids x 8 + pooled text
        cross_attention_dim=64,  # the two encoders' 32 + 32
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        block_out_channels=(4, 8), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, sample_size=64,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(CLIPTextConfig(**text_config)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(projection_dim=32, **text_config)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
