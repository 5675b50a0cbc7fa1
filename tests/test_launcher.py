"""Sweeps through Hydra's submitit launcher (`hydra/launcher=local`, the SLURM launcher's code path)."""
import json
import os
import subprocess
import sys

import pytest
import yaml

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")


def test_two_trial_shapes_sweep_runs_as_submitit_jobs_and_returns_each_final_tune_miou(tmp_path):
    sweep = tmp_path / "multi"
    cmd = [sys.executable, "-m", "dsdiff.train", "-m", "+experiment=shapes_deeplab", "hparams_search=shapes_optuna",
           "hydra/launcher=local", "debug=fast", "hydra.sweeper.n_trials=2",
           'hydra.sweeper.params={model.optimizer.lr:"choice(1e-3,2e-3)",generator.labels.cross_res:"choice(16)",'
           'generator.labels.self_res:"choice(16)"}',
           f"paths.root_dir={tmp_path}", f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "setup plugin alembic" not in out.stdout + out.stderr  # the quiet log covers the sweep's start
    jobs = [p for p in (sweep / ".submitit").iterdir() if list(p.glob("*_result.pkl"))]
    assert len(jobs) == 2  # each trial ran as its own submitit job
    objectives = []
    for trial in ("0", "1"):
        saved = json.loads((sweep / trial / "metrics.json").read_text())
        stages = json.loads((sweep / trial / "stages.json").read_text())
        assert "selftrain_1" in stages and "test" in stages
        assert saved["tune/mIoU"] == saved["selftrain_1/tune/mIoU"]  # the final stage's, after self-training
        objectives.append(saved["tune/mIoU"])
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(max(objectives))
