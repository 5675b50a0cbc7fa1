"""Class-prompt recording on an SD3 (MMDiT) transformer: the image is plain diffusers', the maps are
the direct softmax(q k^T) of the carried class stream."""
from __future__ import annotations

import pytest
import torch

from dsdiff.diffusion import mmdit
from dsdiff.diffusion.attention import AttentionStore
from dsdiff.diffusion.mmdit import JointRecorder
from dsdiff.testing.tiny_mmdit import build_tiny_sd3_pipeline
from dsdiff.utils.errors import SettingError

T5_LENGTH = 32


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_sd3_pipeline(t5_length=T5_LENGTH)


def class_embeds(pipe, texts):
    embeds, _, _, _ = pipe.encode_prompt(prompt=list(texts), prompt_2=None, prompt_3=None,
                                         do_classifier_free_guidance=False, max_sequence_length=T5_LENGTH)
    return embeds


def generate(pipe, prompts, seed=0, steps=2):
    return pipe(list(prompts), num_inference_steps=steps, height=64, width=64, guidance_scale=3.0,
                generator=torch.Generator().manual_seed(seed), output_type="pt",
                max_sequence_length=T5_LENGTH).images


def recorded(pipe, prompts, classes, blocks, seed=0):
    store = AttentionStore()
    store.reset(class_embeds(pipe, classes))
    with JointRecorder(pipe.transformer, store, blocks):
        images = generate(pipe, prompts, seed)
    return images, store


def test_the_image_is_plain_diffusers_bit_for_bit_and_the_class_prompt_changes_no_pixel(pipe):
    prompts = ["a cat on the grass", "a dog and a car"]
    plain = generate(pipe, prompts)
    with_cat, store = recorded(pipe, prompts, ["cat", "dog car"], blocks=[0, 1, 2])
    with_bus, _ = recorded(pipe, prompts, ["bus train", "sheep"], blocks=[1])
    assert torch.equal(plain, with_cat) and torch.equal(plain, with_bus)
    # recorded on every step (2), every block (3), both maps; the processors are diffusers' again after
    assert store.cross_count == store.self_count == 6
    assert store.mean("cross").shape == (2, 16, 77 + T5_LENGTH) and store.mean("self").shape == (2, 16, 16)
    assert all(type(p).__name__ == "JointAttnProcessor2_0" for p in pipe.transformer.attn_processors.values())
    assert torch.equal(generate(pipe, prompts), plain)


def _inputs_of(pipe, index):
    """Records (hidden_states, encoder_hidden_states, temb) each time block ``index`` runs."""
    seen = []

    def hook(module, args, kwargs):
        seen.append({k: kwargs[k].detach().clone() for k in ("hidden_states", "encoder_hidden_states", "temb")})
    return seen, pipe.transformer.transformer_blocks[index].register_forward_pre_hook(hook, with_kwargs=True)


def _direct_cross(block, image_tokens, class_tokens, temb):
    """softmax(q_image k_class^T / sqrt(d)) averaged over heads, from the block's own layers."""
    attn = block.attn
    normed_image = block.norm1(image_tokens, emb=temb)[0]
    normed_class = (block.norm1_context(class_tokens, temb) if block.context_pre_only
                    else block.norm1_context(class_tokens, emb=temb)[0])
    b, d = image_tokens.shape[0], attn.inner_dim // attn.heads
    q = attn.norm_q(attn.to_q(normed_image).view(b, -1, attn.heads, d).transpose(1, 2)) if attn.norm_q is not None else \
        attn.to_q(normed_image).view(b, -1, attn.heads, d).transpose(1, 2)
    k = attn.add_k_proj(normed_class).view(b, -1, attn.heads, d).transpose(1, 2)
    if attn.norm_added_k is not None:
        k = attn.norm_added_k(k)
    return torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1).mean(1)


@pytest.fixture(scope="module")
def pipe35():
    return build_tiny_sd3_pipeline(t5_length=T5_LENGTH, sd35=True)


