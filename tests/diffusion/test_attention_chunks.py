"""Head-mean attention probabilities are the same whether samples go one at a time or in chunks."""
import torch

from dsdiff.diffusion import attention


def test_chunked_probabilities_equal_per_sample_ones(monkeypatch):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(5, 4, 64, 8, generator=g), torch.randn(5, 4, 77, 8, generator=g)
    expected = torch.stack([torch.softmax(qi @ ki.transpose(-1, -2) * 0.35, -1).mean(0) for qi, ki in zip(q, k)])
    for budget in (1, 2 * 4 * 64 * 77 * 4, 2**30):  # one sample, two samples, all five per chunk
        monkeypatch.setattr(attention, "CHUNK_BYTES", budget)
        got = attention._head_mean_probs(q, k, 0.35)
        assert got.shape == (5, 64, 77)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.sum(-1), torch.ones(5, 64))


def test_half_precision_inputs_give_fp32_probabilities():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 2, 16, 8, generator=g), torch.randn(2, 2, 16, 8, generator=g)
    got = attention._head_mean_probs(q.bfloat16(), k.bfloat16(), 0.35)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, attention._head_mean_probs(q, k, 0.35), rtol=0.05, atol=0.01)


def test_class_keys_are_reused_within_a_batch_and_renewed_for_the_next():
    from dsdiff.diffusion.attention import AttentionStore, recording_processors
    from dsdiff.testing.tiny_sd import build_tiny_pipeline

    unet = build_tiny_pipeline().unet.eval()
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(4, 4, 32, 32, generator=g), torch.randn(4, 77, 32, generator=g)
    first, second = torch.randn(2, 77, 32, generator=g), torch.randn(2, 77, 32, generator=g) * 3

    def cross_maps(store, embeds, steps=2):
        store.reset(embeds)
        with torch.no_grad():
            for t in range(steps):
                unet(x, 500 - 100 * t, encoder_hidden_states=text)
        maps = store.mean("cross")
        store.clear()
        return maps

    store = AttentionStore()
    unet.set_attn_processor(recording_processors(unet, store, (32, 32), 16, 32))
    cross_maps(store, first)
    reused = cross_maps(store, second)  # same processors: the first batch's keys must not leak in
    fresh_store = AttentionStore()
    unet.set_attn_processor(recording_processors(unet, fresh_store, (32, 32), 16, 32))
    torch.testing.assert_close(reused, cross_maps(fresh_store, second))
    assert not torch.allclose(reused, cross_maps(fresh_store, first), atol=1e-4)
