"""``checkpoints/last.ckpt``: the final weights (what is tested and pseudo-labels), saved as training goes."""
from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint


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
