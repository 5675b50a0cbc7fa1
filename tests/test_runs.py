"""Runs a user can trust: resume finds the right run or refuses, records merge, loggers stay in the run."""
import csv
import json

import pytest
from dsdiff.chain.runs import STAGES_FILE, Stages
from dsdiff.chain.runtime import TrainBatchGuard, instantiate_loggers
from dsdiff.testing.folders import write_voc_folder
from dsdiff.train import train

FAST = ["+experiment=voc_real", "debug=fast", "trainer.max_steps=4", "trainer.val_check_interval=2"]


class Died(RuntimeError):
    """Stands in for a kill: the process stops in the middle of a stage."""


def _runs(tmp_path):
    return tmp_path / "logs" / "voc_real" / "runs"


def _cfg(make_cfg, tmp_path, voc_root, name, *extra):
    return make_cfg([*FAST, f"paths.voc={voc_root}", *extra], output_dir=_runs(tmp_path) / name)


def _die_in_first_stage(monkeypatch):
    """Make the next train() stop at the start of its first stage, as a kill there would."""
    def fit_stage(*args, **kwargs):
        raise Died("killed")

    monkeypatch.setattr("dsdiff.chain.stages.fit_stage", fit_stage)


def _csv_steps(path):
    with open(path, newline="") as file:
        return sorted({int(row["step"]) for row in csv.DictReader(file)})


def test_run_records_its_identity_before_the_first_stage(make_cfg, voc_root, tmp_path, monkeypatch):
    _die_in_first_stage(monkeypatch)
    with pytest.raises(Died):
        train(_cfg(make_cfg, tmp_path, voc_root, "a"))
    record = json.loads((_runs(tmp_path) / "a" / STAGES_FILE).read_text())
    assert set(record) == {"run"}  # no stage finished, but the run is on record
    assert record["run"]["task_name"] == "voc_real" and len(record["run"]["digest"]) == 16
    assert record["run"]["config"]["model"]["optimizer"]["lr"] == 1e-4
    assert "logger" not in record["run"]["config"] and "paths" not in record["run"]["config"]


def test_run_killed_in_its_first_stage_is_not_taken_for_an_older_finished_run(make_cfg, voc_root, tmp_path, monkeypatch):
    """Issue 11, fault 1: resume=true adopted an older, unrelated finished run of the task."""
    train(_cfg(make_cfg, tmp_path, voc_root, "a_finished", "test=false"))
    old = (_runs(tmp_path) / "a_finished" / STAGES_FILE).read_text()
    with monkeypatch.context() as patch:
        _die_in_first_stage(patch)
        with pytest.raises(Died):
            train(_cfg(make_cfg, tmp_path, voc_root, "b_killed", "seed=7", "test=false"))
    # the same settings again: the killed run is continued, the older finished run is left alone
    _, objects = train(_cfg(make_cfg, tmp_path, voc_root, "c", "seed=7", "test=false", "resume=true"))
    assert objects["work_dir"] == _runs(tmp_path) / "b_killed"
    assert "train" in json.loads((_runs(tmp_path) / "b_killed" / STAGES_FILE).read_text())
    assert (_runs(tmp_path) / "a_finished" / STAGES_FILE).read_text() == old
    # other settings: the latest run is not theirs, so nothing is adopted
    with pytest.raises(ValueError, match=r"seed: 7 -> 3"):
        train(_cfg(make_cfg, tmp_path, voc_root, "d", "seed=3", "test=false", "resume=true"))
    assert (_runs(tmp_path) / "a_finished" / STAGES_FILE).read_text() == old


