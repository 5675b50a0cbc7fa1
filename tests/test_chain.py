"""The whole chain: generate -> train -> pseudo-label -> self-train -> test, resume, sweeps, W&B."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dsdiff.chain.selftrain import combine
from dsdiff.testing.tiny_sd import save_tiny_pipeline
from dsdiff.train import train

CHAIN = ["+experiment=voc_deeplab", "debug=fast", "synthetic.num_images=4", "generator.num_inference_steps=2",
         "generator.batch_size=2", "synthetic.filters.drop_empty=false", "trainer.max_steps=5", "trainer.val_check_interval=2",
         "data.eval_scale=[128,64]", "prompts=default"]  # the fixture's 64x64 images at factor 1: the keep-ratio path without 512x512 CPU inference


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
    # the final weights of each stage, never a checkpoint chosen on a split: last.ckpt at the final step
    assert saved["ckpt_path"] == str(run / "selftrain_1" / "checkpoints" / "last.ckpt") and saved["ckpt"] == "last"
    assert stages["train"]["checkpoint"] == str(run / "checkpoints" / "last.ckpt")
    assert sorted(p.name for p in run.rglob("*.ckpt")) == ["last.ckpt", "last.ckpt"]
    for ckpt in run.rglob("*.ckpt"):
        assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 5  # not the step-4 validation
    assert json.loads((run / "pseudo_1" / "dataset.json").read_text())["checkpoint"] == stages["train"]["checkpoint"]
    # the objective is the final stage's tune/mIoU, measured on the final weights
    assert saved["tune/mIoU"] == saved["selftrain_1/tune/mIoU"] == metrics["tune/mIoU"]
    assert "train/tune/mIoU" in saved and not any(k.startswith("val/") for k in saved)
    # pseudo-labels: the trained model's predictions on the same synthetic images (mode=replace: no 255 left)
    pseudo = [json.loads(line) for line in (run / "pseudo_1" / "manifest.jsonl").read_text().splitlines()]
    assert len(pseudo) == 4 and all(p["image"].startswith(str(tmp_path / "syn")) for p in pseudo)
    assert all(255 not in np.unique(np.array(Image.open(run / "pseudo_1" / p["mask"]))) for p in pseudo)
    # ... of the train stage's final weights (last.ckpt, EMA), at the evaluation scale
    import hydra

    from dsdiff.data.transforms import EvalTransform
    from dsdiff.data.voc import read_rgb
    from dsdiff.chain.runtime import load_weights

    teacher = hydra.utils.instantiate(objects["cfg"].model).eval()
    load_weights(teacher, stages["train"]["checkpoint"])
    for p in pseudo:
        image = read_rgb(Path(p["image"]))
        x, _ = EvalTransform()(image, torch.zeros(image.shape[1:], dtype=torch.uint8))
        with torch.no_grad():
            expected = teacher(x[None]).argmax(1)[0].numpy()
        assert (np.array(Image.open(run / "pseudo_1" / p["mask"])) == expected).mean() > 0.99  # batch-size rounding aside
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
           "logger=wandb", "prompts=default", "hydra.sweeper.n_trials=2", "synthetic.num_images=2", "data.eval_scale=[128,64]",
           "generator.num_inference_steps=2", "synthetic.filters.drop_empty=false",
           'hydra.sweeper.params={generator.labels.cross_res:"choice(16)",generator.labels.self_res:"choice(32)"}',  # the tiny UNet's sizes
           f"generator.model={tiny_sd}", f"paths.voc={voc_root}", f"paths.data_dir={tmp_path / 'data'}", f"hydra.sweep.dir={sweep}"]
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    trials = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [t.name for t in trials] == ["0", "1"]
    run_ids, objectives = set(), []
    for trial in trials:
        saved = json.loads((trial / "metrics.json").read_text())
        assert saved["tune/mIoU"] == saved["selftrain_1/tune/mIoU"]  # the final stage's, after self-training
        objectives.append(saved["tune/mIoU"])
        runs = list((trial / "wandb").glob("offline-run-*"))
        assert len(runs) == 2, runs  # each job its own W&B runs (train, selftrain_1), in its own dir
        run_ids |= {r.name for r in runs}
    assert len(run_ids) == 4
    results = (sweep / "optimization_results.yaml").read_text()
    best = float(results.split("best_value:")[1].split()[0])
    assert best == pytest.approx(max(objectives))  # the sweeper got each trial's final tune/mIoU


class Brightness(torch.nn.Module):
    """A stand-in segmenter: class k where a pixel's mean value is nearest centre k (a label map per image)."""

    def forward(self, x):
        return -(x.mean(1, keepdim=True) - torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1)) ** 2


