"""Cityscapes and your-own-folder readers: fixture folders read pixel-exact, their errors, and their experiments."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from dsdiff.data.cityscapes import CityscapesSegmentation
from dsdiff.data.classes import (
    CITYSCAPES_CLASSES,
    IGNORE_INDEX,
    get_class_list,
    unattended_label,
)
from dsdiff.data.coco import COCOSegmentation
from dsdiff.data.folder import FolderSegmentation, default_split
from dsdiff.data.voc import VOCSegmentation
from dsdiff.diffusion.masks import attention_to_labels
from dsdiff.diffusion.prompts import build_records, find_class_ids
from dsdiff.models.metrics import iou_metric
from dsdiff.testing.folders import (
    CITYSCAPES_FIXTURE_CITIES,
    FOLDER_FIXTURE_CLASSES,
    write_cityscapes_folder,
    write_image_folder,
)
from dsdiff.utils.errors import MissingPathError, SettingError


@pytest.fixture(scope="module")
def cityscapes(tmp_path_factory):
    return write_cityscapes_folder(tmp_path_factory.mktemp("cityscapes"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("folder"))


# ---------------------------------------------------------------- Cityscapes


@pytest.mark.parametrize("split", ["train", "val"])
def test_cityscapes_label_ids_read_as_the_19_train_ids(cityscapes, split):
    root = cityscapes["root"]
    assert not list(root.rglob("*labelTrainIds*"))  # the fixture is the raw download: label ids only
    ds = CityscapesSegmentation(root, split)
    assert ds.ids == cityscapes["splits"][split]
    assert {ds.cities[n] for n in ds.ids} == set(CITYSCAPES_FIXTURE_CITIES[split])
    assert ds.num_classes == 19 and ds.classes[0] == "road" and ds.classes[18] == "bicycle"
    for item in ds:
        ids, mask = cityscapes["label_ids"][item["name"]], item["mask"].numpy()
        assert item["image"].shape == (3, 64, 128) and item["mask"].dtype == torch.int64
        np.testing.assert_array_equal(mask, cityscapes["train_ids"][item["name"]])
        # the official table: road 7 -> 0, building 11 -> 2, sky 23 -> 10, person 24 -> 11, car 26 -> 13
        for label_id, train_id in ((7, 0), (8, 1), (11, 2), (21, 8), (23, 10), (24, 11), (26, 13)):
            assert (mask[ids == label_id] == train_id).all() and (ids == label_id).any()
        for label_id in (0, 1, 4, 30):  # unlabeled, ego vehicle, static, trailer
            assert (ids == label_id).any() and (mask[ids == label_id] == IGNORE_INDEX).all()
    labels = ds.image_labels()
    assert labels == {n: cityscapes["labels"][n] for n in ds.ids} and all(0 in v for v in labels.values())


def test_cityscapes_ignored_ids_are_not_counted_in_the_iou(cityscapes):
    ds = CityscapesSegmentation(cityscapes["root"], "val")
    metric = iou_metric(ds.num_classes)
    for item in ds:
        truth = item["mask"]
        pred = torch.where(truth == IGNORE_INDEX, torch.full_like(truth, 5), truth)  # "pole" on every ignored pixel
        metric.update(pred[None], truth[None])
    iou = metric.compute()
    present = sorted({c for n in ds.ids for c in cityscapes["labels"][n]})
    assert torch.equal(iou[present], torch.ones(len(present)))  # the pixels of ids 0 and 1 cost nothing
    assert torch.isnan(iou[5])  # and count for no class


def test_cityscapes_train_ids_file_is_read_as_it_is_when_present(cityscapes, tmp_path):
    root = shutil.copytree(cityscapes["root"], tmp_path / "cs")
    name = cityscapes["splits"]["val"][0]
    train_ids = np.full((64, 128), 18, dtype=np.uint8)
    train_ids[:, :10] = IGNORE_INDEX
    Image.fromarray(train_ids).save(root / "gtFine/val/frankfurt" / f"{name}_gtFine_labelTrainIds.png")
    ds = CityscapesSegmentation(root, "val")
    np.testing.assert_array_equal(ds[0]["mask"].numpy(), train_ids)
    np.testing.assert_array_equal(ds[1]["mask"].numpy(), cityscapes["train_ids"][ds.ids[1]])  # the others: label ids


def test_cityscapes_missing_folders_and_labels_are_named(cityscapes, tmp_path):
    with pytest.raises(MissingPathError, match=r"no Cityscapes folder at .*nowhere.*leftImg8bit/.*gtFine/.*paths\.cityscapes="):
        CityscapesSegmentation(tmp_path / "nowhere")
    root = shutil.copytree(cityscapes["root"], tmp_path / "cs")
    name = cityscapes["splits"]["train"][1]
    (root / "gtFine/train/aachen" / f"{name}_gtFine_labelIds.png").unlink()
    with pytest.raises(MissingPathError, match=rf"1 Cityscapes images .* no label file \(gtFine/train/aachen/{name}_gtFine_labelIds\.png\)"):
        CityscapesSegmentation(root, "train")
    assert len(CityscapesSegmentation(root, "val")) == 2


def test_cityscapes_tune_subset_and_split_file(cityscapes, tmp_path):
    train = cityscapes["splits"]["train"]
    sub = CityscapesSegmentation(cityscapes["root"], "train", subset=2, subset_seed=0).ids
    assert len(sub) == 2 and set(sub) <= set(train)
    listed = tmp_path / "ids.txt"
    listed.write_text(f"{train[2]}\naachen/{train[0]}_leftImg8bit.png\n")
    assert CityscapesSegmentation(cityscapes["root"], str(listed)).ids == [train[2], train[0]]
    listed.write_text("aachen_999999_000000\n")
    with pytest.raises(MissingPathError, match=r"lists 1 frames that are not in leftImg8bit/train \(aachen_999999_000000\)"):
        CityscapesSegmentation(cityscapes["root"], str(listed))


def test_cityscapes_class_list_prompts_every_class_and_ignores_unattended_pixels():
    names = get_class_list("cityscapes").classes
    assert names == CITYSCAPES_CLASSES and get_class_list("cityscapes").words()[6:8] == ("traffic light", "traffic sign")
    # no background class: road (0) is prompted like any other, and no pixel falls to it by default
    assert find_class_ids("a road with a traffic light, two motorcycles and a sky", names) == [0, 6, 10, 17]
    assert unattended_label(names) == IGNORE_INDEX and unattended_label(("background", "cat")) == 0
    records = build_records({"a": [0, 13, IGNORE_INDEX], "b": []}, names, [("a", "a street")])
    assert [(r.class_ids, r.prompt) for r in records] == [([0, 13], "a street; road car")]
    cross = torch.zeros(2, 4, 4)
    cross[0, :2], cross[1, 2:, :2] = 1.0, 1.0  # road on top, car bottom-left, nothing bottom-right
    labels, _ = attention_to_labels(cross, torch.eye(16), [0, 13], tau=0, size=4, background=unattended_label(names))
    assert (labels[:2] == 0).all() and (labels[2:, :2] == 13).all() and (labels[2:, 2:] == IGNORE_INDEX).all()


def test_cityscapes_real_trains_and_tests_with_per_class_keys(make_cfg, cityscapes, tmp_path):
    from dsdiff.train import train

    full = make_cfg(["+experiment=cityscapes_real"])
    assert list(full.data.train_transform.crop_size) == [512, 1024] and list(full.data.eval_scale) == [2048, 1024]
    assert full.data.num_classes == 19 and full.data.tune.subset == 300 and full.data.test.split == "val"
    cfg = make_cfg(["+experiment=cityscapes_real", "debug=fast", f"paths.cityscapes={cityscapes['root']}",
                    "trainer.max_steps=2", "trainer.val_check_interval=1"], output_dir=tmp_path / "run")
    train(cfg)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0 <= saved["test/mIoU"] <= 1 and 0 <= saved["test/IoU/road"] <= 1 and 0 <= saved["test/IoU/car"] <= 1
    assert {k.split("/")[-1] for k in saved if k.startswith("test/IoU/")} == set(CITYSCAPES_CLASSES)


def test_cityscapes_missing_folder_is_named_before_the_run_writes(make_cfg, tmp_path):
    from dsdiff.train import train

    cfg = make_cfg(["+experiment=cityscapes_real", "debug=fast", f"paths.cityscapes={tmp_path / 'nowhere'}"],
                   output_dir=tmp_path / "run")
    with pytest.raises(MissingPathError, match=r"paths\.cityscapes=.*leftImg8bit/\{train,val\}/<city>/\*_leftImg8bit\.png"):
        train(cfg)
    assert not (tmp_path / "run" / "stages.json").exists()


@pytest.mark.slow  # 17 s alone, 31 s on the shared 2 cores
def test_cityscapes_deeplab_chain_captions_frames_and_prompts_road(make_cfg, cityscapes, tmp_path):
    from dsdiff.testing.tiny_blip import save_tiny_blip
    from dsdiff.testing.tiny_sd import save_tiny_pipeline
    from dsdiff.train import train

    sd, blip = save_tiny_pipeline(tmp_path / "sd"), save_tiny_blip(tmp_path / "blip")
    syn = tmp_path / "syn"
    cfg = make_cfg(["+experiment=cityscapes_deeplab", "debug=fast", f"paths.cityscapes={cityscapes['root']}",
                    f"paths.data_dir={tmp_path / 'data'}", f"generator.model={sd}", f"prompts.captioner={blip}",
                    f"synthetic.dir={syn}", "synthetic.num_images=4", "generator.batch_size=2",
                    "synthetic.filters.drop_empty=false", "trainer.max_steps=2", "trainer.val_check_interval=1"],
                   output_dir=tmp_path / "run")
    train(cfg)
    samples = [json.loads(line) for line in (syn / "manifest.jsonl").read_text().splitlines()]
    assert sorted(s["image_id"] for s in samples) == sorted(cityscapes["splits"]["train"])
    for s in samples:  # each frame's classes from its label ids, road (0) among them
        assert s["class_ids"] == cityscapes["labels"][s["image_id"]] and s["class_ids"][0] == 0
        assert s["prompt"].endswith("; " + " ".join(CITYSCAPES_CLASSES[c] for c in s["class_ids"]))
        values = set(np.unique(np.array(Image.open(syn / s["mask"]))).tolist())
        assert values <= set(s["class_ids"]) | {IGNORE_INDEX}  # unattended pixels are ignored, not road
    (prompts,) = (tmp_path / "data" / "prompts").glob("cityscapes-captions-*[0-9a-f].jsonl")
    assert len(prompts.read_text().splitlines()) == 4 * 3
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0 <= saved["test/IoU/road"] <= 1 and 0 <= saved["test/mIoU_tta"] <= 1
    assert saved["ckpt_path"] == str(tmp_path / "run" / "selftrain_1" / "checkpoints" / "last.ckpt")


# ---------------------------------------------------------------- your own folder


def test_folder_palette_and_index_masks_read_to_the_same_labels(tmp_path):
    palette = write_image_folder(tmp_path / "p", mask_format="palette")
    index = write_image_folder(tmp_path / "i", mask_format="index")
    assert Image.open(palette["root"] / "masks/img_000.png").mode == "P"
    assert Image.open(index["root"] / "masks/img_000.png").mode == "L"
    for split in ("train", "val"):
        a, b = FolderSegmentation(palette["root"], split), FolderSegmentation(index["root"], split)
        assert a.ids == b.ids == palette["splits"][split]
        assert a.classes == FOLDER_FIXTURE_CLASSES and a.num_classes == 4
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x["mask"].numpy(), palette["masks"][x["name"]])
            assert torch.equal(x["mask"], y["mask"]) and x["image"].shape == (3, 48, 48)
    assert any((m == IGNORE_INDEX).any() for m in palette["masks"].values())
    labels = FolderSegmentation(palette["root"], "train").image_labels()
    assert labels == {n: palette["labels"][n] for n in palette["splits"]["train"]}


def test_folder_without_split_files_splits_every_fifth_image_by_name(tmp_path):
    expected = write_image_folder(tmp_path / "f", n_images=12, split_files=False)
    names = sorted(expected["masks"])
    train, val = (FolderSegmentation(expected["root"], s).ids for s in ("train", "val"))
    assert val == [names[4], names[9]] and train == [n for n in names if n not in val]
    assert default_split(names, "val") == val
    (expected["root"] / "splits").mkdir()
    (expected["root"] / "splits/val.txt").write_text("img_000\nimg_001.jpg\n")  # one file: train is the rest
    assert FolderSegmentation(expected["root"], "val").ids == ["img_000", "img_001"]
    assert FolderSegmentation(expected["root"], "train").ids == names[2:]


def test_folder_bad_mask_value_and_missing_files_name_the_path(folder, tmp_path):
    root = shutil.copytree(folder["root"], tmp_path / "f")
    name = folder["splits"]["val"][0]
    mask = folder["masks"][name].copy()
    mask[0, :2] = [4, 9]
    Image.fromarray(mask).save(root / "masks" / f"{name}.png")
    with pytest.raises(SettingError, match=rf"masks/{name}\.png holds labels \[4, 9\]; expected 0\.\.3 or 255"):
        FolderSegmentation(root, "val")[0]
    (root / "splits/train.txt").write_text("img_000\nimg_404\n")
    (root / "masks/img_000.png").unlink()
    with pytest.raises(MissingPathError, match=r"3 files .* listed by .*splits/train\.txt .*\(images/img_404\.\*, masks/img_000\.png, masks/img_404\.png\)"):
        FolderSegmentation(root, "train")
    with pytest.raises(MissingPathError, match=r"no dataset folder at .*nowhere: classes\.txt, images/, masks/ missing.*paths\.folder="):
        FolderSegmentation(tmp_path / "nowhere")
    (root / "classes.txt").write_text("background\ncat\ncat\n")
    with pytest.raises(SettingError, match=r"classes\.txt names \['cat'\] more than once"):
        FolderSegmentation(root, "val")


def test_unreadable_images_name_the_file_in_every_reader(folder, cityscapes, voc_root, voc_expected, coco_root, tmp_path):
    f = shutil.copytree(folder["root"], tmp_path / "f")
    (f / "images/img_007.jpg").write_bytes(b"not an image")
    cs = shutil.copytree(cityscapes["root"], tmp_path / "cs")
    frame = cityscapes["splits"]["val"][0]
    (cs / "leftImg8bit/val/frankfurt" / f"{frame}_leftImg8bit.png").write_bytes(b"\x89PNG truncated")
    voc = shutil.copytree(voc_root, tmp_path / "voc")
    voc_id = voc_expected["splits"]["val"][0]
    (voc / "JPEGImages" / f"{voc_id}.jpg").write_bytes(b"\xff\xd8 cut short")  # (a 0-byte file fails at setup)
    coco = shutil.copytree(coco_root, tmp_path / "coco")
    ds_coco = COCOSegmentation(coco, "val")
    (coco / "val2017" / ds_coco.files[0]).write_bytes(b"GIF89a")
    for ds, path in ((FolderSegmentation(f, "val"), f / "images/img_007.jpg"),
                     (CityscapesSegmentation(cs, "val"), cs / "leftImg8bit/val/frankfurt" / f"{frame}_leftImg8bit.png"),
                     (VOCSegmentation(voc, "val"), voc / "JPEGImages" / f"{voc_id}.jpg"),
                     (ds_coco, coco / "val2017" / ds_coco.files[0])):
        with pytest.raises(MissingPathError, match=rf"unreadable image {path}: "):
            ds[0]
    (f / "masks/img_008.png").write_bytes(b"broken")
    with pytest.raises(MissingPathError, match=r"unreadable mask .*masks/img_008\.png"):
        FolderSegmentation(f, "val")[1]


def test_folder_class_list_file_is_the_config_class_list(make_cfg, folder):
    cfg = make_cfg(["+experiment=folder_real", f"paths.folder={folder['root']}"])
    assert cfg.data.num_classes == 4 and list(cfg.model.class_names) == list(FOLDER_FIXTURE_CLASSES)
    words = get_class_list(str(folder["root"] / "classes.txt")).words()
    assert words == ("background", "cat", "dog", "traffic cone")
    assert find_class_ids("a dog next to two traffic cones", FOLDER_FIXTURE_CLASSES) == [2, 3]


def test_folder_real_trains_and_tests_on_its_val_split(make_cfg, folder, tmp_path):
    from dsdiff.train import train

    cfg = make_cfg(["+experiment=folder_real", "debug=fast", f"paths.folder={folder['root']}",
                    "trainer.max_steps=2", "trainer.val_check_interval=1"], output_dir=tmp_path / "run")
    train(cfg)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {k.split("/")[-1] for k in saved if k.startswith("test/IoU/")} == set(FOLDER_FIXTURE_CLASSES)
    assert 0 <= saved["test/mIoU"] <= 1 and 0 <= saved["test/IoU/background"] <= 1


def test_folder_prompts_stage_reads_its_train_masks(make_cfg, folder, tmp_path):
    from dsdiff.prompting.stage import stage_inputs, stage_settings

    cfg = make_cfg(["+experiment=folder_deeplab", f"paths.folder={folder['root']}", f"paths.data_dir={tmp_path}"])
    settings = stage_settings(cfg)
    assert settings["root"] == str(folder["root"].resolve()) and len(settings["classes_sha256"]) == 16
    inputs = stage_inputs(settings)
    assert inputs["class_names"] == FOLDER_FIXTURE_CLASSES
    assert inputs["labels"] == {n: folder["labels"][n] for n in folder["splits"]["train"]}
    assert set(inputs["images"]) == {n for n in folder["splits"]["train"] if folder["labels"][n]}


def test_prompts_command_reads_cityscapes_and_folder_labels(cityscapes, folder, tmp_path):
    from dsdiff.diffusion.prompts import read_jsonl
    from dsdiff.prompts import main

    records = read_jsonl(main(["--dataset", "cityscapes", "--root", str(cityscapes["root"]), "--out", str(tmp_path / "cs.jsonl")]))
    first = cityscapes["splits"]["train"][0]
    assert (records[0].image_id, records[0].class_ids) == (first, cityscapes["labels"][first])
    assert records[0].prompt.startswith("a photo of a road and a sidewalk")
    records = read_jsonl(main(["--dataset", "folder", "--root", str(folder["root"]), "--out", str(tmp_path / "f.jsonl")]))
    assert {r.image_id: r.class_ids for r in records} == {n: v for n, v in folder["labels"].items()
                                                           if n in folder["splits"]["train"] and v}


@pytest.mark.slow
def test_folder_deeplab_chain_prompts_its_classes_and_tests_on_its_val_split(make_cfg, tmp_path):
    from dsdiff.testing.tiny_blip import save_tiny_blip
    from dsdiff.testing.tiny_sd import save_tiny_pipeline
    from dsdiff.train import train

    data = write_image_folder(tmp_path / "mine", n_images=8, split_files=False)  # the split by name: 7 train, 1 val
    sd, blip = save_tiny_pipeline(tmp_path / "sd"), save_tiny_blip(tmp_path / "blip")
    syn = tmp_path / "syn"
    cfg = make_cfg(["+experiment=folder_deeplab", "debug=fast", f"paths.folder={data['root']}", f"paths.data_dir={tmp_path / 'data'}",
                    f"generator.model={sd}", f"prompts.captioner={blip}", f"synthetic.dir={syn}", "synthetic.num_images=4",
                    "generator.batch_size=2", "synthetic.filters.drop_empty=false", "trainer.max_steps=2",
                    "trainer.val_check_interval=1"], output_dir=tmp_path / "run")
    train(cfg)
    samples = [json.loads(line) for line in (syn / "manifest.jsonl").read_text().splitlines()]
    assert len(samples) == 4
    for s in samples:
        assert s["class_ids"] == data["labels"][s["image_id"]] and 0 not in s["class_ids"]  # background is not prompted
        assert s["prompt"].endswith("; " + " ".join(FOLDER_FIXTURE_CLASSES[c] for c in s["class_ids"]))
    assert list((tmp_path / "data" / "prompts").glob("mine-captions-*[0-9a-f].jsonl"))
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {k.split("/")[-1] for k in saved if k.startswith("test/IoU/")} == set(FOLDER_FIXTURE_CLASSES)
    assert 0 <= saved["test/mIoU_tta"] <= 1
