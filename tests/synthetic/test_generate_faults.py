"""Generation under faults: bad settings fail before any write, broken files are redone, a resumed
folder is bit-identical to an uninterrupted one, a finished folder is finished, bad folders are named."""
import errno
import json
import logging
import shutil

import numpy as np
import pytest
from PIL import Image

from dsdiff.synthetic.dataset import SyntheticDataset
from dsdiff.synthetic.store import SyntheticStore
from dsdiff.utils.errors import ConfigError


def _files(root):
    """Every image and mask of a folder, as bytes, by relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for sub in ("images", "masks") for p in sorted((root / sub).glob("*"))}


def _drop(root, ids):
    """Simulate a run killed before ``ids`` were made: remove their files and manifest lines."""
    for sid in ids:
        (root / "images" / f"{sid}.png").unlink()
        (root / "masks" / f"{sid}.png").unlink()
    manifest = root / "manifest.jsonl"
    lines = [line for line in manifest.read_text().splitlines() if json.loads(line)["id"] not in ids]
    manifest.write_text("".join(line + "\n" for line in lines))


def _without_letter_v(src, dst):
    """A copy of a pipeline whose tokenizer has no 'v' (so VOC's 'tv monitor' cannot be placed)."""
    shutil.copytree(src, dst)
    path = dst / "tokenizer" / "tokenizer.json"
    spec = json.loads(path.read_text())
    bpe = spec["model"]
    bpe["vocab"] = {k: i for k, i in bpe["vocab"].items() if "v" not in k.replace("</w>", "")}
    bpe["merges"] = [m for m in bpe["merges"] if not any("v" in part.replace("</w>", "") for part in m)]
    path.write_text(json.dumps(spec))
    return dst


@pytest.mark.parametrize("case", ["missing_model", "missing_folder", "not_a_pipeline", "unknown_scheduler", "alpha_below_beta",
                                  "negative_tau", "unplaceable_class", "weights_fail_to_load", "jpeg_quality", "negative_prompt"])
def test_a_failed_generation_writes_nothing_and_the_corrected_rerun_succeeds(case, gen_inproc, tiny32, tmp_path):
    out = tmp_path / "syn"
    if case == "not_a_pipeline":
        (tmp_path / "folder").mkdir()
        (tmp_path / "folder" / "notes.txt").write_text("hello")
    broken = tmp_path / "broken"
    if case == "weights_fail_to_load":  # config and tokenizer fine, the UNet weights gone
        shutil.copytree(tiny32, broken)
        for weights in (broken / "unet").glob("diffusion_pytorch_model*"):
            weights.unlink()
    if case == "unplaceable_class":
        _without_letter_v(tiny32, tmp_path / "nov")
    bad, error = {
        "missing_model": (["generator.model=nope"], "generator.model='nope' is not in the local Hugging Face cache"),
        "missing_folder": ([f"generator.model={tmp_path / 'nowhere'}"], "generator.model=.*nowhere: no such folder"),
        "not_a_pipeline": ([f"generator.model={tmp_path / 'folder'}"], "no Stable Diffusion weights at"),
        "unknown_scheduler": (["generator.scheduler=heun2"], "unknown scheduler 'heun2' \\(generator.scheduler\\)"),
        "alpha_below_beta": (["generator.labels.alpha=0.3"], "generator.labels.alpha=0.3 < generator.labels.beta=0.45"),
        "negative_tau": (["generator.labels.tau=-1"], "generator.labels.tau=-1"),
        "unplaceable_class": ([f"generator.model={tmp_path / 'nov'}"], "class name 'tvmonitor'"),
        "weights_fail_to_load": ([f"generator.model={broken}"], "could not load the pipeline"),
        "jpeg_quality": (["synthetic.image_format=jpg", "synthetic.jpeg_quality=0"], "synthetic.jpeg_quality=0"),
        "negative_prompt": (["generator.negative_prompt=5"], "generator.negative_prompt=5"),
    }[case]
    with pytest.raises(ConfigError, match=error):
        gen_inproc(out, 2, *bad)
    assert not out.exists()  # no folder, no dataset.json: nothing to refuse the corrected run with
    summary = gen_inproc(out, 2)
    assert summary["samples"] == 2 and len(SyntheticDataset(out)) == 2


def test_empty_and_truncated_files_are_made_again_identically(gen_inproc, tmp_path, caplog):
    out = tmp_path / "syn"
    gen_inproc(out, 4, "generator.batch_size=2")
    before = _files(out)
    (out / "images" / "0000001.png").write_bytes(b"")  # a 0-byte image
    mask = out / "masks" / "0000002.png"
    mask.write_bytes(mask.read_bytes()[:-30])  # a mask cut short
    with caplog.at_level(logging.INFO, logger="dsdiff"):
        gen_inproc(out, 4, "generator.batch_size=2")
    assert "2 finished samples have a broken file" in caplog.text and "0000001.png is empty (0 bytes)" in caplog.text
    assert "2 of 4 samples done, 2 to generate (2 groups" in caplog.text
    assert _files(out) == before  # both groups made again, bit for bit
    assert len(SyntheticDataset(out)) == 4


def test_resumed_and_extended_folders_equal_an_uninterrupted_one_bit_for_bit(gen_inproc, tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    gen_inproc(whole, 7, "generator.batch_size=3")  # groups 0-2, 3-5, 6
    gen_inproc(resumed, 4, "generator.batch_size=3")  # a smaller run: its last group is 3 alone
    _drop(resumed, ["0000001", "0000002"])  # killed mid-way: a hole in the first group
    gen_inproc(resumed, 7, "generator.batch_size=3")  # resume and extend to 7
    a, b = _files(whole), _files(resumed)
    assert sorted(a) == sorted(b) and len(a) == 14
    # (batching the missing ids as they come, 1-2-4 / 5-6, changes labels: batch mates round differently)
    assert [k for k in a if a[k] != b[k]] == []
    assert [e["id"] for e in SyntheticStore(resumed).entries()] == [f"{i:07d}" for i in range(7)]


def test_a_rerun_with_nothing_left_merges_the_shards_and_draws_the_grid(gen_inproc, tmp_path, monkeypatch):
    out = tmp_path / "syn"
    gen_inproc(out, 3)
    (out / "manifest.jsonl").rename(out / "manifest.rank0.jsonl")  # killed before the merge
    (out / "grid.png").unlink()

    from dsdiff.synthetic.predict import GenerationModule

    def no_weights(self, device):
        raise AssertionError("a finished folder must not load the pipeline")

    monkeypatch.setattr(GenerationModule, "build_generator", no_weights)
    summary = gen_inproc(out, 3)
    assert summary["samples"] == 3 and summary["grid"] == str(out / "grid.png")
    assert (out / "grid.png").is_file() and not list(out.glob("manifest.*.jsonl"))
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize("n", [0, -3])
def test_num_images_below_one_is_refused(gen_inproc, tmp_path, n):
    with pytest.raises(ValueError, match=f"synthetic.num_images={n}"):
        gen_inproc(tmp_path / "syn", n)
    assert not (tmp_path / "syn").exists()


def test_synthetic_dir_that_cannot_be_a_folder_is_named(gen_inproc, tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError, match=f"synthetic.dir={tmp_path / 'afile'} is a file"):
        gen_inproc(tmp_path / "afile", 2)
    with pytest.raises(NotADirectoryError, match=f"lies under the file {tmp_path / 'afile'}"):
        gen_inproc(tmp_path / "afile" / "sub" / "syn", 2)
    import dsdiff.synthetic.store as store

    readonly = tmp_path / "ro"
    readonly.mkdir()
    # root ignores permission bits, so the check os.access makes (true for a read-only mount too) is simulated
    monkeypatch.setattr(store.os, "access", lambda path, mode: path != readonly)
    with pytest.raises(PermissionError, match=f"synthetic.dir={readonly / 'syn'}: {readonly} is not writable"):
        gen_inproc(readonly / "syn", 2)
    assert list(readonly.iterdir()) == []


def test_a_full_disk_names_the_folder_and_the_rerun_finishes(gen_inproc, tmp_path, monkeypatch):
    out = tmp_path / "syn"
    real = SyntheticStore.write_sample
    calls = []

    def fills_up(self, sid, *args, **kwargs):
        calls.append(sid)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, sid, *args, **kwargs)

    monkeypatch.setattr(SyntheticStore, "write_sample", fills_up)
    with pytest.raises(OSError, match=f"could not write sample 0000002 into synthetic.dir={out}.*No space left.*rerun"):
        gen_inproc(out, 4, "generator.batch_size=2")
    monkeypatch.setattr(SyntheticStore, "write_sample", real)
    assert gen_inproc(out, 4, "generator.batch_size=2")["samples"] == 4


def test_moving_the_model_keeps_the_cache_and_changed_weights_are_refused(gen_inproc, tiny32, tmp_path):
    out = tmp_path / "syn"
    gen_inproc(out, 2)
    moved = shutil.copytree(tiny32, tmp_path / "elsewhere" / tiny32.name)
    assert gen_inproc(out, 2, f"generator.model={moved}")["samples"] == 2  # same name and weights: same cache
    weights = next((moved / "unet").glob("diffusion_pytorch_model*"))
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # one weight byte changed
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="different configuration.*generator.model.digest"):
        gen_inproc(out, 2, f"generator.model={moved}")
    recorded = json.loads((out / "dataset.json").read_text())["generator"]["model"]
    assert recorded["name"] == tiny32.name and str(tiny32.parent) not in json.dumps(recorded)


