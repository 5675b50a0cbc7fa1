"""`python -m dsdiff.evaluate ckpt_path=FILE`: mIoU on the real val split, with and without TTA.

The checkpoint's run config (``.hydra/config.yaml`` in the run dir above the checkpoint) gives the
data, model and trainer settings; command-line overrides win over it. With ``+experiment=NAME``
the run config is not read and the experiment's settings are used instead. A checkpoint with no run
config above it is rebuilt from its own record (network, classes, mean/std, evaluation scale) and
tested on eval.yaml's data (``data=NAME`` for another). Results go to
``logs/eval/runs/<time>/metrics.json``.
"""
from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

from dsdiff.chain.config import check_devices, checks_experiment, config_dir
from dsdiff.chain.runtime import StageLoggers, instantiate_loggers
from dsdiff.chain.stages import test_stage
from dsdiff.utils.errors import SettingError, exits_cleanly
from dsdiff.utils.io import write_json_atomic
from dsdiff.utils.progress import LogProgress

log = logging.getLogger("dsdiff")
RUN_CONFIG = Path(".hydra") / "config.yaml"
# this command's own settings: never taken from the run that made the checkpoint
EVAL_KEYS = ("ckpt_path", "tta", "logger")
# the training run's settings that mean nothing to an evaluation
_UNSET = object()
TRAIN_ONLY = ("callbacks", "resume", "resume_force", "train", "test", "selftrain", "optimized_metric")


def find_run_config(ckpt_path: str | Path) -> Path | None:
    """The ``.hydra/config.yaml`` of the run that wrote ``ckpt_path``: in its folder or one above it."""
    for folder in Path(ckpt_path).resolve().parents:
        if (folder / RUN_CONFIG).is_file():
            return folder / RUN_CONFIG
    return None


def _overridden(overrides: list[str]) -> list[str]:
    """The config paths the command line set (``model/optimizer=sgd`` -> ``model.optimizer``)."""
    paths = []
    for override in OverridesParser.create().parse_overrides(overrides):
        path = override.key_or_group.replace("/", ".")
        if not path.startswith("hydra"):
            paths.append(path)
    return paths


def with_run_config(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The run config of ``cfg.ckpt_path`` with this command's settings and overrides on top.

    Returns ``cfg`` unchanged when an experiment was named or no run config is found.
    """
    paths = _overridden(overrides)
    if "experiment" in paths:
        return cfg
    if not Path(cfg.ckpt_path).expanduser().is_file():
        raise SettingError(f"ckpt_path={cfg.ckpt_path}: no such checkpoint file; pass the .ckpt a training run "
                           "wrote (RUN_DIR/checkpoints/last.ckpt)")
    found = find_run_config(cfg.ckpt_path)
    if found is None:
        log.warning("no %s in the folders above %s: the model is rebuilt from the checkpoint's own record, the "
                    "test data is eval.yaml's (data=%s; pass data=NAME or +experiment=NAME for another)", RUN_CONFIG,
                    cfg.ckpt_path, cfg.data.get("class_list"))
        with open_dict(cfg):
            cfg.model_from_checkpoint = True
        return cfg
    log.info("settings of the run that wrote the checkpoint: %s", found)
    run = OmegaConf.load(found)
    with open_dict(run):
        for key in TRAIN_ONLY:
            run.pop(key, None)
        for key in EVAL_KEYS:
            run[key] = cfg.get(key)
        run.paths.output_dir = cfg.paths.output_dir
        run.paths.log_dir = cfg.paths.log_dir
        for path in paths:
            value = OmegaConf.select(cfg, path, default=_UNSET)
            if path in EVAL_KEYS or value is _UNSET:
                continue  # set above, or a group with a global package (debug=...)
            OmegaConf.update(run, path, value, merge=False, force_add=True)
    return run


def evaluate(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Load a checkpoint's weights into the configured model and test it; writes metrics.json."""
    check_devices(cfg.trainer)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    datamodule = hydra.utils.instantiate(cfg.data, train=None)  # only the test split; a synthetic train set needs no generator here
    if cfg.get("model_from_checkpoint"):  # a checkpoint away from its run dir: it says what it is
        model = described_model(cfg.ckpt_path, datamodule, tta=cfg.get("tta", True))
    else:  # the checkpoint holds every weight: no pretrained encoder download
        net = {"encoder_weights": None} if "encoder_weights" in cfg.model.get("net", {}) else {}
        model = hydra.utils.instantiate(cfg.model, test_tta=cfg.get("tta", True), **({"net": net} if net else {}))
    with StageLoggers(partial(instantiate_loggers, cfg.get("logger"), output_dir)) as loggers:
        trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers.open() or False,
                                                     callbacks=[LogProgress()], default_root_dir=str(output_dir))
        metrics = test_stage(model, datamodule, trainer, cfg.ckpt_path)
        print(format_table(metrics))
        write_json_atomic(output_dir / "metrics.json", {**metrics, "ckpt_path": str(cfg.ckpt_path)})
        log.info("metrics written to %s", output_dir / "metrics.json")
    return metrics, {"model": model, "datamodule": datamodule, "trainer": trainer}


def described_model(ckpt_path: str, datamodule, tta: bool) -> L.LightningModule:
    """The LightningModule a self-describing checkpoint records (its net, classes, evaluation settings)."""
    from dsdiff.deploy.segmenter import Segmenter

    module = Segmenter.from_checkpoint(ckpt_path, device="cpu").module
    module.hparams.test_tta = bool(tta)
    want = getattr(datamodule, "num_classes", None)
    if want is not None and want != len(module.class_names):
        raise SettingError(f"ckpt_path={ckpt_path} predicts {len(module.class_names)} classes ({', '.join(module.class_names[:4])}, "
                           f"...) but the data's class list {getattr(datamodule, 'class_list', None)!r} "
                           f"has {want}: pass the data the model was trained for (data=NAME or +experiment=NAME)")
    return module


def format_table(metrics: dict[str, float]) -> str:
    """A plain-text table: one row per class, plain and TTA IoU side by side, then the means."""
    classes = [k.removeprefix("test/IoU/") for k in metrics if k.startswith("test/IoU/")]
    rows = [f"{'class':<16} {'IoU':>7} {'IoU_tta':>8}"]
    fmt = lambda v: "    n/a" if v is None else f"{100 * v:7.2f}"  # noqa: E731
    for name in classes:
        rows.append(f"{name:<16} {fmt(metrics.get(f'test/IoU/{name}'))} {fmt(metrics.get(f'test/IoU_tta/{name}'))}")
    rows.append(f"{'mIoU':<16} {fmt(metrics.get('test/mIoU'))} {fmt(metrics.get('test/mIoU_tta'))}")
    return "\n".join(rows)


@checks_experiment("train")  # a wrong +experiment=NAME: one error block, before Hydra composes
@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="eval")
@exits_cleanly  # a ConfigError: one "dsdiff: error:" block and exit status 2, no traceback
def main(cfg: DictConfig) -> None:
    evaluate(with_run_config(cfg, list(HydraConfig.get().overrides.task)))


if __name__ == "__main__":
    main()
