"""Training and evaluation end to end on the fixture datasets (tiny encoder, CPU)."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsdiff.train import train

# the fixture's 64x64 images at scale factor 1 (the keep-ratio path, without 512x512 CPU inference)
SMALL_EVAL = "data.eval_scale=[128,64]"


@pytest.mark.parametrize("experiment,root_key", [("voc_real", "voc"), ("coco_real", "coco")])
def test_fast_dev_run_writes_metrics(make_cfg, tmp_path, request, experiment, root_key):
    root = request.getfixturevalue(f"{root_key}_root")
    cfg = make_cfg([f"+experiment={experiment}", "debug=fdr", f"paths.{root_key}={root}", SMALL_EVAL])
    metrics, objects = train(cfg)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("tune/mIoU", "test/mIoU", "test/mIoU_tta"):
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
    _run("dsdiff.train", "+experiment=voc_real", "debug=fast", f"paths.voc={voc_root}", f"hydra.run.dir={run_dir}", SMALL_EVAL,
         "trainer.max_steps=7", "trainer.val_check_interval=5", cwd=tmp_path)
    ckpts = run_dir / "checkpoints"
    assert [p.name for p in ckpts.iterdir()] == ["last.ckpt"]  # no checkpoint chosen by a metric
    last = ckpts / "last.ckpt"
    trained = json.loads((run_dir / "metrics.json").read_text())
    assert trained["ckpt_path"] == str(last) and trained["ckpt"] == "last"
    # EMA weights are what the checkpoint's state_dict holds, and what evaluation uses
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert "current_model_state" in state and state["global_step"] == 7  # the final step, not the last validation's
    rows = list(csv.DictReader((run_dir / "csv" / "version_0" / "metrics.csv").open()))
    tuned = [(int(r["step"]), float(r["tune/mIoU"])) for r in rows if r.get("tune/mIoU")]
    assert [step for step, _ in tuned] == [4, 7]  # in-fit validation at step 5 (logged 0-based), then the final weights
    assert trained["tune/mIoU"] == pytest.approx(tuned[-1][1])
    assert not any(k.startswith("val/") for k in trained)

    eval_dir = tmp_path / "eval"
    proc = _run("dsdiff.evaluate", f"ckpt_path={last}", "+experiment=voc_real", "debug=fast", SMALL_EVAL,
                f"paths.voc={voc_root}", f"hydra.run.dir={eval_dir}", cwd=tmp_path)
    evaluated = json.loads((eval_dir / "metrics.json").read_text())
    # same weights, same data, same limit on test batches: the same numbers as the training run's test
    assert evaluated["test/mIoU"] == pytest.approx(trained["test/mIoU"], abs=1e-6)
    assert evaluated["test/mIoU_tta"] == pytest.approx(trained["test/mIoU_tta"], abs=1e-6)
    assert "mIoU" in proc.stdout and "aeroplane" in proc.stdout


def test_resume_from_last_checkpoint_continues_the_step_count(voc_root, make_cfg, tmp_path):
    first = make_cfg(["+experiment=voc_real", "debug=fast", f"paths.voc={voc_root}", "test=false", SMALL_EVAL], output_dir=tmp_path / "a")
    _, objects = train(first)
    assert objects["trainer"].global_step == 10
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    resumed = make_cfg(["+experiment=voc_real", "debug=fast", f"paths.voc={voc_root}", "test=false", SMALL_EVAL,
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

    datamodule = SegDataModule(num_classes=19, train=partial(VOCSegmentation, voc_root, "train"), tune=None, test=None)
    with pytest.raises(ValueError, match="has 21 classes but the model is configured for 19: set data.num_classes=21"):
        datamodule.setup("fit")


def test_wandb_logs_offline_inside_the_run_dir(voc_root, make_cfg, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_MODE", "offline")
    for n, out in enumerate(("run1", "run2")):  # two runs in one process, like a multirun
        cfg = make_cfg(["+experiment=voc_real", "debug=fast", f"paths.voc={voc_root}", "logger=wandb", SMALL_EVAL,
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
        assert list((tmp_path / out / "images").glob("tune_step*.png"))
    assert not any(home.rglob("*wandb*")), "W&B wrote under ~/"


def test_a_run_that_trains_nothing_is_refused_before_writing(make_cfg, voc_root, tmp_path):
    for steps in ("trainer.max_steps=0", "max_steps=-1"):
        out = tmp_path / steps.replace("=", "_")
        cfg = make_cfg(["+experiment=voc_real", f"paths.voc={voc_root}", "logger=csv", steps], output_dir=out)
        with pytest.raises(ValueError, match=r"trainer\.max_steps=-?[01] trains nothing.*set max_steps="):
            train(cfg)
        assert not out.exists() or not any(out.iterdir())


def test_recipe_settings_of_the_original(make_cfg):
    for experiment in ("voc_deeplab", "voc_real", "coco_deeplab", "coco_real"):
        cfg = make_cfg([f"+experiment={experiment}"])
        assert cfg.trainer.gradient_clip_val == 0.01 and cfg.trainer.gradient_clip_algorithm == "norm"
        assert cfg.data.train_transform.cat_max_ratio == 0.75
        assert list(cfg.model.eval_scale) == [2048, 512] and cfg.optimized_metric == "tune/mIoU"
        assert "model_checkpoint" not in cfg.callbacks  # no checkpoint chosen by a metric
    voc, coco = make_cfg(["+experiment=voc_deeplab"]), make_cfg(["+experiment=coco_deeplab"])
    for synthetic in (voc, coco):  # the original's images: JPEG at PIL's default quality, with its negative prompt
        assert (synthetic.synthetic.image_format, synthetic.synthetic.jpeg_quality) == ("jpg", 75)
        assert synthetic.generator.negative_prompt.startswith("ugly, tiling,") and synthetic.data.train_transform.scale is None
    assert voc.trainer.val_check_interval == 1000 and coco.trainer.val_check_interval == 4000  # val_interval
    for real in ("voc_real", "coco_real"):  # mmseg's RandomResize(scale=(2048, 512), ratio_range=(0.5, 2.0))
        assert list(make_cfg([f"+experiment={real}"]).data.train_transform.scale) == [2048, 512]
    assert voc.data.tune.split == "train" and voc.data.tune.subset == 300 and voc.data.test.split == "val"
    assert coco.data.tune.split == "train" and coco.data.tune.subset == 500 and coco.data.test.split == "val"
    shapes = make_cfg(["+experiment=shapes_deeplab"])
    assert shapes.model.eval_scale is None and shapes.trainer.gradient_clip_val is None
    assert shapes.data.tune.split == "val" and shapes.data.test.split == "test"


def test_no_tune_split_means_zero_real_labels_and_no_curves(make_cfg, voc_root, tmp_path):
    cfg = make_cfg(["+experiment=voc_real", "debug=fast", f"paths.voc={voc_root}", "data.tune=null", SMALL_EVAL,
                    "trainer.max_steps=4", "trainer.val_check_interval=2"])
    metrics, objects = train(cfg)
    assert not any(k.startswith("tune/") for k in metrics) and 0 <= metrics["test/mIoU"] <= 1
    assert metrics["ckpt_path"] == str(tmp_path / "checkpoints" / "last.ckpt") and objects["trainer"].global_step == 4
    assert not list((tmp_path / "images").glob("tune_step*.png"))


def test_testing_without_training_needs_a_checkpoint(make_cfg, voc_root, tmp_path):
    cfg = make_cfg(["+experiment=voc_real", f"paths.voc={voc_root}", "logger=csv", "train=false"], output_dir=tmp_path / "out")
    with pytest.raises(ValueError, match=r"train=false test=true would test an untrained network: pass ckpt_path="):
        train(cfg)
    assert not (tmp_path / "out").exists()
