"""Tiny random-weight Stable Diffusion 3 and FLUX.1 pipelines built offline from configs (tests, benchmarks).

SD3's three text encoders are the real classes (two ``CLIPTextModelWithProjection``, one
``T5EncoderModel``) with tiny configs; the CLIP tokenizers are the tiny BPE of
:mod:`dsdiff.testing.tiny_sd` and the T5 tokenizer a real Unigram ``T5Tokenizer`` over the same
words, so class names fall on different token offsets in CLIP and in T5, as in SD3.
"""
from __future__ import annotations

import string
from collections.abc import Sequence

import torch

from dsdiff.testing.tiny_sd import TINY_WORDS, build_tokenizer


def build_t5_tokenizer(words: Sequence[str] = TINY_WORDS, max_length: int = 32):
    """A ``T5Tokenizer`` (Unigram): one piece per word in ``words``, single characters for the rest."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -6.0) for c in string.printable if not c.isspace()]
    vocab += [("\u2581" + w, -1.0) for w in words]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def _t5_encoder(tokenizer, d_model: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=2,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0,
    )).eval()


def _vae(image_size: int, shift_factor: float, scaling_factor: float):
    """A x8 VAE with 4 latent channels (the real ones have 16; the layout and the factor are what count here)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(4, 4, 4, 4), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4, norm_num_groups=2, sample_size=image_size, use_quant_conv=False,
        use_post_quant_conv=False, shift_factor=shift_factor, scaling_factor=scaling_factor,
    ).eval()


def build_tiny_sd3_pipeline(*, image_size: int = 64, num_layers: int = 3, heads: int = 2, head_dim: int = 8,
                            text_dim: int = 16, t5_length: int = 32, words: Sequence[str] = TINY_WORDS,
                            sd35: bool = False, seed: int = 0):
    """A random-weight ``StableDiffusion3Pipeline``: an SD3 VAE (x8), a ``num_layers``-block
    ``SD3Transformer2DModel`` with patch 2: a 64 px image is an 8x8 latent, a 4x4 token grid.
    ``sd35``: SD3.5's RMS q/k norms and dual attention (a second, image-only attention) in blocks 0 and 1."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(words)
    tokenizer_3 = build_t5_tokenizer(words, t5_length)
    joint_dim = 2 * text_dim  # SD3 concatenates the two CLIPs' features, then pads them to T5's width

    def clip():
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=text_dim, intermediate_size=37, num_attention_heads=2,
            num_hidden_layers=3, max_position_embeddings=77, projection_dim=text_dim,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )).eval()

    text_encoder, text_encoder_2 = clip(), clip()
    text_encoder_3 = _t5_encoder(tokenizer_3, joint_dim)
    transformer = SD3Transformer2DModel(
        sample_size=image_size // 8, patch_size=2, in_channels=4, out_channels=4, num_layers=num_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=joint_dim,
        caption_projection_dim=heads * head_dim, pooled_projection_dim=2 * text_dim, pos_embed_max_size=16,
        **({"qk_norm": "rms_norm", "dual_attention_layers": (0, 1)} if sd35 else {}),
    ).eval()
    vae = _vae(image_size, shift_factor=0.0609, scaling_factor=1.5035)  # SD3's latent statistics
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=build_tokenizer(words), text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )


def save_tiny_sd3_pipeline(out_dir, **kwargs):
    """Build a tiny SD3 pipeline and ``save_pretrained`` it: a local diffusers folder users could pass."""
    from pathlib import Path

    out_dir = Path(out_dir)
    build_tiny_sd3_pipeline(**kwargs).save_pretrained(out_dir)
    return out_dir


def build_tiny_flux_pipeline(*, image_size: int = 64, num_layers: int = 2, num_single_layers: int = 2, heads: int = 2,
                             head_dim: int = 16, text_dim: int = 16, t5_dim: int = 32, t5_length: int = 32,
                             words: Sequence[str] = TINY_WORDS, seed: int = 0):
    """A random-weight ``FluxPipeline`` (FLUX.1-schnell's layout, no guidance embedding): a x8 VAE with 4
    latent channels packed 2x2 (a 64 px image is a 4x4 token grid), ``num_layers`` dual-stream and
    ``num_single_layers`` single-stream blocks with rotary embeddings, CLIP (pooled) and T5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(words)
    tokenizer_2 = build_t5_tokenizer(words, t5_length)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=text_dim, intermediate_size=37, num_attention_heads=2,
        num_hidden_layers=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )).eval()
    text_encoder_2 = _t5_encoder(tokenizer_2, t5_dim)
    rope = (head_dim // 4, head_dim // 4 + head_dim // 8, head_dim - head_dim // 2 - head_dim // 8)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=t5_dim,
        pooled_projection_dim=text_dim, guidance_embeds=False, axes_dims_rope=rope,
    ).eval()
    vae = _vae(image_size, shift_factor=0.1159, scaling_factor=0.3611)  # FLUX's latent statistics
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                        transformer=transformer)


def save_tiny_flux_pipeline(out_dir, **kwargs):
    """Build a tiny FLUX pipeline and ``save_pretrained`` it."""
    from pathlib import Path

    out_dir = Path(out_dir)
    build_tiny_flux_pipeline(**kwargs).save_pretrained(out_dir)
    return out_dir