def test_progress_lines_reach_a_log_file(gen_inproc, tmp_path):
    log_file = tmp_path / "gen.log"
    handler = logging.FileHandler(log_file)
    logger = logging.getLogger("dsdiff")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        gen_inproc(tmp_path / "syn", 5, "generator.batch_size=1")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    lines = [line for line in log_file.read_text().splitlines() if line.startswith("generation: ")]
    assert [line.split(" batches")[0] for line in lines] == [f"generation: {k}/5" for k in range(1, 6)]
    assert "(100%)" in lines[-1] and "/s, ETA" in lines[-1]


def test_hf_export_loads_back_with_the_same_pixels(gen_inproc, tmp_path):
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "syn"
    summary = gen_inproc(out, 3, "synthetic.export=hf", "generator.labels.tau=2")
    assert summary["export"] == str(out / "hf")
    ds = datasets.load_dataset(str(out / "hf"), split="train", cache_dir=str(tmp_path / "cache"))
    store = SyntheticStore(out)
    assert ds["id"] == [e["id"] for e in store.entries()] == ["0000000", "0000001", "0000002"]
    for row, entry in zip(ds, store.entries()):
        assert np.array_equal(np.asarray(row["image"]), np.asarray(Image.open(out / entry["image"])))
        assert np.array_equal(np.asarray(row["label"]), np.asarray(Image.open(out / entry["mask"])))
        assert (row["prompt"], row["class_ids"], row["seed"]) == (entry["prompt"], entry["class_ids"], entry["seed"])
    card = (out / "hf" / "README.md").read_text()
    assert '"tau": 2' in card and "tvmonitor" in card and "data/train-" in card
    # a re-export with other content loads as itself: `datasets` keys its cache of a local folder on the
    # card's file pattern, so the shards carry a content digest (seen: a stale cache returned old masks)
    other = tmp_path / "other"
    gen_inproc(other, 2, "synthetic.export=hf", "generator.labels.tau=1")
    again = datasets.load_dataset(str(other / "hf"), split="train", cache_dir=str(tmp_path / "cache"))
    first = datasets.load_dataset(str(out / "hf"), split="train", cache_dir=str(tmp_path / "cache"))
    assert again["id"] == ["0000000", "0000001"] and first["id"] == ["0000000", "0000001", "0000002"]


def test_a_folder_from_before_groups_and_digests_is_adopted_when_nothing_else_differs(gen_inproc, tiny32, tmp_path):
    out = tmp_path / "syn"
    gen_inproc(out, 2)
    path = out / "dataset.json"
    current = json.loads(path.read_text())
    legacy = json.loads(path.read_text())
    legacy["generator"]["model"] = str(tiny32)  # how older versions recorded it
    del legacy["generator"]["batch_size"]
    path.write_text(json.dumps(legacy))
    with pytest.raises(ValueError, match="generator.labels.tau: 4 -> 2"):
        gen_inproc(out, 2, "generator.labels.tau=2")
    assert json.loads(path.read_text()) == legacy  # not adopted by a run that differs
    assert gen_inproc(out, 3)["samples"] == 3
    assert json.loads(path.read_text()) == current


def test_generation_with_progress_bars_turned_off(gen_inproc, tmp_path):
    """trainer.enable_progress_bar=false: Lightning refuses a progress-bar callback, so none is added."""
    summary = gen_inproc(tmp_path / "syn", 2, "+trainer.enable_progress_bar=false")
    assert summary["samples"] + summary["dropped"] == 2
