"""Data-parallel training: how many processes Lightning will run, each one's share of the batch, SyncBatchNorm.

``data.batch_size`` is the global training batch (the images one optimizer step sees, summed over
every process): with ``W`` processes (``trainer.devices`` x ``trainer.num_nodes``, or the world size
of torchrun / SLURM when the run is launched under one) each loads ``batch_size / W``. So the same
config trains the same recipe on one GPU and on eight; a batch that does not divide is refused
before the run writes anything (:func:`check_batch`). Under DDP on GPUs the segmenter's BatchNorm
layers become SyncBatchNorm (``trainer.sync_batchnorm``, on in ``trainer=ddp``): their statistics are
those of the global batch, as in the original's 2-GPU SyncBN recipe. SyncBatchNorm works on GPUs only;
on CPUs (``trainer=ddp_cpu``, gloo) each process keeps plain BatchNorm over its own share
(:func:`trainer_overrides`).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments.slurm import _is_srun_used
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import ListConfig

from dsdiff.utils.errors import SettingError

log = logging.getLogger("dsdiff")
CUDA = ("gpu", "cuda")


def resolved_accelerator(trainer: Mapping) -> str:
    """``trainer.accelerator`` as Lightning will pick it: ``auto`` is ``cuda`` when torch finds a GPU, else ``cpu``."""
    accelerator = str(trainer.get("accelerator") or "auto").lower()
    if accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if accelerator in CUDA else accelerator


def processes_per_node(trainer: Mapping) -> int:
    """The number of processes ``trainer.devices`` asks for on each node (an int, a list or ``"0,1"`` of GPU ids,
    ``"auto"`` or -1: every GPU torch finds, one process on a CPU)."""
    devices = trainer.get("devices", "auto")
    cuda = resolved_accelerator(trainer) == "cuda"
    found = torch.cuda.device_count() if cuda and torch.cuda.is_available() else 1
    if isinstance(devices, (list, tuple, ListConfig)):
        return len(devices)
    text = str(devices).strip()
    if text in ("auto", "-1"):
        return found if cuda else 1
    if "," in text:  # GPU ids, as Lightning reads "0,1"
        return len([part for part in text.split(",") if part.strip()])
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise SettingError(f"trainer.devices={devices!r}: use a number of devices (e.g. 2), a list of GPU ids, or auto")


def launcher_world_size() -> int | None:
    """The world size of torchrun or an ``srun`` job step when this process runs under one (Lightning then takes
    its processes from them, and checks that they match ``trainer.devices`` x ``trainer.num_nodes``), else None."""
    if dist.is_available() and dist.is_torchelastic_launched() and os.environ.get("WORLD_SIZE", "").isdigit():
        return int(os.environ["WORLD_SIZE"])
    if _is_srun_used() and os.environ.get("SLURM_NTASKS", "").isdigit():
        return int(os.environ["SLURM_NTASKS"])  # _is_srun_used: Lightning's own test for a SLURM launch
    return None


def world_size(trainer: Mapping) -> int:
    """The number of training processes: the launcher's world size if any, else ``devices`` x ``num_nodes``."""
    launched = launcher_world_size()
    if launched is not None:
        return launched
    return processes_per_node(trainer) * int(trainer.get("num_nodes") or 1)


def _processes(trainer: Mapping, world: int) -> str:
    """How the error messages name the processes: ``trainer.devices=4`` (x ``trainer.num_nodes=2`` = 8)."""
    nodes = int(trainer.get("num_nodes") or 1)
    if launcher_world_size() is not None:
        return f"the launcher's {world}"
    devices = f"trainer.devices={trainer.get('devices')}"
    return f"{devices} x trainer.num_nodes={nodes} = {world}" if nodes > 1 else f"{devices}"


def syncs_batchnorm(trainer: Mapping) -> bool:
    """Whether Lightning will turn BatchNorm into SyncBatchNorm: ``sync_batchnorm`` set and the devices GPUs."""
    return bool(trainer.get("sync_batchnorm")) and resolved_accelerator(trainer) == "cuda"


def batch_split(batch_size: int, trainer: Mapping) -> dict[str, int]:
    """``{"global", "per_device", "devices"}``: the global training batch and each process's share."""
    world = world_size(trainer)
    return {"global": int(batch_size), "per_device": int(batch_size) // world, "devices": world}


def check_batch(cfg: Any) -> None:
    """Refuse a global ``data.batch_size`` that the training processes cannot share evenly, or that leaves a
    process fewer than 2 images for BatchNorm layers that are not synchronised."""
    if not cfg.get("train"):
        return
    batch_size, trainer = int(cfg.data.get("batch_size", 8)), cfg.trainer
    world = world_size(trainer)
    if world <= 1:
        return
    if batch_size % world:
        lower, upper = batch_size - batch_size % world, batch_size + world - batch_size % world
        raise SettingError(
            f"data.batch_size={batch_size} does not divide over {_processes(trainer, world)} processes: "
            f"data.batch_size is the global batch, and each process loads batch_size / {world}; use "
            f"data.batch_size={' or '.join(str(b) for b in (lower, upper) if b > 0)}, or other trainer.devices")
    if batch_size // world < 2 and not syncs_batchnorm(trainer):
        raise SettingError(
            f"data.batch_size={batch_size} over {_processes(trainer, world)} processes gives each "
            f"process {batch_size // world} image, and its BatchNorm layers are not synchronised "
            f"({'sync_batchnorm works on GPUs only' if trainer.get('sync_batchnorm') else 'trainer.sync_batchnorm=false'}):"
            f" use data.batch_size={2 * world} or more")


def trainer_overrides(trainer: Mapping) -> dict[str, Any]:
    """Keyword arguments over ``cfg.trainer`` for a run on these devices: ``sync_batchnorm=False`` off GPUs,
    where SyncBatchNorm cannot run (each process then normalises over its own share of the batch)."""
    if trainer.get("sync_batchnorm") and not syncs_batchnorm(trainer):
        return {"sync_batchnorm": False}
    return {}


def log_batch(cfg: Any) -> None:
    """Rank 0 logs how a multi-process run splits the batch, and when ``sync_batchnorm=true`` is dropped off GPUs."""
    trainer = cfg.trainer
    split = batch_split(int(cfg.data.get("batch_size", 8)), trainer)
    if split["devices"] <= 1 or rank_zero_only.rank != 0:
        return
    log.info("data.batch_size=%d is the global batch: %d images on each of %d processes", split["global"],
             split["per_device"], split["devices"])
    if trainer_overrides(trainer):
        log.info("trainer.sync_batchnorm=true is off: SyncBatchNorm works on GPUs only (accelerator=%s here), so each "
                 "process keeps plain BatchNorm over its own %d images", resolved_accelerator(trainer), split["per_device"])
