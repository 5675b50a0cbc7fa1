"""`python -m dsdiff.train +experiment=NAME`: the whole method (dsdiff.chain.stages), stage by stage, resumable.

This entry point checks the config, builds the chain's objects from it (``hydra.utils.instantiate``)
and runs :func:`dsdiff.chain.stages.run_chain` in the run dir that :func:`dsdiff.chain.runs.open_run` picks:
a fresh run, or with ``resume=true`` (the latest run of this task, if its settings match) or
``resume=DIR`` the chain being continued. With a synthetic training set (``data/train=synthetic``,
see :func:`trains_on_synthetic`) the stages are generate, train, pseudo_<r>, selftrain_<r>, test;
with real labels (``data/train=voc_real`` ...) only train and test. ``<run>/metrics.json`` holds
the test metrics, the tested file and the final stage's ``tune/mIoU`` (the sweep objective).
"""
from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, open_dict

from dsdiff.chain.config import check_devices, checks_experiment, config_dir
from dsdiff.chain.debug import log_debug_overrides
from dsdiff.chain.parallel import check_batch, log_batch, trainer_overrides
from dsdiff.chain.provenance import training_record
from dsdiff.chain.runs import open_run
from dsdiff.chain.runtime import (
    instantiate_callbacks,
    instantiate_loggers,
    log_config,
    trainer_callbacks,
)
from dsdiff.chain.selftrain import INITS, MODES
from dsdiff.chain.stages import ChainSettings, Factories, SelfTraining, run_chain
from dsdiff.chain.sweeps import check_search
from dsdiff.data.datamodule import check_roots
from dsdiff.diffusion.pipeline import generator_source
from dsdiff.generate import generate
from dsdiff.models.checkpoint import is_pruned
from dsdiff.prompting.stage import ensure_prompts
from dsdiff.synthetic.spec import check_settings
from dsdiff.utils.config import to_plain
from dsdiff.utils.errors import (
    MissingPathError,
    SettingError,
    exits_cleanly,
    find_config_error,
)

log = logging.getLogger("dsdiff")


def check_config(cfg: DictConfig) -> None:
    """Fail early, before any data or weights are loaded and before the run writes a file, on settings
    that cannot work: values, the dataset folders, and (for a synthetic chain) the generation settings."""
    check_values(cfg)
    check_search(trains_on_synthetic(cfg))  # a sweep samples only knobs this run uses
    check_devices(cfg.trainer)
    check_batch(cfg)  # data.batch_size is the global batch: it must divide over the processes
    check_roots(cfg.data)
    check_model(cfg.model)
    if trains_on_synthetic(cfg) and cfg.get("train"):
        generator = to_plain(cfg.generator)
        check_settings(generator, to_plain(cfg.synthetic))
        if generator.get("model"):  # a missing folder, or a hub id that cannot be had now: at once
            generator_source(generator["model"])


def check_model(model: DictConfig) -> None:
    """Build the segmenter on the meta device (no memory, no download: ``encoder_weights`` left out), so a
    wrong ``model.*`` setting stops the run before generation, not hours later when training starts."""
    import torch

    shape = model.copy()
    if "encoder_weights" in shape.get("net", {}):
        with open_dict(shape):
            shape.net.encoder_weights = None  # whether the weights can be had is checked when they are loaded
    try:
        with torch.device("meta"):
            hydra.utils.instantiate(shape)
    except Exception as err:  # Hydra wraps the net's SettingError in an InstantiationException
        error = find_config_error(err)
        if error is None:
            raise
        raise error from None


