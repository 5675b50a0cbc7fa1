"""Entry-point plumbing: instantiate callbacks/loggers, log the config, write metrics atomically."""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import hydra
import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("dsdiff")

_WANDB_DIRS = {"WANDB_DIR": ".", "WANDB_CACHE_DIR": "wandb/cache", "WANDB_CONFIG_DIR": "wandb/config", "WANDB_DATA_DIR": "wandb/data"}
# what the user set before dsdiff started: kept; anything else points into the current run dir
_USER_WANDB_ENV = {var: os.environ.get(var) for var in _WANDB_DIRS}


def _instantiate_group(cfg: DictConfig | None, kind: str) -> list[Any]:
    objects = []
    for name, node in (cfg or {}).items():
        if isinstance(node, DictConfig) and "_target_" in node:
            log.info("instantiating %s <%s>", kind, node._target_)
            objects.append(hydra.utils.instantiate(node))
    return objects


def instantiate_callbacks(cfg: DictConfig | None) -> list[Callback]:
    return _instantiate_group(cfg, "callback")


def instantiate_loggers(cfg: DictConfig | None, output_dir: str | Path, stage: str | None = None) -> list[Logger]:
    """Loggers from config; W&B is kept offline unless WANDB_MODE says otherwise, and out of ~/.

    ``stage`` (a later stage of the chain, e.g. ``selftrain_1``) gives each stage its own W&B run
    (named ``<name>-<stage>``, grouped by run dir) and its own CSV version folder.
    """
    if cfg and any("WandbLogger" in str(node.get("_target_", "")) for node in cfg.values() if node):
        os.environ.setdefault("WANDB_MODE", "offline")
        for var, sub in _WANDB_DIRS.items():
            if _USER_WANDB_ENV.get(var) is None:  # per run, so each multirun job keeps its own files
                path = Path(output_dir) / sub
                path.mkdir(parents=True, exist_ok=True)
                os.environ[var] = str(path)
    if stage is None:
        return _instantiate_group(cfg, "logger")
    loggers = []
    for node in (cfg or {}).values():
        if not (isinstance(node, DictConfig) and "_target_" in node):
            continue
        target = str(node._target_)
        extra: dict[str, Any] = {}
        if "WandbLogger" in target:
            extra = {"name": f"{node.get('name')}-{stage}", "group": Path(output_dir).name, "job_type": stage}
        elif "CSVLogger" in target or "TensorBoardLogger" in target:
            extra = {"version": stage}
        loggers.append(hydra.utils.instantiate(node, **extra))
    return loggers


def log_config(cfg: DictConfig, loggers: list[Logger]) -> None:
    """Send the resolved config to every logger (W&B shows it as the run config)."""
    resolved = OmegaConf.to_container(job_config(cfg), resolve=True)
    for logger in loggers:
        logger.log_hyperparams(resolved)


def job_config(cfg: DictConfig) -> DictConfig:
    """The config without Hydra's own node (which only resolves inside a Hydra run)."""
    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.pop("hydra", None)
    return OmegaConf.create(plain)


def finish_loggers(loggers: list[Logger]) -> None:
    """Close W&B runs so that each multirun job gets its own run."""
    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        wandb.finish()


def to_float_dict(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor):
            value = value.item()
        if isinstance(value, (int, float)):
            out[key] = None if math.isnan(value) else float(value)
    return out


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write text through a temp file and rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write JSON atomically (see :func:`write_text_atomic`)."""
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def load_weights(model: torch.nn.Module, ckpt_path: str | Path) -> None:
    """Load a Lightning checkpoint's ``state_dict`` (EMA weights when EMA was on) into ``model``."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: pass ckpt_path=<run dir>/checkpoints/<file>.ckpt")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a Lightning checkpoint (no 'state_dict' key)")
    model.load_state_dict(checkpoint["state_dict"])
