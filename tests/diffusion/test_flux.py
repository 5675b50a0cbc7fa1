"""Class-prompt recording on a FLUX.1 transformer (dual- then single-stream blocks, rotary embeddings):
the image is plain diffusers', the maps are the direct softmax(q k^T) of the carried class stream."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb

from dsdiff.data.classes import VOC_CLASSES
from dsdiff.diffusion.attention import AttentionStore
from dsdiff.diffusion.flux import FluxRecorder
from dsdiff.diffusion.generator import SyntheticGenerator
from dsdiff.testing.tiny_mmdit import build_tiny_flux_pipeline
from dsdiff.utils.errors import SettingError

T5_LENGTH = 32


@pytest.fixture(scope="module")
def pipe():
    pipe = build_tiny_flux_pipeline(t5_length=T5_LENGTH)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompts, seed=0, steps=2):
    return pipe(list(prompts), num_inference_steps=steps, height=64, width=64, guidance_scale=0.0,
                generator=torch.Generator().manual_seed(seed), output_type="pt", max_sequence_length=T5_LENGTH).images


def class_embeds(pipe, texts):
    return pipe.encode_prompt(prompt=list(texts), prompt_2=None, max_sequence_length=T5_LENGTH)[0]


def recorded(pipe, prompts, classes, blocks):
    store = AttentionStore()
    store.reset(class_embeds(pipe, classes))
    with FluxRecorder(pipe.transformer, store, blocks):
        images = generate(pipe, prompts)
    return images, store


def test_the_image_is_plain_diffusers_and_the_class_prompt_changes_no_pixel(pipe):
    prompts = ["a cat on the grass", "a dog and a car"]
    plain = generate(pipe, prompts)
    with_cat, store = recorded(pipe, prompts, ["cat", "dog car"], blocks=[0, 1, 2, 3])
    with_bus, _ = recorded(pipe, prompts, ["bus train", "sheep"], blocks=[3])
    assert torch.equal(plain, with_cat) and torch.equal(plain, with_bus)
    assert store.cross_count == store.self_count == 2 * 4  # 2 steps x 4 blocks (2 dual + 2 single)
    assert store.mean("cross").shape == (2, 16, T5_LENGTH)
    assert torch.equal(generate(pipe, prompts), plain)  # diffusers' processors are back


def _direct_chain(pipe, seen, embeds, upto):
    """Class tokens entering block ``upto`` and the cross maps there, from the blocks' own forward passes
    with the class tokens as the text (the class queries then see [class, image], as the stream's do)."""
    transformer = pipe.transformer
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    tokens = transformer.context_embedder(embeds)
    for i in range(upto + 1):
        x = seen[i]
        cos, sin = x["image_rotary_emb"]
        text = x["encoder_hidden_states"].shape[1]
        n_cls = tokens.shape[1]
        rot_img = (cos[text:], sin[text:])
        block = blocks[i]
        attn = block.attn
        d = attn.head_dim
        if i < len(transformer.transformer_blocks):
            normed_img = block.norm1(x["hidden_states"], emb=x["temb"])[0]
            normed_cls = block.norm1_context(tokens, emb=x["temb"])[0]
            k = attn.norm_added_k(attn.add_k_proj(normed_cls).unflatten(-1, (-1, d)))
        else:
            normed_img = block.norm(x["hidden_states"], emb=x["temb"])[0]
            normed_cls = block.norm(tokens, emb=x["temb"])[0]
            k = attn.norm_k(attn.to_k(normed_cls).unflatten(-1, (-1, d)))
        q = attn.norm_q(attn.to_q(normed_img).unflatten(-1, (-1, d)))
        q = apply_rotary_emb(q, rot_img, sequence_dim=1)
        maps = torch.softmax(q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2) / d**0.5, -1).mean(1)
        if i == upto:
            return maps
        rotary = (torch.cat([torch.ones(n_cls, cos.shape[1]), cos[text:]]), torch.cat([torch.zeros(n_cls, sin.shape[1]), sin[text:]]))
        tokens, _ = block(hidden_states=x["hidden_states"], encoder_hidden_states=tokens, temb=x["temb"],
                          image_rotary_emb=rotary)