def check_values(cfg: DictConfig) -> None:
    """The settings' values, each against what it can be."""
    crop = cfg.data.get("train_transform", {}).get("crop_size")
    stride = cfg.model.net.get("output_stride", 8)
    for side in [crop] if isinstance(crop, int) else list(crop or []):
        if side % stride:
            raise SettingError(
                f"data.train_transform.crop_size={crop} is not a multiple of the output stride {stride}: "
                f"use e.g. {side - side % stride or stride}"
            )
    if cfg.get("train") and cfg.data.get("train_transform") is not None:
        hydra.utils.instantiate(cfg.data.train_transform)  # its settings are validated when it is built (cheap)
    max_steps = cfg.trainer.get("max_steps")
    if cfg.get("train") and not cfg.trainer.get("fast_dev_run") and max_steps is not None and int(max_steps) <= 0:
        raise SettingError(
            f"trainer.max_steps={max_steps} trains nothing (an untrained network would be tested and pseudo-label): "
            "set max_steps=<optimizer steps> (the paper: 20000 VOC, 40000 COCO), or train=false ckpt_path=FILE to only test")
    if not cfg.get("train") and cfg.get("test") and not cfg.get("ckpt_path") and not cfg.get("resume"):
        raise SettingError("train=false test=true would test an untrained network: pass ckpt_path=<a checkpoint> "
                         "(e.g. <run dir>/checkpoints/last.ckpt), or resume=<run dir>")
    batch = cfg.data.get("batch_size", 2)
    if isinstance(batch, bool) or not isinstance(batch, int):
        raise SettingError(f"data.batch_size={batch!r}: images per training batch (all processes), a whole number >= 2")
    if cfg.get("train") and batch < 2:
        raise SettingError(f"data.batch_size={cfg.data.batch_size}: the segmenter's BatchNorm layers need at least 2 "
                         "images per training batch; use data.batch_size=2 or more")
    prune = cfg.get("prune_checkpoints", False)
    if not isinstance(prune, bool):
        raise SettingError(  # noqa: TRY004  (a setting's value: the config errors here are all ValueError)
            f"prune_checkpoints={prune!r}: use true (once the test metrics are written, keep only the "
            "final weights) or false (keep every stage's last.ckpt)")
    if prune and not cfg.get("test"):
        log.warning("prune_checkpoints=true with test=false: checkpoints are pruned only once a run's test metrics "
                    "are written, so this invocation keeps them all")
    ckpt = cfg.get("ckpt_path")
    if ckpt and not Path(ckpt).expanduser().is_file():
        raise MissingPathError(f"ckpt_path={ckpt}: no checkpoint there: pass an existing file (e.g. <run dir>/"
                               "checkpoints/last.ckpt), or leave ckpt_path out")
    if cfg.get("train") and ckpt and Path(ckpt).is_file() and is_pruned(ckpt):
        raise SettingError(f"ckpt_path={ckpt} holds final weights only (prune_checkpoints=true dropped its optimizer "
                         "state), so training cannot resume from it: evaluate it (python -m dsdiff.evaluate "
                         f"ckpt_path={ckpt}), or train without ckpt_path")
    selftrain = cfg.get("selftrain") or {}
    if selftrain.get("mode", "replace") not in MODES:
        raise SettingError(f"selftrain.mode={selftrain.get('mode')!r}: use one of {', '.join(MODES)}")
    if selftrain.get("init", "scratch") not in INITS:
        raise SettingError(f"selftrain.init={selftrain.get('init')!r}: use scratch (a fresh student, the paper's) or "
                         "teacher (the student starts from the teacher's final weights)")


def trains_on_synthetic(cfg: DictConfig) -> bool:
    """Whether ``data.train`` is the synthetic dataset, which the chain generates and self-trains on.

    The synthetic training set's config takes the ``synthetic`` settings (conf/data/train/synthetic.yaml:
    ``synthetic: ${synthetic}``); a real one (voc_real, voc_aug, coco_real, shapes_real) has no such key.
    """
    train_set = cfg.data.get("train")
    return isinstance(train_set, DictConfig) and "synthetic" in train_set.keys()


