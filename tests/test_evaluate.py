"""dsdiff.evaluate: reads the run's own config, and refuses checkpoints that do not fit with one clear message."""
import json
import os
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from dsdiff.evaluate import evaluate, find_run_config, with_run_config
from dsdiff.chain.runs import job_config
from dsdiff.chain.runtime import load_weights
from dsdiff.train import train

DEBUG = ["debug=fast", "trainer.max_steps=2", "trainer.val_check_interval=2"]


def _model(make_cfg, experiment="voc_real", *overrides):
    return hydra.utils.instantiate(make_cfg([f"+experiment={experiment}", *DEBUG, *overrides]).model)


def _checkpoint(model, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict()}, path)
    return path


def _refusal(model, path) -> str:
    with pytest.raises(ValueError) as refused:
        load_weights(model, path)
    message = str(refused.value)
    assert str(path) in message and len(message) < 700 and "\n" not in message  # one paragraph, naming the file
    return message


def test_checkpoint_of_another_class_count_is_refused_in_one_paragraph(make_cfg, tmp_path):
    coco = _checkpoint(_model(make_cfg, "coco_real"), tmp_path / "coco.ckpt")
    message = _refusal(_model(make_cfg), coco)
    assert "it predicts 81 classes, the model 21 (data.num_classes)" in message


def test_checkpoint_of_another_architecture_is_refused_with_the_missing_key_count(make_cfg, tmp_path):
    plus = _checkpoint(_model(make_cfg, "voc_real", "model=deeplabv3plus_small"), tmp_path / "plus.ckpt")
    model = _model(make_cfg)
    message = _refusal(model, plus)
    assert f"of the model's {len(model.state_dict())} weights are missing from it" in message
    assert "another architecture" in message


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_broken_checkpoint_is_refused_naming_the_file(make_cfg, tmp_path, damage):
    model = _model(make_cfg)
    path = _checkpoint(model, tmp_path / "good.ckpt")
    data = path.read_bytes()
    broken = tmp_path / f"{damage}.ckpt"
    broken.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "garbage": os.urandom(4096)}[damage])
    message = _refusal(model, broken)
    assert ("empty" if damage == "empty" else "cannot be read") in message


def test_evaluate_refuses_a_mismatched_checkpoint_before_testing(make_cfg, voc_root, tmp_path):
    coco = _checkpoint(_model(make_cfg, "coco_real"), tmp_path / "coco.ckpt")
    cfg = make_cfg(["+experiment=voc_real", "debug=fast", f"paths.voc={voc_root}", f"ckpt_path={coco}"],
                   config_name="eval", output_dir=tmp_path / "eval")
    with pytest.raises(ValueError, match="81 classes"):
        evaluate(cfg)
    assert not (tmp_path / "eval" / "metrics.json").exists()


def _trained_run(make_cfg, voc_root, run):
    """A finished training run with the .hydra/config.yaml that Hydra writes (interpolations kept)."""
    cfg = make_cfg(["+experiment=voc_real", *DEBUG, f"paths.voc={voc_root}"], output_dir=run)
    metrics, _ = train(cfg)
    (run / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(job_config(cfg), run / ".hydra" / "config.yaml")
    return metrics


def test_evaluate_with_only_ckpt_path_uses_the_run_config(make_cfg, voc_root, tmp_path):
    run = tmp_path / "logs" / "debug" / "voc_real" / "runs" / "a"
    trained = _trained_run(make_cfg, voc_root, run)
    ckpt = Path(trained["ckpt_path"])
    assert find_run_config(ckpt) == run / ".hydra" / "config.yaml"
    overrides = [f"ckpt_path={ckpt}", "tta=false"]
    cfg = with_run_config(make_cfg(overrides, config_name="eval", output_dir=tmp_path / "eval"), overrides)
    assert cfg.model.net.encoder_name == "resnet18" and cfg.paths.voc == str(voc_root) and cfg.tta is False
    metrics, _ = evaluate(cfg)
    assert metrics["test/mIoU"] == pytest.approx(trained["test/mIoU"], abs=1e-6)
    assert "test/mIoU_tta" not in metrics
    # a command-line override wins over the run's setting
    overrides = [f"ckpt_path={ckpt}", "data.val_batch_size=2"]
    cfg = with_run_config(make_cfg(overrides, config_name="eval", output_dir=tmp_path / "eval2"), overrides)
    assert cfg.data.val_batch_size == 2 and cfg.data.batch_size == 2


@pytest.mark.slow
def test_evaluate_cli_alone_writes_to_logs_eval(make_cfg, voc_root, tmp_path):
    run = tmp_path / "logs" / "debug" / "voc_real" / "runs" / "a"
    trained = _trained_run(make_cfg, voc_root, run)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "dsdiff.evaluate", f"ckpt_path={trained['ckpt_path']}"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    [out] = list((tmp_path / "logs" / "eval" / "runs").glob("*/metrics.json"))
    evaluated = json.loads(out.read_text())
    assert evaluated["test/mIoU"] == pytest.approx(trained["test/mIoU"], abs=1e-6)
    assert evaluated["test/mIoU_tta"] == pytest.approx(trained["test/mIoU_tta"], abs=1e-6)


def test_evaluate_a_synthetic_experiment_needs_no_generator_settings(make_cfg, voc_root, tmp_path):
    """eval.yaml has no synthetic/generator nodes: the experiment's synthetic train set must not be built."""
    ckpt = _checkpoint(_model(make_cfg, "voc_deeplab"), tmp_path / "model.ckpt")
    cfg = make_cfg(["+experiment=voc_deeplab", "debug=fast", f"paths.voc={voc_root}", f"ckpt_path={ckpt}", "tta=false"],
                   config_name="eval", output_dir=tmp_path / "eval")
    metrics, _ = evaluate(cfg)
    assert 0 <= metrics["test/mIoU"] <= 1
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["ckpt_path"] == str(ckpt)
