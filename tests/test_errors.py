"""Expected errors: each console script, given a bad setting, prints one ``dsdiff: error:`` block that
names the setting, no Python traceback and no Hydra hint, and exits with status 2, before the run
writes anything of its own. ``HYDRA_FULL_ERROR=1`` / ``verbose=true`` show the traceback; an
unexpected exception keeps its traceback."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsdiff.utils.errors import ConfigError, MissingPathError, SettingError, exits_cleanly, format_error

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "dsdiff" / "assets" / "shapes_t2i"

# name: (console script, arguments, what stderr must name)
CASES = {
    "batch_size": ("dsdiff-train", ["+experiment=shapes_deeplab", "data.batch_size=1"], "data.batch_size=1"),
    "max_steps": ("dsdiff-train", ["+experiment=shapes_deeplab", "max_steps=0"], "max_steps=0"),
    "alpha_beta": ("dsdiff-train", ["+experiment=shapes_deeplab", "generator.labels.alpha=0.3", "generator.labels.beta=0.6"],
                   "generator.labels.alpha=0.3 < generator.labels.beta=0.6"),
    "voc_missing": ("dsdiff-train", ["+experiment=voc_deeplab", "paths.voc=/nonexistent/voc"], "paths.voc="),
    "model_missing": ("dsdiff-train", ["+experiment=voc_deeplab", "debug=fast", "paths.voc={voc}",
                                       "generator.model=/nonexistent/model"], "generator.model=/nonexistent/model: no such folder"),
    "hub_offline": ("dsdiff-train", ["+experiment=voc_deeplab", "debug=fast", "paths.voc={voc}"],
                    "generator.model='stabilityai/stable-diffusion-2-1-base' is not in the local Hugging Face cache"),
    "wrong_experiment": ("dsdiff-train", ["+experiment=shapes_t2i"],
                         "experiment=shapes_t2i is an experiment of `python -m dsdiff.pretrain`"),
    "generate": ("dsdiff-generate", ["+experiment=shapes_deeplab", "synthetic.num_images=0"], "synthetic.num_images=0"),
    "evaluate": ("dsdiff-evaluate", ["ckpt_path=/nonexistent/last.ckpt"], "ckpt_path="),
    "score_labels": ("dsdiff-score-labels", ["+experiment=shapes_deeplab", "score.images=0"], "score.images=0"),
    "pretrain": ("dsdiff-pretrain", ["+experiment=shapes_t2i", "ckpt_path=/nonexistent/last.ckpt"], "ckpt_path="),
    "prompts": ("dsdiff-prompts", ["--dataset", "voc", "--root", "{voc}", "--captioner", "Salesforce/blip-image-captioning-large",
                                   "--out", "prompts.jsonl"], "--captioner='Salesforce/blip-image-captioning-large'"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every case at once (they are mostly start-up time), offline, each in its own folder."""
    from dsdiff.testing.folders import write_voc_folder

    voc = tmp_path_factory.mktemp("voc")
    write_voc_folder(voc)
    started = {}
    for name, (script, args, _) in CASES.items():
        work = tmp_path_factory.mktemp(name)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "DSDIFF_ROOT": str(work)}
        env.pop("HYDRA_FULL_ERROR", None)
        argv = [str(BIN / script), *(a.format(voc=voc) for a in args)]
        started[name] = (work, time.monotonic(), subprocess.Popen(argv, cwd=work, env=env, stdout=subprocess.PIPE,
                                                                   stderr=subprocess.PIPE, text=True))
    done = {}
    for name, (work, start, proc) in started.items():
        out, err = proc.communicate(timeout=300)
        done[name] = (proc.returncode, out, err, work, time.monotonic() - start)
    return done