def _synthetic_folder(root, n, size=(12, 16)):
    from dsdiff.synthetic.spec import sample_id
    from dsdiff.synthetic.store import SyntheticStore

    store = SyntheticStore(root)
    store.prepare({"class_names": ["background", "a", "b"]})
    rng = np.random.default_rng(0)
    images = {}
    for i in range(n):
        image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        store.write_sample(sample_id(i), image, rng.integers(0, 3, size).astype(np.uint8), {"prompt": f"p{i}"})
        images[sample_id(i)] = image
    store.compact()
    return images


def _pseudo(source, out, max_samples):
    import lightning as L

    from dsdiff.chain.selftrain import pseudo_label

    def make_trainer(callbacks):
        return L.Trainer(accelerator="cpu", devices=1, logger=False, callbacks=callbacks,
                         enable_model_summary=False, default_root_dir=str(out))

    return pseudo_label(Brightness(), source, out, make_trainer, batch_size=2, max_samples=max_samples, checkpoint="test")


def _prediction(image):
    from dsdiff.data.transforms import EvalTransform

    x, _ = EvalTransform()(torch.from_numpy(image).permute(2, 0, 1).contiguous(), torch.zeros(image.shape[:2], dtype=torch.uint8))
    return Brightness()(x[None]).argmax(1)[0].numpy()


def test_pseudo_labels_cover_exactly_num_images_of_an_extended_folder_each_under_its_own_id(tmp_path):
    images = _synthetic_folder(tmp_path / "syn", 6)  # a folder extended past num_images=4
    (tmp_path / "syn" / "masks" / "0000001.png").write_bytes(b"not a png")  # one damaged sample
    summary = _pseudo(tmp_path / "syn", tmp_path / "pseudo", max_samples=4)
    pseudo = [json.loads(line) for line in (tmp_path / "pseudo" / "manifest.jsonl").read_text().splitlines()]
    assert [p["id"] for p in pseudo] == ["0000000", "0000002", "0000003"]  # 0..3, the damaged one skipped
    for p in pseudo:
        assert p["image"] == str((tmp_path / "syn" / "images" / f"{p['id']}.png").resolve())
        label = np.array(Image.open(tmp_path / "pseudo" / p["mask"]))
        np.testing.assert_array_equal(label, _prediction(images[p["id"]]))  # the prediction on its own image
    assert summary["samples"] == 3 and summary["unreadable"] == 1 and summary["dropped_by_reason"] == {"unreadable": 1}
    dropped = [json.loads(line) for line in (tmp_path / "pseudo" / "dropped.jsonl").read_text().splitlines()]
    assert [d["id"] for d in dropped] == ["0000001"]
    # round 2 reads the pseudo folder as the chain does: exactly the relabelled samples of 0..num_images-1
    from dsdiff.synthetic.dataset import SyntheticDataset

    assert SyntheticDataset(tmp_path / "pseudo", max_samples=4).ids == ["0000000", "0000002", "0000003"]
    assert len(SyntheticDataset(tmp_path / "syn", max_samples=4)) == 4


def test_selftrain_modes():
    pred = torch.tensor([[1, 2], [3, 0]])
    conf = torch.tensor([[0.95, 0.5], [0.99, 0.2]])
    current = torch.tensor([[1, 255], [0, 255]])
    assert combine(pred, conf, current, "replace").tolist() == [[1, 2], [3, 0]]
    assert combine(pred, conf, current, "fill_uncertain").tolist() == [[1, 2], [0, 0]]
    assert combine(pred, conf, current, "confident", 0.9).tolist() == [[1, 255], [3, 255]]
    # agree: kept where the teacher agrees (1), dropped where it overrules a certain label (0 vs 3), the band
    # filled only where the teacher is confident (2 at 0.5: no; 0 at 0.2: no)
    assert combine(pred, conf, current, "agree", 0.9).tolist() == [[1, 255], [255, 255]]
    assert combine(pred, conf, current, "agree", 0.4).tolist() == [[1, 2], [255, 255]]
    with pytest.raises(ValueError, match="selftrain.mode"):
        combine(pred, conf, current, "bogus")