@torch.no_grad()
@pytest.mark.parametrize("layout", ["sd3", "sd35"])
def test_cross_maps_are_the_direct_softmax_of_the_carried_class_stream(pipe, pipe35, layout):
    """Block 0 sees the class prompt as embedded; block 1 sees it as block 0's context output would be
    if the class prompt were the context (class queries over [image, class] keys). ``sd35``: RMS q/k
    norms and dual attention in both blocks."""
    pipe = pipe35 if layout == "sd35" else pipe
    prompts, classes = ["a cat on the grass"], ["cat"]
    transformer = pipe.transformer
    seen0, h0 = _inputs_of(pipe, 0)
    seen1, h1 = _inputs_of(pipe, 1)
    try:
        _, store0 = recorded(pipe, prompts, classes, blocks=[0])
        _, store1 = recorded(pipe, prompts, classes, blocks=[1])
    finally:
        h0.remove()
        h1.remove()
    steps = len(seen0) // 2  # two recorded generations, same seed: the same inputs twice
    embeds = class_embeds(pipe, classes)
    c0 = transformer.context_embedder(embeds)
    block0, block1 = transformer.transformer_blocks[0], transformer.transformer_blocks[1]
    want0 = want1 = 0
    for step in range(steps):
        x0, x1 = seen0[step], seen1[step]
        cond = slice(-1, None)  # the batch is [uncond, cond]
        want0 = want0 + _direct_cross(block0, x0["hidden_states"][cond], c0, x0["temb"][cond])
        c1, _ = block0(hidden_states=x0["hidden_states"][cond], encoder_hidden_states=c0, temb=x0["temb"][cond])
        want1 = want1 + _direct_cross(block1, x1["hidden_states"][cond], c1, x1["temb"][cond])
    torch.testing.assert_close(store0.mean("cross"), want0 / steps, rtol=0, atol=1e-5)
    torch.testing.assert_close(store1.mean("cross"), want1 / steps, rtol=0, atol=1e-5)
    assert not torch.allclose(store0.mean("cross"), store1.mean("cross"), atol=1e-3)
    # each map is a distribution over the class prompt's tokens
    torch.testing.assert_close(store1.mean("cross").sum(-1), torch.ones(1, 16), rtol=0, atol=1e-5)


