"""Entry-point plumbing: instantiate callbacks/loggers (and close them), log the config, load weights."""
from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from omegaconf import DictConfig, OmegaConf

from dsdiff.chain.runs import chain_of, job_config
from dsdiff.utils.errors import MissingPathError, SettingError

log = logging.getLogger("dsdiff")

_WANDB_DIRS = {"WANDB_DIR": ".", "WANDB_CACHE_DIR": "wandb/cache", "WANDB_CONFIG_DIR": "wandb/config", "WANDB_DATA_DIR": "wandb/data"}
# what the user set before dsdiff started: kept; anything else points into the current run dir
_USER_WANDB_ENV = {var: os.environ.get(var) for var in _WANDB_DIRS}


def _instantiate_group(cfg: DictConfig | None, kind: str) -> list[Any]:
    objects = []
    for name, node in (cfg or {}).items():
        if isinstance(node, DictConfig) and "_target_" in node:
            log.debug("instantiating %s <%s>", kind, node._target_)
            objects.append(hydra.utils.instantiate(node))
    if objects:  # one line for the group
        log.info("%ss: %s", kind, ", ".join(type(o).__name__ for o in objects))
    return objects


def instantiate_callbacks(cfg: DictConfig | None) -> list[Callback]:
    return _instantiate_group(cfg, "callback")


def instantiate_loggers(cfg: DictConfig | None, output_dir: str | Path, stage: str | None = None) -> list[Logger]:
    """Loggers from config; W&B is kept offline unless WANDB_MODE says otherwise, and out of ~/.

    In a chain's run dir (one with a ``stages.json`` run record, see dsdiff.chain.runs), every logger writes
    into that dir, even when a later invocation resumes the chain: W&B runs are grouped by the
    chain, with ``job_type`` the stage (``train`` for ``stage=None``) and a run id fixed per chain
    and stage, so a resumed stage continues its W&B run; CSV/TensorBoard use one version folder
    per stage (``version_0`` for ``train``, else the stage name), appended to on resume.
    """
    if cfg and any("WandbLogger" in str(node.get("_target_", "")) for node in cfg.values() if node):
        os.environ.setdefault("WANDB_MODE", "offline")
        for var, sub in _WANDB_DIRS.items():
            if _USER_WANDB_ENV.get(var) is None:  # per run, so each multirun job keeps its own files
                path = Path(output_dir) / sub
                path.mkdir(parents=True, exist_ok=True)
                os.environ[var] = str(path)
    chain = chain_of(output_dir)
    if stage is None and chain is None:
        return _instantiate_group(cfg, "logger")
    job = stage or "train"
    loggers = []
    for node in (cfg or {}).values():
        if not (isinstance(node, DictConfig) and "_target_" in node):
            continue
        target = str(node._target_)
        extra: dict[str, Any] = {"save_dir": str(output_dir)} if chain else {}
        if "WandbLogger" in target:
            extra.update(group=chain or Path(output_dir).name, job_type=job)
            if stage is not None:
                extra["name"] = f"{node.get('name')}-{stage}"
            if chain:
                digest = hashlib.sha1(str(Path(output_dir).resolve()).encode()).hexdigest()[:6]
                extra.update(id=_wandb_id(f"{chain}-{job}-{digest}"), resume="allow")
        elif "CSVLogger" in target or "TensorBoardLogger" in target:
            extra["version"] = stage or "version_0"
        log.debug("instantiating logger <%s> for stage %s", target, job)
        loggers.append(hydra.utils.instantiate(node, **extra))
    if loggers:
        log.info("stage %s logs to %s", job, ", ".join(type(o).__name__ for o in loggers))
    return loggers


def _wandb_id(text: str) -> str:
    """W&B run ids may not contain / \\ # ? % : (and are at most 128 characters)."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)[-128:]


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv; this one appends to it (a resumed stage)."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                header = file.readline().strip()
            self.metrics_keys = sorted(header.split(",")) if header else []


class CSVLogger(_LightningCSVLogger):
    """Lightning's CSVLogger, except that logging into an existing version folder appends to its metrics.csv."""

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def trainer_callbacks(callbacks: list[Callback], loggers: list[Logger]) -> list[Callback]:
    """The callbacks a Trainer gets: without those that need a logger when there is none (``logger=none``),
    plus :class:`TrainBatchGuard`."""
    if not loggers:
        dropped = [type(c).__name__ for c in callbacks if isinstance(c, LearningRateMonitor)]
        if dropped:
            log.info("no logger (logger=none): %s left out", ", ".join(dropped))
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    return [*callbacks, TrainBatchGuard()]


