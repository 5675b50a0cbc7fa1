"""`dsdiff.generate generator=sd3` (and `generator=flux`) on tiny random-weight folders: labelled samples whose
images are plain diffusers' for the same groups, resumable, identical under two-process DDP."""
from __future__ import annotations

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

from dsdiff.synthetic.store import SyntheticStore
from dsdiff.testing.tiny_mmdit import save_tiny_flux_pipeline, save_tiny_sd3_pipeline
from tests.synthetic.conftest import cli_env

T5_LENGTH = 32
SD3_ARGS = ["generator.num_inference_steps=2", "generator.labels.cross_res=4",
            "generator.labels.self_res=4", "generator.labels.tau=1", f"generator.max_sequence_length={T5_LENGTH}",
            "synthetic.filters.drop_empty=false", "prompts=default", "synthetic.image_format=png"]


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    return save_tiny_sd3_pipeline(tmp_path_factory.mktemp("tiny_sd3") / "pipeline", t5_length=T5_LENGTH)


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    return save_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny_flux") / "pipeline", t5_length=T5_LENGTH)


FLUX_ARGS = ("generator.height=64", "generator.width=64")


@pytest.fixture(params=["sd3", "flux"])
def family(request, tiny_sd3, tiny_flux):
    """(model folder, family, extra overrides) of each MMDiT kit."""
    if request.param == "sd3":
        return tiny_sd3, "sd3", ()
    return tiny_flux, "flux", FLUX_ARGS


def cmd(model, out, run_dir, n, *extra, family="sd3"):
    return [sys.executable, "-m", "dsdiff.generate", "+experiment=voc_deeplab", "debug=fast", f"generator={family}",
            f"generator.model={model}", f"synthetic.num_images={n}", f"synthetic.dir={out}", f"hydra.run.dir={run_dir}",
            *SD3_ARGS, *extra]