def test_row_chunks_give_the_unchunked_maps(monkeypatch):
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 64, 8), torch.randn(2, 3, 40, 8)
    whole = mmdit._row_chunked_probs(q, k, 8**-0.5)
    monkeypatch.setattr(mmdit, "CHUNK_BYTES", 2 * 3 * 40 * 4 * 5)  # 5 query rows per chunk
    torch.testing.assert_close(mmdit._row_chunked_probs(q, k, 8**-0.5), whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(whole, torch.softmax(q @ k.transpose(-1, -2) * 8**-0.5, -1).mean(1))


@pytest.mark.parametrize("blocks", [[], [3], [-1], ["x"]])
def test_blocks_out_of_range_are_refused_naming_the_setting(pipe, blocks):
    with pytest.raises(SettingError, match=r"generator\.labels\.blocks"):
        JointRecorder(pipe.transformer, AttentionStore(), blocks)


def test_a_pipeline_dsdiff_cannot_record_names_itself():
    from dsdiff.diffusion.pipeline import pipeline_family

    assert pipeline_family({"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "x"]}, "m") == "sd3"
    assert pipeline_family({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "x"]}, "m") == "unet"
    assert pipeline_family({"_class_name": "FluxPipeline", "transformer": ["diffusers", "x"]}, "m") == "flux"
    with pytest.raises(SettingError, match=r"generator\.model=PixArt-alpha/PixArt-XL-2-512x512 is a PixArtAlphaPipeline"):
        pipeline_family({"_class_name": "PixArtAlphaPipeline", "transformer": ["diffusers", "x"]},
                        "PixArt-alpha/PixArt-XL-2-512x512")


def test_sd3_only_settings_are_refused_on_a_unet_generator(tiny_pipeline_dir):
    from dsdiff.data.classes import VOC_CLASSES
    from dsdiff.diffusion.generator import SyntheticGenerator

    with pytest.raises(SettingError, match=r"generator\.labels\.blocks=\[1, 2\]"):
        SyntheticGenerator.from_pretrained(tiny_pipeline_dir, VOC_CLASSES, device="cpu", blocks=[1, 2])
    with pytest.raises(SettingError, match=r"generator\.max_sequence_length"):
        SyntheticGenerator.from_pretrained(tiny_pipeline_dir, VOC_CLASSES, device="cpu", max_sequence_length=77)
    with pytest.raises(SettingError, match=r"generator\.labels\.self_blocks=\[3\]"):
        SyntheticGenerator.from_pretrained(tiny_pipeline_dir, VOC_CLASSES, device="cpu", self_blocks=[3])


def test_self_maps_can_come_from_fewer_blocks_than_the_cross_maps(pipe):
    from dsdiff.data.classes import VOC_CLASSES
    from dsdiff.diffusion.generator import SyntheticGenerator

    store = AttentionStore()
    store.reset(class_embeds(pipe, ["cat"]))
    with JointRecorder(pipe.transformer, store, [0, 1, 2], self_blocks=[1]):
        generate(pipe, ["a cat on the grass"])
    assert (store.cross_count, store.self_count) == (6, 2)  # 2 steps x 3 cross blocks, x 1 self block
    gen = SyntheticGenerator(pipe, VOC_CLASSES, num_inference_steps=2, cross_res=4, self_res=4,
                             max_sequence_length=T5_LENGTH, self_blocks="1-1")
    sample = gen(["a cat on the grass"], seeds=[0])[0]
    assert sample.metadata["self_blocks"] == [1] and sample.label.shape == (64, 64)
    with pytest.raises(SettingError, match=r"generator\.labels\.self_blocks=\[5\]: this transformer has blocks 0\.\.2"):
        SyntheticGenerator(pipe, VOC_CLASSES, cross_res=4, self_res=4, self_blocks=[5])


def test_sd3_maps_must_be_at_the_token_grid(pipe):
    from dsdiff.data.classes import VOC_CLASSES
    from dsdiff.diffusion.generator import SyntheticGenerator

    with pytest.raises(SettingError, match=r"generator\.labels\.cross_res=16.*set generator\.labels\.cross_res=4"):
        SyntheticGenerator(pipe, VOC_CLASSES)
    with pytest.raises(SettingError, match=r"generator\.labels\.class_prompt=false"):
        SyntheticGenerator(pipe, VOC_CLASSES, cross_res=4, self_res=4, class_prompt=False)


@torch.no_grad()
def test_output_space_maps_are_the_direct_softmax_of_the_attention_outputs(pipe):
    """maps=output (ConceptAttention): the image tokens' attention outputs against the class tokens', both
    before the output projection, head-mean softmax over the class tokens; the image is unchanged."""
    prompts, classes = ["a cat on the grass"], ["cat"]
    seen, hook = _inputs_of(pipe, 0)
    store = AttentionStore()
    store.reset(class_embeds(pipe, classes))
    try:
        with JointRecorder(pipe.transformer, store, [0], maps="output"):
            images = generate(pipe, prompts)
    finally:
        hook.remove()
    assert torch.equal(images, generate(pipe, prompts))
    block = pipe.transformer.transformer_blocks[0]
    attn, d = block.attn, block.attn.inner_dim // block.attn.heads
    c0 = pipe.transformer.context_embedder(class_embeds(pipe, classes))

    def heads(x):
        return x.view(1, -1, attn.heads, d).transpose(1, 2)

    want = 0
    for x in seen:
        cond = slice(-1, None)
        temb = x["temb"][cond]
        img = block.norm1(x["hidden_states"][cond], emb=temb)[0]
        ctx = block.norm1_context(x["encoder_hidden_states"][cond], emb=temb)[0]
        cls = block.norm1_context(c0, emb=temb)[0]
        q_i, k_i, v_i = heads(attn.to_q(img)), heads(attn.to_k(img)), heads(attn.to_v(img))
        k_p, v_p = heads(attn.add_k_proj(ctx)), heads(attn.add_v_proj(ctx))
        q_c, k_c, v_c = heads(attn.add_q_proj(cls)), heads(attn.add_k_proj(cls)), heads(attn.add_v_proj(cls))
        assert attn.norm_q is None and attn.norm_added_k is None  # the kit's SD3 has no q/k norms
        out_img = torch.softmax(q_i @ torch.cat([k_i, k_p], 2).transpose(-1, -2) / d**0.5, -1) @ torch.cat([v_i, v_p], 2)
        out_cls = torch.softmax(q_c @ torch.cat([k_i, k_c], 2).transpose(-1, -2) / d**0.5, -1) @ torch.cat([v_i, v_c], 2)
        want = want + torch.softmax(out_img @ out_cls.transpose(-1, -2) / d**0.5, -1).mean(1)
    torch.testing.assert_close(store.mean("cross"), want / len(seen), rtol=0, atol=1e-5)


def test_output_maps_are_refused_on_a_unet_generator(tiny_pipeline_dir):
    from dsdiff.data.classes import VOC_CLASSES
    from dsdiff.diffusion.generator import SyntheticGenerator

    with pytest.raises(SettingError, match=r"generator\.labels\.maps=output"):
        SyntheticGenerator.from_pretrained(tiny_pipeline_dir, VOC_CLASSES, device="cpu", maps="output")
    with pytest.raises(SettingError, match=r"generator\.labels\.maps='outputs'"):
        SyntheticGenerator.from_pretrained(tiny_pipeline_dir, VOC_CLASSES, device="cpu", maps="outputs")


@torch.no_grad()
def test_real_images_are_noised_as_the_flow_matching_scheduler_does_and_labelled(pipe):
    import numpy as np

    from dsdiff.data.classes import VOC_CLASSES
    from dsdiff.diffusion.generator import SyntheticGenerator
    from dsdiff.diffusion.real_images import attention_on_images

    gen = SyntheticGenerator(pipe, VOC_CLASSES, cross_res=4, self_res=4, tau=1, max_sequence_length=T5_LENGTH)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[3]
    latents, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["hidden_states"]), with_kwargs=True)
    try:
        cond = gen.family.condition(["a cat"], "cpu")
        gen.family.noised_forward(latents, noise, float(t), cond)
    finally:
        hook.remove()
    torch.testing.assert_close(seen[0], scheduler.scale_noise(latents, t[None], noise), rtol=0, atol=1e-6)

    images = (np.random.default_rng(0).random((2, 64, 64, 3)) * 255).astype(np.uint8)
    a = attention_on_images(gen, images, ["a cat on the grass", "a dog and a car"], [200, 600], seed=3)
    b = attention_on_images(gen, images, ["a cat on the grass", "a dog and a car"], [200, 600], seed=3)
    c = attention_on_images(gen, images, ["a cat on the grass", "a dog and a car"], [200, 600], seed=4)
    assert all(np.array_equal(x.label, y.label) for x, y in zip(a, b))  # the seed fixes the noise
    assert any(not np.array_equal(x.class_maps, z.class_maps) for x, z in zip(a, c))
    assert a[1].class_ids == [7, 12] and a[1].label.shape == (64, 64)
    assert set(np.unique(a[1].label)) <= {0, 7, 12, 255}


