"""score_labels on a VOC-format folder with a tiny Stable Diffusion pipeline: end to end on the tune split
(train images), with the val split (the test split) deleted from disk and never asked for."""
import json

import numpy as np

from dsdiff.data import voc
from dsdiff.chain.runtime import instantiate_loggers
from dsdiff.score_labels import score_labels


def test_voc_end_to_end_on_the_tune_split_only(score_cfg, voc_without_val, tiny32, tiny_labels, tmp_path, monkeypatch):
    splits = []
    original = voc.VOCSegmentation.__init__

    def spy(self, root, split="train", *args, **kwargs):
        splits.append(split)
        original(self, root, split, *args, **kwargs)

    monkeypatch.setattr(voc.VOCSegmentation, "__init__", spy)
    train_ids = voc_without_val["splits"]["train"]
    cfg = score_cfg("+experiment=voc_deeplab", f"paths.voc={voc_without_val['root']}", f"generator.model={tiny32}",
                    *tiny_labels, f"score.images={len(train_ids)}", "score.batch_size=4", "score.timesteps=[100,500]")
    result = score_labels(cfg, instantiate_loggers(cfg.logger, cfg.paths.output_dir))
    assert splits == ["train"]  # the tune split (300 drawn from train.txt: all 6 here); val is never built
    rows = [json.loads(line) for line in next((tmp_path / "results").glob("*/scores.jsonl")).read_text().splitlines()]
    assert sorted(r["name"] for r in rows) == sorted(train_ids)
    for r in rows:  # a class template from the image's true classes, those classes as the class prompt
        assert r["prompt"].startswith("a photo of a") and r["class_ids"] == voc_without_val["labels"][r["name"]]
        mask = voc_without_val["masks"][r["name"]]
        assert r["pixels"] == int((mask != 255).sum())  # scored at the mask's own size, void band left out
    assert result["labels/images"] == len(train_ids) and 0 <= result["labels/mIoU"] <= 1
    assert np.isfinite(result["labels/uncertain"]) and result["labels/pointing"] is not None
    assert (tmp_path / "run" / "label_scores.json").is_file() and (tmp_path / "run" / "label_overlay.png").is_file()


def test_captions_from_a_file(score_cfg, voc_without_val, tiny32, tiny_labels, tmp_path):
    first = voc_without_val["splits"]["train"][0]
    captions = tmp_path / "captions.jsonl"
    captions.write_text(json.dumps({"image": f"{first}.jpg", "caption": "a blurry picture of things"}) + "\n")
    cfg = score_cfg("+experiment=voc_deeplab", f"paths.voc={voc_without_val['root']}", f"generator.model={tiny32}",
                    *tiny_labels, "score.images=2", "score.batch_size=2", "score.timesteps=[300]", f"score.captions={captions}")
    score_labels(cfg, [])
    rows = [json.loads(line) for line in next((tmp_path / "results").glob("*/scores.jsonl")).read_text().splitlines()]
    by_name = {r["name"]: r for r in rows}
    assert by_name[first]["prompt"].startswith("a blurry picture of things; ")
    assert all(r["prompt"].startswith("a photo of a") for n, r in by_name.items() if n != first)