class TrainBatchGuard(Callback):
    """Stops before the first step when a training batch would hold one image and the model has BatchNorm."""

    def on_train_start(self, trainer, pl_module) -> None:
        if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in pl_module.modules()):
            return
        if trainer.world_size > 1 and any(isinstance(m, torch.nn.SyncBatchNorm) for m in pl_module.modules()):
            return  # SyncBatchNorm: the statistics are over every process's share of the global batch
        loaders = trainer.train_dataloader
        for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
            batch_size = getattr(loader, "batch_size", None)
            sampler = getattr(loader, "sampler", None)
            try:
                n = len(sampler) if sampler is not None else len(loader.dataset)
            except TypeError:  # a stream without a length (on-the-fly generation)
                n = None
            if batch_size is None:
                continue
            ones = batch_size == 1 or n == 1 or (n is not None and not loader.drop_last and n % batch_size == 1)
            if ones:
                size = "" if n is None else f" from {n} training image{'s' if n != 1 else ''}"
                raise SettingError(
                    f"data.batch_size={batch_size}{size} gives a training batch of one image, and BatchNorm "
                    "cannot train on one image per batch: use data.batch_size=2 or more, and a training set "
                    "of at least 2 images (a synthetic set: raise synthetic.num_images, or relax synthetic.filters)"
                )


def log_config(cfg: DictConfig, loggers: list[Logger]) -> None:
    """Send the resolved config to every logger (W&B shows it as the run config)."""
    resolved = OmegaConf.to_container(job_config(cfg), resolve=True)
    for logger in loggers:
        logger.log_hyperparams(resolved)


class StageLoggers:
    """The loggers of the stage now running, and the one place they are closed.

    ``make(stage)`` builds a stage's loggers; :meth:`open` closes the previous stage's first, and
    leaving the ``with`` block closes the last ones (W&B runs are finished, so that each stage and
    each multirun job gets its own run).
    """

    def __init__(self, make: Callable[[str | None], list[Logger]]) -> None:
        self.make = make
        self.loggers: list[Logger] = []

    def __enter__(self) -> StageLoggers:
        return self

    def __exit__(self, error_type: type | None, *rest: object) -> None:
        self.close(failed=error_type is not None)

    def open(self, stage: str | None = None) -> list[Logger]:
        self.close()
        self.loggers = self.make(stage)
        return self.loggers

    def close(self, failed: bool = False) -> None:
        if any(isinstance(logger, WandbLogger) for logger in self.loggers):
            import wandb  # only when W&B is in use

            wandb.finish(exit_code=1 if failed else None)
        self.loggers = []


def to_float_dict(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor):
            value = value.item()
        if isinstance(value, (int, float)):
            out[key] = None if math.isnan(value) else float(value)
    return out


def load_weights(model: torch.nn.Module, ckpt_path: str | Path) -> None:
    """Load a Lightning checkpoint's ``state_dict`` (EMA weights when EMA was on) into ``model``.

    A file that is not a readable checkpoint, or whose weights do not fit ``model`` (another class
    count or architecture), is refused with one message naming the file.
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise MissingPathError(f"no checkpoint at {path}: pass ckpt_path=<run dir>/checkpoints/<file>.ckpt")
    if path.stat().st_size == 0:
        raise SettingError(f"checkpoint {path} is empty (0 bytes): pass another checkpoint of the run (e.g. its last.ckpt)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises a different type for each way a file can be broken
        raise SettingError(f"checkpoint {path} cannot be read ({type(error).__name__}: {(str(error).splitlines() or [''])[0].split('. ')[0][:160]}): "
                         "it is truncated or not a checkpoint; pass another checkpoint of the run") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise SettingError(f"{path} is not a Lightning checkpoint (no 'state_dict' key)")
    problem = weights_mismatch(model, checkpoint["state_dict"])
    if problem:
        raise SettingError(f"checkpoint {path} does not fit the configured model: {problem}. Evaluate it with the "
                         "config it was trained with (the run's .hydra/config.yaml, or the same +experiment and "
                         "model/data settings)")
    model.load_state_dict(checkpoint["state_dict"])


def weights_mismatch(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """One sentence on how ``state`` differs from ``model``'s weights (class count, missing keys), or None."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and tuple(expected[k].shape) != tuple(state[k].shape)]
    if not (missing or unexpected or shapes):
        return None
    parts = []
    classes = getattr(getattr(model, "net", model), "num_classes", None)
    found = {int(state[k].shape[0]) for k in shapes if expected[k].ndim and expected[k].shape[0] == classes}
    if classes is not None and found:
        parts.append(f"it predicts {', '.join(map(str, sorted(found)))} classes, the model {classes} (data.num_classes)")
    elif shapes:
        parts.append(f"{len(shapes)} weights have other shapes (e.g. {shapes[0]}: {tuple(state[shapes[0]].shape)} "
                     f"in the file, {tuple(expected[shapes[0]].shape)} in the model)")
    if missing or unexpected:
        parts.append(f"{len(missing)} of the model's {len(expected)} weights are missing from it"
                     + (f" (e.g. {missing[0]})" if missing else "")
                     + f" and {len(unexpected)} of its weights are unknown to the model"
                     + (f" (e.g. {unexpected[0]})" if unexpected else "") + ": another architecture")
    return "; ".join(parts)


@contextmanager
def job_loggers(cfg: DictConfig, output_dir: str | Path) -> Iterator[list[Logger]]:
    """The loggers of a one-stage job (generate, score_labels), the config logged to them; closed on exit."""
    with StageLoggers(partial(instantiate_loggers, cfg.get("logger"), output_dir)) as loggers:
        opened = loggers.open()
        log_config(cfg, opened)
        yield opened
