"""The whole chain: generate -> train -> pseudo-label -> self-train -> test, resume, sweeps, W&B."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from dsdiff.diffusion.testing import save_tiny_pipeline
from dsdiff.selftrain import combine
from dsdiff.train import train

CHAIN = ["+experiment=voc_deeplab", "debug=fast", "synthetic.num_images=4", "generator.num_inference_steps=2",
         "generator.batch_size=2", "synthetic.filters.drop_empty=false", "trainer.max_steps=4", "trainer.val_check_interval=2"]


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("chain_sd") / "pipeline")


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}


def test_chain_runs_every_stage_logs_to_wandb_and_resumes_without_redoing(make_cfg, tiny_sd, voc_root, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    overrides = [*CHAIN, f"generator.model={tiny_sd}", f"paths.voc={voc_root}", f"synthetic.dir={tmp_path / 'syn'}", "logger=wandb"]
    metrics, objects = train(make_cfg(overrides, output_dir=tmp_path / "run"))
    run = tmp_path / "run"
    stages = json.loads((run / "stages.json").read_text())
    assert set(stages) == {"run", "generate", "train", "pseudo_1", "selftrain_1", "test"}
    saved = json.loads((run / "metrics.json").read_text())
    assert 0 <= saved["test/mIoU"] <= 1 and 0 <= saved["test/mIoU_tta"] <= 1
    assert saved["ckpt_path"].startswith(str(run / "selftrain_1" / "checkpoints"))  # the self-trained model is tested
    # pseudo-labels: the trained model's predictions on the same synthetic images (mode=replace: no 255 left)
    pseudo = [json.loads(line) for line in (run / "pseudo_1" / "manifest.jsonl").read_text().splitlines()]
    assert len(pseudo) == 4 and all(p["image"].startswith(str(tmp_path / "syn")) for p in pseudo)
    assert all(255 not in np.unique(np.array(Image.open(run / "pseudo_1" / p["mask"]))) for p in pseudo)
    # W&B: one offline run per training stage; the first has the synthetic gallery, masks and the IoU table
    runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    media = runs[0] / "files" / "media"
    assert list((media / "images" / "mask").rglob("*.png")), "no mask overlays"
    assert list((media / "table").rglob("*.table.json")), "no per-class IoU table"
    assert any("synthetic" in str(p) for p in (media / "images").rglob("*.png")), "no synthetic sample grid"

    before = {p: p.stat().st_mtime_ns for p in run.rglob("*.ckpt")}
    pseudo_before = (run / "pseudo_1" / "manifest.jsonl").stat().st_mtime_ns
    again, _ = train(make_cfg([*overrides, f"resume={run}"], output_dir=tmp_path / "again"))
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*.ckpt")} == before  # no stage was trained again
    assert (run / "pseudo_1" / "manifest.jsonl").stat().st_mtime_ns == pseudo_before
    assert again["test/mIoU"] == pytest.approx(saved["test/mIoU"])  # only the test ran, on the same weights


@pytest.mark.slow
def test_chain_killed_between_stages_resumes(tiny_sd, voc_root, tmp_path):
    logs = tmp_path / "logs"
    base = [sys.executable, "-m", "dsdiff.train", *CHAIN, f"generator.model={tiny_sd}", f"paths.voc={voc_root}",
            f"synthetic.dir={tmp_path / 'syn'}", f"paths.log_dir={logs}"]
    first = logs / "voc_deeplab" / "runs" / "first"
    proc = subprocess.Popen([*base, f"hydra.run.dir={first}"], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        stages = first / "stages.json"
        if stages.is_file() and "train" in json.loads(stages.read_text()):
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = json.loads((first / "stages.json").read_text())
    assert "train" in done and "test" not in done
    train_ckpt = done["train"]["checkpoint"]
    mtime = os.stat(train_ckpt).st_mtime_ns
    out = subprocess.run([*base, "resume=true", f"hydra.run.dir={logs / 'voc_deeplab' / 'runs' / 'second'}"], env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "stage generate: done in an earlier run" in log and "stage train: done in an earlier run" in log
    assert os.stat(train_ckpt).st_mtime_ns == mtime
    final = json.loads((first / "stages.json").read_text())
    assert set(final) == {"run", "generate", "train", "pseudo_1", "selftrain_1", "test"}
    metrics = json.loads((first / "metrics.json").read_text())
    assert "test/mIoU" in metrics and "test/mIoU_tta" in metrics


def test_optuna_sweep_gives_each_trial_its_run_dir_and_wandb_runs(tiny_sd, voc_root, tmp_path):
    sweep = tmp_path / "multi"
    cmd = [sys.executable, "-m", "dsdiff.train", "-m", "+experiment=voc_deeplab", "hparams_search=voc_optuna", "debug=fdr",
           "logger=wandb", "hydra.sweeper.n_trials=2", "selftrain.rounds=0", "synthetic.num_images=2",
           "generator.num_inference_steps=2", "synthetic.filters.drop_empty=false",
           'hydra.sweeper.params={generator.cross_res:"choice(16)",generator.self_res:"choice(32)"}',  # the tiny UNet's sizes
           f"generator.model={tiny_sd}", f"paths.voc={voc_root}", f"paths.data_dir={tmp_path / 'data'}", f"hydra.sweep.dir={sweep}"]
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    trials = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [t.name for t in trials] == ["0", "1"]
    run_ids = set()
    for trial in trials:
        assert "val/mIoU" in json.loads((trial / "metrics.json").read_text())
        runs = list((trial / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, runs  # each job its own W&B run, in its own dir
        run_ids.add(runs[0].name)
    assert len(run_ids) == 2
    assert "best_value" in (sweep / "optimization_results.yaml").read_text()


def test_selftrain_modes():
    pred = torch.tensor([[1, 2], [3, 0]])
    conf = torch.tensor([[0.95, 0.5], [0.99, 0.2]])
    current = torch.tensor([[1, 255], [0, 255]])
    assert combine(pred, conf, current, "replace").tolist() == [[1, 2], [3, 0]]
    assert combine(pred, conf, current, "fill_uncertain").tolist() == [[1, 2], [0, 0]]
    assert combine(pred, conf, current, "confident", 0.9).tolist() == [[1, 255], [3, 255]]
    with pytest.raises(ValueError, match="selftrain.mode"):
        combine(pred, conf, current, "bogus")


def test_shapes_deeplab_runs_the_whole_method_offline(make_cfg, tmp_path):
    """The README's main job, reduced: the shipped tiny model generates, a segmenter trains, self-trains, tests."""
    cfg = make_cfg(["+experiment=shapes_deeplab", "synthetic.num_images=24", f"synthetic.dir={tmp_path / 'syn'}",
                    "generator.num_inference_steps=8", "max_steps=6", "val_every=3", "data.val.size=10", "data.test.size=20",
                    "callbacks.val_panel.num_images=2"], output_dir=tmp_path / "run")
    metrics, _ = train(cfg)
    stages = json.loads((tmp_path / "run" / "stages.json").read_text())
    assert set(stages) == {"run", "generate", "train", "pseudo_1", "selftrain_1", "test"}
    assert stages["generate"]["samples"] + stages["generate"]["dropped"] == 24
    assert stages["generate"]["mean_foreground"] > 0.02  # the attention found objects
    assert 0 <= metrics["test/mIoU"] <= 1 and 0 <= metrics["test/mIoU_tta"] <= 1
    assert (tmp_path / "syn" / "grid.png").is_file()
