"""Builders for the tiny pixel-space text-to-image pipeline (all standard diffusers/transformers parts).

- tokenizer: a real CLIP BPE over printable characters plus merges for a few words, so the
  world's words are single tokens and any other text still tokenizes (into characters);
- text encoder: ``CLIPTextModel`` with no transformer layer by default, i.e. learned word
  embeddings and the final LayerNorm. Position embeddings are zero and frozen
  (``positions=False``): a word's key is then the same in the caption and in the separately
  encoded class prompt ("ball leaf"), which is what class-prompt cross-attention
  (docs/method.md) reads. The start token, present in every prompt, is free to act as an attention
  sink. ``text_layers >= 1`` adds CLIP's causal self-attention layers: a word's state then
  carries the words before it, as in Stable Diffusion's encoder (the case the class prompt is for);
- UNet: ``UNet2DConditionModel`` over (3 r^2, H/r, W/r) packed pixels, cross-attention in
  every block (for 32 px and r = 2: at 16x16 and 8x8);
- scheduler: DDIM, cosine schedule, v-prediction, trailing timesteps (the first sampling step
  starts from pure noise, as in training).
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dsdiff.data.classes import SHAPES_CLASSES, class_words
from dsdiff.diffusion import tokenizer as bpe
from dsdiff.diffusion.pipeline import load_pipeline
from dsdiff.utils.errors import MissingPathError, SettingError
from dsdiff.utils.io import replace_dir, write_json_atomic

# Words of the shapes world's captions and class prompts; anything else falls apart into characters.
SHAPES_WORDS: tuple[str, ...] = tuple(class_words(c) for c in SHAPES_CLASSES[1:]) + (
    "a", "an", "and", "the", "of", "with", "photo", "picture",
)


def build_tokenizer(words: Sequence[str] = SHAPES_WORDS, max_length: int = 16):
    """A ``CLIPTokenizer`` whose vocabulary is printable characters plus one token per word in ``words``."""
    if max_length < 4:
        raise ValueError(f"max_length={max_length} leaves no room for a caption: use >= 8 (start + words + end)")
    return bpe.build_tokenizer(words, max_length)


def build_text_encoder(tokenizer, dim: int = 64, positions: bool = False, seed: int = 0, layers: int = 0, heads: int = 4):
    """A ``CLIPTextModel``: word (+ position) embeddings, ``layers`` causal self-attention layers
    (0: none, a bag of words without positions) and a LayerNorm."""
    from transformers import CLIPTextConfig, CLIPTextModel

    if layers < 0 or (layers and dim % heads):
        raise ValueError(f"text encoder: layers={layers}, heads={heads}, dim={dim}: use layers >= 0 and heads dividing dim")
    torch.manual_seed(seed)
    encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=dim, intermediate_size=(4 * dim if layers else dim),
            num_attention_heads=(heads if layers else 1), num_hidden_layers=layers, max_position_embeddings=int(tokenizer.model_max_length),
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    if not positions:
        freeze_positions(encoder)
    return encoder


def freeze_positions(encoder) -> None:
    """Zero the position embeddings and stop their gradient: the encoder becomes a bag of words."""
    weight = getattr(encoder, "text_model", encoder).embeddings.position_embedding.weight  # transformers 4 nests it
    with torch.no_grad():
        weight.zero_()
    weight.requires_grad_(False)


def build_unet(
    image_size: int = 32,
    packing: int = 2,
    block_out_channels: Sequence[int] = (32, 64),
    layers_per_block: int = 1,
    text_dim: int = 64,
    heads: int = 4,
    norm_num_groups: int = 16,
    seed: int = 0,
):
    """A ``UNet2DConditionModel`` on packed pixels, with cross-attention in every block."""
    from diffusers import UNet2DConditionModel

    if image_size % (packing * 2 ** (len(block_out_channels) - 1)):
        raise ValueError(
            f"image_size={image_size} must be divisible by packing ({packing}) x 2^(blocks-1) "
            f"for {len(block_out_channels)} blocks"
        )
    torch.manual_seed(seed)
    channels = 3 * packing * packing
    n = len(block_out_channels)
    return UNet2DConditionModel(
        sample_size=image_size // packing,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n,
        cross_attention_dim=text_dim,
        attention_head_dim=heads,  # diffusers' legacy name: this is the number of heads
        norm_num_groups=norm_num_groups,
    )


def build_scheduler(num_train_timesteps: int = 1000):
    """DDIM with a cosine noise schedule and v-prediction (stable at the pure-noise first step)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=num_train_timesteps, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing",
    )


