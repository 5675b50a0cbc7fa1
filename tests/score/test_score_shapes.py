"""score_labels on the shapes world with the shipped model: scores far above chance, the files a user
opens, the loggers, and a rerun that redoes only what was deleted (or nothing, loading no weights)."""
import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dsdiff.data.shapes import ShapesDataset
from dsdiff.diffusion.quality import QualityTally
from dsdiff.score import predict
from dsdiff.chain.runtime import instantiate_loggers
from dsdiff.score_labels import score_labels

IMAGES, BATCH = 24, 8
ARGS = ["+experiment=shapes_deeplab", f"score.images={IMAGES}", f"score.batch_size={BATCH}", "score.timesteps=[100,300]",
        "score.grid_rows=3"]
LOG_LINES: list[str] = []  # the dsdiff log of the module's first run


def run(cfg):
    loggers = instantiate_loggers(cfg.logger, cfg.paths.output_dir)
    return score_labels(cfg, loggers)


@pytest.fixture(scope="module")
def first(tmp_path_factory, compose_score):
    tmp = tmp_path_factory.mktemp("shapes_score")
    cfg = compose_score(tmp, *ARGS)
    lines = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("dsdiff")
    level = logger.level
    logger.setLevel(logging.INFO)  # not `logger.level = ...`: that keeps the logger's cached isEnabledFor answers
    logger.addHandler(handler)
    try:
        result = run(cfg)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    LOG_LINES[:] = lines
    return tmp, cfg, result


def chance_baselines(result, world_size=200):
    """mIoU of two labellers that know nothing of where things are, on the same images and masks:
    every pixel background, and each image labelled with the next image's attention labels (the same
    label statistics and classes-per-image, no correspondence)."""
    world = ShapesDataset("val", size=world_size)
    rows = [json.loads(line) for line in (Path(result["results_dir"]) / "scores.jsonl").read_text().splitlines()]
    truths = [world.render(int(r["name"].split("_")[-1]))[1] for r in rows]
    labels = [np.asarray(Image.open(Path(result["results_dir"]) / "labels" / f"{r['name']}.png")) for r in rows]
    background, shifted = QualityTally(6), QualityTally(6)
    for i, truth in enumerate(truths):
        background.add(np.zeros((0, *truth.shape)), [], np.zeros_like(truth), truth)
        shifted.add(np.zeros((0, *truth.shape)), [], labels[(i + 1) % len(labels)], truth)
    return background.summary()["mIoU"], shifted.summary()["mIoU"]


def test_scores_are_far_above_chance(first):
    _, _, result = first
    background, shifted = chance_baselines(result)
    assert result["labels/images"] == IMAGES
    assert result["labels/mIoU"] > max(background, shifted) + 0.3, (result["labels/mIoU"], background, shifted)
    assert result["labels/pointing"] >= 0.9 and result["labels/right_object"] >= 0.9  # chance: 0.5 for right-object
    assert 0 <= result["labels/uncertain"] < 0.5 and result["labels/objective"] == result["labels/mIoU"]
    for name in ("background", "ball", "box", "leaf", "tent", "ring"):
        assert 0 < result[f"labels/IoU/{name}"] <= 1


def test_writes_scores_grid_and_logs(first):
    tmp, cfg, result = first
    saved = json.loads((tmp / "run" / "label_scores.json").read_text())
    assert saved["labels/mIoU"] == result["labels/mIoU"]
    assert saved["settings"]["labels"]["tau"] == cfg.generator.labels.tau and saved["settings"]["scored_timesteps"] == [300, 100]
    assert saved["settings"]["tune_split"]["split"] == "val"  # the shapes world's tune split, never its test split
    grid = Image.open(tmp / "run" / "label_overlay.png")
    assert f"picture: label overlay -> {tmp / 'run' / 'label_overlay.png'}" in LOG_LINES
    assert grid.height >= 3 * 96 and grid.width >= 3 * 96  # 3 rows of image | true mask | labels, enlarged from 32 px
    with open(tmp / "run" / "csv" / "version_0" / "metrics.csv") as f:
        logged = next(csv.DictReader(f))
    assert float(logged["labels/mIoU"]) == pytest.approx(result["labels/mIoU"])


def test_rerun_redoes_only_the_deleted_results(first, compose_score, monkeypatch):
    tmp, _, result = first
    results = Path(result["results_dir"])
    lines = (results / "scores.jsonl").read_text().splitlines()
    # lose one image of the second group and another's label PNG in the third: those two groups are redone whole
    (results / "scores.jsonl").write_text("\n".join(lines[:BATCH + 2] + lines[BATCH + 3:]) + "\n")
    (results / "labels" / f"{json.loads(lines[2 * BATCH])['name']}.png").unlink()
    again = run(compose_score(tmp, *ARGS, run="run2"))
    assert again["groups_scored_now"] == 2
    assert again["labels/mIoU"] == result["labels/mIoU"] and again["labels/pointing"] == result["labels/pointing"]
    assert (results / "scores.jsonl").read_text().splitlines() == lines  # the same bits as the first time

    # everything done: only aggregates, loading no weights
    monkeypatch.setattr(predict.ScoreModule, "setup", lambda *a: pytest.fail("a finished run loaded the model"))
    done = run(compose_score(tmp, *ARGS, run="run3"))
    assert done["groups_scored_now"] == 0 and done["labels/mIoU"] == result["labels/mIoU"]
    assert (tmp / "run3" / "label_scores.json").is_file() and (tmp / "run3" / "label_overlay.png").is_file()


def test_other_label_settings_get_their_own_results(first, compose_score):
    tmp, _, result = first
    other = run(compose_score(tmp, *ARGS, "generator.labels.tau=0", run="tau0"))
    assert other["results_dir"] != result["results_dir"] and other["groups_scored_now"] == IMAGES // BATCH
    assert other["labels/mIoU"] != result["labels/mIoU"]


def test_the_diffusion_transformer_scores_far_above_chance(tmp_path, compose_score):
    """generator=shapes_dit (the SD3-layout model) through the same scoring: real images noised by flow matching."""
    result = run(compose_score(tmp_path, *ARGS, "generator=shapes_dit"))
    background, shifted = chance_baselines(result)
    assert result["labels/images"] == IMAGES
    assert result["labels/mIoU"] > max(background, shifted) + 0.3, (result["labels/mIoU"], background, shifted)
    assert result["labels/pointing"] >= 0.9 and result["labels/right_object"] >= 0.9  # 200 val images: 1.0 and 1.0
    saved = json.loads((tmp_path / "run" / "label_scores.json").read_text())
    labels = saved["settings"]["labels"]
    assert (labels["blocks"], labels["self_blocks"]) == ([0], [3])  # the preset's choice, measured on val
