"""`python -m dsdiff.pretrain +experiment=shapes_t2i`: train the tiny text-to-image model, export it.

The run resumes from ``<run dir>/checkpoints/last.ckpt`` when one exists (``ckpt_path: auto``),
so rerunning the same command continues an interrupted training. At the end the EMA weights
are saved as a diffusers pipeline folder (``export_dir``) that ``SyntheticGenerator.from_pretrained``
loads like Stable Diffusion, with ``training.json`` (steps, minutes, command) beside it.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from dsdiff.chain.config import checks_experiment, config_dir
from dsdiff.chain.runtime import (
    instantiate_callbacks,
    instantiate_loggers,
    log_config,
    to_float_dict,
)
from dsdiff.shapes_t2i.net import save_pipeline
from dsdiff.utils.errors import MissingPathError, SettingError, exits_cleanly
from dsdiff.utils.io import write_json_atomic

log = logging.getLogger("dsdiff")


def resolve_checkpoint(ckpt_path: str | None, output_dir: Path) -> str | None:
    """``auto``: the run's last.ckpt if there is one (else start fresh); a path must exist."""
    if ckpt_path in (None, "", "null"):
        return None
    if ckpt_path == "auto":
        last = output_dir / "checkpoints" / "last.ckpt"
        return str(last) if last.is_file() else None
    if not Path(ckpt_path).is_file():
        raise MissingPathError(f"no checkpoint at {ckpt_path}: pass ckpt_path=<run dir>/checkpoints/last.ckpt, auto or null")
    return str(ckpt_path)


def pretrain(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit (or, with ``train=false``, load ``ckpt_path``), then export the EMA pipeline; returns (metrics, objects)."""
    if cfg.get("entry_point") != "pretrain":
        raise SettingError(f"this config is for `python -m dsdiff.{cfg.get('entry_point', 'train')}`, not dsdiff.pretrain")
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    ckpt = resolve_checkpoint(cfg.get("ckpt_path"), output_dir)

    datamodule = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model)
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    loggers = instantiate_loggers(cfg.get("logger"), output_dir)
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    log_config(cfg, loggers)

    metrics: dict[str, Any] = {}
    if cfg.get("train"):
        log.info("training%s; checkpoints go to %s", f" from {ckpt}" if ckpt else "", output_dir / "checkpoints")
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt)  # EMA weights are in the model at the end
        metrics.update(to_float_dict(trainer.callback_metrics))
        steps = trainer.global_step
    else:
        if ckpt is None:
            raise MissingPathError(f"train=false needs a checkpoint: none at {output_dir}/checkpoints/last.ckpt; pass ckpt_path=")
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
        model.load_state_dict(checkpoint["state_dict"])  # the EMA weights (WeightAveraging saves them there)
        model.on_load_checkpoint(checkpoint)
        steps = int(checkpoint["global_step"])

    export_dir = Path(cfg.export_dir)
    save_pipeline(model.to_pipeline(), export_dir)
    metrics.update({"steps": steps, "train_minutes": round(model.train_seconds / 60, 2), "export_dir": str(export_dir)})
    command = "python -m dsdiff.pretrain " + " ".join(cfg.get("overrides", []))
    write_json_atomic(export_dir / "training.json", {
        **metrics, **({"command": command} if cfg.get("train") else {"exported_by": command, "checkpoint": os.path.relpath(ckpt)}),
        "seed": cfg.get("seed"), "batch_size": cfg.data.batch_size, "ema_decay": cfg.get("ema_decay"),
        "exported_at": time.strftime("%Y-%m-%d %H:%M:%S"), **warm_start(cfg),
    })
    write_json_atomic(output_dir / "metrics.json", metrics)
    log.info("pipeline (EMA weights, %d steps, %.1f training minutes) saved to %s", steps, model.train_seconds / 60, export_dir)
    return metrics, {"cfg": cfg, "datamodule": datamodule, "model": model, "trainer": trainer}


def warm_start(cfg: DictConfig) -> dict[str, Any]:
    """The model a warm start began from (``model.pipeline.init``): its folder, digest and own training.json,
    so an exported model's card can state its whole lineage."""
    init = (cfg.model.get("pipeline") or {}).get("init")
    if not init:
        return {}
    from dsdiff.diffusion.pipeline import folder_digest

    init = Path(init)
    before = init / "training.json"
    return {"warm_start": {"from": str(init), "digest": folder_digest(init),
                           "training": json.loads(before.read_text()) if before.is_file() else None}}


@checks_experiment("pretrain")  # a wrong +experiment=NAME: one error block, before Hydra composes
@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="pretrain")
@exits_cleanly  # a ConfigError: one "dsdiff: error:" block and exit status 2, no traceback
def main(cfg: DictConfig) -> None:
    with open_dict(cfg):
        cfg.overrides = list(HydraConfig.get().overrides.task)
    pretrain(cfg)


if __name__ == "__main__":
    sys.exit(main())
