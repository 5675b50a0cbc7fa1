"""The synthetic folder format: atomic writes, resume bookkeeping, config checks, reading, export."""
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from dsdiff.data.classes import VOC_CLASSES
from dsdiff.synthetic.dataset import SyntheticDataset
from dsdiff.synthetic.export import export_voc
from dsdiff.synthetic.spec import sample_id
from dsdiff.synthetic.store import SyntheticStore, filter_reason
from dsdiff.data.transforms import TrainTransform
from dsdiff.data.voc import VOCSegmentation

CONFIG = {"class_names": list(VOC_CLASSES), "generator": {"model": "tiny", "tau": 4}, "seed": 0}


def _sample(i: int, size: int = 24):
    rng = np.random.default_rng(i)
    label = np.zeros((size, size), np.uint8)
    label[4:12, 4:12] = 1 + i % 20
    label[12:14] = 255
    image = np.empty((size, size, 3), np.uint8)
    image[:] = rng.integers(0, 255, 3)
    image[label == 1 + i % 20] = rng.integers(0, 255, 3)  # flat regions: JPEG keeps them close
    return image, label


def _fill(store: SyntheticStore, ids, tag="rank0", image_format="png"):
    for i in ids:
        image, label = _sample(i)
        store.write_sample(sample_id(i), image, label, {"seed": i, "class_ids": [1 + i % 20]}, tag=tag, image_format=image_format)


def test_written_samples_read_back_exactly(tmp_path):
    store = SyntheticStore(tmp_path / "syn")
    store.prepare(CONFIG)
    _fill(store, range(3))
    data = SyntheticDataset(store.root)
    assert len(data) == 3 and data.classes == VOC_CLASSES and data.num_classes == 21
    item = data[1]
    image, label = _sample(1)
    assert item["name"] == "0000001"
    assert torch.equal(item["image"], torch.from_numpy(image).permute(2, 0, 1))
    assert torch.equal(item["mask"], torch.from_numpy(label).long())
    with Image.open(store.root / "masks" / "0000001.png") as im:
        assert im.mode == "P"  # palette PNG, as VOC
    entry = store.entries()[1]
    assert entry["seed"] == 1 and entry["image"] == "images/0000001.png"
    assert entry["uncertain"] == pytest.approx(2 * 24 / 24**2, abs=1e-4)
    assert not list(store.root.rglob(".*.tmp*"))  # no temporary file left


def test_torn_manifest_line_is_ignored_then_cut_before_appending(tmp_path):
    store = SyntheticStore(tmp_path / "syn")
    store.prepare(CONFIG)
    _fill(store, range(2))
    shard = store.root / "manifest.rank0.jsonl"
    with shard.open("a") as f:
        f.write('{"id": "0000002", "ima')  # a writer killed mid-line
    assert store.done_ids() == {"0000000", "0000001"}
    fresh = SyntheticStore(store.root)  # the restarted run
    _fill(fresh, [2])
    lines = shard.read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["id"] for line in lines)
    assert fresh.done_ids() == {"0000000", "0000001", "0000002"}


def test_sample_without_its_manifest_line_or_files_is_not_done(tmp_path):
    store = SyntheticStore(tmp_path / "syn")
    store.prepare(CONFIG)
    _fill(store, range(3))
    (store.root / "images" / "0000001.png").unlink()
    image, label = _sample(7)
    Image.fromarray(image).save(store.root / "images" / "0000007.png")  # files but no manifest line
    assert store.done_ids() == {"0000000", "0000002"}


def test_a_folder_made_differently_is_refused_unless_overwritten(tmp_path):
    store = SyntheticStore(tmp_path / "syn")
    store.prepare(CONFIG)
    _fill(store, range(2))
    other = {**CONFIG, "generator": {"model": "tiny", "tau": 2}}
    with pytest.raises(ValueError, match=r"generator.labels.tau: 4 -> 2.*synthetic.overwrite=true"):
        store.prepare(other)
    store.prepare(CONFIG)  # the same configuration resumes
    assert len(store.done_ids()) == 2
    store.prepare(other, overwrite=True)
    assert store.done_ids() == set() and json.loads(store.config_path.read_text())["generator"]["tau"] == 2