def test_resume_with_changed_settings_is_refused_with_the_differences(make_cfg, voc_root, tmp_path):
    """Issue 11, fault 2: resume=true silently re-tested the old model under new settings."""
    train(_cfg(make_cfg, tmp_path, voc_root, "a", "test=false"))
    before = (_runs(tmp_path) / "a" / STAGES_FILE).read_text()
    changed = ["model.optimizer.lr=0.5", "data.train_transform.hflip=false", "resume=true"]
    with pytest.raises(ValueError) as refused:
        train(_cfg(make_cfg, tmp_path, voc_root, "b", *changed))
    message = str(refused.value)
    assert "model.optimizer.lr: 0.0001 -> 0.5" in message and "data.train_transform.hflip: True -> False" in message
    assert "resume=force" in message
    assert (_runs(tmp_path) / "a" / STAGES_FILE).read_text() == before  # nothing written
    assert not (_runs(tmp_path) / "b" / STAGES_FILE).exists()
    # settings that cannot change a result (logger, stages to run, progress) do not block a resume
    _, objects = train(_cfg(make_cfg, tmp_path, voc_root, "c", "logger=none", "trainer.log_every_n_steps=3", "resume=true"))
    assert objects["work_dir"] == _runs(tmp_path) / "a"
    # resume=force continues anyway and records the change; the new settings are now the run's
    _, objects = train(_cfg(make_cfg, tmp_path, voc_root, "d", *changed[:-1], "resume=force"))
    assert objects["work_dir"] == _runs(tmp_path) / "a"
    record = json.loads((_runs(tmp_path) / "a" / STAGES_FILE).read_text())["run"]
    assert "model.optimizer.lr: 0.0001 -> 0.5" in record["changes"][-1]["diff"]
    assert record["config"]["model"]["optimizer"]["lr"] == 0.5


def test_resume_of_a_named_dir_checks_identity_too(make_cfg, voc_root, tmp_path):
    train(_cfg(make_cfg, tmp_path, voc_root, "a", "test=false"))
    run = _runs(tmp_path) / "a"
    with pytest.raises(ValueError, match=rf"seed: 42 -> 5(.|\n)*resume={run} resume_force=true"):
        train(_cfg(make_cfg, tmp_path, voc_root, "b", "seed=5", f"resume={run}", "test=false"))
    _, objects = train(_cfg(make_cfg, tmp_path, voc_root, "c", "seed=5", f"resume={run}", "resume_force=true", "test=false"))
    assert objects["work_dir"] == run
    with pytest.raises(FileNotFoundError, match="not a dsdiff run dir"):
        train(_cfg(make_cfg, tmp_path, voc_root, "d", f"resume={tmp_path}"))


def test_resume_true_without_earlier_run_starts_fresh(make_cfg, voc_root, tmp_path, caplog):
    caplog.set_level("INFO", logger="dsdiff")
    _, objects = train(_cfg(make_cfg, tmp_path, voc_root, "a", "resume=true", "test=false"))
    assert objects["work_dir"] == _runs(tmp_path) / "a"
    assert "no earlier run of voc_real" in caplog.text


def test_run_that_died_mid_training_is_resumed_from_its_checkpoint_in_the_same_csv(make_cfg, voc_root, tmp_path, monkeypatch):
    """Issue 11, faults 3-4: resume=true could not find a run that died in its first stage, and a
    resumed chain wrote its logs into the new run dir."""
    def die_after_step_2(self, trainer, *args):
        if trainer.global_step >= 3:  # last.ckpt was saved at step 2's validation
            raise Died("killed")

    with monkeypatch.context() as patch:
        patch.setattr(TrainBatchGuard, "on_train_batch_end", die_after_step_2, raising=False)
        with pytest.raises(Died):
            train(_cfg(make_cfg, tmp_path, voc_root, "a", "test=false"))
    run = _runs(tmp_path) / "a"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert _csv_steps(run / "csv" / "version_0" / "metrics.csv")[-1] <= 3
    _, objects = train(_cfg(make_cfg, tmp_path, voc_root, "b", "test=false", "resume=true"))
    assert objects["work_dir"] == run and objects["trainer"].global_step == 4
    steps = _csv_steps(run / "csv" / "version_0" / "metrics.csv")
    assert steps[0] <= 1 and steps[-1] >= 3  # the killed attempt's rows are kept, the resumed ones appended
    assert not (_runs(tmp_path) / "b" / "csv").exists()
    assert "train" in json.loads((run / STAGES_FILE).read_text())


def test_resumed_test_keeps_the_train_stage_metrics(make_cfg, voc_root, tmp_path):
    """Issue 11, fault 4: a resumed chain overwrote metrics.json with only the test metrics."""
    train(_cfg(make_cfg, tmp_path, voc_root, "a", "test=false"))
    run = _runs(tmp_path) / "a"
    val = json.loads((run / "metrics.json").read_text())["tune/mIoU"]
    metrics, _ = train(_cfg(make_cfg, tmp_path, voc_root, "b", "resume=true"))
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["tune/mIoU"] == pytest.approx(val) and 0 <= saved["test/mIoU"] <= 1
    assert metrics["tune/mIoU"] == pytest.approx(val)  # what a sweeper is handed, too
    assert json.loads((_runs(tmp_path) / "b" / "metrics.json").read_text()) == saved


