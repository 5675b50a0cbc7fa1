"""Bad generator / synthetic settings stop generation before any file is written, naming the key."""
from __future__ import annotations

import subprocess
import sys

import pytest

CASES = [
    ("generator.num_inference_steps=0", "generator.num_inference_steps"),
    ("generator.num_inference_steps=abc", "generator.num_inference_steps"),
    ("generator.batch_size=0", "generator.batch_size"),
    ("generator.guidance_scale=-3", "generator.guidance_scale"),
    ("generator.guidance_scale=abc", "generator.guidance_scale"),
    ("generator.height=100", "generator.height"),
    ("generator.labels.alpha=abc", "generator.labels.alpha"),
    ("generator.labels.window=[a,1]", "generator.labels.window"),
    ("synthetic.seed=abc", "synthetic.seed"),
]


def _generate(tmp_path, *overrides):
    cmd = [sys.executable, "-m", "dsdiff.generate", "+experiment=shapes_deeplab", "debug=fast",
           f"synthetic.dir={tmp_path / 's'}", f"hydra.run.dir={tmp_path / 'run'}", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(("override", "key"), CASES)
def test_bad_generator_setting_writes_nothing(tmp_path, override, key):
    result = _generate(tmp_path, override)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"dsdiff: error: {key}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "s" / "dataset.json").exists()


def test_corrected_rerun_succeeds(tmp_path):
    assert _generate(tmp_path, "generator.num_inference_steps=0").returncode == 2
    result = _generate(tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "s" / "dataset.json").exists()


def test_data_batch_size_not_a_number_names_the_key(tmp_path):
    cmd = [sys.executable, "-m", "dsdiff.train", "+experiment=shapes_deeplab", "debug=fast", "data.batch_size=abc",
           f"synthetic.dir={tmp_path / 's'}", f"hydra.run.dir={tmp_path / 'run'}"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "dsdiff: error: data.batch_size='abc'" in result.stderr
    assert not (tmp_path / "s").exists()
