"""End-to-end generation on a tiny pipeline saved to disk and loaded the way users load models."""
import logging
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor2_0

from dsdiff.data.classes import VOC_CLASSES
from dsdiff.diffusion import PromptRecord, SyntheticGenerator
from dsdiff.diffusion.attention import AttentionStore
from dsdiff.testing.tiny_sd import build_tiny_sdxl_pipeline
from dsdiff.viz.samples import save_sample_grid

VOC = {name: i for i, name in enumerate(VOC_CLASSES)}
PROMPTS = ["a photo of a dog on a sofa", "a dining table and a tv monitor"]


@pytest.fixture(scope="module")
def gen(tiny_pipeline_dir):
    return SyntheticGenerator.from_pretrained(
        tiny_pipeline_dir, VOC_CLASSES, dtype="fp32", device="cpu", num_inference_steps=3
    )


def test_generation_gives_images_labels_maps_and_metadata(gen, tmp_path):
    samples = gen(PROMPTS, seeds=[0, 1])
    assert [s.class_ids for s in samples] == [[VOC["dog"], VOC["sofa"]], [VOC["diningtable"], VOC["tvmonitor"]]]
    for s in samples:
        assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
        assert s.label.shape == (64, 64) and s.label.dtype == np.uint8
        assert set(np.unique(s.label)) <= {0, 255, *s.class_ids}
        assert s.class_maps.shape == (2, 64, 64) and s.class_maps.min() >= 0 and s.class_maps.max() <= 1
        assert s.attention is None
    meta = samples[1].metadata
    assert meta["class_prompt"] == "dining table tv monitor" and meta["seed"] == 1
    assert (meta["steps"], meta["recorded_steps"], meta["scheduler"]) == (3, 3, "DDIMScheduler")
    assert (meta["tau"], meta["alpha"], meta["beta"], meta["cross_res"], meta["self_res"]) == (4, 0.6, 0.5, 16, 32)
    png = save_sample_grid(samples, tmp_path / "grid.png", VOC_CLASSES)  # a picture to look at
    assert png.stat().st_size > 0


def test_same_seed_same_sample_whatever_the_batch(gen):
    alone = gen(PROMPTS[:1], seeds=[7], return_attention=True)[0]
    again = gen(PROMPTS[:1], seeds=[7])[0]
    batched = gen([PROMPTS[1], PROMPTS[0]], seeds=[3, 7], return_attention=True)[1]
    assert np.array_equal(alone.image, again.image) and np.array_equal(alone.label, again.label)
    assert np.abs(alone.image.astype(int) - batched.image.astype(int)).max() <= 1
    # The recorded attention agrees to float precision. (Labels are not compared across batch
    # compositions: with random weights S^tau is nearly uniform, so min-max normalisation blows
    # last-bit differences of the refined maps up to whole-label flips.)
    for kind in ("cross", "self"):
        a, b = alone.attention[kind], batched.attention[kind]
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max(), kind
    other = gen(PROMPTS[:1], seeds=[8])[0]
    assert np.abs(alone.image.astype(int) - other.image.astype(int)).mean() > 1


def test_images_equal_the_plain_pipeline_for_the_same_seed(gen, tiny_pipeline_dir):
    plain = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    plain.set_progress_bar_config(disable=True)
    expected = plain(
        PROMPTS[0], num_inference_steps=3, guidance_scale=7.5, output_type="np",
        generator=torch.Generator("cpu").manual_seed(5),
    ).images[0]
    ours = gen(PROMPTS[:1], seeds=[5])[0].image
    assert np.abs(ours.astype(float) - expected * 255).max() <= 0.51  # equal up to uint8 rounding