def test_wandb_groups_by_chain_with_a_job_type_and_a_run_id_fixed_per_stage(make_cfg, tmp_path):
    from omegaconf import DictConfig

    from dsdiff.chain.runs import open_run

    loggers_cfg = DictConfig({"wandb": {"_target_": "lightning.pytorch.loggers.wandb.WandbLogger", "project": "p",
                                        "name": "voc_real", "save_dir": str(tmp_path / "elsewhere")}})
    trial = tmp_path / "logs" / "voc_real" / "multiruns" / "2026-01-01_00-00-00" / "0"
    work, _ = open_run(make_cfg(["+experiment=voc_real"], output_dir=trial))
    train_stage = instantiate_loggers(loggers_cfg, work)[0]
    self_stage = instantiate_loggers(loggers_cfg, work, stage="selftrain_1")[0]
    assert train_stage._wandb_init["group"] == self_stage._wandb_init["group"] == "voc_real-2026-01-01_00-00-00-0"
    assert (train_stage._wandb_init["job_type"], self_stage._wandb_init["job_type"]) == ("train", "selftrain_1")
    assert train_stage._wandb_init["dir"] == str(work)  # the run dir, not the logger's configured save_dir
    again = instantiate_loggers(loggers_cfg, work)[0]  # a resumed train stage continues its W&B run
    assert again._wandb_init["id"] == train_stage._wandb_init["id"] != self_stage._wandb_init["id"]
    other = tmp_path / "logs" / "voc_real" / "multiruns" / "2026-01-02_00-00-00" / "0"
    open_run(make_cfg(["+experiment=voc_real"], output_dir=other))
    assert instantiate_loggers(loggers_cfg, other)[0]._wandb_init["group"] != train_stage._wandb_init["group"]


def test_batch_size_one_is_refused_before_anything_is_written(make_cfg, voc_root, tmp_path):
    cfg = _cfg(make_cfg, tmp_path, voc_root, "a", "data.batch_size=1")
    with pytest.raises(ValueError, match="data.batch_size=1"):
        train(cfg)
    assert not (_runs(tmp_path) / "a").exists()


def test_training_set_of_one_image_is_refused_and_a_last_batch_of_one_is_dropped(make_cfg, tmp_path):
    one = write_voc_folder(tmp_path / "one", n_train=1, n_val=1)["root"]
    with pytest.raises(ValueError, match=r"data.batch_size=2 from 1 training image"):
        train(_cfg(make_cfg, tmp_path, one, "a", "test=false"))
    three = write_voc_folder(tmp_path / "three", n_train=3, n_val=1)["root"]  # batches of 2, then 1: dropped
    _, objects = train(_cfg(make_cfg, tmp_path, three, "b", "test=false"))
    assert objects["trainer"].global_step == 4


def test_logger_none_trains(make_cfg, voc_root, tmp_path):
    """Issue 11: logger=none crashed (LearningRateMonitor needs a logger)."""
    metrics, objects = train(_cfg(make_cfg, tmp_path, voc_root, "a", "logger=none", "test=false"))
    assert objects["trainer"].global_step == 4 and 0 <= metrics["tune/mIoU"] <= 1
    assert not (_runs(tmp_path) / "a" / "csv").exists()


def test_stages_file_lists_finished_stages_apart_from_the_record(tmp_path):
    (tmp_path / STAGES_FILE).write_text(json.dumps({"run": {"task_name": "t"}, "train": {"checkpoint": "x"}}))
    stages = Stages(tmp_path)
    assert stages.finished() == ["train"] and stages.get("train") == {"checkpoint": "x"}


def test_the_final_stage_is_the_last_round_read_back_from_the_key_sorted_file(tmp_path):
    from dsdiff.chain.runs import final_checkpoint, fitted_stages

    stages = Stages(tmp_path)
    for name in ("train", "pseudo_1", "selftrain_1", "pseudo_2", "selftrain_2", "selftrain_10"):
        stages.mark(name, {"checkpoint": f"{name}.ckpt"})
    stages = Stages(tmp_path)  # written with sorted keys: selftrain_1, selftrain_10, selftrain_2, train
    assert fitted_stages(stages) == ["train", "selftrain_1", "selftrain_2", "selftrain_10"]
    assert final_checkpoint(stages) == "selftrain_10.ckpt"


