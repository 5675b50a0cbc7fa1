"""Training and evaluation end to end on the fixture datasets (tiny encoder, CPU)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsdiff.evaluate import evaluate
from dsdiff.train import train


@pytest.mark.parametrize("experiment,root_key", [("voc_real", "voc"), ("coco_real", "coco")])
def test_fast_dev_run_writes_metrics(make_cfg, tmp_path, request, experiment, root_key):
    root = request.getfixturevalue(f"{root_key}_root")
    cfg = make_cfg([f"+experiment={experiment}", "debug=fdr", f"paths.{root_key}={root}"])
    metrics, objects = train(cfg)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("val/mIoU", "test/mIoU", "test/mIoU_tta"):
        assert 0.0 <= saved[key] <= 1.0, key
    assert objects["trainer"].global_step == 1
    num_classes = 21 if root_key == "voc" else 81
    assert objects["model"].net.num_classes == num_classes


def _run(module, *args, cwd):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_cli_trains_checkpoints_and_evaluate_reads_them(voc_root, tmp_path, make_cfg):
    run_dir = tmp_path / "run"
    _run("dsdiff.train", "+experiment=voc_real", "debug=fast", f"paths.voc={voc_root}", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "last.ckpt").is_file()
    best = [p for p in ckpts.glob("step_*.ckpt")]
    assert len(best) == 1
    trained = json.loads((run_dir / "metrics.json").read_text())
    assert trained["ckpt_path"] == str(best[0])
    assert (run_dir / "csv" / "version_0" / "metrics.csv").is_file()
    # EMA weights are what the checkpoint's state_dict holds, and what evaluation uses
    state = torch.load(best[0], map_location="cpu", weights_only=False)
    assert "current_model_state" in state

    eval_dir = tmp_path / "eval"
    proc = _run("dsdiff.evaluate", f"ckpt_path={best[0]}", "+experiment=voc_real", "debug=fast",
                f"paths.voc={voc_root}", f"hydra.run.dir={eval_dir}", cwd=tmp_path)
    evaluated = json.loads((eval_dir / "metrics.json").read_text())
    # same weights, same data, same limit on test batches: the same numbers as the training run's test
    assert evaluated["test/mIoU"] == pytest.approx(trained["test/mIoU"], abs=1e-6)
    assert evaluated["test/mIoU_tta"] == pytest.approx(trained["test/mIoU_tta"], abs=1e-6)
    assert "mIoU" in proc.stdout and "aeroplane" in proc.stdout


def test_resume_from_last_checkpoint_continues_the_step_count(voc_root, make_cfg, tmp_path):
    first = make_cfg(["+experiment=voc_real", "debug=fast", f"paths.voc={voc_root}", "test=false"], output_dir=tmp_path / "a")
    _, objects = train(first)
    assert objects["trainer"].global_step == 10
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    resumed = make_cfg(["+experiment=voc_real", "debug=fast", f"paths.voc={voc_root}", "test=false",
                        f"ckpt_path={last}", "trainer.max_steps=14"], output_dir=tmp_path / "b")
    _, objects = train(resumed)
    assert objects["trainer"].global_step == 14
    rows = (tmp_path / "b" / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    steps = {int(r.split(",")[rows[0].split(",").index("step")]) for r in rows[1:] if r}
    assert min(steps) >= 10  # nothing before the checkpoint was redone


def test_missing_dataset_root_names_the_key(make_cfg, tmp_path):
    cfg = make_cfg(["+experiment=voc_real", "debug=fast", f"paths.voc={tmp_path / 'nowhere'}"])
    with pytest.raises(Exception, match="paths.voc"):
        train(cfg)


def test_crop_not_divisible_by_stride_is_refused(make_cfg, voc_root):
    cfg = make_cfg(["+experiment=voc_real", "debug=fast", f"paths.voc={voc_root}", "data.train_transform.crop_size=60"])
    with pytest.raises(ValueError, match="not a multiple of the output stride 8"):
        train(cfg)


def test_num_classes_mismatch_is_refused(make_cfg, voc_root):
    cfg = make_cfg(["+experiment=voc_real", "debug=fast", f"paths.voc={voc_root}", "model.net.num_classes=19"])
    with pytest.raises(Exception, match="predicts 19 classes but the class list has 21"):
        train(cfg)


def test_dataset_with_other_class_count_is_refused(voc_root):
    from functools import partial

    from dsdiff.data.datamodule import SegDataModule
    from dsdiff.data.voc import VOCSegmentation

    datamodule = SegDataModule(num_classes=19, train=partial(VOCSegmentation, voc_root, "train"), val=None)
    with pytest.raises(ValueError, match="has 21 classes but the model is configured for 19: set data.num_classes=21"):
        datamodule.setup("fit")


def test_wandb_logs_offline_inside_the_run_dir(voc_root, make_cfg, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_MODE", "offline")
    for n, out in enumerate(("run1", "run2")):  # two runs in one process, like a multirun
        cfg = make_cfg(["+experiment=voc_real", "debug=fast", f"paths.voc={voc_root}", "logger=wandb",
                        "trainer.max_steps=2", "trainer.val_check_interval=2", "test=false"], output_dir=tmp_path / out)
        train(cfg)
        runs = list((tmp_path / out / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, f"run {n}: {runs}"
        history = list(runs[0].glob("run-*.wandb"))
        assert history and history[0].stat().st_size > 0
        media = runs[0] / "files" / "media"
        assert list((media / "images").rglob("*.png")), "no validation images logged"
        assert list((media / "images" / "mask").rglob("*.png")), "no mask overlays logged"
        tables = list((media / "table").rglob("*.table.json"))
        assert tables, "no per-class IoU table logged"
        rows = json.loads(tables[0].read_text())["data"]
        assert [r[1] for r in rows][:3] == ["background", "aeroplane", "bicycle"] and len(rows) == 21
        assert any(isinstance(r[2], float) and r[2] == r[2] for r in rows)  # real (non-NaN) IoU values
        assert list((tmp_path / out / "images").glob("val_step*.png"))
    assert not any(home.rglob("*wandb*")), "W&B wrote under ~/"
