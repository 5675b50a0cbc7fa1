"""Pixel-space (VAE-less) pipelines through the generator: the same loading and labelling path as SD."""
import numpy as np
import pytest
import torch

from dsdiff.data.classes import SHAPES_CLASSES
from dsdiff.data.shapes import ShapesDataset
from dsdiff.diffusion import SyntheticGenerator, load_pipeline
from dsdiff.diffusion.pixels import latents_to_images, pack, packing_factor, unpack
from dsdiff.diffusion.real_images import attention_on_images
from dsdiff.shapes_t2i.scoring import world_records

PROMPTS = ["a ball and a leaf; ball leaf", "a ring"]


@pytest.fixture(scope="module")
def gen(pixel_pipeline_dir):
    return SyntheticGenerator.from_pretrained(pixel_pipeline_dir, SHAPES_CLASSES, device="cpu",
                                              num_inference_steps=3, self_res=16)


def test_pack_unpack_roundtrip_and_factor_from_channels():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    packed = pack(x, 2)
    assert packed.shape == (2, 12, 16, 16) and torch.equal(unpack(packed, 2), x)
    assert [packing_factor(c) for c in (3, 12, 27)] == [1, 2, 3]
    with pytest.raises(ValueError, match="in_channels=4: add its VAE"):
        packing_factor(4)
    with pytest.raises(ValueError, match="not a multiple of the packing factor 2"):
        pack(torch.zeros(1, 3, 31, 31), 2)


def test_saved_pixel_pipeline_loads_without_a_vae_and_labels_images(gen):
    assert gen.pipe.vae is None and (gen.height, gen.width) == (32, 32)
    samples = gen(PROMPTS, seeds=[0, 1])
    assert [s.class_ids for s in samples] == [[1, 3], [5]]
    for s in samples:
        assert s.image.shape == (32, 32, 3) and s.image.dtype == np.uint8
        assert s.label.shape == (32, 32) and set(np.unique(s.label)) <= {0, 255, *s.class_ids}
        assert s.class_maps.shape == (len(s.class_ids), 32, 32) and 0 <= s.class_maps.min() <= s.class_maps.max() <= 1
        assert s.image.std() > 5  # an image, not a blank: the latents were unpacked to pixels


def test_images_equal_the_plain_pipeline_latents_unpacked(gen, pixel_pipeline_dir):
    plain = load_pipeline(pixel_pipeline_dir, dtype=torch.float32)
    plain.set_progress_bar_config(disable=True)
    latents = plain(PROMPTS[0], num_inference_steps=3, guidance_scale=7.5, height=128, width=128,
                    output_type="latent", generator=torch.Generator("cpu").manual_seed(5)).images
    assert latents.shape == (1, 12, 16, 16)
    expected = latents_to_images(latents, 2)[0].numpy()
    ours = gen(PROMPTS[:1], seeds=[5])[0].image
    assert np.abs(ours.astype(float) - expected * 255).max() <= 0.51


def test_image_size_must_be_a_multiple_of_the_packing(gen):
    with pytest.raises(ValueError, match="multiple of this pipeline's latent factor 2"):
        gen(PROMPTS[:1], seeds=[0], height=31, width=31)


def test_attention_on_real_images(gen):
    world = ShapesDataset("test", size=4)
    images = np.stack([world.render(i)[0] for i in range(4)])
    records = world_records(world, range(4))
    a = attention_on_images(gen, images, records, [100, 400], seed=3, return_attention=True)
    b = attention_on_images(gen, images, records, [100, 400], seed=3)
    for i, (s, r) in enumerate(zip(a, records)):
        assert s.class_ids == r.class_ids == sorted(o.label for o in world.layout(i))
        assert np.array_equal(s.image, images[i]) and s.label.shape == (32, 32)
        assert set(np.unique(s.label)) <= {0, 255, *s.class_ids}
        assert s.attention["self"].shape == (256, 256) and s.attention["cross"].shape[1:] == (16, 16)
        assert np.array_equal(s.label, b[i].label)
    with pytest.raises(ValueError, match=r"uint8 \(B, H, W, 3\)"):
        attention_on_images(gen, images.astype(np.float32), records, [100])


def test_text_layers_make_a_class_words_key_depend_on_its_context():
    """The bag-of-words encoder gives "ball" one state in any text; a causal layer (text_layers=1)
    makes it carry the words before it, the case the paper's class prompt is for."""
    from dsdiff.shapes_t2i.net import build_text_encoder, build_tokenizer

    tok = build_tokenizer()
    ball = tok.convert_tokens_to_ids(tok.tokenize("ball"))[0]

    def ball_state(encoder, text):
        ids = tok(text, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
        with torch.no_grad():
            hidden = encoder(ids).last_hidden_state[0]
        return hidden[ids[0].tolist().index(ball)]

    bag = build_text_encoder(tok, layers=0)
    assert torch.allclose(ball_state(bag, "a leaf and a ball"), ball_state(bag, "ball"), atol=1e-6)
    contextual = build_text_encoder(tok, layers=1, positions=True)
    assert contextual.config.num_hidden_layers == 1
    assert not torch.allclose(ball_state(contextual, "a leaf and a ball"), ball_state(contextual, "ball"), atol=1e-3)
    # causal: what follows a word does not change it
    assert torch.allclose(ball_state(contextual, "a ball and a leaf"), ball_state(contextual, "a ball"), atol=1e-5)
    with pytest.raises(ValueError, match="heads dividing dim"):
        build_text_encoder(tok, dim=64, layers=1, heads=5)


def test_contextual_from_starts_as_the_bag_of_words_model_and_then_reads_context(pixel_pipeline_dir):
    """Warm start for issue 12 part 4: the added causal layers are an exact identity at step 0."""
    from dsdiff.shapes_t2i.net import contextual_from

    base = load_pipeline(pixel_pipeline_dir, dtype=torch.float32)
    warm = contextual_from(pixel_pipeline_dir, text_layers=1)
    assert warm.text_encoder.config.num_hidden_layers == 1 and warm.unet is not None
    tok = base.tokenizer
    ids = tok(["a ball and a leaf", "ball leaf", ""], padding="max_length", max_length=tok.model_max_length,
              return_tensors="pt").input_ids
    with torch.no_grad():
        before, after = base.text_encoder(ids)[0], warm.text_encoder(ids)[0]
        assert torch.allclose(before, after, atol=1e-5)
        layer = getattr(warm.text_encoder, "text_model", warm.text_encoder).encoder.layers[0]
        layer.self_attn.out_proj.weight.normal_()  # once trained, the layer mixes context in
        assert not torch.allclose(base.text_encoder(ids)[0], warm.text_encoder(ids)[0], atol=1e-3)
    with pytest.raises(FileNotFoundError, match="not a diffusers pipeline folder"):
        contextual_from(pixel_pipeline_dir / "unet")


def test_a_contextual_warm_start_trains_its_models_and_refuses_a_contextual_init(pixel_pipeline_dir, tmp_path):
    from dsdiff.shapes_t2i.net import contextual_from, save_pipeline
    from dsdiff.shapes_t2i.system import TextToImage

    warm = contextual_from(pixel_pipeline_dir, text_layers=1)
    assert not warm.unet.training  # diffusers loads in eval mode ...
    system = TextToImage(warm, optimizer=torch.optim.AdamW)
    assert system.unet.training and system.text_encoder.training  # ... training must not keep it
    save_pipeline(warm, tmp_path / "contextual")
    with pytest.raises(ValueError, match="already has 1 layer"):
        contextual_from(tmp_path / "contextual")
