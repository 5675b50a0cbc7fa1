"""Recording processors: installed only where used, invisible in the UNet output, flat in memory."""
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from dsdiff.diffusion.attention import AttentionStore, RecordingAttnProcessor, attention_layer_sizes, recording_processors
from dsdiff.testing.tiny_sd import build_sd_shaped_pipeline, build_tiny_pipeline


@pytest.fixture(scope="module")
def unet():
    return build_tiny_pipeline().unet.eval()


def inputs(batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 32, 32, generator=g), torch.randn(batch, 77, 32, generator=g)


def run(unet, x, text, t=500):
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=text).sample


def install(unet, store, cross_res=16, self_res=32):
    unet.set_attn_processor(recording_processors(unet, store, (32, 32), cross_res, self_res))


def test_layer_sizes_follow_the_sd_block_layout():
    unet = build_sd_shaped_pipeline(width=8, image_size=512).unet
    sizes = attention_layer_sizes(unet, (64, 64))
    side = {name.split(".attentions")[0]: hw[0] for name, hw in sizes.items()}
    assert side == {
        "down_blocks.0": 64, "down_blocks.1": 32, "down_blocks.2": 16, "mid_block": 8,
        "up_blocks.1": 16, "up_blocks.2": 32, "up_blocks.3": 64,
    }
    assert attention_layer_sizes(unet, (64, 96))["down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor"] == (32, 48)


def test_recorders_only_on_the_layers_used(unet):
    install(unet, AttentionStore())
    recorders = {n: (p.kind, p.hw) for n, p in unet.attn_processors.items() if isinstance(p, RecordingAttnProcessor)}
    others = [p for p in unet.attn_processors.values() if not isinstance(p, RecordingAttnProcessor)]
    assert sorted(k for k, _ in recorders.values()) == ["cross"] * 4 + ["self"] * 3
    assert all((kind == "cross") == (hw == (16, 16)) for kind, hw in recorders.values())
    assert all(n.endswith("attn2.processor") == (k == "cross") for n, (k, _) in recorders.items())
    assert len(others) == 7 and all(isinstance(p, AttnProcessor2_0) for p in others)
    with pytest.raises(ValueError, match=r"resolution 8 .* attention at \[32, 16\]: set cross_res"):
        install(unet, AttentionStore(), cross_res=8)


def test_recording_leaves_the_unet_output_unchanged(unet):
    x, text = inputs(4)
    unet.set_attn_processor(AttnProcessor2_0())
    plain = run(unet, x, text)
    store = AttentionStore()
    install(unet, store)
    store.reset(torch.randn(2, 77, 32))  # B=2 prompts: the batch of 4 is [uncond, cond]
    recorded = run(unet, x, text)
    assert store.cross_count == 4 and store.self_count == 3, "the recorders did run"
    assert (recorded - plain).abs().max() < 1e-5
    store.reset(torch.randn(2, 77, 32) * 10)  # another class prompt: still the same image
    assert (run(unet, x, text) - plain).abs().max() < 1e-5


def test_recorded_maps_come_from_the_conditional_half_and_are_distributions(unet):
    x, text = inputs(4, seed=1)
    class_embeds = torch.randn(2, 77, 32)
    store = AttentionStore()
    install(unet, store)
    store.reset(class_embeds)
    run(unet, x, text)
    cross, self_attn = store.mean("cross"), store.mean("self")
    assert cross.shape == (2, 256, 77) and self_attn.shape == (2, 1024, 1024)
    torch.testing.assert_close(cross.sum(-1), torch.ones(2, 256))
    torch.testing.assert_close(self_attn.sum(-1), torch.ones(2, 1024))
    store.reset(class_embeds)
    run(unet, x[2:], text[2:])  # the conditional half alone (no guidance)
    torch.testing.assert_close(store.mean("cross"), cross, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(store.mean("self"), self_attn, atol=1e-5, rtol=1e-4)


def test_memory_is_flat_in_the_number_of_steps(unet):
    x, text = inputs(2, seed=2)
    store = AttentionStore()
    install(unet, store)
    store.reset(torch.randn(1, 77, 32))
    sizes = []
    for step in range(6):
        run(unet, x, text, t=900 - 150 * step)
        sizes.append(store.nbytes())
    assert sizes == [sizes[0]] * 6
    assert sizes[0] == (256 * 77 + 1024 * 1024) * 4  # one fp32 running sum per kind
    assert (store.cross_count, store.self_count) == (6 * 4, 6 * 3)
    store.recording = False
    run(unet, x, text)
    assert (store.cross_count, store.self_count) == (24, 18), "outside the window nothing is added"