def test_shards_of_several_ranks_are_read_together_and_compacted(tmp_path):
    store = SyntheticStore(tmp_path / "syn")
    store.prepare(CONFIG)
    _fill(store, [0, 2, 4], tag="rank0")
    _fill(store, [1, 3], tag="rank1")
    store.write_dropped(sample_id(5), "no_foreground", {"seed": 5}, tag="rank1")
    assert [e["id"] for e in store.entries()] == [sample_id(i) for i in range(5)]
    assert store.compact() == 5
    assert not list(store.root.glob("manifest.*.jsonl")) and not list(store.root.glob("dropped.*.jsonl"))
    assert len((store.root / "manifest.jsonl").read_text().splitlines()) == 5
    assert store.done_ids() == {sample_id(i) for i in range(6)}  # the dropped one is not redone
    assert len(SyntheticDataset(store.root)) == 5


def test_corrupt_and_missing_files_are_skipped_with_their_path(tmp_path, caplog):
    store = SyntheticStore(tmp_path / "syn")
    store.prepare(CONFIG)
    _fill(store, range(4))
    (store.root / "masks" / "0000003.png").unlink()
    data = SyntheticDataset(store.root)
    assert len(data) == 3  # missing file: left out when opening
    (store.root / "images" / "0000001.png").write_bytes(b"not a png")
    with caplog.at_level(logging.WARNING, logger="dsdiff"):
        names = [data[i]["name"] for i in range(len(data))]
    assert names == ["0000000", "0000002", "0000002"]  # the corrupt one replaced by the next good one
    assert data.skipped == 1 and "0000001" in caplog.text


def test_reader_applies_the_training_transforms(tmp_path):
    store = SyntheticStore(tmp_path / "syn")
    store.prepare(CONFIG)
    _fill(store, range(2))
    data = SyntheticDataset(store.root, transform=TrainTransform(crop_size=16, scale_range=(1.0, 1.0), photometric=False))
    item = data[0]
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert set(item["mask"].unique().tolist()) <= {0, 1, 255}


def test_missing_folder_error_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m dsdiff.generate"):
        SyntheticDataset(tmp_path / "nothing")


@pytest.mark.parametrize("image_format", ["png", "jpg"])
def test_voc_export_is_read_by_the_voc_dataset(tmp_path, image_format):
    store = SyntheticStore(tmp_path / "syn")
    store.prepare(CONFIG)
    _fill(store, range(3), image_format=image_format)
    root = export_voc(store.root)
    voc = VOCSegmentation(root, split="train")
    assert voc.ids == ["0000000", "0000001", "0000002"]
    for i, name in enumerate(voc.ids):
        item = voc[i]
        image, label = _sample(i)
        assert torch.equal(item["mask"], torch.from_numpy(label).long())  # masks are exact
        assert item["image"].shape == (3, 24, 24)
        # JPEG re-encoding is lossy but close
        assert (item["image"].float() - torch.from_numpy(image).permute(2, 0, 1).float()).abs().mean() < 40


def test_filters():
    empty = np.zeros((8, 8), np.uint8)
    assert filter_reason(empty) == "no_foreground"
    assert filter_reason(empty, drop_empty=False) is None
    label = empty.copy()
    label[:2] = 3
    label[2:6] = 255
    assert filter_reason(label) is None
    assert filter_reason(label, max_uncertain=0.4) == "too_uncertain"
    assert filter_reason(label, max_uncertain=0.6) is None


def test_max_samples_reads_the_first_n_of_an_extended_folder(tmp_path):
    store = SyntheticStore(tmp_path / "syn")
    store.prepare(CONFIG)
    _fill(store, range(6))
    assert SyntheticDataset(store.root, max_samples=4).ids == ["0000000", "0000001", "0000002", "0000003"]
    assert len(SyntheticDataset(store.root)) == 6


def test_an_empty_image_is_skipped_with_its_path_and_is_not_done(tmp_path, caplog):
    store = SyntheticStore(tmp_path / "syn")
    store.prepare(CONFIG)
    _fill(store, range(3))
    empty = store.root / "images" / "0000001.png"
    empty.write_bytes(b"")  # torchvision alone says "Expected a non empty file", no path
    data = SyntheticDataset(store.root)
    with caplog.at_level(logging.WARNING, logger="dsdiff"):
        assert data[1]["name"] == "0000002"
    assert str(empty) in caplog.text
    assert store.done_ids() == {"0000000", "0000002"}  # made again by the next generation run


