"""What a user notices at a run's edges: a debug config replacing a knob they passed says so, a start that
fails its checks leaves no run dir, a resumed finished chain does not test again, and a sweep's search
space holds only knobs its experiment uses (a debug sweep writes only under logs/debug/)."""
import json
import os
import subprocess
import sys

import pytest
import yaml

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}


def _run(module, *args, cwd):
    return subprocess.run([sys.executable, "-m", module, *args], check=False, cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def finished_chain(tmp_path_factory):
    """A finished shapes_real chain (train + test) under debug=fast, started with max_steps=-1."""
    root = tmp_path_factory.mktemp("chain")
    run_dir = root / "logs" / "first"
    out = _run("dsdiff.train", "+experiment=shapes_real", "debug=fast", "max_steps=-1", f"paths.root_dir={root}",
               f"hydra.run.dir={run_dir}", cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    return root, run_dir, out.stdout + out.stderr


def test_a_debug_config_that_replaces_a_passed_knob_logs_one_line(finished_chain):
    _, _, log = finished_chain
    lines = [line for line in log.splitlines() if "you passed" in line]
    assert len(lines) == 1 and "debug=fast sets trainer.max_steps=10 (you passed max_steps=-1)" in lines[0]


def test_a_start_that_fails_its_checks_leaves_no_run_dir(tmp_path):
    logs = tmp_path / "logs"
    cases = [
        ("dsdiff.train", ["+experiment=shapes_real", "debug=fast", f"resume={tmp_path / 'no_such_run'}"], "resume="),
        ("dsdiff.train", ["+experiment=shapes_real", "debug=fast", f"ckpt_path={tmp_path / 'no.ckpt'}"], "ckpt_path="),
        ("dsdiff.score_labels", ["+experiment=shapes_deeplab", "score.images=0"], "score.images=0"),
    ]
    for module, args, named in cases:
        out = _run(module, *args, f"paths.log_dir={logs}", cwd=tmp_path)
        assert out.returncode == 2, out.stderr[-2000:]
        assert "dsdiff: error:" in out.stderr and named in out.stderr and "Traceback" not in out.stderr
        left = [str(p.relative_to(tmp_path)) for p in logs.rglob("*")] if logs.exists() else []
        assert left == [], (module, args, left)


def test_a_real_run_dir_is_never_removed_by_a_failed_start(finished_chain):
    root, run_dir, _ = finished_chain
    out = _run("dsdiff.train", "+experiment=shapes_real", "debug=fast", f"hydra.run.dir={run_dir}",
               f"paths.root_dir={root}", "data.batch_size=1", cwd=root)
    assert out.returncode == 2, out.stderr[-2000:]
    assert (run_dir / "stages.json").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_a_resume_of_a_finished_chain_does_not_test_again(finished_chain):
    root, run_dir, _ = finished_chain
    before = json.loads((run_dir / "stages.json").read_text())["test"]
    out = _run("dsdiff.train", "+experiment=shapes_real", "debug=fast", "max_steps=-1", f"resume={run_dir}",
               f"paths.root_dir={root}", f"hydra.run.dir={root / 'logs' / 'second'}", cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "stage test: done in an earlier run" in log and "stage test: the final weights" not in log
    assert "test: 1/" not in log  # no test batch ran
    assert json.loads((run_dir / "stages.json").read_text())["test"] == before
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test/mIoU"] == before["metrics"]["test/mIoU"]


def test_a_search_space_for_synthetic_knobs_is_refused_on_a_real_label_run(tmp_path):
    out = _run("dsdiff.train", "-m", "+experiment=shapes_real", "hparams_search=voc_optuna", "debug=fast",
               "hydra.sweeper.n_trials=1", f"paths.root_dir={tmp_path}", cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "never uses" in out.stderr and "hparams_search=real_optuna" in out.stderr
    assert not list((tmp_path / "logs").rglob("stages.json")) if (tmp_path / "logs").exists() else True


def _sweep(tmp_path, experiment, search):
    sweep = tmp_path / "logs" / "debug" / "sweep"
    out = _run("dsdiff.train", "-m", f"+experiment={experiment}", f"hparams_search={search}", "debug=fast",
               "hydra.sweeper.n_trials=2", f"paths.root_dir={tmp_path}", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    trials = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [t.name for t in trials] == ["0", "1"]
    sampled = [{o.split("=")[0] for o in yaml.safe_load((t / ".hydra" / "overrides.yaml").read_text())
                if not o.startswith(("+experiment", "hparams_search", "debug", "hydra.", "paths."))} for t in trials]
    for trial in trials:
        assert "test/mIoU" in json.loads((trial / "metrics.json").read_text())
    assert not (tmp_path / "data" / "synthetic").exists()  # the real cache is untouched
    return sampled


@pytest.mark.slow
def test_shapes_sweep_tunes_the_synthetic_chain_at_the_shapes_model_grids(tmp_path):
    sampled = _sweep(tmp_path, "shapes_deeplab", "shapes_optuna")
    for keys in sampled:
        assert keys == {"generator.labels.tau", "generator.labels.alpha", "generator.labels.beta",
                        "generator.labels.cross_res", "generator.labels.self_res", "model.optimizer.lr", "selftrain.mode"}
    folders = [f.parent.name for f in (tmp_path / "logs" / "debug" / "shapes_deeplab" / "synthetic").glob("*/dataset.json")]
    assert folders and all(name.startswith("shapes_deeplab_c") for name in folders)  # per setting, under logs/debug/


@pytest.mark.slow
def test_real_label_sweep_tunes_only_the_optimizer(tmp_path):
    sampled = _sweep(tmp_path, "shapes_real", "real_optuna")
    assert sampled == [{"model.optimizer.lr", "model.optimizer.weight_decay"}] * 2
