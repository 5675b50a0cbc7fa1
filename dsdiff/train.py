"""`python -m dsdiff.train +experiment=NAME`: the whole method, stage by stage, resumable.

With a synthetic training set (``data/train=synthetic``) the stages are::

    generate      synthetic.dir: generate the dataset, or finish it (kept across runs: a cache)
    train         <run>/checkpoints: the segmenter on the synthetic labels
    pseudo_<r>    <run>/pseudo_<r>: its predictions on the synthetic images (self-training labels)
    selftrain_<r> <run>/selftrain_<r>/checkpoints: a new segmenter on them, r = 1..selftrain.rounds
    test          the final model on the real test split (VOC/COCO: val), plain and with TTA

With real labels (``data/train=voc_real`` ...) only ``train`` and ``test`` run. ``<run>/stages.json``
records the run's identity when it starts and each finished stage (dsdiff.runs); ``resume=true``
(the latest run of this task, if its settings match) or ``resume=DIR`` continues a chain there,
skipping finished stages and resuming an interrupted training stage from its ``last.ckpt``.

Protocol: every stage ends with its final weights in ``checkpoints/last.ckpt`` (EMA), and those
pseudo-label and are tested; nothing is chosen by a metric. Validation runs on ``data.tune``, a
labelled split disjoint from the test split, and the test split is used once, by ``test``.
``<run>/metrics.json`` holds ``test/mIoU``, ``test/mIoU_tta``, the tested file (``ckpt_path``,
``ckpt: last``), the final stage's ``tune/mIoU`` (the sweep objective) and every fitted stage's
metrics under ``<stage>/``; a resumed chain merges into it.
"""
from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, open_dict

from dsdiff.config import config_dir
from dsdiff.io import write_json_atomic
from dsdiff.synthetic.dataset import SyntheticDataset
from dsdiff.models.checkpoint import LastCheckpoint
from dsdiff.runs import Stages, final_checkpoint, merge_metrics, open_run
from dsdiff.runtime import (
    finish_loggers,
    instantiate_callbacks,
    instantiate_loggers,
    load_weights,
    log_config,
    to_float_dict,
    trainer_callbacks,
)

log = logging.getLogger("dsdiff")


def check_config(cfg: DictConfig) -> None:
    """Fail early, before any data or weights are loaded, on settings that cannot work."""
    crop = cfg.data.get("train_transform", {}).get("crop_size")
    stride = cfg.model.net.get("output_stride", 8)
    for side in [crop] if isinstance(crop, int) else list(crop or []):
        if side % stride:
            raise ValueError(
                f"data.train_transform.crop_size={crop} is not a multiple of the output stride {stride}: "
                f"use e.g. {side - side % stride or stride}"
            )
    max_steps = cfg.trainer.get("max_steps")
    if cfg.get("train") and not cfg.trainer.get("fast_dev_run") and max_steps is not None and int(max_steps) <= 0:
        raise ValueError(
            f"trainer.max_steps={max_steps} trains nothing (an untrained network would be tested and pseudo-label): "
            "set max_steps=<optimizer steps> (the paper: 20000 VOC, 40000 COCO), or train=false ckpt_path=FILE to only test")
    if not cfg.get("train") and cfg.get("test") and not cfg.get("ckpt_path") and not cfg.get("resume"):
        raise ValueError("train=false test=true would test an untrained network: pass ckpt_path=<a checkpoint> "
                         "(e.g. <run dir>/checkpoints/last.ckpt), or resume=<run dir>")
    if cfg.get("train") and int(cfg.data.get("batch_size", 2)) < 2:
        raise ValueError(f"data.batch_size={cfg.data.batch_size}: the segmenter's BatchNorm layers need at least 2 "
                         "images per training batch; use data.batch_size=2 or more")
    selftrain = cfg.get("selftrain") or {}
    if selftrain.get("mode", "replace") not in ("replace", "fill_uncertain", "confident"):
        raise ValueError(f"selftrain.mode={selftrain.get('mode')!r}: use replace, fill_uncertain or confident")


def uses_synthetic(cfg: DictConfig) -> bool:
    return str(cfg.data.get("train", {}).get("_target_", "")).endswith("synthetic_train_set")


def _final_checkpoint(trainer: L.Trainer) -> str | None:
    """The checkpoint of the final step (``last.ckpt``), or None when none was saved (e.g. fast_dev_run)."""
    for callback in trainer.callbacks:
        if isinstance(callback, LastCheckpoint) and callback.dirpath:
            path = Path(callback.dirpath) / f"{LastCheckpoint.FILENAME}.ckpt"
            if path.is_file():
                return str(path)
    return None


