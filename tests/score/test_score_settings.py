"""Bad settings stop score_labels before it writes anything, with an error naming the setting; the
sweep config composes; the objective cannot be won by leaving pixels uncertain."""
import pytest

from dsdiff.score.report import objective
from dsdiff.score_labels import score_labels

BAD = [
    ("score.images=0", "score.images=0"),
    ("score.images=500", "score.images=500, but the tune split"),  # the shapes world's tune split has 200 images
    ("score.timesteps=[]", "score.timesteps"),
    ("score.timesteps=[100,5000]", "score.timesteps has [5000] outside"),
    ("score.batch_size=0", "score.batch_size=0"),
    ("generator.labels.alpha=0.3", "generator.labels.alpha=0.3 < generator.labels.beta"),
    ("generator.labels.tau=-1", "generator.labels.tau=-1"),
    ("generator.labels.window=[0.9,0.95]", "generator.labels.window"),
    ("generator.scheduler=nope", "unknown scheduler 'nope' (generator.scheduler)"),
    ("generator.model=/no/such/model", "generator.model=/no/such/model: no such folder"),
    ("data.tune=null", "data.tune=null"),
]


@pytest.mark.parametrize("override,message", BAD, ids=[b[0] for b in BAD])
def test_bad_settings_fail_before_anything_is_written(score_cfg, tmp_path, override, message):
    cfg = score_cfg("+experiment=shapes_deeplab", override)
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        score_labels(cfg, [])
    assert message in str(error.value)
    assert not (tmp_path / "results").exists() and not (tmp_path / "run").exists()


def test_labels_optuna_composes(make_cfg):
    cfg = make_cfg(["+experiment=voc_deeplab", "hparams_search=labels_optuna"], config_name="score_labels")
    assert cfg.optimized_metric == "labels/objective" and "MULTIRUN" in str(cfg.hydra.mode)
    assert cfg.hydra.sweeper.direction == "maximize"
    swept = {k.removeprefix("generator.labels.") for k in cfg.hydra.sweeper.params}
    assert swept == {"tau", "alpha", "beta", "cross_res", "self_res", "window"}
    assert cfg.hydra.sweep.dir.startswith(f"{cfg.paths.log_dir}/score_labels/voc_deeplab/multiruns/")


def test_score_runs_never_land_among_training_runs(make_cfg):
    cfg = make_cfg(["+experiment=shapes_deeplab"], config_name="score_labels")
    assert "/score_labels/shapes_deeplab/runs/" in cfg.hydra.run.dir
    assert "score" not in make_cfg(["+experiment=shapes_deeplab"])  # train.yaml's runs keep their settings digest


def test_objective_cannot_be_won_by_abstaining():
    careful = objective(0.70, certain=0.85, min_certain=0.5)
    abstaining = objective(0.95, certain=0.20, min_certain=0.5)  # only the easiest pixels labelled
    assert careful == 0.70 and abstaining == pytest.approx(0.38) and abstaining < careful


def test_labels_optuna_sweep_runs_on_the_shapes_world(tmp_path):
    """Three trials with the shapes model's grids; each trial's label_scores.json holds the objective the sweeper got."""
    import json
    import os
    import subprocess
    import sys

    sweep = tmp_path / "multi"
    cmd = [sys.executable, "-m", "dsdiff.score_labels", "-m", "+experiment=shapes_deeplab", "hparams_search=labels_optuna",
           "logger=csv", "hydra.sweeper.n_trials=3", "score.images=8", "score.timesteps=[100,300]",
           "generator.labels.cross_res=choice(8,16)", "generator.labels.self_res=choice(8,16)",
           f"hydra.sweep.dir={sweep}", f"paths.log_dir={tmp_path / 'logs'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    objectives = [json.loads((sweep / str(n) / "label_scores.json").read_text())["labels/objective"] for n in range(3)]
    best = float((sweep / "optimization_results.yaml").read_text().split("best_value:")[1].split()[0])
    assert best == pytest.approx(max(objectives))
