"""Fixtures for the synthetic-dataset tests: a tiny 32px pipeline on disk and a CLI runner."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsdiff.testing.tiny_sd import save_tiny_pipeline

# 32px images (16x16 latent): attention at 16x16 and 8x8
GEN_ARGS = ["generator.num_inference_steps=2", "generator.labels.cross_res=8", "generator.labels.self_res=16",
            "generator.labels.alpha=0.55", "generator.labels.beta=0.45", "synthetic.filters.drop_empty=false",
            "prompts=default",  # class templates: no captioner offline
            "synthetic.image_format=png"]  # lossless images (the VOC recipe's own are JPEG at quality 75)


@pytest.fixture(scope="session")
def tiny32(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny32") / "pipeline", image_size=32)


def cli_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}


def generate_cmd(model: Path, out: Path, run_dir: Path, n: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dsdiff.generate", "+experiment=voc_deeplab", "debug=fast", f"generator.model={model}",
            f"synthetic.num_images={n}", f"synthetic.dir={out}", f"hydra.run.dir={run_dir}", *GEN_ARGS, *extra]


def run_generate(model: Path, out: Path, run_dir: Path, n: int, *extra: str, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(generate_cmd(model, out, run_dir, n, *extra), env=cli_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


class GenerateCLI:
    env = staticmethod(cli_env)
    cmd = staticmethod(generate_cmd)
    run = staticmethod(run_generate)


@pytest.fixture
def gen_cli():
    """``gen_cli.cmd(...)`` / ``gen_cli.run(...)``: the generate command line, and running it to success."""
    return GenerateCLI


@pytest.fixture
def gen_inproc(make_cfg, tiny32):
    """``gen_inproc(out, n, *overrides)``: run ``dsdiff.generate.generate`` in this process (no CLI start-up)."""
    from dsdiff.generate import generate

    def _cfg(out: Path, n: int, *extra: str):
        return make_cfg(["+experiment=voc_deeplab", "trainer=cpu", "logger=csv", f"generator.model={tiny32}",
                         f"synthetic.num_images={n}", f"synthetic.dir={out}", *GEN_ARGS, *extra])

    def _run(out: Path, n: int, *extra: str) -> dict:
        return generate(_cfg(out, n, *extra))

    _run.cfg = _cfg
    return _run