def test_negative_prompt_changes_the_image_and_is_recorded(gen):
    plain = gen(PROMPTS[:1], seeds=[2])[0]
    negated = gen(PROMPTS[:1], seeds=[2], negative_prompt="a blurry photo")[0]
    assert negated.metadata["negative_prompt"] == "a blurry photo" and plain.metadata["negative_prompt"] is None
    assert np.abs(plain.image.astype(int) - negated.image.astype(int)).mean() > 0.5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_on_cuda(tiny_pipeline_dir, dtype):
    gen = SyntheticGenerator.from_pretrained(tiny_pipeline_dir, VOC_CLASSES, dtype=dtype, device="cuda")
    first, again = (gen(PROMPTS[:1], seeds=[0], num_inference_steps=3)[0] for _ in range(2))
    assert first.metadata["dtype"] == {"fp16": "float16", "bf16": "bfloat16"}[dtype]
    assert np.isfinite(first.class_maps).all() and set(np.unique(first.label)) <= {0, 255, *first.class_ids}
    assert np.array_equal(first.image, again.image) and np.array_equal(first.label, again.label)


def test_recorders_come_back_after_someone_replaces_the_processors(gen):
    gen.pipe.unet.set_attn_processor(AttnProcessor2_0())
    s = gen(PROMPTS[:1], seeds=[0], return_attention=True)[0]
    assert s.attention["cross"].std() > 0 and (s.label != 0).any()


def test_sdxl_layout_generates_and_matches_its_plain_pipeline(tmp_path):
    build_tiny_sdxl_pipeline().save_pretrained(tmp_path / "sdxl")
    with pytest.raises(ValueError, match=r"attention at \[16, 8\]: set self_res"):
        SyntheticGenerator.from_pretrained(tmp_path / "sdxl", VOC_CLASSES, device="cpu")
    gen = SyntheticGenerator.from_pretrained(tmp_path / "sdxl", VOC_CLASSES, device="cpu", cross_res=8, self_res=16)
    sample = gen(PROMPTS[:1], seeds=[4], num_inference_steps=3)[0]
    assert sample.class_ids == [VOC["dog"], VOC["sofa"]] and sample.class_maps.shape == (2, 64, 64)
    assert type(gen.pipe).__name__ == "StableDiffusionXLPipeline"
    gen.pipe.unet.set_attn_processor(AttnProcessor2_0())
    plain = gen.pipe(PROMPTS[0], num_inference_steps=3, guidance_scale=7.5, output_type="np",
                     generator=torch.Generator("cpu").manual_seed(4)).images[0]
    assert np.abs(sample.image.astype(float) - plain * 255).max() <= 0.51


def test_records_window_and_counts(gen, monkeypatch):
    adds = {"cross": 0, "self": 0}
    original = AttentionStore.add

    def counting(self, kind, probs):
        adds[kind] += 1
        original(self, kind, probs)

    monkeypatch.setattr(AttentionStore, "add", counting)
    monkeypatch.setattr(gen, "labels", replace(gen.labels, window=(0.5, 1.0)))
    record = PromptRecord("x_0", "a cat; cat", [VOC["cat"]], ["cat"], "cat", "a cat", "x")
    sample = gen([record], seeds=[0], num_inference_steps=4)[0]
    assert adds == {"cross": 2 * 4, "self": 2 * 3}  # 2 of 4 steps x layers at 16 (cross) / 32 (self)
    assert sample.metadata["recorded_steps"] == 2 and sample.metadata["id"] == "x_0"


def test_raw_attention_on_request_and_no_guidance(gen):
    s = gen([{"id": "r", "prompt": "a bird; bird", "class_ids": [VOC["bird"]]}], seeds=[0],
            guidance_scale=1.0, return_attention=True)[0]
    assert s.attention["cross"].shape == (1, 16, 16)
    assert s.attention["self"].shape == (1024, 1024)
    np.testing.assert_allclose(s.attention["self"].sum(-1), 1.0, atol=1e-4)