@torch.no_grad()
@pytest.mark.parametrize("block", [0, 2, 3])  # the first dual-stream block; the single-stream ones after both
def test_cross_maps_are_the_direct_softmax_of_the_carried_class_stream(pipe, block):
    transformer = pipe.transformer
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    seen = {}

    def keep(i):
        def hook(module, args, kwargs):
            seen[i] = {k: tuple(t.clone() for t in v) if isinstance(v, tuple) else v.clone()
                       for k, v in kwargs.items() if k != "joint_attention_kwargs"}
        return hook
    hooks = [b.register_forward_pre_hook(keep(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:  # one step: the maps are that step's alone
        store = AttentionStore()
        store.reset(class_embeds(pipe, ["cat dog"]))
        with FluxRecorder(transformer, store, [block]):
            pipe(["a cat and a dog"], num_inference_steps=1, height=64, width=64, guidance_scale=0.0,
                 generator=torch.Generator().manual_seed(0), output_type="pt", max_sequence_length=T5_LENGTH)
    finally:
        for h in hooks:
            h.remove()
    want = _direct_chain(pipe, seen, class_embeds(pipe, ["cat dog"]), block)
    torch.testing.assert_close(store.mean("cross"), want, rtol=0, atol=1e-5)


def test_flux_generator_labels_and_refuses_a_negative_prompt(pipe):
    gen = SyntheticGenerator(pipe, VOC_CLASSES, num_inference_steps=2, guidance_scale=0.0, height=64, width=64,
                             cross_res=4, self_res=4, tau=1, max_sequence_length=T5_LENGTH)
    samples = gen(["a cat on the grass", "a dog and a car"], seeds=[0, 1])
    recorder = gen.family.recorder
    assert gen(["a cat"], seeds=[2])[0].label.shape == (64, 64) and gen.family.recorder is recorder  # installed once
    plain = pipe(["a cat on the grass", "a dog and a car"], num_inference_steps=2, guidance_scale=0.0, height=64,
                 width=64, generator=[torch.Generator().manual_seed(s) for s in (0, 1)], output_type="np",
                 max_sequence_length=T5_LENGTH).images
    for sample, image in zip(samples, plain):
        assert np.array_equal(sample.image, (image * 255).round().clip(0, 255).astype(np.uint8))
        assert set(np.unique(sample.label)) <= {0, 255, *sample.class_ids}
    with pytest.raises(SettingError, match="generator.negative_prompt"):
        SyntheticGenerator(pipe, VOC_CLASSES, height=64, width=64, cross_res=4, self_res=4, negative_prompt="ugly")
    with pytest.raises(SettingError, match=r"generator\.labels\.blocks=\[0, 4\]: this transformer has blocks 0\.\.3"):
        SyntheticGenerator(pipe, VOC_CLASSES, height=64, width=64, cross_res=4, self_res=4, blocks=[0, 4])


def test_flux_output_space_maps_leave_the_image_alone_and_are_distributions(pipe):
    prompts = ["a cat on the grass"]
    store = AttentionStore()
    store.reset(class_embeds(pipe, ["cat"]))
    with FluxRecorder(pipe.transformer, store, [1, 3], maps="output"):
        images = generate(pipe, prompts)
    assert torch.equal(images, generate(pipe, prompts))
    maps = store.mean("cross")
    assert maps.shape == (1, 16, T5_LENGTH) and store.cross_count == 2 * 2
    torch.testing.assert_close(maps.sum(-1), torch.ones(1, 16), rtol=0, atol=1e-5)
    _, attention_store = recorded(pipe, prompts, ["cat"], blocks=[1, 3])
    assert not torch.allclose(maps, attention_store.mean("cross"), atol=1e-3)  # another map, not the same one
