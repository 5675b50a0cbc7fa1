"""Fixtures for the tiny text-to-image tests: a tiny random pixel-space pipeline on disk (one thread: root conftest)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

TINY = dict(block_out_channels=(8, 16), text_dim=16, heads=2, norm_num_groups=4)


@pytest.fixture(scope="session")
def pixel_pipeline_dir(tmp_path_factory):
    """A saved random-weight pixel-space pipeline: 32 px RGB packed to 16x16x12, no VAE."""
    from dsdiff.shapes_t2i.net import build_pipeline, save_pipeline

    return save_pipeline(build_pipeline(**TINY), tmp_path_factory.mktemp("t2i") / "pipeline")
