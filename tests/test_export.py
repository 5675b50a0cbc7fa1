"""`python -m dsdiff.export`: smp / transformers folders and ONNX that reproduce the checkpoint, and a model card."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

TRAIN = ["+experiment=shapes_deeplab", "debug=fast", "synthetic.num_images=8", "trainer.max_steps=2",
         "trainer.val_check_interval=2", "selftrain.rounds=0"]


@pytest.fixture(scope="module")
def run_ckpt(tmp_path_factory):
    """A 2-step shapes model trained on 8 synthetic samples: (its last.ckpt inside the run dir, the run's metrics)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from dsdiff.chain.config import config_dir
    from dsdiff.train import train

    root = tmp_path_factory.mktemp("export")
    run = root / "run"
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=[*TRAIN, f"synthetic.dir={root / 'synthetic'}"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = cfg.paths.log_dir = cfg.hydra.runtime.output_dir = str(run)
    HydraConfig().set_config(cfg)
    try:
        metrics, _ = train(cfg)
    finally:
        GlobalHydra.instance().clear()
    return metrics["ckpt_path"], metrics


def _export(ckpt, out, tmp_path, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DSDIFF_ROOT": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", "dsdiff.export", f"ckpt_path={ckpt}", f"output={out}", *extra],
                          env=env, capture_output=True, text=True, timeout=300)


def _ema_and_raw_logits(ckpt, x):
    """The checkpoint's EMA net's logits (what the run tested) and its raw (non-EMA) weights' logits."""
    from dsdiff import Segmenter

    net = Segmenter.from_checkpoint(ckpt, device="cpu").module.net.eval()
    with torch.no_grad():
        ema = net(x)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    raw = {k.split("net.", 1)[1]: v for k, v in (state.get("current_model_state") or {}).items() if "net." in k}
    if raw:
        net.load_state_dict(raw)
        with torch.no_grad():
            return ema, net(x)
    return ema, None


def test_the_checkpoint_records_what_trained_it(run_ckpt):
    ckpt, _ = run_ckpt
    record = torch.load(ckpt, map_location="cpu", weights_only=True)["dsdiff"]["training"]
    assert record["train_data"] == "synthetic" and record["real_pixel_labels"]["train"] is False
    assert record["synthetic"]["num_images"] == 8
    assert record["synthetic"]["prompts"]["records"] > 0 and len(record["synthetic"]["prompts"]["digest"]) == 16
    assert record["synthetic"]["generator"]["model"]["name"] == "shapes_t2i"
    assert record["recipe"]["max_steps"] == 2 and record["task"] == "shapes_deeplab"
    assert "+experiment=shapes_deeplab" in record["command"]


def test_smp_export_loads_with_smp_and_gives_the_ema_logits(run_ckpt, tmp_path):
    import segmentation_models_pytorch as smp

    ckpt, metrics = run_ckpt
    out = tmp_path / "smp"
    proc = _export(ckpt, out, tmp_path, "format=smp")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    model = smp.from_pretrained(str(out)).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = model(x)
    ema, raw = _ema_and_raw_logits(ckpt, x)
    torch.testing.assert_close(theirs, ema, atol=1e-5, rtol=0)
    if raw is not None:  # the export is the EMA weights, not the raw ones
        assert (theirs - raw).abs().max() > 1e-5
    meta = json.loads((out / "dsdiff.json").read_text())
    assert meta["class_names"][0] == "background" and len(meta["palette"]) == 3 * len(meta["class_names"])
    assert meta["preprocessing"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: segmentation-models-pytorch\n")
    assert "No real pixel labels were used for training" in card
    assert "8 samples" in card and "shapes_t2i" in card
    assert f"| test/mIoU | {metrics['test/mIoU']:.4f} |" in card
    assert f"| test/mIoU_tta | {metrics['test/mIoU_tta']:.4f} |" in card
    assert "test/IoU/ball" in card and "python -m dsdiff.export" in card and "upload_folder" in card


def test_onnx_export_agrees_with_pytorch_at_two_sizes(run_ckpt, tmp_path):
    import onnxruntime as ort

    ckpt, _ = run_ckpt
    out = tmp_path / "onnx"
    proc = _export(ckpt, out, tmp_path, "format=onnx")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(3)
    for h, w in ((64, 64), (96, 80)):  # dynamic height and width
        x = rng.standard_normal((1, 3, h, w)).astype(np.float32)
        got = session.run(None, {"image": x})[0]
        ref, _ = _ema_and_raw_logits(ckpt, torch.from_numpy(x))
        assert got.shape == (1, ref.shape[1], h, w)
        ref = torch.nn.functional.interpolate(ref, size=(h, w), mode="bilinear", align_corners=False).numpy()
        assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.999
    recorded = json.loads((out / "export.json").read_text())
    assert [c["input"][2:] for c in recorded["checks"]] == [[64, 64], [96, 80]]
    assert all(c["argmax_agreement"] >= 0.999 and c["max_abs_diff"] < 1e-3 for c in recorded["checks"])
    assert "max |diff|" in proc.stderr + proc.stdout
    assert "library_name: onnx" in (out / "README.md").read_text()


def test_bad_settings_are_refused_before_anything_is_written(run_ckpt, tmp_path):
    ckpt, _ = run_ckpt
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep")
    for extra, expect in ((["format=tflite"], "format=tflite"), (["format=onnx", "opset=3"], "opset=3")):
        proc = _export(ckpt, tmp_path / "new", tmp_path, *extra)
        assert proc.returncode == 2 and expect in proc.stderr and "Traceback" not in proc.stderr
        assert not (tmp_path / "new").exists()
    proc = _export(ckpt, busy, tmp_path, "format=onnx")
    assert proc.returncode == 2 and "other files in it" in proc.stderr
    assert sorted(p.name for p in busy.iterdir()) == ["mine.txt"]
    proc = _export(tmp_path / "none.ckpt", tmp_path / "new", tmp_path)
    assert proc.returncode == 2 and "none.ckpt" in proc.stderr


def test_an_mmseg_head_is_refused_for_smp_and_a_mask2former_exports_to_transformers(tmp_path):
    from transformers import Mask2FormerForUniversalSegmentation

    from dsdiff.deploy import export as ex
    from dsdiff.models.mask2former import Mask2FormerNet, semantic_scores
    from dsdiff.models.net import SegmentationNet
    from dsdiff.utils.errors import SettingError

    mmseg = SegmentationNet(num_classes=3, arch="deeplabv3", encoder_name="resnet18", encoder_weights=None,
                            head="mmseg", decoder_channels=32)
    with pytest.raises(SettingError, match="format=onnx instead"):
        ex.check_format("smp", mmseg)
    torch.manual_seed(0)
    net = Mask2FormerNet(num_classes=4, encoder_name="resnet18", encoder_weights=None, decoder_channels=32,
                         num_queries=8, encoder_layers=1, decoder_layers=2, num_heads=2).eval()
    ex.check_format("smp", net)
    result = ex.export_smp(net, tmp_path)
    assert result["library"] == "transformers" and result["check"]["max_abs_diff"] <= 1e-5
    loaded = Mask2FormerForUniversalSegmentation.from_pretrained(str(tmp_path)).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        out = loaded(pixel_values=x)
        torch.testing.assert_close(semantic_scores(out.class_queries_logits, out.masks_queries_logits, (64, 96))
                                   .clamp_min(1e-6).log(), net(x), atol=1e-5, rtol=0)
