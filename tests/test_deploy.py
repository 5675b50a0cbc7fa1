"""dsdiff.Segmenter: a trained model used from its checkpoint file alone, predicting as evaluation does."""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from dsdiff import Segmenter
from dsdiff.data.transforms import EvalTransform
from dsdiff.utils.errors import SettingError

TRAIN = ["+experiment=voc_real", "debug=fast", "trainer.max_steps=2", "trainer.val_check_interval=2",
         "data.tune=null", "data.eval_scale=[96,48]"]


@pytest.fixture(scope="module")
def trained(voc_root, tmp_path_factory):
    """A 2-step training run; returns (its LightningModule, last.ckpt copied alone into an empty folder)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from dsdiff.chain.config import config_dir
    from dsdiff.train import train

    run = tmp_path_factory.mktemp("run")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=[*TRAIN, f"paths.voc={voc_root}"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = cfg.paths.log_dir = cfg.hydra.runtime.output_dir = str(run)
    HydraConfig().set_config(cfg)
    try:
        metrics, objects = train(cfg)
    finally:
        GlobalHydra.instance().clear()
    alone = tmp_path_factory.mktemp("alone") / "model.ckpt"
    shutil.copy(metrics["ckpt_path"], alone)
    return objects["model"], alone


def test_checkpoint_describes_itself_in_plain_types(trained):
    _, path = trained
    info = torch.load(path, map_location="cpu", weights_only=True)["dsdiff"]
    assert info["format"] == 1 and info["net"]["class"] == "dsdiff.models.net.SegmentationNet"
    assert info["net"]["args"]["encoder_weights"] is None and info["net"]["args"]["num_classes"] == 21
    assert info["class_names"][:2] == ["background", "aeroplane"] and len(info["class_names"]) == 21
    assert len(info["palette"]) == 63 and info["palette"][3:6] == [128, 0, 0]  # VOC's aeroplane red
    assert info["mean"] == pytest.approx([0.485, 0.456, 0.406]) and info["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert info["eval_scale"] == [96, 48] and info["ignore_index"] == 255


@pytest.mark.parametrize("size,mode", [((40, 30), "RGB"), ((33, 50), "L"), ((70, 20), "RGBA")])
def test_predict_returns_class_indices_at_the_image_size(trained, size, mode):
    segmenter = Segmenter.from_checkpoint(trained[1], device="cpu")
    assert segmenter.class_names[1] == "aeroplane" and len(segmenter.palette) == 63
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    for tta in (False, True):
        pred = segmenter.predict(image, tta=tta)
        assert pred.shape == (size[1], size[0]) and pred.dtype == np.uint8
        assert pred.max() < 21


def test_prediction_is_the_trained_modules_own_forward(trained):
    module, path = trained
    segmenter = Segmenter.from_checkpoint(path, device="cpu")
    array = np.random.default_rng(1).integers(0, 256, (37, 52, 3), dtype=np.uint8)
    images = segmenter.preprocess(array)
    evaluated, _ = EvalTransform()(torch.from_numpy(array).permute(2, 0, 1), torch.zeros(37, 52, dtype=torch.uint8))
    assert torch.allclose(images[0], evaluated, atol=1e-6)  # the evaluation's own normalisation
    module = module.cpu().eval()
    with torch.no_grad():  # the module trained holds the EMA weights that the checkpoint saved
        expected, expected_tta = module(images), module.forward_tta(images)
    assert torch.allclose(segmenter.logits(array), expected, atol=1e-5)
    assert torch.allclose(segmenter.logits(array, tta=True), expected_tta, atol=1e-5)
    assert np.array_equal(segmenter.predict(array), expected.argmax(1)[0].numpy())
    assert np.array_equal(segmenter.predict(Image.fromarray(array)), segmenter.predict(array))


def test_exif_orientation_is_applied(trained, tmp_path):
    segmenter = Segmenter.from_checkpoint(trained[1], device="cpu")
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    exif = image.getexif()
    exif[0x0112] = 6  # rotated 90 degrees: shown 30 wide, 40 high
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert segmenter.predict(Image.open(tmp_path / "rotated.jpg")).shape == (40, 30)


def test_checkpoint_of_an_older_dsdiff_is_refused_with_the_way_forward(trained, tmp_path):
    checkpoint = torch.load(trained[1], map_location="cpu", weights_only=True)
    del checkpoint["dsdiff"]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    with pytest.raises(SettingError, match=r"older dsdiff.*python -m dsdiff\.evaluate ckpt_path="):
        Segmenter.from_checkpoint(tmp_path / "old.ckpt")


@pytest.mark.parametrize("dotted", ["os.system", "torch.nn.Linear", "dsdiff.modelsx.Net", "dsdiff.models.system.uncertainty_aware_ce"])
def test_a_net_class_outside_dsdiff_models_is_refused(trained, tmp_path, dotted):
    checkpoint = torch.load(trained[1], map_location="cpu", weights_only=True)
    checkpoint["dsdiff"]["net"]["class"] = dotted
    torch.save(checkpoint, tmp_path / "foreign.ckpt")
    with pytest.raises(SettingError, match="net class"):
        Segmenter.from_checkpoint(tmp_path / "foreign.ckpt")


def test_a_mask2former_checkpoint_rebuilds_its_own_net(tmp_path):
    from omegaconf import OmegaConf

    from dsdiff.models.mask2former import Mask2FormerNet
    from dsdiff.models.system import Segmenter as Module

    net = Mask2FormerNet(4, encoder_name="resnet18", encoder_weights=None, decoder_channels=32, num_queries=6,
                         encoder_layers=1, decoder_layers=2, num_heads=4)
    module = Module(net, ["background", "a", "b", "c"], optimizer=None, tta_scales=OmegaConf.create([1.0]),
                    tta_flip=False, eval_scale=[64, 32]).eval()
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "m2f.ckpt")
    segmenter = Segmenter.from_checkpoint(tmp_path / "m2f.ckpt", device="cpu")
    assert type(segmenter.module.net) is Mask2FormerNet and segmenter.module.net.init_args["num_queries"] == 6
    array = np.random.default_rng(3).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    with torch.no_grad():
        expected = module(segmenter.preprocess(array))
    assert torch.allclose(segmenter.logits(array), expected, atol=1e-5) and expected.shape == (1, 4, 24, 40)