def test_shapes_deeplab_runs_the_whole_method_offline(make_cfg, tmp_path):
    """The README's main job, reduced: the shipped tiny model generates, a segmenter trains, self-trains, tests.

    Also the protocol: no test/ metric before the final stage, the final weights pseudo-label, and a
    synthetic folder extended past num_images feeds both rounds exactly num_images samples.
    """
    common = ["+experiment=shapes_deeplab", f"synthetic.dir={tmp_path / 'syn'}", "generator.num_inference_steps=8",
              "val_every=3", "data.tune.size=10", "data.test.size=20", "callbacks.val_panel.num_images=2"]
    cfg = make_cfg([*common, "synthetic.num_images=24", "max_steps=6"], output_dir=tmp_path / "run")
    metrics, _ = train(cfg)
    run = tmp_path / "run"
    stages = json.loads((run / "stages.json").read_text())
    assert set(stages) == {"run", "generate", "train", "pseudo_1", "selftrain_1", "test"}
    assert stages["generate"]["samples"] + stages["generate"]["dropped"] == 24
    assert stages["generate"]["mean_foreground"] > 0.02  # the attention found objects
    assert 0 <= metrics["test/mIoU"] <= 1 and 0 <= metrics["test/mIoU_tta"] <= 1
    assert (tmp_path / "syn" / "grid.png").is_file()
    # the test split is used once, at the end: the train stage's log has no test/ metric
    train_log = (run / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    final_log = (run / "csv" / "selftrain_1" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "tune/mIoU" in train_log and not any(c.startswith("test/") for c in train_log)
    assert "test/mIoU" in final_log
    assert metrics["tune/mIoU"] == metrics["selftrain_1/tune/mIoU"] and metrics["ckpt"] == "last"

    # a later run with num_images=16 on the same (24-sample) folder: train, pseudo-labels and round 2 read 0..15
    kept = {e["id"] for e in map(json.loads, (tmp_path / "syn" / "manifest.jsonl").read_text().splitlines())}
    small = make_cfg([*common, "synthetic.num_images=16", "max_steps=2", "test=false"], output_dir=tmp_path / "small")
    _, objects = train(small)
    expected = sorted(i for i in kept if int(i) < 16)
    pseudo = [json.loads(line)["id"] for line in (tmp_path / "small" / "pseudo_1" / "manifest.jsonl").read_text().splitlines()]
    assert sorted(pseudo) == expected and len(kept) > len(expected)
    assert objects["datamodule"].datasets["train"].ids == expected  # round 2's training set


def test_selftrain_init_teacher_starts_the_student_from_the_teachers_final_weights(make_cfg, tmp_path, monkeypatch):
    from dsdiff.chain import stages as chain

    starts = {}
    fit_stage = chain.fit_stage

    def spy(name, root, datamodule, model, *args, **kwargs):
        starts[name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return fit_stage(name, root, datamodule, model, *args, **kwargs)

    monkeypatch.setattr(chain, "fit_stage", spy)
    cfg = make_cfg(["+experiment=shapes_deeplab", f"synthetic.dir={tmp_path / 'syn'}", "generator.num_inference_steps=4",
                    "synthetic.num_images=8", "max_steps=2", "val_every=2", "data.tune.size=4", "test=false",
                    "selftrain.tta=false", "selftrain.init=teacher", "callbacks.val_panel.num_images=1"],
                   output_dir=tmp_path / "run")
    train(cfg)
    stages = json.loads((tmp_path / "run" / "stages.json").read_text())
    teacher = torch.load(stages["train"]["checkpoint"], map_location="cpu", weights_only=False)["state_dict"]
    weights = [k for k in teacher if k.endswith(".weight") and k in starts["selftrain_1"]]
    assert weights and all(torch.equal(starts["selftrain_1"][k], teacher[k]) for k in weights)
    assert any(not torch.equal(starts["train"][k], teacher[k]) for k in weights)  # the teacher trained away from init


def test_a_bad_selftrain_init_is_refused_before_anything_is_written(make_cfg, tmp_path):
    cfg = make_cfg(["+experiment=shapes_deeplab", f"synthetic.dir={tmp_path / 'syn'}", "selftrain.init=teachr"],
                   output_dir=tmp_path / "run")
    with pytest.raises(ValueError, match="selftrain.init='teachr': use scratch"):
        train(cfg)
    assert not (tmp_path / "syn").exists() and not (tmp_path / "run" / "stages.json").exists()


def test_prune_checkpoints_keeps_only_the_final_weights_and_evaluate_still_reads_them(make_cfg, tiny_sd, voc_root, tmp_path):
    from omegaconf import OmegaConf

    from dsdiff.chain.runs import identity, job_config
    from dsdiff.evaluate import evaluate, with_run_config

    run = tmp_path / "run"
    overrides = [*CHAIN, f"generator.model={tiny_sd}", f"paths.voc={voc_root}", f"synthetic.dir={tmp_path / 'syn'}", "logger=csv"]
    cfg = make_cfg([*overrides, "prune_checkpoints=true"], output_dir=run)
    metrics, _ = train(cfg)
    final = run / "selftrain_1" / "checkpoints" / "last.ckpt"
    assert sorted(run.rglob("*.ckpt")) == [final] and not (run / "checkpoints").exists()
    assert metrics["ckpt_path"] == str(final)
    state = torch.load(final, map_location="cpu", weights_only=False)
    assert {"state_dict", "global_step", "hyper_parameters"} <= set(state) and state["global_step"] == 5
    assert not {"optimizer_states", "current_model_state", "averaging_state"} & set(state)
    from dsdiff import Segmenter  # the pruned file still rebuilds its net for inference

    assert Segmenter.from_checkpoint(final, device="cpu").predict(np.zeros((20, 30, 3), np.uint8)).shape == (20, 30)
    stages = json.loads((run / "stages.json").read_text())
    [pruned] = stages["run"]["pruned"]
    assert pruned["removed"] == [str(run / "checkpoints" / "last.ckpt")] and pruned["weights_only"] == [str(final)]
    assert pruned["freed_mb"] > 0 and json.loads((run / "metrics.json").read_text())["test/mIoU"] == metrics["test/mIoU"]
    # the setting is not part of the run's identity: the same run with or without it
    assert identity(make_cfg(overrides, output_dir=tmp_path / "other"))["digest"] == stages["run"]["digest"]
    # evaluate reads the pruned checkpoint: the same weights give the training run's test numbers
    (run / ".hydra").mkdir()
    OmegaConf.save(job_config(cfg), run / ".hydra" / "config.yaml")
    eval_overrides = [f"ckpt_path={final}"]
    evaluated, _ = evaluate(with_run_config(make_cfg(eval_overrides, config_name="eval", output_dir=tmp_path / "eval"), eval_overrides))
    assert evaluated["test/mIoU"] == pytest.approx(metrics["test/mIoU"], abs=1e-6)
    # resuming the finished, pruned run trains nothing and tests the pruned checkpoint again
    again, _ = train(make_cfg([*overrides, "prune_checkpoints=true", f"resume={run}"], output_dir=tmp_path / "resumed"))
    assert again["test/mIoU"] == pytest.approx(metrics["test/mIoU"], abs=1e-6) and sorted(run.rglob("*.ckpt")) == [final]
    assert len(json.loads((run / "stages.json").read_text())["run"]["pruned"]) == 1  # nothing more to prune
    # training cannot resume from final weights alone: refused before anything is written
    with pytest.raises(ValueError, match="holds final weights only"):
        train(make_cfg([*overrides, f"ckpt_path={final}"], output_dir=tmp_path / "from_pruned"))
    assert not (tmp_path / "from_pruned" / "stages.json").exists()


def test_a_bad_prune_checkpoints_is_refused_before_anything_is_written(make_cfg, tmp_path):
    cfg = make_cfg(["+experiment=shapes_deeplab", f"synthetic.dir={tmp_path / 'syn'}", "prune_checkpoints=yes"],
                   output_dir=tmp_path / "run")
    with pytest.raises(ValueError, match="prune_checkpoints='yes': use true"):
        train(cfg)
    assert not (tmp_path / "syn").exists() and not (tmp_path / "run" / "stages.json").exists()