def chain_settings(cfg: DictConfig) -> ChainSettings:
    synthetic, selftrain = cfg.get("synthetic") or {}, cfg.get("selftrain") or {}
    return ChainSettings(
        synthetic=trains_on_synthetic(cfg), synthetic_dir=Path(synthetic["dir"]) if synthetic.get("dir") else None,
        synthetic_mode=synthetic.get("mode", "cached"), num_images=synthetic.get("num_images"),
        class_list=cfg.data.get("class_list"), train=bool(cfg.get("train")), test=bool(cfg.get("test")),
        ckpt_path=cfg.get("ckpt_path"), tune=cfg.data.get("tune") is not None,
        selftrain=SelfTraining(rounds=int(selftrain.get("rounds", 0)), mode=selftrain.get("mode", "replace"),
                               threshold=selftrain.get("threshold", 0.9), tta=bool(selftrain.get("tta", False)),
                               batch_size=selftrain.get("batch_size", 8), init=selftrain.get("init", "scratch")),
        progress=cfg.trainer.get("enable_progress_bar", True), output_dir=Path(cfg.paths.output_dir),
        prune_checkpoints=bool(cfg.get("prune_checkpoints", False)))


def make_trainer(cfg: DictConfig, root: Path, loggers: list, callbacks: list | None = None) -> L.Trainer:
    """A stage's Trainer: the configured callbacks (unless given), checkpoints in ``root/checkpoints``."""
    callbacks = instantiate_callbacks(cfg.get("callbacks")) if callbacks is None else callbacks
    callbacks = trainer_callbacks(callbacks, loggers)
    for callback in callbacks:
        if isinstance(callback, ModelCheckpoint):
            callback.dirpath = str(root / "checkpoints")
    extra = {} if cfg.data.get("tune") is not None else {"limit_val_batches": 0}  # no tune split: no validation
    extra.update(trainer_overrides(cfg.trainer))  # no SyncBatchNorm off GPUs
    return hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, default_root_dir=str(root), **extra)


def make_predictor(cfg: DictConfig, out: Path, callbacks: list) -> L.Trainer:
    """The pseudo-labelling Trainer: the given callbacks, no logger."""
    return hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=False, default_root_dir=str(out),
                                   **trainer_overrides(cfg.trainer))


def make_model(cfg: DictConfig) -> L.LightningModule:
    """A stage's LightningModule; its checkpoints record what trained them (the data, recipe and command)."""
    model = hydra.utils.instantiate(cfg.model)
    model.provenance = training_record(cfg)
    return model


def factories(cfg: DictConfig, work: Path) -> Factories:
    return Factories(datamodule=partial(hydra.utils.instantiate, cfg.data), model=partial(make_model, cfg),
                     trainer=partial(make_trainer, cfg), predictor=partial(make_predictor, cfg),
                     loggers=partial(instantiate_loggers, cfg.get("logger"), work), log_config=partial(log_config, cfg),
                     generate=partial(generate, cfg), prompts=partial(on_the_fly_prompts, cfg))


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Run (or resume) the chain; returns (metrics, objects) and writes <run dir>/metrics.json."""
    log_debug_overrides(cfg)  # a debug config that replaces a knob the user passed says so
    check_config(cfg)
    log_batch(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    work, stages = open_run(cfg)  # records the run's identity before its first stage
    result = run_chain(chain_settings(cfg), factories(cfg, work), work, stages)
    return result.metrics, {"cfg": cfg, "datamodule": result.datamodule, "model": result.model, "trainer": result.trainer,
                            "work_dir": work}


def on_the_fly_prompts(cfg: DictConfig) -> None:
    """synthetic.mode=on_the_fly: run the prompts stage (captions by default) and point the stream at its file."""
    if cfg.synthetic.get("prompts"):
        return
    path = ensure_prompts(cfg)
    if path is not None:
        with open_dict(cfg):
            cfg.synthetic.prompts = str(path)


@checks_experiment("train")  # a wrong +experiment=NAME: one error block, before Hydra composes
@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
@exits_cleanly  # a ConfigError: one "dsdiff: error:" block and exit status 2, no traceback
def main(cfg: DictConfig) -> float | None:
    metrics, _ = train(cfg)
    value = metrics.get(cfg.get("optimized_metric"))
    return None if value is None else float(value)


if __name__ == "__main__":
    main()
