"""On-the-fly generation: distinct seeds across workers, write-through, and training on it."""
import itertools

import pytest

import torch
from torch.utils.data import DataLoader

from dsdiff.data.classes import VOC_CLASSES
from dsdiff.data.datamodule import pad_collate
from dsdiff.synthetic.dataset import OnTheFlySynthetic, SyntheticDataset, synthetic_train_set
from dsdiff.synthetic.store import SyntheticStore

GEN = {"model": None, "dtype": "fp32", "num_inference_steps": 2, "batch_size": 2,
       "labels": {"cross_res": 8, "self_res": 16, "alpha": 0.55, "beta": 0.45}}


def _synthetic(tmp_path, **kw):
    return {"dir": str(tmp_path / "syn"), "seed": 100, "prompts": None, "template": "a photo of {}", "mode": "on_the_fly",
            "filters": {"drop_empty": False}, "image_format": "png", **kw}


def test_two_workers_draw_distinct_samples(tiny32, tmp_path):
    data = OnTheFlySynthetic({**GEN, "model": str(tiny32)}, _synthetic(tmp_path), VOC_CLASSES)
    loader = DataLoader(data, batch_size=None, num_workers=2)
    items = list(itertools.islice(iter(loader), 8))
    names = [item["name"] for item in items]
    assert len(set(names)) == 8
    # worker 0 makes groups 0, 2, ... (ids 0-1, 4-5), worker 1 groups 1, 3, ... (ids 2-3, 6-7): together the first ids
    assert sorted(names) == [f"{i:07d}" for i in range(8)]
    images = torch.stack([item["image"].float() for item in items])
    diffs = [(images[i] - images[j]).abs().mean() for i in range(8) for j in range(i + 1, 8)]
    assert min(diffs) > 1  # different seeds, different images


def test_write_through_caches_and_a_restart_reads_back(tiny32, tmp_path):
    synthetic = _synthetic(tmp_path, write_through=True)
    first = list(itertools.islice(iter(OnTheFlySynthetic({**GEN, "model": str(tiny32)}, synthetic, VOC_CLASSES)), 4))
    store = SyntheticStore(synthetic["dir"])
    assert {e["id"] for e in store.entries()} == {f"{i:07d}" for i in range(4)}
    assert store.entries()[0]["seed"] == 100

    def no_generation(device):
        raise AssertionError("cached samples must be read, not generated")

    again = OnTheFlySynthetic({**GEN, "model": str(tiny32)}, synthetic, VOC_CLASSES, generator_factory=no_generation)
    second = list(itertools.islice(iter(again), 4))
    for a, b in zip(first, second):
        assert a["name"] == b["name"] and torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert len(SyntheticDataset(synthetic["dir"])) == 4  # the cache is a regular synthetic folder


def test_train_set_factory_picks_the_mode(tiny32, tmp_path):
    stream = synthetic_train_set(_synthetic(tmp_path), {**GEN, "model": str(tiny32)}, "voc")
    assert isinstance(stream, OnTheFlySynthetic) and stream.num_classes == 21
    batch = pad_collate(list(itertools.islice(iter(stream), 2)))
    assert batch["image"].shape == (2, 3, 32, 32) and batch["mask"].shape == (2, 32, 32)


def test_write_through_with_a_bad_model_leaves_no_folder(tmp_path):
    synthetic = _synthetic(tmp_path, write_through=True)
    data = OnTheFlySynthetic({**GEN, "model": str(tmp_path / "nowhere")}, synthetic, VOC_CLASSES)
    with pytest.raises(FileNotFoundError, match="generator.model=.*: no such folder"):
        next(iter(data))
    assert not (tmp_path / "syn").exists()


def test_stream_and_cached_writer_store_the_same_sample_the_same_way(gen_inproc, tmp_path):
    from dsdiff.utils.config import to_plain

    cached, streamed = tmp_path / "cached", tmp_path / "streamed"
    gen_inproc(cached, 4, "generator.batch_size=2", "synthetic.filters.drop_empty=true", "synthetic.max_dropped=1")
    cfg = gen_inproc.cfg(streamed, 4, "generator.batch_size=2", "synthetic.filters.drop_empty=true")
    synthetic = {**to_plain(cfg.synthetic), "mode": "on_the_fly", "write_through": True}
    stream = OnTheFlySynthetic(to_plain(cfg.generator), synthetic, VOC_CLASSES)
    list(itertools.islice(iter(stream), 4 - len(SyntheticStore(cached).dropped())))  # ids 0-3, as the cached run made them

    def rows(root):
        store = SyntheticStore(root)
        kept = {e["id"]: {k: v for k, v in e.items() if k != "time"} for e in store.entries()}
        dropped = {d["id"]: {k: v for k, v in d.items() if k != "time"} for d in store.dropped()}
        return kept, dropped

    assert rows(streamed) == rows(cached)  # same fields (record_id, class_ids, thresholds, ...) and values
    assert len(rows(cached)[0]) >= 1 and "record_id" in next(iter(rows(cached)[0].values()))
    assert SyntheticStore(streamed).read_config() == SyntheticStore(cached).read_config()
    for sub in ("images", "masks"):
        for path in sorted((cached / sub).iterdir()):
            assert (streamed / sub / path.name).read_bytes() == path.read_bytes()
