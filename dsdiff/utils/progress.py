"""Progress as log lines: ``generation: 120/400 batches (30%), 2.1/s, ETA 0:02:13``.

Terminal bars (Rich, tqdm) print nothing useful when output goes to a file; this bar logs a
line to the ``dsdiff`` logger every ``percent`` percent (and at the end), so a log file or a
SLURM output shows how far training, testing, generation and pseudo-labelling are. It is a
Lightning ``ProgressBar``, so a trainer that has it shows no other bar. At the start of each
trainer stage it logs one ``device:`` line (device, processes, precision, parameter count), in
place of Lightning's "GPU available" lines and model summary table.
"""
from __future__ import annotations

import logging
import math
import time
from datetime import timedelta

import torch
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from lightning.pytorch.utilities.model_summary import get_human_readable_count

log = logging.getLogger("dsdiff")


def format_progress(name: str, done: int, total: int | None, seconds: float, unit: str, since: int = 0) -> str:
    """One progress line; the rate counts only what this process did (``done - since``)."""
    rate = (done - since) / seconds if seconds > 0 else 0.0
    if total:
        eta = str(timedelta(seconds=round((total - done) / rate))) if rate > 0 else "?"
        return f"{name}: {done}/{total} {unit} ({100 * done / total:.0f}%), {rate:.2f}/s, ETA {eta}"
    return f"{name}: {done} {unit}, {rate:.2f}/s"


def metric_lines(metrics: dict[str, float]) -> list[str]:
    """``test: mIoU 0.7780, mIoU_tta 0.8109`` then one line of per-class IoU per family (``IoU``, ``IoU_tta``)."""
    def num(value: float | None, digits: int) -> str:  # None: NaN, a class absent from the split and every prediction
        return "n/a" if value is None else f"{value:.{digits}f}"

    means = [f"{k[len('test/'):]} {num(v, 4)}" for k, v in metrics.items() if k.count("/") == 1]
    lines = [f"test: {', '.join(means)}"] if means else []
    families: dict[str, list[str]] = {}
    for key, value in metrics.items():
        if key.count("/") == 2:
            _, family, name = key.split("/")
            families.setdefault(family, []).append(f"{name} {num(value, 3)}")
    return lines + [f"test {family}: {', '.join(items)}" for family, items in families.items()]


def device_line(trainer, module: torch.nn.Module) -> str:
    """``device: cpu (no GPU found), 1 process, precision 32-true; SegmentationSystem: 11.5 M parameters (11.5 M trainable)``."""
    device = trainer.strategy.root_device
    if device.type == "cuda":
        where = f"cuda ({torch.cuda.get_device_name(device)})"
    elif torch.cuda.is_available():
        where = f"{device.type} (a GPU is available, not used)"
    else:
        where = f"{device.type} (no GPU found)"
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    processes = f"{trainer.world_size} process{'es' if trainer.world_size != 1 else ''}"
    count = lambda n: " ".join(get_human_readable_count(n).split())  # "11.5 M", "3"
    line = f"device: {where}, {processes}, precision {trainer.precision}"
    if total:  # a module that holds its model outside nn.Module attributes (generation) has no count to give
        line += f"; {type(module).__name__}: {count(total)} parameters ({count(trainable)} trainable)"
    return line


class LogProgress(ProgressBar):
    """Logs training steps (against ``max_steps``), test and prediction batches every ``percent`` percent.

    ``refresh_rate``: also log every this many steps/batches (None: only by percent).
    """

    def __init__(self, percent: float = 5.0, refresh_rate: int | None = None, name: str | None = None) -> None:
        super().__init__()
        self.percent, self.refresh_rate, self.name = float(percent), refresh_rate, name
        self._enabled = True
        self._start = 0.0
        self._since = 0
        self._next = 0
        self._count = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    # -- bookkeeping ------------------------------------------------------------------------------
    def _begin(self, done: int, total: int | None) -> None:
        self._start, self._since, self._count = time.monotonic(), done, done
        self._next = done + self._step(total)

    def _step(self, total: int | None) -> int:
        by_percent = max(1, math.ceil((total or 0) * self.percent / 100)) if total else 10 ** 9
        return min(by_percent, self.refresh_rate) if self.refresh_rate else by_percent

    def _tick(self, name: str, done: int, total: int | None, unit: str, extra=lambda: "") -> None:
        """Log a line when due; ``extra()`` (e.g. the loss, which syncs with the device) runs only then."""
        if not self._enabled or self.trainer is None or not self.trainer.is_global_zero:
            return
        if done >= self._next or (total and done >= total):
            self._next = done + self._step(total)
            log.info("%s%s", format_progress(name, done, total, time.monotonic() - self._start, unit, self._since), extra())

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self._enabled and trainer.is_global_zero:
            log.info("%s", device_line(trainer, pl_module))

    # -- training ---------------------------------------------------------------------------------
    def _train_total(self, trainer) -> int | None:
        if trainer.max_steps and trainer.max_steps > 0:
            return int(trainer.max_steps)
        batches = self.total_train_batches
        if trainer.max_epochs and trainer.max_epochs > 0 and math.isfinite(batches):
            return int(batches * trainer.max_epochs)
        return None

    def on_train_start(self, trainer, pl_module) -> None:
        self._begin(trainer.global_step, self._train_total(trainer))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        def extra() -> str:
            metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
            return "".join(f", {k} {v:.4g}" if isinstance(v, float) else f", {k} {v}" for k, v in metrics.items())

        self._tick(self.name or "train", trainer.global_step, self._train_total(trainer), "steps", extra)

    # -- prediction (generation, pseudo-labels) ---------------------------------------------------
    def _predict_total(self) -> int | None:
        total = sum(n for n in self.trainer.num_predict_batches if math.isfinite(n))
        return int(total) or None

    def on_predict_start(self, trainer, pl_module) -> None:
        self._begin(0, self._predict_total())

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._count += 1
        self._tick(self.name or "predict", self._count, self._predict_total(), "batches")

    # -- test (the test split; validation stays quiet: its metric rides on the training lines) ----
    def _test_total(self) -> int | None:
        total = sum(n for n in self.trainer.num_test_batches if math.isfinite(n))
        return int(total) or None

    def on_test_start(self, trainer, pl_module) -> None:
        self._count = 0
        self._begin(0, self._test_total())

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._count += 1
        self._tick("test", self._count, self._test_total(), "batches")