def _trainer(cfg: DictConfig, root: Path, loggers: list, callbacks: list | None = None) -> L.Trainer:
    callbacks = instantiate_callbacks(cfg.get("callbacks")) if callbacks is None else callbacks
    callbacks = trainer_callbacks(callbacks, loggers)
    for callback in callbacks:
        if isinstance(callback, ModelCheckpoint):
            callback.dirpath = str(root / "checkpoints")
    extra = {} if cfg.data.get("tune") is not None else {"limit_val_batches": 0}  # no tune split: no validation
    return hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, default_root_dir=str(root), **extra)


def fit_stage(cfg: DictConfig, name: str, root: Path, work: Path, train_factory=None, ckpt_path: str | None = None,
              images: dict[str, Path] | None = None):
    """Train a fresh segmenter (on ``train_factory``'s data if given); returns (info, model, datamodule, trainer, loggers).

    ``images`` (key -> PNG) are logged to every logger that takes images, e.g. the synthetic sample grid.
    """
    datamodule = hydra.utils.instantiate(cfg.data)
    if train_factory is not None:
        datamodule.factories["train"] = train_factory
    model = hydra.utils.instantiate(cfg.model)
    loggers = instantiate_loggers(cfg.get("logger"), work, stage=None if name == "train" else name)
    log_config(cfg, loggers)
    for key, path in (images or {}).items():
        for logger in loggers:
            if hasattr(logger, "log_image") and Path(path).is_file():
                logger.log_image(key=key, images=[str(path)])
    trainer = _trainer(cfg, root, loggers)
    last = root / "checkpoints" / "last.ckpt"
    ckpt_path = str(last) if last.is_file() else ckpt_path  # the stage's own progress wins over a given start
    if ckpt_path:
        log.info("stage %s: resuming training from %s", name, ckpt_path)
    log.info("stage %s: training; checkpoints go to %s", name, root / "checkpoints")
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    if cfg.data.get("tune") is not None and getattr(model, "tune_step", None) != trainer.global_step:
        # the last validation ran before the final step: measure the final (EMA) weights
        log.info("stage %s: tune split on the final weights (step %d)", name, trainer.global_step)
        trainer.validate(model, datamodule=datamodule, verbose=False)
    info = {"checkpoint": _final_checkpoint(trainer), "ckpt": "last", "step": int(trainer.global_step),
            "metrics": to_float_dict(trainer.callback_metrics)}
    return info, model, datamodule, trainer, loggers


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Run (or resume) the chain; returns (metrics, objects) and writes <run dir>/metrics.json."""
    check_config(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    work, stages = open_run(cfg)  # records the run's identity before its first stage
    synthetic = uses_synthetic(cfg)
    metrics: dict[str, Any] = {}
    model = datamodule = trainer = None
    loggers: list = []
    class_list = cfg.data.get("class_list")

    if cfg.get("train") and synthetic and cfg.synthetic.get("mode", "cached") == "cached":
        _generate_stage(cfg, stages)
    elif cfg.get("train") and synthetic:
        on_the_fly_prompts(cfg)

    checkpoint = (stages.get("train") or {}).get("checkpoint")
    if cfg.get("train") and not stages.get("train"):
        grid = {"synthetic/samples": Path(cfg.synthetic.dir) / "grid.png"} if synthetic else None
        info, model, datamodule, trainer, loggers = fit_stage(cfg, "train", work, work, ckpt_path=cfg.get("ckpt_path"), images=grid)
        checkpoint = info["checkpoint"]
        stages.mark("train", info)
    elif stages.get("train"):
        log.info("stage train: done in an earlier run (%s)", checkpoint)

    rounds = int((cfg.get("selftrain") or {}).get("rounds", 0)) if synthetic and cfg.get("train") else 0
    source = Path(cfg.synthetic.dir)
    num_images = cfg.synthetic.get("num_images")  # the samples the train stage read: 0..num_images-1
    for r in range(1, rounds + 1):
        pseudo_dir = work / f"pseudo_{r}"
        if not stages.get(f"pseudo_{r}"):
            finish_loggers(loggers)
            loggers = []
            summary = _pseudo_stage(cfg, checkpoint, source, pseudo_dir, model)
            stages.mark(f"pseudo_{r}", summary)
        source = pseudo_dir
        name = f"selftrain_{r}"
        if stages.get(name):
            checkpoint = stages.get(name)["checkpoint"]
            log.info("stage %s: done in an earlier run (%s)", name, checkpoint)
            continue
        finish_loggers(loggers)
        factory = partial(SyntheticDataset, root=str(pseudo_dir), class_list=class_list, max_samples=num_images)
        info, model, datamodule, trainer, loggers = fit_stage(cfg, name, work / name, work, train_factory=factory)
        checkpoint = info["checkpoint"]
        stages.mark(name, info)

    if cfg.get("test"):
        ckpt = checkpoint if cfg.get("train") else (cfg.get("ckpt_path") or final_checkpoint(stages))
        if trainer is None or model is None:
            finish_loggers(loggers)
            loggers = instantiate_loggers(cfg.get("logger"), work, stage="test" if synthetic else None)
            datamodule = hydra.utils.instantiate(cfg.data)
            model = hydra.utils.instantiate(cfg.model)
            trainer = _trainer(cfg, work, loggers, callbacks=[])
        if ckpt:
            # the checkpoint's state_dict holds the EMA weights; trainer.test(ckpt_path=...) would
            # restore the raw weights through the EMA callback instead
            log.info("stage test: the final weights of %s", ckpt)
            load_weights(model, ckpt)
            metrics["ckpt_path"] = str(ckpt)
        else:
            log.info("stage test: the final weights in memory (no checkpoint was saved)")
        metrics["ckpt"] = "last" if cfg.get("train") else "given"
        trainer.test(model, datamodule=datamodule)
        tested = {k: v for k, v in to_float_dict(trainer.callback_metrics).items() if k.startswith("test/")}
        metrics.update(tested)
        stages.mark("test", {"checkpoint": ckpt, "ckpt": metrics["ckpt"], "metrics": tested})

    metrics = merge_metrics(work, stages, metrics)  # a resumed chain keeps its earlier stages' metrics
    for out in {work, Path(cfg.paths.output_dir)}:
        write_json_atomic(out / "metrics.json", metrics)
    log.info("metrics written to %s", work / "metrics.json")
    finish_loggers(loggers)
    return metrics, {"cfg": cfg, "datamodule": datamodule, "model": model, "trainer": trainer, "work_dir": work}


def on_the_fly_prompts(cfg: DictConfig) -> None:
    """synthetic.mode=on_the_fly: run the prompts stage (captions by default) and point the stream at its file."""
    if cfg.synthetic.get("prompts"):
        return
    from dsdiff.prompts import ensure_prompts

    path = ensure_prompts(cfg)
    if path is not None:
        with open_dict(cfg):
            cfg.synthetic.prompts = str(path)


def _generate_stage(cfg: DictConfig, stages: Stages) -> None:
    """Generate the synthetic dataset unless a finished generate stage already covers this folder and size."""
    from dsdiff.generate import generate
    from dsdiff.synthetic.store import SyntheticStore

    done = stages.get("generate") or {}
    store = SyntheticStore(cfg.synthetic.dir)
    if done.get("dir") == str(store.root) and done.get("num_images") == cfg.synthetic.num_images and store.config_path.is_file():
        log.info("stage generate: done in an earlier run (%s)", store.root)
        return
    log.info("stage generate: %d images into %s (resuming what is there)", cfg.synthetic.num_images, store.root)
    summary = generate(cfg)
    stages.mark("generate", {**summary, "num_images": int(cfg.synthetic.num_images)})


def _pseudo_stage(cfg: DictConfig, checkpoint: str | None, source: Path, out: Path, trained=None) -> dict:
    """Label samples 0..num_images-1 of ``source`` with the final weights of ``checkpoint`` (else the model just trained)."""
    from dsdiff.selftrain import pseudo_label

    selftrain = cfg.selftrain
    if checkpoint:
        model = hydra.utils.instantiate(cfg.model)
        load_weights(model, checkpoint)
    elif trained is not None:  # e.g. fast_dev_run, which saves no checkpoint
        model = trained
    else:
        raise RuntimeError("self-training needs the trained model's checkpoint, and the train stage saved none: "
                           "keep the last_checkpoint callback, or set selftrain.rounds=0")
    log.info("stage %s: pseudo-labels (%s%s) from %s into %s", out.name, selftrain.mode, ", TTA" if selftrain.tta else "",
             checkpoint or "the model in memory", out)

    def make_trainer(callbacks):
        return hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=False, default_root_dir=str(out))

    return pseudo_label(model, source, out, make_trainer, mode=selftrain.mode, threshold=selftrain.threshold,
                        tta=bool(selftrain.tta), checkpoint=str(checkpoint), batch_size=selftrain.get("batch_size", 8),
                        max_samples=cfg.synthetic.get("num_images"), progress=cfg.trainer.get("enable_progress_bar", True))


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics, _ = train(cfg)
    value = metrics.get(cfg.get("optimized_metric"))
    return None if value is None else float(value)


if __name__ == "__main__":
    main()
