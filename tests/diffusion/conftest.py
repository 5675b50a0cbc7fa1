"""Fixtures for the diffusion tests: one tiny random-weight SD pipeline saved to disk per session."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from dsdiff.testing.tiny_sd import build_tokenizer, save_tiny_pipeline  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A ``save_pretrained`` folder of a tiny StableDiffusionPipeline (64px images, 32x32 latent)."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd") / "pipeline")


@pytest.fixture(scope="session")
def tokenizer():
    """A real CLIP BPE tokenizer over a tiny vocabulary ("tv monitor" falls apart into characters)."""
    return build_tokenizer()
