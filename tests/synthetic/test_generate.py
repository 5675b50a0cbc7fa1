"""`python -m dsdiff.generate` on a tiny pipeline: resume after SIGKILL, config refusal, DDP = 1 process."""
import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from PIL import Image

from dsdiff.synthetic.dataset import SyntheticDataset
from dsdiff.synthetic.store import SyntheticStore
from dsdiff.data.voc import VOCSegmentation


def _manifest_lines(root):
    return sum(len(p.read_text().splitlines()) for p in root.glob("manifest*.jsonl"))


def _check_complete(root, n):
    store = SyntheticStore(root)
    lines = (root / "manifest.jsonl").read_text().splitlines()
    ids = [json.loads(line)["id"] for line in lines]
    assert ids == [f"{i:07d}" for i in range(n)]  # exactly N distinct ids, one line each
    assert not list(root.glob("manifest.*.jsonl"))  # shards merged
    for e in store.entries():
        with Image.open(root / e["image"]) as im:
            im.load()
            assert im.size == (32, 32)
        mask = np.array(Image.open(root / e["mask"]))
        assert set(np.unique(mask)) <= {0, 255, *e["class_ids"]}
    assert not list(root.rglob(".*.tmp*"))
    return store


def test_killed_generation_resumes_without_redoing_or_corrupting(tiny32, tmp_path, gen_cli):
    out, n = tmp_path / "syn", 8
    cmd = gen_cli.cmd(tiny32, out, tmp_path / "run1", n, "generator.batch_size=1")
    proc = subprocess.Popen(cmd, env=gen_cli.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while _manifest_lines(out) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # a real kill, mid-run
    proc.wait()
    before = _manifest_lines(out)
    assert 2 <= before < n, f"the kill came too late to test resuming ({before} of {n} done)"
    kept = {p.name: p.stat().st_ino for p in (out / "images").glob("*.png")}

    result = gen_cli.run(tiny32, out, tmp_path / "run2", n, "generator.batch_size=1")
    output = result.stdout + result.stderr  # a pipe, not a terminal: progress still shows, as log lines
    assert f"{before} of {n} samples done" in output
    assert f"generation: {n - before}/{n - before} batches (100%)" in output
    store = _check_complete(out, n)
    again = {p.name: p.stat().st_ino for p in (out / "images").glob("*.png")}
    done_first = {f"{e['id']}.png" for e in store.entries()[:before]}
    assert all(again[name] == kept[name] for name in done_first)  # finished files were not rewritten
    assert (out / "grid.png").is_file()
    assert json.loads((tmp_path / "run2" / "generation.json").read_text())["samples"] == n


def test_generation_into_a_folder_made_differently_is_refused(tiny32, tmp_path, gen_cli):
    out = tmp_path / "syn"
    gen_cli.run(tiny32, out, tmp_path / "run1", 2, "synthetic.export=voc")
    assert VOCSegmentation(out / "voc", split="train").ids == ["0000000", "0000001"]
    proc = subprocess.run(gen_cli.cmd(tiny32, out, tmp_path / "run2", 2, "generator.labels.tau=2"), env=gen_cli.env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "generator.labels.tau: 4 -> 2" in proc.stderr and "synthetic.overwrite=true" in proc.stderr
    gen_cli.run(tiny32, out, tmp_path / "run3", 3, "generator.labels.tau=2", "synthetic.overwrite=true")
    assert json.loads((out / "dataset.json").read_text())["generator"]["tau"] == 2
    assert len(SyntheticDataset(out)) == 3


@pytest.mark.slow
def test_two_process_ddp_makes_the_same_samples_as_one_process(tiny32, tmp_path, gen_cli):
    n = 5
    gen_cli.run(tiny32, tmp_path / "one", tmp_path / "run1", n, "generator.batch_size=1")
    proc = gen_cli.run(tiny32, tmp_path / "two", tmp_path / "run2", n, "generator.batch_size=1", "trainer=ddp",
                       "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
                       "trainer.sync_batchnorm=false", timeout=600)
    log = proc.stdout + proc.stderr
    assert "rank 0 wrote 3 samples" in log and "rank 1 wrote 2 samples" in log  # both ranks worked, no repeats
    one, two = SyntheticStore(tmp_path / "one"), SyntheticStore(tmp_path / "two")
    assert [e["id"] for e in one.entries()] == [e["id"] for e in two.entries()] == [f"{i:07d}" for i in range(n)]
    for a, b in zip(one.entries(), two.entries()):
        assert a["seed"] == b["seed"] and a["prompt"] == b["prompt"]
        assert np.array_equal(np.array(Image.open(one.root / a["mask"])), np.array(Image.open(two.root / b["mask"])))
        assert np.array_equal(np.array(Image.open(one.root / a["image"])), np.array(Image.open(two.root / b["image"])))


@pytest.mark.slow
def test_fewer_groups_left_than_ranks_still_finishes(tiny32, tmp_path, gen_cli):
    proc = gen_cli.run(tiny32, tmp_path / "syn", tmp_path / "run", 1, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                       "trainer.precision=32-true", "trainer.sync_batchnorm=false", timeout=300)
    assert "rank 0 wrote 1 samples" in proc.stdout + proc.stderr and "rank 1 wrote 0 samples" in proc.stdout + proc.stderr
    assert [e["id"] for e in SyntheticStore(tmp_path / "syn").entries()] == ["0000000"]