def test_a_cut_short_mask_or_jpeg_is_not_done(tmp_path):
    from dsdiff.utils.io import file_problem

    store = SyntheticStore(tmp_path / "syn")
    store.prepare(CONFIG)
    _fill(store, range(2), image_format="jpg")
    jpg, mask = store.root / "images" / "0000000.jpg", store.root / "masks" / "0000001.png"
    assert file_problem(jpg) is None and file_problem(mask) is None
    jpg.write_bytes(jpg.read_bytes()[:-40])
    mask.write_bytes(mask.read_bytes()[: len(mask.read_bytes()) // 2])
    assert file_problem(jpg) == "truncated (no end marker)" and file_problem(mask).startswith(("truncated", "unreadable"))
    assert store.done_ids() == set()


def test_a_sample_made_again_counts_where_its_latest_row_is(tmp_path):
    store = SyntheticStore(tmp_path / "syn")
    store.prepare(CONFIG)
    _fill(store, range(2))
    store.write_dropped(sample_id(0), "no_foreground", {"seed": 0})  # made again in a new group, now dropped
    assert [e["id"] for e in store.entries()] == ["0000001"] and [d["id"] for d in store.dropped()] == ["0000000"]
    _fill(store, [0], tag="rank1")  # and again, kept
    store.compact()
    assert [e["id"] for e in store.entries()] == ["0000000", "0000001"] and store.dropped() == []


def test_jpeg_images_at_the_recipes_quality_are_pils_default_encoding(tmp_path):
    """synthetic.jpeg_quality=75 (the VOC/COCO recipes) writes the bytes PIL's default JPEG save writes, as the
    original's ``image.save(f"{...}.jpg")``; 95 writes others. Masks stay PNG."""
    import io

    image, label = _sample(3, size=64)
    store = SyntheticStore(tmp_path / "syn")
    store.prepare(CONFIG)
    entry = store.write_sample("0000003", image, label, {"seed": 3, "class_ids": [4]}, image_format="jpg", jpeg_quality=75)
    default = io.BytesIO()
    Image.fromarray(image).save(default, format="JPEG")
    written = (store.root / entry["image"]).read_bytes()
    assert entry["image"] == "images/0000003.jpg" and entry["mask"] == "masks/0000003.png"
    assert written == default.getvalue()
    store.write_sample("0000004", image, label, {"seed": 4, "class_ids": [4]}, image_format="jpg", jpeg_quality=95)
    assert (store.root / "images" / "0000004.jpg").read_bytes() != written


def test_dataset_json_records_the_jpeg_quality_and_negative_prompt_and_bad_values_are_refused():
    from dsdiff.synthetic.spec import GenerationPlan, check_settings
    from dsdiff.utils.errors import SettingError

    generator = {"model": None, "negative_prompt": "ugly, tiling", "batch_size": 2}
    synthetic = {"num_images": 4, "seed": 0, "template": "a photo of {}", "filters": {}}
    jpeg = GenerationPlan.from_settings(generator, {**synthetic, "image_format": "jpg", "jpeg_quality": 75}, VOC_CLASSES)
    png = GenerationPlan.from_settings(generator, {**synthetic, "image_format": "png", "jpeg_quality": 75}, VOC_CLASSES)
    config = jpeg.dataset_config()
    assert config["image_format"] == "jpg" and config["jpeg_quality"] == 75
    assert config["generator"]["negative_prompt"] == "ugly, tiling"
    assert "jpeg_quality" not in png.dataset_config()  # unused by PNG folders: their identity is as before
    for bad, message in [({"image_format": "jpg", "jpeg_quality": 0}, "synthetic.jpeg_quality=0"),
                         ({"image_format": "jpg", "jpeg_quality": "high"}, "synthetic.jpeg_quality='high'")]:
        with pytest.raises(SettingError, match=message):
            check_settings(generator, {**synthetic, **bad})
    with pytest.raises(SettingError, match="generator.negative_prompt=5"):
        check_settings({**generator, "negative_prompt": 5}, synthetic)
