"""`python -m dsdiff.evaluate ckpt_path=FILE +experiment=NAME`: mIoU on the real val split, with and without TTA."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig

from dsdiff.config import config_dir
from dsdiff.runtime import finish_loggers, instantiate_loggers, load_weights, to_float_dict, write_json_atomic

log = logging.getLogger("dsdiff")


def evaluate(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Load a checkpoint's weights into the configured model and test it; writes metrics.json."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    datamodule = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model, test_tta=cfg.get("tta", True))
    load_weights(model, cfg.ckpt_path)
    loggers = instantiate_loggers(cfg.get("logger"), output_dir)
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers or False, callbacks=[])
    trainer.test(model, datamodule=datamodule)
    metrics = to_float_dict(trainer.callback_metrics)
    print(format_table(metrics))
    write_json_atomic(output_dir / "metrics.json", {**metrics, "ckpt_path": str(cfg.ckpt_path)})
    finish_loggers(loggers)
    return metrics, {"model": model, "datamodule": datamodule, "trainer": trainer}


def format_table(metrics: dict[str, float]) -> str:
    """A plain-text table: one row per class, plain and TTA IoU side by side, then the means."""
    classes = [k.removeprefix("test/IoU/") for k in metrics if k.startswith("test/IoU/")]
    rows = [f"{'class':<16} {'IoU':>7} {'IoU_tta':>8}"]
    fmt = lambda v: "    n/a" if v is None else f"{100 * v:7.2f}"  # noqa: E731
    for name in classes:
        rows.append(f"{name:<16} {fmt(metrics.get(f'test/IoU/{name}'))} {fmt(metrics.get(f'test/IoU_tta/{name}'))}")
    rows.append(f"{'mIoU':<16} {fmt(metrics.get('test/mIoU'))} {fmt(metrics.get('test/mIoU_tta'))}")
    return "\n".join(rows)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
