"""Shared fixtures: tiny VOC- and COCO-format folders written once per session."""
import os

# Tests never reach the network: no Hugging Face downloads, no W&B uploads.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest  # noqa: E402
import torch  # noqa: E402

from dsdiff.testing.folders import write_coco_folder, write_voc_folder  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: OpenMP threads contending for cores cost ~50x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def voc_expected(tmp_path_factory):
    """What ``write_voc_folder`` drew: root, splits, masks, images, labels."""
    return write_voc_folder(tmp_path_factory.mktemp("voc"))


@pytest.fixture(scope="session")
def voc_root(voc_expected):
    """A VOC 2012-layout folder (JPEGImages/, SegmentationClass/, ImageSets/Segmentation/)."""
    return voc_expected["root"]


@pytest.fixture(scope="session")
def coco_expected(tmp_path_factory):
    """What ``write_coco_folder`` drew: root, expected semantic masks and labels per split."""
    return write_coco_folder(tmp_path_factory.mktemp("coco"))


@pytest.fixture(scope="session")
def coco_root(coco_expected):
    """A COCO 2017-layout folder (train2017/, val2017/, annotations/)."""
    return coco_expected["root"]


@pytest.fixture
def make_cfg(tmp_path):
    """Compose a dsdiff config the way the CLI does, with outputs in tmp_path."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from dsdiff.chain.config import config_dir

    def _make(overrides=(), config_name="train", output_dir=None):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir or tmp_path)
            cfg.paths.log_dir = str(tmp_path / "logs")
            cfg.hydra.runtime.output_dir = cfg.paths.output_dir
        HydraConfig().set_config(cfg)
        return cfg

    yield _make
    GlobalHydra.instance().clear()