def test_identity_ignores_where_outputs_go(make_cfg, tmp_path):
    from dsdiff.chain.runs import identity

    a = identity(make_cfg(["+experiment=voc_deeplab"], output_dir=tmp_path / "x"))
    b = identity(make_cfg(["+experiment=voc_deeplab", "logger=csv", "synthetic.overwrite=true"], output_dir=tmp_path / "y"))
    c = identity(make_cfg(["+experiment=voc_deeplab", "generator.labels.tau=2"], output_dir=tmp_path / "z"))
    d = identity(make_cfg(["+experiment=voc_deeplab", "generator.batch_size=3"], output_dir=tmp_path / "w"))
    assert a["digest"] == b["digest"] != c["digest"]
    assert d["digest"] != a["digest"]  # samples are made in aligned groups of generator.batch_size
    assert "callbacks" in a["config"] and "dirpath" not in a["config"]["callbacks"]["last_checkpoint"]
    assert json.loads(json.dumps(a["config"])) == a["config"]  # plain values, as stages.json stores them


@pytest.mark.slow
def test_chain_killed_in_generate_is_resumed_not_an_older_run(voc_root, tmp_path, tmp_path_factory):
    """Issue 11, fault 1 with a real kill: a chain SIGKILLed in its generate stage, rerun with
    resume=true, used to adopt an older finished run of the task and re-test its model."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from dsdiff.testing.tiny_sd import save_tiny_pipeline

    tiny_sd = save_tiny_pipeline(tmp_path_factory.mktemp("sd") / "pipeline")
    logs, runs = tmp_path / "logs", tmp_path / "logs" / "voc_deeplab" / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    base = [sys.executable, "-m", "dsdiff.train", "+experiment=voc_deeplab", "debug=fast", "generator.num_inference_steps=2",
            "generator.batch_size=1", "synthetic.filters.drop_empty=false", "trainer.max_steps=2",
            "trainer.val_check_interval=2", "selftrain.rounds=0", "prompts=default", f"generator.model={tiny_sd}", f"paths.voc={voc_root}",
            f"paths.log_dir={logs}"]

    def run(name, *extra):
        out = subprocess.run([*base, *extra, f"hydra.run.dir={runs / name}"], env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]

    run("older", "synthetic.num_images=4", f"synthetic.dir={tmp_path / 'syn_old'}")
    older = (runs / "older" / STAGES_FILE).read_text()
    killed = runs / "killed"
    cmd = [*base, "synthetic.num_images=40", f"synthetic.dir={tmp_path / 'syn'}", f"hydra.run.dir={killed}"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list((tmp_path / "syn").glob("images/*.png")):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert set(json.loads((killed / STAGES_FILE).read_text())) == {"run"}  # on record, no stage finished
    run("again", "synthetic.num_images=40", f"synthetic.dir={tmp_path / 'syn'}", "resume=true")
    done = json.loads((killed / STAGES_FILE).read_text())
    assert {"generate", "train", "test"} <= set(done) and done["generate"]["num_images"] == 40
    assert (runs / "older" / STAGES_FILE).read_text() == older
    assert json.loads((killed / "metrics.json").read_text())["ckpt_path"].startswith(str(killed))


def test_test_only_resume_tests_the_chains_final_weights_and_keeps_its_objective(make_cfg, voc_root, tmp_path):
    """train=false resume=DIR once tested an untrained network, and put the train stage's tune/mIoU back."""
    train(_cfg(make_cfg, tmp_path, voc_root, "a", "test=false"))
    run = _runs(tmp_path) / "a"
    tune = json.loads((run / "metrics.json").read_text())["tune/mIoU"]
    metrics, _ = train(_cfg(make_cfg, tmp_path, voc_root, "b", "train=false", f"resume={run}"))
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["ckpt_path"] == str(run / "checkpoints" / "last.ckpt") == metrics["ckpt_path"]
    assert 0 <= saved["test/mIoU"] <= 1 and saved["tune/mIoU"] == pytest.approx(tune) == saved["train/tune/mIoU"]
