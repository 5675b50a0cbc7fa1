"""A finished synthetic folder is used as it is: no model, no captioner, only a real mismatch refused."""
import json
import subprocess
import sys

from tests.synthetic.conftest import GEN_ARGS


def _reuse_cmd(out, run_dir, n, *extra):
    """The generate command a user runs on a finished folder, without repeating the model or the prompts:
    +experiment=voc_deeplab's own model is a hub id and its prompts come from the captioner, both offline here."""
    args = [a for a in GEN_ARGS if not a.startswith("prompts=")]
    return [sys.executable, "-m", "dsdiff.generate", "+experiment=voc_deeplab", "debug=fast", f"synthetic.num_images={n}",
            f"synthetic.dir={out}", f"hydra.run.dir={run_dir}", *args, *extra]


def test_a_finished_folder_is_used_without_the_model_or_the_captioner(tiny32, tmp_path, gen_cli):
    out = tmp_path / "syn"
    gen_cli.run(tiny32, out, tmp_path / "run1", 3)
    before = {p.name: p.stat().st_mtime_ns for p in sorted((out / "images").glob("*"))}
    proc = subprocess.run(_reuse_cmd(out, tmp_path / "run2", 3), env=gen_cli.env(), capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    assert "holds all 3 samples (made by pipeline" in text and "the captioner are not loaded" in text
    assert "generator.model 'stabilityai/stable-diffusion-2-1-base' is not the folder's" in text
    assert json.loads((tmp_path / "run2" / "generation.json").read_text())["samples"] == 3
    assert {p.name: p.stat().st_mtime_ns for p in sorted((out / "images").glob("*"))} == before  # nothing rewritten

    # a real mismatch is refused with today's key name; a larger num_images is generation work (it needs the model)
    proc = subprocess.run(_reuse_cmd(out, tmp_path / "run3", 3, "generator.labels.tau=2"), env=gen_cli.env(),
                          capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "generator.labels.tau: 4 -> 2" in text and "Traceback" not in text, text[-3000:]
    proc = subprocess.run(_reuse_cmd(out, tmp_path / "run4", 3, f"generator.model={tmp_path / 'other'}"), env=gen_cli.env(),
                          capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "generator.model" in text, text[-3000:]  # a model named on the command line is compared
