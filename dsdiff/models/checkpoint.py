"""``checkpoints/last.ckpt``: the final weights (what is tested and pseudo-labels), saved as training goes.

Each holds the EMA weights (``state_dict``), the raw weights and the optimizer state, so that an
interrupted stage resumes exactly (the demo's: about 184 MB). :func:`keep_weights_only` rewrites a
finished run's final checkpoint with the weights alone (``prune_checkpoints=true``: about a quarter).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from dsdiff.utils.io import atomic_path


class LastCheckpoint(ModelCheckpoint):
    """Saves ``<dirpath>/last.ckpt`` every ``every_n_train_steps`` steps and at the final step.

    No checkpoint is chosen by a metric: the one file always holds the latest weights (the EMA
    weights in ``state_dict`` when EMA is on), so resuming and testing read the same file. The
    final step is saved even when ``max_steps`` is not a multiple of ``every_n_train_steps``.
    Being a ``ModelCheckpoint``, Lightning runs it after every other callback (EMA included).
    """

    FILENAME = "last"

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int = 1000) -> None:
        super().__init__(dirpath=dirpath, filename=self.FILENAME, monitor=None, save_top_k=1,
                         every_n_train_steps=max(1, int(every_n_train_steps)), enable_version_counter=False,
                         save_on_train_epoch_end=False)

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        final = 0 < trainer.max_steps <= trainer.global_step
        if final and not self._should_skip_saving_checkpoint(trainer):
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))


# What a finished run's final checkpoint keeps with prune_checkpoints=true: the (EMA) weights that
# evaluate, pseudo-label and selftrain.init=teacher read, and what Lightning's loaders expect.
WEIGHTS_ONLY_KEYS = ("state_dict", "hyper_parameters", "hparams_name", "epoch", "global_step", "pytorch-lightning_version",
                     "dsdiff")  # "dsdiff": what rebuilds the net for inference (dsdiff.Segmenter)
PRUNED_KEY = "dsdiff_pruned"  # the keys a pruned checkpoint dropped (optimizer state, raw weights, loop state)


def is_pruned(path: str | Path) -> bool:
    """Whether ``path`` is a checkpoint that :func:`keep_weights_only` pruned (it cannot resume training)."""
    try:
        return PRUNED_KEY in torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # noqa: BLE001  (not a zip checkpoint: load_weights or Lightning say what is wrong with it)
        return False


def keep_weights_only(path: str | Path) -> int:
    """Rewrite the checkpoint at ``path`` (atomically) with only :data:`WEIGHTS_ONLY_KEYS`; returns the bytes freed."""
    path = Path(path)
    before = path.stat().st_size
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    dropped = sorted(k for k in checkpoint if k not in WEIGHTS_ONLY_KEYS)
    slim = {k: checkpoint[k] for k in WEIGHTS_ONLY_KEYS if k in checkpoint} | {PRUNED_KEY: dropped}
    with atomic_path(path) as tmp:
        torch.save(slim, tmp)
    return before - path.stat().st_size
