"""The shapes world's diffusion transformer: a pixel-space StableDiffusion3Pipeline trained by dsdiff.pretrain,
loaded and recorded through the same path as SD3.5."""
import json

import numpy as np
import pytest
import torch

from dsdiff.data.classes import SHAPES_CLASSES
from dsdiff.data.shapes import ShapesDataset
from dsdiff.diffusion import SyntheticGenerator, load_pipeline
from dsdiff.diffusion.pixels import latents_to_images
from dsdiff.diffusion.real_images import attention_on_images
from dsdiff.pretrain import pretrain
from dsdiff.shapes_t2i.dit import FlowTextToImage, build_dit_pipeline
from dsdiff.shapes_t2i.net import save_pipeline
from dsdiff.shapes_t2i.scoring import world_records

TINY = dict(num_layers=2, heads=2, head_dim=8, text_dim=16)
TINY_CFG = [f"model.pipeline.{k}={v}" for k, v in TINY.items()] + [
    "data.batch_size=4", "data.size=64", "model.warmup_steps=2", "logger=none"]
LABELS = dict(cross_res=16, self_res=16, tau=1)
PROMPT = "a ball and a leaf; ball leaf"


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory):
    return save_pipeline(build_dit_pipeline(**TINY), tmp_path_factory.mktemp("dit") / "pipeline")


@pytest.fixture(scope="module")
def gen(dit_dir):
    return SyntheticGenerator.from_pretrained(dit_dir, SHAPES_CLASSES, device="cpu", num_inference_steps=3, **LABELS)


def test_a_fresh_model_starts_every_block_as_the_identity():
    pipe = build_dit_pipeline(**TINY)
    block = pipe.transformer.transformer_blocks[0]
    assert not block.norm1.linear.weight.any() and not pipe.transformer.norm_out.linear.weight.any()
    hidden, context, temb = torch.randn(1, 256, 16), torch.randn(1, 32, 16), torch.randn(1, 16)
    context_out, hidden_out = block(hidden_states=hidden, encoder_hidden_states=context, temb=temb)
    assert torch.equal(hidden_out, hidden) and torch.equal(context_out, context)  # adaLN-Zero: gates start at 0
    pooled = pipe.transformer.time_text_embed.text_embedder  # pooled=False: the text enters through attention only
    assert not pooled.linear_2.weight.any() and not any(p.requires_grad for p in pooled.parameters())


def test_the_loss_target_is_the_velocity_the_sampler_integrates():
    """x_s = (1 - s) x0 + s noise is the scheduler's own noising, and an Euler step with the target v = noise - x0
    from s to 0 lands on x0: training and sampling agree on the convention."""
    pipe = build_dit_pipeline(**TINY)
    sched = pipe.scheduler
    x0, noise = torch.rand(2, 3, 32, 32) * 2 - 1, torch.randn(2, 3, 32, 32)
    sched.set_timesteps(1)
    t = sched.timesteps[:1]
    s = float(sched.sigmas[0])
    x_s = sched.scale_noise(x0, t, noise)
    assert torch.allclose(x_s, (1 - s) * x0 + s * noise, atol=1e-6)
    assert torch.allclose(sched.step(noise - x0, t[0], x_s).prev_sample, x0, atol=1e-5)


def test_pretrain_resumes_and_exports_an_sd3_folder_the_generator_records(make_cfg, tmp_path, monkeypatch):
    calls = []
    original = FlowTextToImage.training_step
    monkeypatch.setattr(FlowTextToImage, "training_step",
                        lambda self, batch, i: calls.append(self.global_step) or original(self, batch, i))
    metrics, _ = pretrain(make_cfg(["+experiment=shapes_dit", "max_steps=3", "checkpoint_every=3", *TINY_CFG],
                                   config_name="pretrain"))
    assert calls == [0, 1, 2] and metrics["steps"] == 3
    calls.clear()
    metrics, objects = pretrain(make_cfg(["+experiment=shapes_dit", "max_steps=5", "checkpoint_every=5", *TINY_CFG],
                                         config_name="pretrain"))
    assert calls == [3, 4] and metrics["steps"] == 5  # continued from last.ckpt, not from 0

    folder = tmp_path / "pipeline"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and index["vae"] == [None, None]
    assert index["text_encoder_3"] == [None, None] and json.loads((folder / "training.json").read_text())["steps"] == 5
    saved = load_pipeline(folder, dtype=torch.float32).transformer.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in objects["model"].transformer.state_dict().items())  # the EMA weights
    sample = SyntheticGenerator.from_pretrained(folder, SHAPES_CLASSES, device="cpu", num_inference_steps=2,
                                                **LABELS)([PROMPT], seeds=[0])[0]
    assert sample.image.shape == (32, 32, 3) and sample.class_ids == [1, 3]
    assert sample.label.shape == (32, 32) and set(np.unique(sample.label)) <= {0, 255, 1, 3}


def test_images_equal_plain_diffusers_and_the_class_prompt_changes_no_pixel(gen, dit_dir):
    assert gen.family.name == "sd3" and gen.pipe.vae is None and (gen.height, gen.width) == (32, 32)
    plain = load_pipeline(dit_dir, dtype=torch.float32)
    plain.set_progress_bar_config(disable=True)
    # the pipeline sizes its latents as height // 8 without a VAE: ask for 256 to get the 32x32 pixel latent
    latents = plain(PROMPT, num_inference_steps=3, guidance_scale=7.5, height=256, width=256, output_type="latent",
                    generator=torch.Generator("cpu").manual_seed(5)).images
    assert latents.shape == (1, 3, 32, 32)
    expected = latents_to_images(latents, 1)[0].numpy()
    ours = gen([PROMPT], seeds=[5])[0]
    assert np.abs(ours.image.astype(float) - expected * 255).max() <= 0.51
    assert ours.class_maps.shape == (2, 32, 32)
    other = gen([{"prompt": "a ball and a leaf", "class_ids": [1, 3, 5]}], seeds=[5])[0]  # another class prompt
    assert np.array_equal(other.image, ours.image) and other.class_maps.shape == (3, 32, 32)


def test_real_images_are_read_as_pixels_noised_by_flow_matching(gen):
    world = ShapesDataset("test", size=3)
    images = np.stack([world.render(i)[0] for i in range(3)])
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.equal(gen.family.image_latents(pixels), pixels)  # no VAE, factor 1: the transformer sees pixels
    records = world_records(world, range(3))
    out = attention_on_images(gen, images, records, [100, 400], seed=3)
    for s, r in zip(out, records):
        assert s.class_ids == r.class_ids and s.label.shape == (32, 32)
        assert set(np.unique(s.label)) <= {0, 255, *s.class_ids}
