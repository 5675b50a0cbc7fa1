"""Validation pictures: a fixed panel of tune-split images with prediction / ground-truth overlays.

Saved as PNG grids ``<run dir>/images/tune_step*.png`` with any logger: titled columns (image |
prediction | ground truth), images smaller than ``min_side`` pixels enlarged by a whole factor
(nearest), and a legend of the classes that appear (uncertain / ignore 255 drawn white); each file
is named in the log (``picture: validation panel -> PATH``). With W&B also logged as ``wandb.Image``
mask overlays (toggle classes in the UI) plus a per-class IoU table.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from PIL import Image, ImageDraw

from dsdiff.data.classes import IGNORE_INDEX
from dsdiff.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from dsdiff.utils.io import save_image_atomic
from dsdiff.viz.samples import colorize_labels, comparison_grid, stack_rows

log = logging.getLogger("dsdiff")
COLUMNS = ("image", "prediction", "ground truth")
SWATCH = 10


def denormalize(image: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """Normalised (3, H, W) float -> (H, W, 3) uint8."""
    mean = torch.tensor(mean, device=image.device).view(3, 1, 1)
    std = torch.tensor(std, device=image.device).view(3, 1, 1)
    pixels = ((image * std + mean) * 255).clamp(0, 255).round().byte()
    return pixels.permute(1, 2, 0).cpu().numpy()


def overlay_row(image: np.ndarray, pred: np.ndarray, target: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """image | image blended with the prediction | with the ground truth (255 drawn white)."""
    blend = lambda label: (image * (1 - alpha) + colorize_labels(label) * alpha).astype(np.uint8)
    return np.concatenate([image, blend(pred), blend(target)], axis=1)


def legend(class_ids: Sequence[int], names: Sequence[str], width: int) -> Image.Image:
    """Colour swatch + name for each of ``class_ids`` (``IGNORE_INDEX``: "uncertain / ignore"), wrapped to ``width``."""
    entries = [(colorize_labels(np.uint8([[c]]))[0, 0], "uncertain / ignore (255)" if c == IGNORE_INDEX else
                (names[c] if c < len(names) else str(c))) for c in class_ids]
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines, line, x = [], [], 4
    for colour, name in entries:
        w = SWATCH + 4 + int(draw.textlength(name)) + 10
        if line and x + w > width:
            lines.append(line)
            line, x = [], 4
        line.append((x, colour, name))
        x += w
    lines += [line] if line else []
    out = Image.new("RGB", (max(width, 1), 4 + (SWATCH + 4) * len(lines)), "white")
    draw = ImageDraw.Draw(out)
    for row, items in enumerate(lines):
        y = 4 + (SWATCH + 4) * row
        for x, colour, name in items:
            draw.rectangle([x, y, x + SWATCH - 1, y + SWATCH - 1], fill=tuple(int(v) for v in colour), outline="black")
            draw.text((x + SWATCH + 4, y - 1), name, fill="black")
    return out


def panel_picture(rows: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], names: Sequence[str],
                  min_side: int = 96) -> Image.Image:
    """One row per (image, pred, target): image | prediction overlay | ground-truth overlay, titled,
    enlarged to ``min_side`` like :func:`dsdiff.viz.samples.comparison_grid`, with a class legend under it."""
    tiles = [np.split(overlay_row(*row), 3, axis=1) for row in rows]
    grid = comparison_grid(tiles, COLUMNS, min_side=min_side)
    present = sorted(set().union(*(np.unique(np.concatenate([p.ravel(), t.ravel()])).tolist() for _, p, t in rows)))
    return stack_rows([grid, legend(present, names, grid.width)])


class ValidationPanel(L.Callback):
    """Shows the first ``num_images`` tune-split images (the same ones every time) with overlays."""

    def __init__(self, num_images: int = 8, save_png: bool = True, min_side: int = 96):
        self.num_images = num_images
        self.save_png = save_png
        self.min_side = min_side  # cells smaller than this are enlarged by a whole factor (nearest)
        self._rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._rows = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if len(self._rows) >= self.num_images or not isinstance(outputs, dict) or "pred" not in outputs:
            return
        for image, pred, target in zip(batch["image"], outputs["pred"], batch["mask"]):
            if len(self._rows) >= self.num_images:
                break
            valid = (target != IGNORE_INDEX).any(0).nonzero()  # crop batch padding (all-255 columns)
            width = int(valid.max()) + 1 if len(valid) else target.shape[-1]
            self._rows.append((denormalize(image[..., :width]), pred[..., :width].cpu().numpy(), target[..., :width].cpu().numpy()))

    def on_validation_end(self, trainer, pl_module) -> None:
        if not self._rows or trainer.sanity_checking or not trainer.is_global_zero:
            return
        names = getattr(pl_module, "class_names", None) or [str(i) for i in range(256)]
        if self.save_png:
            out = Path(trainer.default_root_dir) / "images" / f"tune_step{trainer.global_step:06d}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            save_image_atomic(panel_picture(self._rows, names, self.min_side), out, format="PNG")
            log.info("picture: validation panel -> %s", out)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                self._log_wandb(logger, trainer, names)

    def _log_wandb(self, logger: WandbLogger, trainer, names) -> None:
        import wandb

        labels = {i: n for i, n in enumerate(names)} | {IGNORE_INDEX: "ignore"}
        images = [
            wandb.Image(image, masks={"prediction": {"mask_data": pred, "class_labels": labels},
                                      "ground_truth": {"mask_data": target, "class_labels": labels}})
            for image, pred, target in self._rows
        ]
        metrics = trainer.callback_metrics
        table = wandb.Table(columns=["step", "class", "IoU"])
        for name in names[: len(getattr(trainer.lightning_module, "class_names", []))]:
            value = metrics.get(f"tune/IoU/{name}")
            table.add_data(trainer.global_step, name, None if value is None else float(value))
        logger.experiment.log({"tune/examples": images, "tune/IoU_table": table, "trainer/global_step": trainer.global_step})
