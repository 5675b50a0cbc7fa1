"""Damaged inputs named with their path and fix: a real dataset's image or mask that does not decode
(also from a DataLoader worker), a 0-byte file at setup, a local generator.model folder missing a
component, and a dataset card without the machine's paths."""
from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
from torch.utils.data import DataLoader

from dsdiff.data.coco import COCOSegmentation
from dsdiff.data.voc import VOCSegmentation
from dsdiff.utils.errors import MissingPathError, find_config_error, format_error

FIX = "download or copy it again, or remove its id from the split list"


@pytest.fixture(scope="module")
def tiny_pipeline_dir(tmp_path_factory):
    from dsdiff.testing.tiny_sd import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipeline", image_size=32)


@pytest.fixture
def damaged_voc(voc_root, voc_expected, tmp_path):
    """A copy of the VOC fixture whose first train JPEG is cut to a third and second train mask is garbage."""
    root = shutil.copytree(voc_root, tmp_path / "voc")
    first, second = voc_expected["splits"]["train"][:2]
    jpeg = root / "JPEGImages" / f"{first}.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 3])
    mask = root / "SegmentationClass" / f"{second}.png"
    mask.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30)
    return root, jpeg, mask


def test_a_damaged_jpeg_and_mask_are_named_with_the_fix(damaged_voc):
    root, jpeg, mask = damaged_voc
    ds = VOCSegmentation(root, "train")  # setup reads no pixels
    with pytest.raises(MissingPathError) as image_error:
        ds[0]
    assert str(image_error.value).startswith(f"unreadable image {jpeg}: ") and FIX in str(image_error.value)
    with pytest.raises(MissingPathError) as mask_error:
        ds[1]
    assert str(mask_error.value).startswith(f"unreadable mask {mask}: ") and FIX in str(mask_error.value)


def test_a_damaged_image_read_in_a_dataloader_worker_prints_the_readers_message(damaged_voc):
    root, jpeg, _ = damaged_voc
    loader = DataLoader(VOCSegmentation(root, "train"), batch_size=1, num_workers=1)
    with pytest.raises(MissingPathError) as raised:
        next(iter(loader))
    block = format_error(find_config_error(raised.value))
    first = block.splitlines()[0]
    assert first.startswith(f"dsdiff: error: unreadable image {jpeg}: ") and FIX in first
    assert "Traceback" not in block and "DataLoader worker" not in block


def test_a_zero_byte_file_fails_at_setup_with_its_path(voc_root, voc_expected, coco_root, tmp_path):
    voc = shutil.copytree(voc_root, tmp_path / "voc")
    name = voc_expected["splits"]["val"][1]
    (voc / "SegmentationClass" / f"{name}.png").write_bytes(b"")
    with pytest.raises(MissingPathError, match=r"1 files listed by .*val\.txt are empty \(0 bytes") as raised:
        VOCSegmentation(voc, "val")
    assert str(voc / "SegmentationClass" / f"{name}.png") in str(raised.value)
    assert "remove their ids from the split list" in str(raised.value)
    coco = shutil.copytree(coco_root, tmp_path / "coco")
    image = sorted((coco / "val2017").iterdir())[0]
    image.write_bytes(b"")
    with pytest.raises(MissingPathError, match="are empty \\(0 bytes") as raised:
        COCOSegmentation(coco, "val")
    assert str(image) in str(raised.value)


@pytest.mark.parametrize("component", ["unet", "tokenizer", "text_encoder"])
def test_a_model_folder_missing_a_component_names_that_folder(tiny_pipeline_dir, tmp_path, component):
    from dsdiff.diffusion.pipeline import generator_source, load_tokenizer

    folder = shutil.copytree(tiny_pipeline_dir, tmp_path / "model")
    assert component in json.loads((folder / "model_index.json").read_text())
    shutil.rmtree(folder / component)
    for check in (generator_source, load_tokenizer):
        with pytest.raises(MissingPathError) as raised:
            check(str(folder))
        message = str(raised.value)
        assert message.startswith(f"generator.model={folder}: ") and f"{folder / component}/" in message, message
    (folder / component).mkdir()  # an empty folder is as missing
    with pytest.raises(MissingPathError, match=f"{component}/"):
        generator_source(str(folder))


@pytest.mark.parametrize("model", ["./no_such_model", "../no_such_model", "~/no_such_model_dsdiff"])
def test_a_local_looking_model_path_that_does_not_exist_names_generator_model(model, tmp_path, monkeypatch):
    from dsdiff.diffusion.pipeline import generator_source

    monkeypatch.chdir(tmp_path)
    with pytest.raises(MissingPathError, match=f"generator.model={model}: no such folder"):
        generator_source(model)


def test_the_dataset_card_names_the_prompts_file_not_its_path(tmp_path):
    pytest.importorskip("datasets")
    from dsdiff.data.classes import VOC_CLASSES
    from dsdiff.synthetic.export import export_hf
    from dsdiff.synthetic.spec import sample_id
    from dsdiff.synthetic.store import SyntheticStore

    prompts = tmp_path / "deep" / "prompts.jsonl"
    prompts.parent.mkdir()
    prompts.write_text('{"prompt": "a cat", "class_ids": [8]}\n')
    store = SyntheticStore(tmp_path / "syn")
    store.prepare({"class_names": list(VOC_CLASSES), "generator": {"model": {"name": "pipeline", "digest": "sha256:0"}},
                   "seed": 0, "prompts": {"file": str(prompts), "template": None, "max_classes": 1, "records": 1,
                                          "digest": "0123456789abcdef"}})
    for i in range(2):
        label = np.zeros((16, 16), np.uint8)
        label[4:12, 4:12] = 8
        store.write_sample(sample_id(i), np.full((16, 16, 3), 40 * i, np.uint8), label, {"seed": i, "class_ids": [8]})
    card = (export_hf(store.root) / "README.md").read_text()
    assert str(tmp_path) not in card and "/deep/" not in card, card
    assert '"file": "prompts.jsonl"' in card and hashlib.sha256(prompts.read_bytes()).hexdigest()[:16] in card, card
    assert "0123456789abcdef" in card  # the records' digest, as dataset.json has it
