"""Fixtures for label scoring: composing `score_labels` configs, a tiny 32 px SD pipeline, a VOC copy without val."""
import shutil
from pathlib import Path

import pytest

from dsdiff.testing.tiny_sd import save_tiny_pipeline

# the tiny 32 px pipeline (16x16 latent) has attention at 16x16 and 8x8
TINY_LABELS = ["generator.labels.cross_res=8", "generator.labels.self_res=16", "generator.labels.alpha=0.55",
               "generator.labels.beta=0.45"]


@pytest.fixture(scope="session")
def tiny_labels() -> list[str]:
    """Labelling overrides that fit the tiny 32 px pipeline's attention grids."""
    return TINY_LABELS


@pytest.fixture(scope="session")
def tiny32(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny32") / "pipeline", image_size=32)


def _compose_score(tmp: Path, *overrides: str, run: str = "run"):
    """The `score_labels` config as the CLI composes it: results in tmp/results, logs in tmp/logs, output in tmp/<run>."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from dsdiff.chain.config import config_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("score_labels", overrides=["trainer=cpu", "logger=csv", f"score.dir={tmp / 'results'}", *overrides],
                      return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp / run)
        cfg.paths.log_dir = str(tmp / "logs")
        cfg.hydra.runtime.output_dir = cfg.paths.output_dir
    HydraConfig().set_config(cfg)
    GlobalHydra.instance().clear()
    return cfg


@pytest.fixture(scope="session")
def compose_score():
    """``compose_score(tmp, *overrides, run="run")``: the `score_labels` config as the CLI composes it."""
    return _compose_score


@pytest.fixture
def score_cfg(tmp_path):
    """``score_cfg(*overrides)``: the `score_labels` config into this test's tmp_path."""
    return lambda *overrides, run="run": _compose_score(tmp_path, *overrides, run=run)


@pytest.fixture
def voc_without_val(voc_expected, tmp_path) -> dict:
    """A copy of the VOC fixture whose val split is gone (images, masks and val.txt): reading it would fail."""
    root = tmp_path / "voc"
    shutil.copytree(voc_expected["root"], root)
    for name in voc_expected["splits"]["val"]:
        (root / "JPEGImages" / f"{name}.jpg").unlink()
        (root / "SegmentationClass" / f"{name}.png").unlink()
    (root / "ImageSets" / "Segmentation" / "val.txt").unlink()
    return {**voc_expected, "root": root}
