"""What trained a checkpoint, in plain types: the record a self-describing checkpoint carries under
``checkpoint["dsdiff"]["training"]`` and an exported model card states.

It says which data trained the net (the synthetic folder's generator, prompts digest and sample count,
or the real split), how many real pixel labels were used (none for training on synthetic data; the
tune split's images, which pick nothing but are read for curves and the final measurement), the recipe
(model, steps, global batch, optimizer, EMA, self-training) and the command that ran it.
"""
from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

import dsdiff
from dsdiff.synthetic.store import CONFIG_FILE

log = logging.getLogger("dsdiff")


def _plain(node: Any) -> Any:
    """A config node as plain dicts, lists and scalars (``weights_only``-loadable); None if it does not resolve."""
    if node is None or isinstance(node, (str, int, float, bool)):
        return node
    try:
        return OmegaConf.to_container(node, resolve=True)
    except Exception:  # an interpolation that needs a runtime resolver: leave it out
        return None


def _choices() -> dict[str, str]:
    """Hydra's config-group choices (``model``, ``data/train``, ...) and the command line, when under Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            hydra_cfg = HydraConfig.get()
            choices = {str(k): str(v) for k, v in hydra_cfg.runtime.choices.items() if v is not None}
            choices["__command__"] = " ".join(["python -m dsdiff.train", *(shlex.quote(a) for a in hydra_cfg.overrides.task)])
            return choices
    except Exception:  # outside a Hydra app
        pass
    return {"__command__": " ".join(["python -m dsdiff.train", *(shlex.quote(a) for a in sys.argv[1:])])}


def _split(node: Any) -> dict[str, Any] | None:
    """A dataset config's identity: its class, split and size where it has them."""
    if not isinstance(node, DictConfig):
        return None
    keys = ("_target_", "split", "size", "root", "split_file", "max_samples")
    return {k.strip("_") or k: _plain(node.get(k)) for k in keys if node.get(k) is not None}


def synthetic_record(cfg: DictConfig) -> dict[str, Any]:
    """The synthetic training set: folder, size, mode and what its ``dataset.json`` says made it."""
    synthetic = cfg.get("synthetic") or {}
    folder = synthetic.get("dir")
    record: dict[str, Any] = {"dir": str(folder) if folder else None, "num_images": _plain(synthetic.get("num_images")),
                              "mode": _plain(synthetic.get("mode", "cached"))}
    made = Path(str(folder)) / CONFIG_FILE if folder else None
    if made is not None and made.is_file():
        try:
            written = json.loads(made.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            log.warning("cannot read %s for the checkpoint's training record: %s", made, err)
            written = {}
        record["generator"] = written.get("generator")
        record["prompts"] = written.get("prompts")
        record["seed"] = written.get("seed")
    else:  # on the fly, or not generated yet: what the config asks for
        generator = cfg.get("generator") or {}
        record["generator"] = {"model": _plain(generator.get("model")), "labels": _plain(generator.get("labels"))}
        record["prompts"] = {"synthetic.prompts": _plain(synthetic.get("prompts"))}
    return record


def training_record(cfg: DictConfig) -> dict[str, Any]:
    """The checkpoint's ``training`` entry for the run ``cfg`` describes."""
    choices = _choices()
    data = cfg.get("data") or {}
    train_set = data.get("train")
    synthetic = isinstance(train_set, DictConfig) and "synthetic" in train_set.keys()
    tune = _split(data.get("tune"))
    selftrain = cfg.get("selftrain") or {}
    record: dict[str, Any] = {
        "dsdiff": dsdiff.__version__,
        "task": _plain(cfg.get("task_name")),
        "command": choices.pop("__command__"),
        "seed": _plain(cfg.get("seed")),
        "class_list": _plain(data.get("class_list")),
        "train_data": "synthetic" if synthetic else choices.get("data/train", "real"),
        "real_pixel_labels": {
            "train": not synthetic,
            "tune": tune,  # read for curves and the final tune measurement; no checkpoint is chosen by it
        },
        "test": _split(data.get("test")),
        "recipe": {
            "model": choices.get("model"),
            "max_steps": _plain((cfg.get("trainer") or {}).get("max_steps", cfg.get("max_steps"))),
            "global_batch": _plain(data.get("batch_size")),
            "optimizer": _plain((cfg.get("model") or {}).get("optimizer")),
            "ema_decay": _plain(cfg.get("ema_decay")),
            "selftrain": {k: _plain(selftrain.get(k)) for k in ("rounds", "mode", "init", "tta", "threshold")} if synthetic else None,
        },
    }
    if synthetic:
        record["synthetic"] = synthetic_record(cfg)
    return record
