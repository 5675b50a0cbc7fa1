"""`python -m dsdiff.score_labels +experiment=NAME [score.images=N] [score.timesteps=[100,300,500]]`
(or `dsdiff-score-labels ...`).

Scores the experiment's labelller directly on real annotated images, in minutes instead of a
generate-and-train run: N images of the **tune split** (`data.tune`; the shapes world: its val
split; never the test split) are noised at the given timesteps, the generator's UNet reads each
with its caption (or a class template) and its class prompt, the recorded attention becomes labels
with `generator.labels`, and the labels are scored against the true masks. Writes
`<run dir>/label_scores.json` and `<run dir>/label_overlay.png` and logs both; per-image results
go to `<score.dir>/<settings digest>/`, so a killed run continues where it stopped and a rerun with
everything done only aggregates. `hparams_search=labels_optuna` sweeps `generator.labels` on the
returned objective (`labels/objective`).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from dsdiff.chain.config import check_devices, checks_experiment, config_dir
from dsdiff.chain.runtime import job_loggers
from dsdiff.data.classes import get_class_list
from dsdiff.data.datamodule import check_roots
from dsdiff.diffusion.generator import SyntheticGenerator
from dsdiff.diffusion.pipeline import (
    check_class_names,
    generator_source,
    load_tokenizer,
)
from dsdiff.score.plan import (
    ScoreSettings,
    check_generator,
    results_config,
    results_dir,
    score_groups,
    scored_timesteps,
    select_items,
    train_timesteps,
)
from dsdiff.score.predict import (
    ScoreModule,
    checked_rows,
    images_per_class,
    run_scoring,
)
from dsdiff.score.report import label_metrics, save_overlay_grid
from dsdiff.score.store import ScoreStore
from dsdiff.utils.config import to_plain
from dsdiff.utils.errors import SettingError, exits_cleanly
from dsdiff.utils.io import write_json_atomic

log = logging.getLogger("dsdiff")


def check_scoring(cfg: DictConfig) -> tuple[ScoreSettings, Any]:
    """The score settings, the generator's labelling settings and the tune split, checked without weights."""
    check_devices(cfg.trainer)
    settings = ScoreSettings.of(to_plain(cfg.score))
    labels = check_generator(to_plain(cfg.generator))
    if cfg.data.get("tune") is None:
        raise SettingError("data.tune=null: score_labels scores on the tune split (never on the test split); "
                           "set data.tune (e.g. the dataset's default: 300 train images for VOC)")
    check_roots({"tune": cfg.data.tune})
    generator_source(cfg.generator.model)
    return settings, labels


def score_labels(cfg: DictConfig, loggers: list | None = None) -> dict[str, Any]:
    """Score the labelling settings of ``cfg`` on its tune split; returns ``label_scores.json``'s content.

    Every setting (score.*, generator.*, the model, the timesteps against its noise schedule, the
    tune split's size) is checked before any file is written.
    """
    generator, class_names = to_plain(cfg.generator), get_class_list(cfg.data.class_list).classes
    settings, labels = check_scoring(cfg)
    check_class_names(load_tokenizer(generator["model"]), class_names)  # also: is it a pipeline at all
    timesteps = scored_timesteps(settings, labels, train_timesteps(generator["model"]))
    dataset = hydra.utils.instantiate(cfg.data.tune)()  # the tune split only: data.test is never built
    items = select_items(dataset, class_names, settings)
    config = results_config(generator, labels, settings, timesteps, to_plain(cfg.data.tune), class_names)
    store = ScoreStore(results_dir(settings, config))
    store.check_settings(config)

    def build(device) -> SyntheticGenerator:
        return SyntheticGenerator.from_settings(generator, class_names, device, labels=labels)

    def make_trainer(callbacks: list):
        return hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    log.info("scoring %d tune images at timesteps %s into %s", len(items), timesteps, store.root)
    scored = run_scoring(store, config, dataset, items, score_groups(len(items), settings.batch_size), settings.seed,
                         ScoreModule(build, timesteps, len(class_names)), make_trainer,
                         progress=cfg.trainer.get("enable_progress_bar", True))
    rows = checked_rows(store, items)
    metrics = label_metrics(rows, class_names, settings.min_certain)
    output_dir = Path(cfg.paths.output_dir)
    grid = save_overlay_grid(store, dataset, items, settings.grid_rows, output_dir / "label_overlay.png")
    if grid:
        log.info("picture: label overlay -> %s", grid)
    result = {
        **metrics,
        "images_per_class": images_per_class(rows, class_names),
        "groups_scored_now": scored,
        "results_dir": str(store.root.resolve()),
        "grid": str(grid) if grid else None,
        "settings": {"score": {**vars(settings), "timesteps": list(settings.timesteps)}, "scored_timesteps": timesteps,
                     "labels": labels.to_dict(), "model": str(generator["model"]), "tune_split": to_plain(cfg.data.tune)},
    }
    write_json_atomic(output_dir / "label_scores.json", result)
    for logger in loggers or ():
        logger.log_metrics({k: v for k, v in metrics.items() if v is not None}, step=0)
        if grid and hasattr(logger, "log_image"):
            logger.log_image(key="labels/overlay", images=[str(grid)])
        logger.finalize("success")
    return result


@checks_experiment("train")  # a wrong +experiment=NAME: one error block, before Hydra composes
@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="score_labels")
@exits_cleanly  # a ConfigError: one "dsdiff: error:" block and exit status 2, no traceback
def main(cfg: DictConfig) -> float:
    """Returns the sweep objective (``labels/objective``; see conf/hparams_search/labels_optuna.yaml)."""
    output_dir = Path(cfg.paths.output_dir)
    check_scoring(cfg)  # before the loggers write their first file
    with job_loggers(cfg, output_dir) as loggers:
        result = score_labels(cfg, loggers)
    log.info("label scores: mIoU %s, uncertain %s, pointing %s, right-object %s (%s)", result["labels/mIoU"],
             result["labels/uncertain"], result["labels/pointing"], result["labels/right_object"], output_dir / "label_scores.json")
    return float(result["labels/objective"])


if __name__ == "__main__":
    main()
