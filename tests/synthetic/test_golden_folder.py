"""A generated folder stays bit-identical across refactors: digests recorded before a change, compared after.

``DSDIFF_RECORD_GOLDEN=1 pytest tests/synthetic/test_golden_folder.py`` records them anew (only when a
change is meant to alter the samples; say so in the commit). Floating-point kernels differ between torch
builds and CPU instruction sets, so the comparison runs where the recording was made (same torch version
and CPU capability) and is skipped, with the reason, elsewhere.
"""
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from dsdiff.chain.config import asset_path

GOLDEN = Path(__file__).with_name("golden_folders.json")


def folder_digests(root: Path) -> dict[str, str]:
    """sha256 of dataset.json, of every image and mask (by name), and of the manifest's sample fields."""
    out = {"dataset.json": hashlib.sha256((root / "dataset.json").read_bytes()).hexdigest()}
    for sub in ("images", "masks"):
        h = hashlib.sha256()
        for path in sorted((root / sub).iterdir()):
            h.update(path.name.encode() + b"\0" + path.read_bytes())
        out[sub] = h.hexdigest()
    rows = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines() if line.strip()]
    # "time" is when it was written, "model" the path it was loaded from (dataset.json has its digest)
    fields = json.dumps([{k: v for k, v in r.items() if k not in ("time", "model")} for r in rows], sort_keys=True)
    out["manifest"] = hashlib.sha256(fields.encode()).hexdigest()
    out["samples"] = str(len(rows))
    return out


def environment() -> dict[str, str]:
    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability()}


CASES = {
    # the shapes world's shipped pixel-space model, 3 groups of 4 ids
    "shapes": lambda tiny32: ["+experiment=shapes_deeplab", f"generator.model={asset_path('shapes_t2i')}",
                              "generator.batch_size=4", "prompts=default"],
    # a tiny random Stable Diffusion layout (VAE, VOC classes), 2 groups of 4 ids and one of 2
    "tiny_sd_voc": lambda tiny32: ["+experiment=voc_deeplab", "debug=fast", f"generator.model={tiny32}",
                                   "generator.num_inference_steps=2", "generator.labels.cross_res=8",
                                   "generator.labels.self_res=16", "generator.labels.alpha=0.55", "generator.labels.beta=0.45", "synthetic.filters.drop_empty=false",
                                   "prompts=default",
                                   # as recorded: no negative prompt, PNG images (the recipe's are the original's, JPEG)
                                   "generator.negative_prompt=null", "synthetic.image_format=png"],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_generated_folder_is_bit_identical_to_the_recorded_one(case, tiny32, gen_cli, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "synthetic"
    cmd = [sys.executable, "-m", "dsdiff.generate", *CASES[case](tiny32), "synthetic.num_images=10",
           f"synthetic.dir={out}", f"hydra.run.dir={tmp_path / 'run'}", "logger=csv", "trainer=cpu"]
    proc = subprocess.run(cmd, env=gen_cli.env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = folder_digests(out)
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
    if os.environ.get("DSDIFF_RECORD_GOLDEN") == "1":
        golden.setdefault("environment", environment())
        assert golden["environment"] == environment(), "record all cases in one environment"
        golden[case] = got
        GOLDEN.write_text(json.dumps(golden, indent=2, sort_keys=True) + "\n")
        return
    assert case in golden, f"no recorded digests for {case}: run with DSDIFF_RECORD_GOLDEN=1 once"
    if golden["environment"] != environment():
        pytest.skip(f"recorded on {golden['environment']}, this is {environment()}: float kernels differ")
    assert got == golden[case]
