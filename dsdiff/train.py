"""`python -m dsdiff.train +experiment=NAME`: train a segmenter, then test it (plain and TTA)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from dsdiff.config import config_dir
from dsdiff.runtime import (
    finish_loggers,
    instantiate_callbacks,
    instantiate_loggers,
    load_weights,
    log_config,
    to_float_dict,
    write_json_atomic,
)

log = logging.getLogger("dsdiff")


def check_config(cfg: DictConfig) -> None:
    """Fail early, before any data or weights are loaded, on settings that cannot work."""
    crop = cfg.data.get("train_transform", {}).get("crop_size")
    stride = cfg.model.net.get("output_stride", 8)
    for side in [crop] if isinstance(crop, int) else list(crop or []):
        if side % stride:
            raise ValueError(
                f"data.train_transform.crop_size={crop} is not a multiple of the output stride {stride}: "
                f"use e.g. {side - side % stride or stride}"
            )


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit, then test the best checkpoint; returns (metrics, objects). Writes <run dir>/metrics.json."""
    check_config(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)

    datamodule = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model)
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    loggers = instantiate_loggers(cfg.get("logger"), output_dir)
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    log_config(cfg, loggers)

    metrics: dict[str, float] = {}
    if cfg.get("train"):
        log.info("training; checkpoints go to %s", output_dir / "checkpoints")
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        metrics.update(to_float_dict(trainer.callback_metrics))
    if cfg.get("test"):
        ckpt = _best_checkpoint(trainer) if cfg.get("train") else cfg.get("ckpt_path")
        if ckpt:
            # the checkpoint's state_dict holds the EMA weights; trainer.test(ckpt_path=...) would
            # restore the raw weights through the EMA callback instead
            log.info("testing weights from %s", ckpt)
            load_weights(model, ckpt)
            metrics["ckpt_path"] = str(ckpt)  # type: ignore[assignment]
        trainer.test(model, datamodule=datamodule)
        metrics.update(to_float_dict(trainer.callback_metrics))

    write_json_atomic(output_dir / "metrics.json", metrics)
    log.info("metrics written to %s", output_dir / "metrics.json")
    finish_loggers(loggers)
    return metrics, {"cfg": cfg, "datamodule": datamodule, "model": model, "trainer": trainer}


def _best_checkpoint(trainer: L.Trainer) -> str | None:
    """The best checkpoint by a monitored metric, else the latest one saved."""
    checkpoints = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]
    for callback in sorted(checkpoints, key=lambda c: c.monitor is None):
        if callback.best_model_path:
            return callback.best_model_path
    return None


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics, _ = train(cfg)
    value = metrics.get(cfg.get("optimized_metric"))
    return None if value is None else float(value)


if __name__ == "__main__":
    main()
