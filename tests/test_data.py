"""The data layer: VOC/COCO readers against fixture folders, transforms, and the shapes world."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from dsdiff.data.classes import COCO_ID_TO_TRAIN_ID, IGNORE_INDEX, SHAPES_CLASSES, get_class_list
from dsdiff.data.coco import COCOSegmentation
from dsdiff.data.shapes import ShapesDataset, shape_region
from dsdiff.data.transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, TrainTransform
from dsdiff.data.voc import VOCSegmentation
from dsdiff.testing.folders import VOC_FIXTURE_COLORS, write_coco_folder

# ---------------------------------------------------------------- VOC


@pytest.mark.parametrize("split", ["train", "val"])
def test_voc_reads_fixture_masks_pixel_exact(voc_root, voc_expected, split):
    ds = VOCSegmentation(voc_root, split=split)
    assert ds.ids == voc_expected["splits"][split]
    assert ds.num_classes == 21 and ds.classes[15] == "person"
    for item in ds:
        expected = voc_expected["masks"][item["name"]]
        assert item["mask"].dtype == torch.int64
        np.testing.assert_array_equal(item["mask"].numpy(), expected)
        assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, *expected.shape)
        for label in voc_expected["labels"][item["name"]]:  # each class shows its own colour
            mean_color = item["image"][:, item["mask"] == label].float().mean(1)
            distance = {c: (mean_color - torch.tensor(rgb)).abs().max() for c, rgb in VOC_FIXTURE_COLORS.items()}
            assert min(distance, key=distance.get) == label and distance[label] < 8
    # The fixture is like real VOC: palette PNGs with 255 bands around objects.
    assert any((m == IGNORE_INDEX).any() for m in voc_expected["masks"].values())
    assert Image.open(ds.mask_path(ds.ids[0])).mode == "P"


def test_voc_root_may_be_the_folder_above_vocdevkit(voc_root, tmp_path):
    (tmp_path / "VOCdevkit").mkdir()
    (tmp_path / "VOCdevkit" / "VOC2012").symlink_to(voc_root, target_is_directory=True)
    assert VOCSegmentation(tmp_path, "val").ids == VOCSegmentation(voc_root, "val").ids


def test_voc_image_labels_are_the_classes_in_each_mask(voc_root, voc_expected):
    labels = VOCSegmentation(voc_root, "train").image_labels()
    assert labels == {n: voc_expected["labels"][n] for n in voc_expected["splits"]["train"]}
    assert all(0 not in v and IGNORE_INDEX not in v and v for v in labels.values())


def test_voc_train_aug_reads_plain_pngs_and_path_style_lists(voc_root, voc_expected, tmp_path):
    root = shutil.copytree(voc_root, tmp_path / "voc")
    (root / "SegmentationClassAug").mkdir()
    ids = voc_expected["splits"]["train"][:3]
    for name in ids:  # SBD-style: plain grayscale PNGs, list lines with paths
        Image.fromarray(voc_expected["masks"][name]).save(root / "SegmentationClassAug" / f"{name}.png")
    lines = [f"/JPEGImages/{n}.jpg /SegmentationClassAug/{n}.png" for n in ids]
    (root / "ImageSets/Segmentation/train_aug.txt").write_text("\n".join(lines))
    ds = VOCSegmentation(root, "train_aug")
    assert ds.ids == ids
    for item in ds:
        np.testing.assert_array_equal(item["mask"].numpy(), voc_expected["masks"][item["name"]])


def test_voc_with_transform_returns_its_outputs(voc_root):
    item = VOCSegmentation(voc_root, "train", transform=TrainTransform(32))[0]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (32, 32) and item["mask"].dtype == torch.int64


def test_voc_missing_root_says_which_setting_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no PASCAL VOC 2012 folder at .*nowhere.*pass paths\.voc="):
        VOCSegmentation(tmp_path / "nowhere")


def test_voc_missing_split_file_names_it_and_the_known_splits(voc_root):
    with pytest.raises(FileNotFoundError, match=r"ImageSets/Segmentation/trainval\.txt.*\['train', 'val'\]"):
        VOCSegmentation(voc_root, "trainval")
    with pytest.raises(FileNotFoundError, match=r"SegmentationClassAug"):
        VOCSegmentation(voc_root, "train_aug")


def test_voc_missing_image_or_mask_fails_at_setup_naming_the_files(voc_root, voc_expected, tmp_path):
    root = shutil.copytree(voc_root, tmp_path / "voc")
    first, second = voc_expected["splits"]["val"][:2]
    (root / "JPEGImages" / f"{first}.jpg").unlink()
    (root / "SegmentationClass" / f"{second}.png").unlink()
    with pytest.raises(FileNotFoundError, match=rf"2 files listed by .*val\.txt are missing .*JPEGImages/{first}\.jpg, "
                       rf"SegmentationClass/{second}\.png\): add them, or remove their ids"):
        VOCSegmentation(root, "val")
    assert len(VOCSegmentation(root, "train")) == len(voc_expected["splits"]["train"])  # other splits are fine


def test_voc_split_listing_many_missing_ids_shows_the_first_few(voc_root, tmp_path):
    root = shutil.copytree(voc_root, tmp_path / "voc")
    ids = [f"2099_{i:06d}" for i in range(8)]
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids) + "\n")
    with pytest.raises(FileNotFoundError, match=r"16 files listed .*2099_000000\.jpg.*, \.\.\.\)") as err:
        VOCSegmentation(root, "val")
    assert "2099_000007" not in str(err.value)


def test_voc_missing_mask_folder_is_named(voc_root, tmp_path):
    root = shutil.copytree(voc_root, tmp_path / "voc")
    shutil.rmtree(root / "SegmentationClass")
    with pytest.raises(FileNotFoundError, match=r"no mask folder .*SegmentationClass for the ids in .*val\.txt"):
        VOCSegmentation(root, "val")


def test_voc_subset_is_a_fixed_seeded_draw_and_a_file_split_is_read_whole(voc_root, voc_expected, tmp_path):
    train = voc_expected["splits"]["train"]
    a = VOCSegmentation(voc_root, "train", subset=3, subset_seed=0).ids
    assert len(a) == 3 and set(a) <= set(train) and a == [n for n in train if n in a]  # list order kept
    assert VOCSegmentation(voc_root, "train", subset=3, subset_seed=0).ids == a
    assert any(VOCSegmentation(voc_root, "train", subset=3, subset_seed=s).ids != a for s in range(1, 6))
    assert VOCSegmentation(voc_root, "train", subset=300).ids == train  # shorter list: all of it
    listed = tmp_path / "tune.txt"
    listed.write_text("\n".join(train[:2]) + "\n")
    assert VOCSegmentation(voc_root, str(listed)).ids == train[:2]
    with pytest.raises(FileNotFoundError, match=r"no split file .*nope\.txt"):
        VOCSegmentation(voc_root, str(tmp_path / "nope.txt"))


def test_tune_split_sharing_images_with_the_test_split_is_refused(voc_root, voc_expected, tmp_path):
    from functools import partial

    from dsdiff.data.datamodule import SegDataModule

    listed = tmp_path / "tune.txt"
    listed.write_text(voc_expected["splits"]["val"][1] + "\n")
    dm = SegDataModule(21, train=None, tune=partial(VOCSegmentation, voc_root, str(listed)),
                       test=partial(VOCSegmentation, voc_root, "val"))
    with pytest.raises(ValueError, match=rf"tune split shares 1 images with the test split \({voc_expected['splits']['val'][1]}\)"):
        dm.setup("fit")
    ok = SegDataModule(21, train=None, tune=partial(VOCSegmentation, voc_root, "train", subset=2),
                       test=partial(VOCSegmentation, voc_root, "val"))
    ok.setup("fit")
    assert len(ok.val_dataloader()) == 2
    assert SegDataModule(21, train=None, tune=None, test=None).val_dataloader() == []


def test_voc_mask_with_unknown_class_ids_names_file_and_values(voc_root, voc_expected, tmp_path):
    root = shutil.copytree(voc_root, tmp_path / "voc")
    name = voc_expected["splits"]["val"][0]
    mask = voc_expected["masks"][name].copy()
    mask[0, :3] = [30, 21, 200]
    Image.fromarray(mask).save(root / "SegmentationClass" / f"{name}.png")
    with pytest.raises(ValueError, match=rf"{name}\.png holds labels \[21, 30, 200\]; expected 0\.\.20"):
        VOCSegmentation(root, "val")[0]


# ---------------------------------------------------------------- COCO


@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_masks_match_the_painting_rule(coco_root, coco_expected, split):
    ds = COCOSegmentation(coco_root, split)
    expected = coco_expected["masks"][split]
    assert [item["name"] for item in ds] == sorted(expected)
    assert ds.num_classes == 81 and ds.classes[COCO_ID_TO_TRAIN_ID[47]] == "cup"
    for item in ds:
        np.testing.assert_array_equal(item["mask"].numpy(), expected[item["name"]])
        assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.uint8
    assert ds.image_labels() == coco_expected["labels"][split]
    assert (ds.cache_dir == coco_root / "dsdiff_masks" / f"{split}2017") and ds.cache_dir.is_dir()


def test_coco_small_object_on_large_one_stays_visible_and_crowd_is_ignored(coco_root):
    masks = {item["name"]: item["mask"].numpy() for item in COCOSegmentation(coco_root, "val")}
    table_with_cup, crowd_with_dog, _ = (masks[n] for n in sorted(masks))
    cup, table, dog, person = (COCO_ID_TO_TRAIN_ID[c] for c in (47, 67, 18, 1))
    # The cup is listed before the table it lies on; painting in list order would hide it.
    assert (table_with_cup == cup).sum() > 100 and (table_with_cup == table).sum() > 1000
    # Crowd "person" pixels are ignored, never labelled person; the dog overlapping it keeps its label.
    assert (crowd_with_dog == IGNORE_INDEX).sum() > 500 and not (crowd_with_dog == person).any()
    assert (crowd_with_dog == dog).sum() == 24 * 20


def test_coco_prepare_data_is_idempotent_and_leaves_no_temp_files(coco_root, coco_expected, tmp_path):
    cache = COCOSegmentation.prepare_data(coco_root, "val", cache_dir=tmp_path / "cache")
    names = {f"{n}.png" for n in coco_expected["masks"]["val"]}
    assert {p.name for p in cache.iterdir()} == names
    mtimes = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    COCOSegmentation.prepare_data(coco_root, "val", cache_dir=cache)
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == mtimes
    # A deleted mask is rewritten; the others are left alone.
    gone = sorted(names)[0]
    (cache / gone).unlink()
    COCOSegmentation(coco_root, "val", cache_dir=cache)
    after = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert set(after) == names and all(after[n] == mtimes[n] for n in names - {gone})


def test_coco_write_killed_midway_leaves_no_partial_mask(coco_root, coco_expected, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    real_save, calls = Image.Image.save, []

    def dying_save(self, fp, *args, **kwargs):  # the second mask dies halfway through its bytes
        calls.append(fp)
        if len(calls) == 2:
            open(fp, "wb").write(b"\x89PNG half")
            raise KeyboardInterrupt
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        COCOSegmentation.prepare_data(coco_root, "val", cache_dir=cache)
    assert [p.name for p in cache.iterdir()] == [f"{sorted(coco_expected['masks']['val'])[0]}.png"]
    monkeypatch.setattr(Image.Image, "save", real_save)
    for item in COCOSegmentation(coco_root, "val", cache_dir=cache):
        np.testing.assert_array_equal(item["mask"].numpy(), coco_expected["masks"]["val"][item["name"]])


def test_coco_unwritable_cache_suggests_cache_dir(tmp_path):
    root = write_coco_folder(tmp_path / "coco", n_train=1, n_val=1)["root"]
    (root / "dsdiff_masks").write_text("a file where the cache folder should go")
    with pytest.raises(PermissionError, match=r"cannot write COCO masks to .*dsdiff_masks/val2017.*cache_dir="):
        COCOSegmentation(root, "val")
    assert len(COCOSegmentation(root, "val", cache_dir=tmp_path / "elsewhere")) == 1


def test_coco_renamed_category_is_refused(tmp_path):
    root = write_coco_folder(tmp_path / "coco", n_train=1, n_val=1)["root"]
    path = root / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    data["categories"][0]["name"] = "human"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"instances_val2017\.json differ from COCO 2017.*\(1, 'human'\)"):
        COCOSegmentation(root, "val")


def test_coco_missing_annotations_says_which_setting_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"instances_val2017\.json.*pass paths\.coco="):
        COCOSegmentation(tmp_path, "val")


def test_coco_missing_images_fail_at_setup_naming_them(tmp_path):
    root = write_coco_folder(tmp_path / "coco", n_train=1, n_val=3)["root"]
    victim = sorted((root / "val2017").iterdir())[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=rf"1 images listed in the val2017 annotations are missing .*\({victim.name}\)"):
        COCOSegmentation(root, "val")
    with pytest.raises(FileNotFoundError, match=rf"1 images .*{victim.name}"):
        COCOSegmentation.prepare_data(root, "val")
    shutil.rmtree(root / "val2017")
    with pytest.raises(FileNotFoundError, match=r"no COCO images folder .*val2017.*pass paths\.coco="):
        COCOSegmentation(root, "val")


def test_coco_subset_builds_only_its_masks(coco_root, coco_expected, tmp_path):
    cache = tmp_path / "cache"
    ds = COCOSegmentation(coco_root, "train", cache_dir=cache, subset=2, subset_seed=0)
    assert len(ds) == 2 and set(ds.ids) <= set(coco_expected["masks"]["train"])
    assert {p.stem for p in cache.iterdir()} == set(ds.ids)
    assert COCOSegmentation(coco_root, "train", cache_dir=cache, subset=2, subset_seed=0).ids == ds.ids
    listed = tmp_path / "tune.txt"
    chosen = sorted(coco_expected["masks"]["train"])[-1:]
    listed.write_text("\n".join(chosen) + "\n")
    assert COCOSegmentation(coco_root, str(listed), cache_dir=tmp_path / "c2").ids == chosen  # a file: train2017 images
    listed.write_text("999999999999\n")
    with pytest.raises(ValueError, match=r"lists 1 images that are not in the train2017 annotations \(999999999999\)"):
        COCOSegmentation(coco_root, str(listed), cache_dir=tmp_path / "c3")


# ---------------------------------------------------------------- transforms


def halves(height=24, width=32):
    """An image whose left half is red class 1 and right half blue class 2."""
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    image[0, :, : width // 2] = 255
    image[2, :, width // 2:] = 255
    mask = torch.full((height, width), 2, dtype=torch.uint8)
    mask[:, : width // 2] = 1
    return image, mask


def test_train_transform_shapes_dtypes_and_labels():
    image, mask = halves(40, 50)
    mask[:2] = IGNORE_INDEX
    torch.manual_seed(0)
    for _ in range(10):
        x, y = TrainTransform(32)(image, mask)
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert y.shape == (32, 32) and y.dtype == torch.int64
        assert set(y.unique().tolist()) <= {1, 2, IGNORE_INDEX}  # nearest resize invents no labels
    x, y = TrainTransform((16, 24))(image, mask.long())
    assert x.shape == (3, 16, 24) and y.shape == (16, 24)


def test_resize_ratio_scales_the_image_and_padding_is_ignored():
    image, mask = halves(10, 12)
    x, y = TrainTransform(32, scale_range=(2.0, 2.0), photometric=False)(image, mask)
    assert (y[:20, :24] != IGNORE_INDEX).all()
    assert (y[20:] == IGNORE_INDEX).all() and (y[:, 24:] == IGNORE_INDEX).all()
    assert (x[:, 20:] == 0).all() and (x[:, :, 24:] == 0).all()  # mean colour after normalisation


def test_resize_relative_to_a_scale_gives_a_voc_image_mmsegs_size():
    """mmseg's RandomResize(scale=(2048, 512), ratio_range, keep_ratio=True): a 500x375 image is fitted into
    (int(2048 r), int(512 r)), factor min(2048 r / 500, 512 r / 375), not scaled by r itself."""
    from dsdiff.data.transforms import random_resize_size

    assert random_resize_size(375, 500, 1.0, (2048, 512)) == (512, 683)   # factor 512/375, as mmseg's test Resize
    assert random_resize_size(375, 500, 0.5, (2048, 512)) == (256, 341)   # scale (1024, 256): factor 256/375
    assert random_resize_size(375, 500, 1.7, (2048, 512)) == (870, 1160)  # scale (3481, 870): factor 870/375
    assert random_resize_size(375, 500, 1.0) == (375, 500)                # null: relative to the image itself
    # a 512x512 synthetic image: the same size to within mmseg's truncation of the target scale (int(665.6))
    assert random_resize_size(512, 512, 1.3, (2048, 512)) == (665, 665) and random_resize_size(512, 512, 1.3) == (666, 666)
    assert random_resize_size(512, 512, 1.25, (2048, 512)) == random_resize_size(512, 512, 1.25) == (640, 640)
    assert random_resize_size(100, 3000, 1.0, (2048, 512)) == (68, 2048)  # the long side bounds a panorama
    # through the transform: with the ratio at 1 the resized image is 512x683 (the rest of the crop is padding)
    image, mask = halves(375, 500)
    _, y = TrainTransform(1024, scale_range=(1.0, 1.0), scale=(2048, 512), photometric=False, hflip=False)(image, mask)
    kept = (y != IGNORE_INDEX).nonzero()
    assert kept[:, 0].max().item() + 1 == 512 and kept[:, 1].max().item() + 1 == 683
    with pytest.raises(ValueError, match="data.train_transform.scale"):
        TrainTransform(512, scale=(2048,))


def test_flip_moves_image_and_mask_together():
    image, mask = halves()
    transform = TrainTransform((24, 32), scale_range=(1.0, 1.0), photometric=False)
    red = (1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    flipped = []
    for seed in range(8):
        torch.manual_seed(seed)
        x, y = transform(image, mask)
        left_red = bool((x[0, :, :16] - red).abs().max() < 1e-4)
        assert (y[:, :16] == (1 if left_red else 2)).all() and (y[:, 16:] == (2 if left_red else 1)).all()
        flipped.append(not left_red)
    assert any(flipped) and not all(flipped)


def test_photometric_changes_colours_but_never_the_mask():
    image, mask = halves()
    image[1] = torch.randint(0, 256, image.shape[1:], dtype=torch.uint8)
    plain = EvalTransform()(image, mask)[0]
    transform = TrainTransform((24, 32), scale_range=(1.0, 1.0), hflip=False)
    changed = 0
    for seed in range(6):
        torch.manual_seed(seed)
        x, y = transform(image, mask)
        assert torch.equal(y, mask.long())
        changed += not torch.allclose(x, plain, atol=1e-4)
    assert changed >= 4  # each of 4 distortions fires with p=0.5: all skipped has p=1/16
    off = TrainTransform((24, 32), scale_range=(1.0, 1.0), hflip=False, photometric=False)
    assert torch.allclose(off(image, mask)[0], plain)


def test_train_transform_is_reproducible_from_the_global_seed():
    image, mask = halves(40, 50)
    outputs = []
    for _ in range(2):
        torch.manual_seed(7)
        outputs.append(TrainTransform(32)(image, mask))
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])


def test_eval_transform_keeps_geometry_and_normalises():
    image, mask = halves(21, 17)
    x, y = EvalTransform()(image, mask)
    assert x.shape == (3, 21, 17) and torch.equal(y, mask.long())
    expected = (image.float() / 255 - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    assert torch.allclose(x, expected, atol=1e-5)


def test_cat_max_ratio_redraws_crops_dominated_by_one_class():
    """mmseg's RandomCrop(cat_max_ratio=0.75): a 20-wide crop of a 40-wide two-class mask passes
    when its left edge is in 6..14 (9 of 21 positions); with 10 redraws nearly every crop passes."""
    image, mask = halves(20, 40)

    def share(transform, n=200):
        torch.manual_seed(0)
        passed = 0
        for _ in range(n):
            _, y = transform(image, mask)
            ones = (y == 1).float().mean().item()
            passed += max(ones, 1 - ones) < 0.75
        return passed / n

    plain = TrainTransform(20, scale_range=(1.0, 1.0), hflip=False, photometric=False)
    balanced = TrainTransform(20, scale_range=(1.0, 1.0), hflip=False, photometric=False, cat_max_ratio=0.75)
    assert share(plain) < 0.6  # 9/21 = 0.43 expected
    assert share(balanced) > 0.97  # 1 - (12/21)^11 = 0.998 expected


def test_cat_max_ratio_ignores_ignored_pixels_and_gives_up_after_ten_tries():
    from dsdiff.data.transforms import dominant_share, random_crop_box

    mask = torch.full((20, 40), IGNORE_INDEX, dtype=torch.uint8)
    mask[:, :4] = 1
    mask[:, -4:] = 2
    assert dominant_share(mask) == (2, 0.5)  # 255 pixels do not count
    assert dominant_share(torch.full((4, 4), IGNORE_INDEX, dtype=torch.uint8)) == (0, 1.0)
    # one class and 255 only: no crop can pass; the draw stops after 1 + 10 boxes
    calls = []
    original = torch.randint

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    single = torch.full((20, 40), 1, dtype=torch.uint8)
    single[:, 20:] = IGNORE_INDEX
    try:
        torch.randint = counting
        box = random_crop_box(single, (20, 20), cat_max_ratio=0.75)
    finally:
        torch.randint = original
    assert len(calls) == 2 * 11 and box[2:] == (20, 20)
    with pytest.raises(ValueError, match="cat_max_ratio=1.5"):
        TrainTransform(20, cat_max_ratio=1.5)


def test_transforms_refuse_mismatched_pairs():
    image, mask = halves()
    with pytest.raises(ValueError, match=r"expected a mask of shape \(24, 32\).*found \(32, 24\)"):
        TrainTransform(16)(image, mask.T)
    with pytest.raises(ValueError, match=r"expected a uint8 image"):
        EvalTransform()(image.float(), mask)


# ---------------------------------------------------------------- shapes world


def test_shapes_is_deterministic_by_seed_and_split():
    a, b = ShapesDataset("train", size=20, seed=0), ShapesDataset("train", size=20, seed=0)
    for i in (0, 7, 19):
        assert torch.equal(a[i]["image"], b[i]["image"]) and torch.equal(a[i]["mask"], b[i]["mask"])
        assert a[i]["caption"] == b[i]["caption"]
    other_seed, other_split = ShapesDataset("train", size=20, seed=1), ShapesDataset("val", size=20, seed=0)
    assert not all(torch.equal(a[i]["image"], other_seed[i]["image"]) for i in range(5))
    assert not all(torch.equal(a[i]["image"], other_split[i]["image"]) for i in range(5))


def test_shapes_masks_are_exactly_the_drawn_regions():
    ds = ShapesDataset("train", size=200, seed=0)
    boxes = 0
    for i in range(len(ds)):
        image, mask = ds.render(i)
        expected = np.zeros_like(mask)
        for obj in ds.layout(i):
            window = expected[obj.top:obj.top + obj.height, obj.left:obj.left + obj.width]
            window[shape_region(obj)] = obj.label
            if obj.name == "box":  # axis-aligned: the whole box, colour inside, background outside
                boxes += 1
                assert (mask[obj.top:obj.top + obj.height, obj.left:obj.left + obj.width] == obj.label).all()
                inner = image[obj.top + 1:obj.top + obj.height - 1, obj.left + 1:obj.left + obj.width - 1]
                assert np.abs(inner.astype(int) - obj.color).max() <= 15
                ring = np.pad(np.ones((obj.height, obj.width), bool), 1)
                ring[1:-1, 1:-1] = False
                rows, cols = np.nonzero(ring)
                rows, cols = rows + obj.top - 1, cols + obj.left - 1
                keep = (rows >= 0) & (rows < 32) & (cols >= 0) & (cols < 32)
                assert (mask[rows[keep], cols[keep]] == 0).all()
        np.testing.assert_array_equal(mask, expected)
    assert boxes > 20


def test_shapes_captions_and_labels_name_exactly_the_classes_in_the_mask():
    ds = ShapesDataset("val", size=100, seed=3)
    labels, captions = ds.image_labels(), ds.captions()
    for i in range(len(ds)):
        item = ds[i]
        present = sorted(set(item["mask"].unique().tolist()) - {0})
        assert labels[item["name"]] == present and captions[item["name"]] == item["caption"]
        named = sorted(SHAPES_CLASSES.index(part.removeprefix("a ")) for part in item["caption"].split(" and "))
        assert named == present


def test_shapes_world_shows_every_class_in_several_looks():
    ds = ShapesDataset("train", size=300, seed=0)
    assert get_class_list("shapes").classes == ds.classes and ds.num_classes == 6
    objects = [obj for i in range(len(ds)) for obj in ds.layout(i)]
    for label in range(1, ds.num_classes):
        mine = [o for o in objects if o.label == label]
        assert len(mine) > 30
        assert len({o.color for o in mine}) > 10 and len({(o.height, o.width) for o in mine}) > 3
    assert {len(ds.layout(i)) for i in range(len(ds))} == {1, 2}
    item = ShapesDataset("test", size=2, transform=EvalTransform())[1]
    assert item["image"].dtype == torch.float32 and item["mask"].shape == (32, 32)