def run(*args, timeout=300, **kw):
    proc = subprocess.run(cmd(*args, **kw), env=cli_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def pixels(store, entry, key):
    return np.array(Image.open(store.root / entry[key]))


def test_sd3_generation_writes_labelled_samples_whose_images_are_plain_diffusers(tiny_sd3, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    out, n = tmp_path / "syn", 4
    run(tiny_sd3, out, tmp_path / "run", n)
    store = SyntheticStore(out)
    entries = store.entries()
    assert [e["id"] for e in entries] == [f"{i:07d}" for i in range(n)]
    recorded = json.loads((out / "dataset.json").read_text())["generator"]
    assert recorded["max_sequence_length"] == T5_LENGTH and recorded["cross_res"] == 4
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    pipe.set_progress_bar_config(disable=True)
    labelled = 0
    for group in (entries[:2], entries[2:]):  # sd3.yaml's batch_size 2: the groups one forward pass made
        images = pipe([e["prompt"] for e in group], num_inference_steps=2, guidance_scale=4.5, height=64, width=64,
                      generator=[torch.Generator().manual_seed(e["seed"]) for e in group], output_type="np",
                      max_sequence_length=T5_LENGTH).images
        for e, image in zip(group, images):
            assert np.array_equal(pixels(store, e, "image"), (image * 255).round().clip(0, 255).astype(np.uint8))
            mask = pixels(store, e, "mask")
            assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255, *e["class_ids"]}
            labelled += bool(set(np.unique(mask)) & set(e["class_ids"]))
    assert labelled >= 1  # the class maps place some class, not only background / uncertain


def test_a_blocks_setting_out_of_range_is_refused_before_anything_is_written(tiny_sd3, tmp_path):
    out = tmp_path / "syn"
    proc = subprocess.run(cmd(tiny_sd3, out, tmp_path / "run", 2, "generator.labels.blocks=[0,7]"), env=cli_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "generator.labels.blocks=[0, 7]" in proc.stderr and "0..2" in proc.stderr
    assert not (out / "dataset.json").exists()
    run(tiny_sd3, out, tmp_path / "run2", 2, "generator.labels.blocks=[0,2]")
    assert json.loads((out / "dataset.json").read_text())["generator"]["blocks"] == [0, 2]


@pytest.mark.slow
def test_killed_generation_resumes_to_the_uninterrupted_folder(family, tmp_path):
    model, name, extra = family
    n = 6
    run(model, tmp_path / "whole", tmp_path / "run0", n, "generator.batch_size=1", *extra, family=name)
    out = tmp_path / "syn"
    proc = subprocess.Popen(cmd(model, out, tmp_path / "run1", n, "generator.batch_size=1", *extra, family=name),
                            env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while (len(SyntheticStore(out).entries()) if (out / "dataset.json").exists() else 0) < 2 \
            and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = len(SyntheticStore(out).entries())
    assert 2 <= before < n, f"the kill came too late to test resuming ({before} of {n} done)"
    run(model, out, tmp_path / "run2", n, "generator.batch_size=1", *extra, family=name)
    whole, resumed = SyntheticStore(tmp_path / "whole"), SyntheticStore(out)
    assert [e["id"] for e in resumed.entries()] == [e["id"] for e in whole.entries()]
    for a, b in zip(whole.entries(), resumed.entries()):
        for key in ("image", "mask"):
            assert np.array_equal(pixels(whole, a, key), pixels(resumed, b, key))


@pytest.mark.slow
def test_two_process_generation_makes_the_one_process_folder(family, tmp_path):
    model, name, extra = family
    n = 4
    run(model, tmp_path / "one", tmp_path / "run1", n, "generator.batch_size=1", *extra, family=name)
    run(model, tmp_path / "two", tmp_path / "run2", n, "generator.batch_size=1", "trainer=ddp",
        "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true", "trainer.sync_batchnorm=false",
        *extra, family=name, timeout=600)
    one, two = SyntheticStore(tmp_path / "one"), SyntheticStore(tmp_path / "two")
    assert [e["id"] for e in one.entries()] == [e["id"] for e in two.entries()]
    for a, b in zip(one.entries(), two.entries()):
        for key in ("image", "mask"):
            assert np.array_equal(pixels(one, a, key), pixels(two, b, key))


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_score_labels_scores_real_images_with_an_mmdit_generator(name, tiny_sd3, tiny_flux, tmp_path):
    model = tiny_sd3 if name == "sd3" else tiny_flux
    proc = subprocess.run([sys.executable, "-m", "dsdiff.score_labels", "+experiment=shapes_deeplab", f"generator={name}",
                           f"generator.model={model}", "generator.height=64", "generator.width=64",
                           "generator.labels.cross_res=4", "generator.labels.self_res=4", f"generator.max_sequence_length={T5_LENGTH}",
                           "score.images=4", "score.batch_size=2", "score.timesteps=[300,600]",
                           f"score.dir={tmp_path / 'results'}", f"hydra.run.dir={tmp_path / 'run'}",
                           f"paths.log_dir={tmp_path / 'logs'}", "logger=csv"],
                          env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "label_scores.json").read_text())
    assert result["labels/images"] == 4 and 0.0 <= result["labels/mIoU"] <= 1.0, result
    assert result["groups_scored_now"] == 2 and (tmp_path / "run" / "label_overlay.png").is_file()
    rows = [json.loads(line) for line in (Path(result["results_dir"]) / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all((Path(result["results_dir"]) / "labels" / f"{r['name']}.png").is_file() for r in rows)


def test_flux_generation_writes_labelled_samples_whose_images_are_plain_diffusers(tiny_flux, tmp_path):
    from diffusers import FluxPipeline

    model = tiny_flux
    out, n = tmp_path / "syn", 2
    proc = subprocess.run(cmd(model, out, tmp_path / "run", n, *FLUX_ARGS, family="flux"), env=cli_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    store = SyntheticStore(out)
    entries = store.entries()
    assert json.loads((out / "dataset.json").read_text())["generator"]["guidance_scale"] == 0.0  # flux.yaml's
    pipe = FluxPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    images = pipe([e["prompt"] for e in entries], num_inference_steps=2, guidance_scale=0.0, height=64, width=64,
                  generator=[torch.Generator().manual_seed(e["seed"]) for e in entries], output_type="np",
                  max_sequence_length=T5_LENGTH).images
    for e, image in zip(entries, images):
        assert np.array_equal(pixels(store, e, "image"), (image * 255).round().clip(0, 255).astype(np.uint8))
        assert set(np.unique(pixels(store, e, "mask"))) <= {0, 255, *e["class_ids"]}