def build_pipeline(
    *,
    words: Sequence[str] = SHAPES_WORDS,
    max_length: int = 16,
    text_dim: int = 64,
    positions: bool = False,
    text_layers: int = 0,
    seed: int = 0,
    **unet: Any,
):
    """A random-weight ``StableDiffusionPipeline`` with ``vae=None`` (pixel space).

    ``unet``: :func:`build_unet`'s other arguments (image_size, packing, block_out_channels,
    layers_per_block, heads, norm_num_groups); ``text_dim`` and ``seed`` serve both networks;
    ``text_layers``: the text encoder's causal self-attention layers (0: a bag of words).
    """
    from diffusers import StableDiffusionPipeline

    tokenizer = build_tokenizer(words, max_length)
    pipe = StableDiffusionPipeline(
        vae=None,
        text_encoder=build_text_encoder(tokenizer, text_dim, positions, seed, layers=text_layers),
        tokenizer=tokenizer,
        unet=build_unet(text_dim=text_dim, seed=seed, **unet),
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def contextual_from(init: str | Path, text_layers: int = 1, positions: bool = True, heads: int = 4):
    """A trained pipeline folder (e.g. the shipped bag-of-words model) with ``text_layers`` causal
    self-attention layers added to its text encoder, started as an exact identity.

    The new encoder copies the word embeddings, final LayerNorm and (zero) position embeddings, and
    each added pre-LayerNorm layer has its attention output and MLP output projections set to zero,
    so at step 0 every text encodes exactly as before and the pipeline draws the same images. Training
    (``+experiment=shapes_t2i_contextual``) then only has to learn to use the context.
    """
    init = Path(init)
    if not (init / "model_index.json").is_file():
        raise MissingPathError(f"contextual_from: {init} is not a diffusers pipeline folder (no model_index.json): "
                                "run stage 1 first (`python -m dsdiff.pretrain +experiment=shapes_t2i` exports "
                                "logs/shapes_t2i/run/pipeline), or pass model.pipeline.init=<a bag-of-words pipeline folder>")
    pipe = load_pipeline(init, dtype=torch.float32)
    old = getattr(pipe.text_encoder, "text_model", pipe.text_encoder)
    if old.config.num_hidden_layers:
        raise SettingError(f"contextual_from: {init}'s text encoder already has {old.config.num_hidden_layers} layer(s), "
                         "which a warm start would drop; start from a bag-of-words pipeline (0 layers), e.g. the export "
                         "of `python -m dsdiff.pretrain +experiment=shapes_t2i` (logs/shapes_t2i/run/pipeline)")
    encoder = build_text_encoder(pipe.tokenizer, old.config.hidden_size, positions=True, layers=text_layers, heads=heads)
    new = getattr(encoder, "text_model", encoder)
    with torch.no_grad():
        new.embeddings.token_embedding.weight.copy_(old.embeddings.token_embedding.weight)
        new.embeddings.position_embedding.weight.copy_(old.embeddings.position_embedding.weight)
        new.final_layer_norm.load_state_dict(old.final_layer_norm.state_dict())
        for layer in new.encoder.layers:
            for linear in (layer.self_attn.out_proj, layer.mlp.fc2):
                linear.weight.zero_()
                linear.bias.zero_()
    if not positions:
        freeze_positions(encoder)
    pipe.register_modules(text_encoder=encoder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pipeline(pipe, out_dir: str | Path, keep: Sequence[str] = ("MODEL_CARD.md",)) -> Path:
    """``save_pretrained`` (safetensors) into a temp folder, then swap it in: never a half-written model.

    Files named in ``keep`` that the old folder has (its model card) are carried over.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    for config in tmp.glob("*/config.json"):  # a warm-started model's configs would name the folder it came from
        data = json.loads(config.read_text())
        if data.pop("_name_or_path", None) is not None:
            write_json_atomic(config, data)
    for name in keep:
        if (out_dir / name).is_file():
            shutil.copy2(out_dir / name, tmp / name)
    return replace_dir(tmp, out_dir)