def test_prompt_without_class_gives_background_and_long_prompt_is_truncated(gen, caplog):
    with caplog.at_level(logging.WARNING):
        empty = gen(["clouds over the sea"], seeds=[0])[0]
        long = gen(["a dog " + "sitting on the grass " * 30], seeds=[0])[0]
    assert empty.class_ids == [] and (empty.label == 0).all() and empty.class_maps.shape == (0, 64, 64)
    assert "all background" in caplog.text and "truncated" in caplog.text
    assert long.class_ids == [VOC["dog"]]
    assert len(gen.pipe.tokenizer(long.metadata["prompt"])["input_ids"]) <= 77


@pytest.mark.parametrize("scheduler", ["dpm-solver", "euler"])
def test_schedulers_by_name(tiny_pipeline_dir, scheduler):
    gen = SyntheticGenerator.from_pretrained(tiny_pipeline_dir, VOC_CLASSES, device="cpu", scheduler=scheduler)
    s = gen(PROMPTS[:1], seeds=[0], num_inference_steps=2)[0]
    assert s.metadata["scheduler"] == {"dpm-solver": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler"}[scheduler]
    assert np.isfinite(s.class_maps).all()


def test_clear_errors(tiny_pipeline_dir, tmp_path, gen):
    with pytest.raises(FileNotFoundError, match="generator.model=.*nowhere: no such folder; pass generator.model="):
        SyntheticGenerator.from_pretrained(tmp_path / "nowhere", VOC_CLASSES, device="cpu")
    broken = shutil.copytree(tiny_pipeline_dir, tmp_path / "broken")
    for weights in (broken / "unet").glob("diffusion_pytorch_model*"):
        weights.unlink()
    with pytest.raises(FileNotFoundError, match="could not load the pipeline at"):
        SyntheticGenerator.from_pretrained(broken, VOC_CLASSES, device="cpu")
    with pytest.raises(ValueError, match="unknown scheduler 'heun2'.*ddim"):
        SyntheticGenerator.from_pretrained(tiny_pipeline_dir, VOC_CLASSES, device="cpu", scheduler="heun2")
    with pytest.raises(ValueError, match="dtype fp16 on CPU"):
        SyntheticGenerator.from_pretrained(tiny_pipeline_dir, VOC_CLASSES, device="cpu", dtype="fp16")
    with pytest.raises(ValueError, match="cannot place class name 'café'"):
        SyntheticGenerator(gen.pipe, ("background", "café"))
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        gen(PROMPTS, seeds=[0])
    with pytest.raises(ValueError, match=r"class ids \[0\]"):
        gen([{"id": "b", "prompt": "x", "class_ids": [0]}], seeds=[0])


def test_caption_tokens_instead_of_the_class_prompt(tiny_pipeline_dir, tokenizer):
    from dsdiff.diffusion.prompts import prompt_token_spans

    text = "a photo of a dog on a sofa; dog sofa"
    ids = tokenizer(text)["input_ids"]
    spans = prompt_token_spans(tokenizer, text, ["dog", "sofa"])
    assert [ids[i] for i in spans[0]] == tokenizer("dog", add_special_tokens=False)["input_ids"]
    assert spans[0][0] > ids.index(ids[spans[0][0]])  # the appended (last) occurrence
    with pytest.raises(ValueError, match="not among the tokens"):
        prompt_token_spans(tokenizer, "a photo of a dog", ["sofa"])
    gen = SyntheticGenerator.from_pretrained(tiny_pipeline_dir, VOC_CLASSES, dtype="fp32", device="cpu",
                                             num_inference_steps=2, class_prompt=False)
    with_class = SyntheticGenerator.from_pretrained(tiny_pipeline_dir, VOC_CLASSES, dtype="fp32", device="cpu", num_inference_steps=2)
    a = gen([PROMPTS[0]], seeds=[1], return_attention=True)[0]
    b = with_class([PROMPTS[0]], seeds=[1], return_attention=True)[0]
    assert np.array_equal(a.image, b.image)  # recording never changes the image
    assert a.metadata["maps_from"] == "prompt_tokens" and b.metadata["maps_from"] == "class_prompt"
    assert a.class_ids == b.class_ids
    assert a.attention["cross"].shape == b.attention["cross"].shape
    assert not np.allclose(a.attention["cross"], b.attention["cross"])  # other keys, other maps


def test_pndm_at_100_steps_records_all_101_unet_calls(tiny_pipeline_dir):
    """SD 2.1-base ships PNDM (PLMS, skip_prk_steps): 100 steps make 101 UNet calls, and the window [0, 1]
    records every one of them, as the original does (a window counted in steps would miss the last)."""
    from diffusers import PNDMScheduler

    from dsdiff.diffusion.pipeline import unet_calls

    gen = SyntheticGenerator.from_pretrained(tiny_pipeline_dir, VOC_CLASSES, dtype="fp32", device="cpu", num_inference_steps=100)
    gen.pipe.scheduler = PNDMScheduler.from_config(gen.pipe.scheduler.config, skip_prk_steps=True, set_alpha_to_one=False)
    calls = []
    hook = gen.pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(gen.store.recording))
    try:
        sample = gen([{"id": "p", "prompt": "a cat; cat", "class_ids": [VOC["cat"]]}], seeds=[0], guidance_scale=1.0)[0]
    finally:
        hook.remove()
    recorded = [c for c in calls if c]
    assert len(calls) == 101 and len(recorded) == 101
    assert sample.metadata["recorded_steps"] == 101 and sample.metadata["scheduler"] == "PNDMScheduler"
    assert unet_calls(gen.pipe.scheduler, 100) == 101
    # DDIM makes one call per step: the same 100 as before
    assert unet_calls(SyntheticGenerator.from_pretrained(tiny_pipeline_dir, VOC_CLASSES, device="cpu").pipe.scheduler, 100) == 100


