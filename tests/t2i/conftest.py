"""Fixtures for the tiny text-to-image tests: one thread, and a tiny random pixel-space pipeline on disk."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

TINY = dict(block_out_channels=(8, 16), text_dim=16, heads=2, norm_num_groups=4)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine run fastest on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def pixel_pipeline_dir(tmp_path_factory):
    """A saved random-weight pixel-space pipeline: 32 px RGB packed to 16x16x12, no VAE."""
    from dsdiff.t2i.model import build_pipeline, save_pipeline

    return save_pipeline(build_pipeline(**TINY), tmp_path_factory.mktemp("t2i") / "pipeline")