@pytest.mark.parametrize("name", list(CASES))
def test_a_bad_setting_prints_one_block_and_exits_2(runs, name):
    rc, out, err, work, _ = runs[name]
    assert rc == 2, f"{name}: exit {rc}\n{err[-2000:]}"
    assert "dsdiff: error: " in err and CASES[name][2] in err, err[-2000:]
    assert "Traceback" not in err + out and "Set the environment variable HYDRA_FULL_ERROR" not in err
    # nothing of the run's own beyond what Hydra writes on start (.hydra/, the log file)
    written = [p for p in work.rglob("*") if p.is_file() and ".hydra" not in p.parts and p.suffix != ".log"
               and p.name != "prompts.jsonl.meta"]
    assert name in {"prompts"} or not written, written


def test_the_offline_hub_is_decided_before_any_download_is_tried(runs):
    # dsdiff's own check answered (no diffusers/huggingface_hub retry or connection message reached stderr)
    err = runs["hub_offline"][2]
    assert "HF_HUB_OFFLINE=1 forbids downloads" in err and "couldn't connect" not in err.lower()
    assert "generator.model=<local diffusers folder" in err


def _boom(cfg):
    raise SettingError("data.batch_size=1: use 2 or more")


def test_hydra_full_error_and_verbose_keep_the_traceback(monkeypatch):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(SettingError):
        exits_cleanly(_boom)({})
    monkeypatch.delenv("HYDRA_FULL_ERROR")
    with pytest.raises(SettingError):
        exits_cleanly(_boom)({"verbose": True})
    with pytest.raises(SystemExit) as stop:
        exits_cleanly(_boom)({"verbose": False})
    assert stop.value.code == 2


def test_an_unexpected_error_keeps_its_traceback(monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    def broken(cfg):
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        exits_cleanly(broken)({})


def test_a_wrapped_config_error_is_still_reported(capsys, monkeypatch):
    """Hydra's instantiate wraps a constructor's error: the ConfigError behind it is what is printed."""
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    def wrapped(cfg):
        try:
            raise MissingPathError("no PASCAL VOC 2012 folder at X: pass paths.voc=DIR")
        except ConfigError as e:
            raise RuntimeError("Error in call to target 'VOCSegmentation'") from e

    with pytest.raises(SystemExit):
        exits_cleanly(wrapped)({})
    assert capsys.readouterr().err.startswith("dsdiff: error: no PASCAL VOC 2012 folder at X: pass paths.voc=DIR\n")


def test_format_error_indents_continuation_lines():
    text = format_error(SettingError("refusing to resume D: it was run with different settings:\n  max_steps: 1 -> 2"))
    assert text.splitlines()[:2] == ["dsdiff: error: refusing to resume D: it was run with different settings:",
                                     "    max_steps: 1 -> 2"]


def test_a_gpu_trainer_without_a_gpu_is_a_setting_error(monkeypatch):
    import torch
    from omegaconf import OmegaConf

    from dsdiff.chain.config import check_devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SettingError, match="trainer.accelerator=gpu .*needs a CUDA GPU.*trainer=cpu"):
        check_devices(OmegaConf.create({"accelerator": "gpu", "devices": 8}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(SettingError, match="trainer.devices=8 asks for 8 GPUs, and torch finds 2"):
        check_devices(OmegaConf.create({"accelerator": "gpu", "devices": 8}))
    check_devices(OmegaConf.create({"accelerator": "gpu", "devices": 2}))
    check_devices(OmegaConf.create({"accelerator": "auto", "devices": 1}))


def test_an_experiment_of_another_command_is_named_before_hydra_composes():
    from dsdiff.chain.config import experiment_problem

    assert experiment_problem("train", ["+experiment=shapes_deeplab", "max_steps=5"]) is None
    assert "experiment of `python -m dsdiff.pretrain`" in experiment_problem("train", ["+experiment=shapes_t2i"])
    assert "shapes_t2i_contextual" in experiment_problem("pretrain", ["experiment=voc_deeplab"])
    assert experiment_problem("train", ["+experiment=nope"]).startswith("experiment=nope: no such experiment")
    assert experiment_problem("train", ["--config-dir", "/my/conf", "+experiment=mine"]) is None  # Hydra looks there