def test_the_recipes_negative_prompt_reaches_the_pipeline(tiny_pipeline_dir, monkeypatch):
    """conf/generator/sd21.yaml holds the original's negative prompt (gen_data.py: three pieces joined with no
    space after their commas); its embeddings are the unconditional branch of every batch."""
    from hydra import compose, initialize_config_dir

    from dsdiff.chain.config import config_dir
    from dsdiff.utils.config import to_plain

    original = ("ugly, tiling, poorly drawn hands, poorly drawn feet, poorly drawn face,"
                "out of frame, extra limbs, disfigured, deformed, body out of frame, bad anatomy,"
                "watermark, signature, cut off, low contrast, underexposed, overexposed, bad art, beginner, amateur, distorted face")
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        for experiment in ("voc_deeplab", "coco_deeplab"):
            assert compose("train", overrides=[f"+experiment={experiment}"]).generator.negative_prompt == original
        settings = to_plain(compose("train", overrides=["+experiment=voc_deeplab"]).generator)
    gen = SyntheticGenerator.from_settings({**settings, "model": str(tiny_pipeline_dir)}, VOC_CLASSES, device="cpu")
    assert gen.negative_prompt == original
    seen = []
    encode = gen.pipe.encode_prompt

    def spy(*args, **kwargs):
        out = encode(*args, **kwargs)
        seen.append((kwargs.get("negative_prompt", args[4] if len(args) > 4 else None), out[1]))
        return out

    monkeypatch.setattr(gen.pipe, "encode_prompt", spy)
    sample = gen(PROMPTS, seeds=[0, 1], num_inference_steps=2)[0]
    negatives = [(n, e) for n, e in seen if e is not None]  # the pipeline's call (the class prompts have no negative)
    assert len(negatives) == 1 and negatives[0][0] == [original, original]
    torch.testing.assert_close(negatives[0][1], encode(prompt=[original] * 2, device="cpu", num_images_per_prompt=1,
                                                       do_classifier_free_guidance=False)[0])
    assert sample.metadata["negative_prompt"] == original
