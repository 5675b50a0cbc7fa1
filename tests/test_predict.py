"""`python -m dsdiff.predict`: masks at each image's own size, unreadable files skipped and listed, resumable."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

TRAIN = ["+experiment=shapes_real", "debug=fast", "trainer.max_steps=2", "trainer.val_check_interval=2"]
SIZES = {"rgb.png": ((40, 30), "RGB"), "photo.jpg": ((64, 64), "RGB"), "sub/grey.png": ((33, 50), "L"),
         "sub/alpha.png": ((70, 20), "RGBA")}


@pytest.fixture(scope="module")
def shapes_ckpt(tmp_path_factory):
    """A 2-step shapes model; its last.ckpt copied alone into an empty folder (no run dir beside it)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from dsdiff.chain.config import config_dir
    from dsdiff.train import train

    run = tmp_path_factory.mktemp("run")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=TRAIN, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = cfg.paths.log_dir = cfg.hydra.runtime.output_dir = str(run)
    HydraConfig().set_config(cfg)
    try:
        metrics, _ = train(cfg)
    finally:
        GlobalHydra.instance().clear()
    alone = tmp_path_factory.mktemp("alone") / "model.ckpt"
    shutil.copy(metrics["ckpt_path"], alone)
    return alone


def _inputs(root):
    rng = np.random.default_rng(0)
    for name, ((w, h), mode) in SIZES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode).save(root / name)
    (root / "broken.png").write_text("not an image")
    return root


def _predict(ckpt, src, out, tmp_path, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DSDIFF_ROOT": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", "dsdiff.predict", f"ckpt_path={ckpt}", f"input={src}", f"output={out}", *extra],
                          env=env, capture_output=True, text=True, timeout=300)


def test_predict_segments_a_folder_skips_the_broken_file_and_resumes(shapes_ckpt, tmp_path):
    from dsdiff import Segmenter

    src, out = _inputs(tmp_path / "in"), tmp_path / "out"
    proc = _predict(shapes_ckpt, src, out, tmp_path, "overlay=true")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    segmenter = Segmenter.from_checkpoint(shapes_ckpt, device="cpu")
    n = len(segmenter.class_names)
    for name, ((w, h), _) in SIZES.items():
        mask = Image.open((out / name).with_suffix(".png"))
        assert mask.mode == "P" and mask.size == (w, h)
        values = np.asarray(mask)
        assert values.max() < n
        assert np.array_equal(values, segmenter.predict(Image.open(src / name)))  # the API's mask, exactly
    assert (out / "overlays" / "sub" / "grey.jpg").is_file() and (out / "legend.png").is_file()
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert sorted(r["file"] for r in rows) == sorted(SIZES)
    assert {r["file"]: r["size"] for r in rows}["sub/alpha.png"] == [70, 20]
    assert all(abs(sum(r["classes"].values()) - 1) < 1e-3 for r in rows)
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [s["file"] for s in skipped] == ["broken.png"] and skipped[0]["reason"]

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    proc = _predict(shapes_ckpt, src, out, tmp_path)
    assert proc.returncode == 0 and "4 done before" in proc.stdout + proc.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == stamps  # a rerun writes no mask again

    proc = _predict(shapes_ckpt, src, tmp_path / "strict", tmp_path, "strict=true")
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "broken.png" in text and "Traceback" not in text


def test_predict_refuses_a_missing_input_or_checkpoint_before_writing(shapes_ckpt, tmp_path):
    proc = _predict(shapes_ckpt, tmp_path / "nowhere", tmp_path / "out", tmp_path)
    assert proc.returncode == 2 and "input=" in proc.stdout + proc.stderr and not (tmp_path / "out").exists()
    proc = _predict(tmp_path / "missing.ckpt", tmp_path, tmp_path / "out", tmp_path)
    assert proc.returncode == 2 and "ckpt_path=" in proc.stdout + proc.stderr and not (tmp_path / "out").exists()


def test_evaluate_reads_a_checkpoint_alone_and_refuses_the_wrong_data(shapes_ckpt, tmp_path):
    """No run dir beside the checkpoint: the model comes from its own record; only the data is named."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DSDIFF_ROOT": str(tmp_path)}
    run = [sys.executable, "-m", "dsdiff.evaluate", f"ckpt_path={shapes_ckpt}", "trainer=cpu", "data.num_workers=0"]
    proc = subprocess.run([*run, "data=shapes", "tta=false"], env=env, capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    [metrics] = list((tmp_path / "logs" / "eval" / "runs").glob("*/metrics.json"))
    recorded = json.loads(metrics.read_text())
    assert 0 <= recorded["test/mIoU"] <= 1 and "rebuilt from the checkpoint's own record" in text
    proc = subprocess.run([*run, "data=voc"], env=env, capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "predicts 6 classes" in text and "Traceback" not in text, text[-2000:]