def test_self_maps_pooled_below_the_token_grid_equal_the_pooled_full_maps(pipe, monkeypatch):
    from dsdiff.data.classes import VOC_CLASSES
    from dsdiff.diffusion.generator import SyntheticGenerator

    q, k = torch.randn(2, 3, 8 * 6, 4), torch.randn(2, 3, 8 * 6, 4)  # an 8x6 token grid, 3 heads
    full = torch.softmax(q @ k.transpose(-1, -2) * 0.5, dim=-1).mean(1)  # (B, 48, 48)
    grid = full.view(2, 4, 2, 3, 2, 4, 2, 3, 2)  # (B, qy, py, qx, px, ky, py', kx, px')
    expected = grid.sum((6, 8)).mean((2, 4)).reshape(2, 12, 12)
    monkeypatch.setattr(mmdit, "CHUNK_BYTES", 1)  # one band of 2 token rows per chunk
    pooled = mmdit._self_probs(q, k, 0.5, (2, 6))
    assert torch.allclose(pooled, expected, atol=1e-6) and torch.allclose(pooled.sum(-1), torch.ones(2, 12))
    assert torch.equal(mmdit._self_probs(q, k, 0.5, None), mmdit._row_chunked_probs(q, k, 0.5))

    gen = SyntheticGenerator(pipe, VOC_CLASSES, num_inference_steps=2, cross_res=4, self_res=2, tau=1,
                             max_sequence_length=T5_LENGTH)
    sample = gen(["a cat on the grass"], seeds=[0], return_attention=True)[0]
    assert sample.attention["self"].shape == (4, 4) and sample.label.shape == (64, 64)
    with pytest.raises(SettingError, match=r"generator\.labels\.self_res=3: .*one of \[4, 2, 1\]"):
        SyntheticGenerator(pipe, VOC_CLASSES, cross_res=4, self_res=3)


def test_a_call_at_another_size_is_checked_against_the_label_grids(pipe):
    from dsdiff.data.classes import VOC_CLASSES
    from dsdiff.diffusion.generator import SyntheticGenerator

    gen = SyntheticGenerator(pipe, VOC_CLASSES, num_inference_steps=2, cross_res=4, self_res=2,
                             max_sequence_length=T5_LENGTH)
    with pytest.raises(SettingError, match=r"generator\.labels\.cross_res=4: .*3x3 for 48x48 images"):
        gen(["a cat on the grass"], seeds=[0], height=48, width=48)
