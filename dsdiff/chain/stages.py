"""The chain of stages, over plain objects: the entry point (dsdiff.train) builds them, the chain runs them.

With a synthetic training set (:attr:`ChainSettings.synthetic`) the stages are::

    generate      synthetic_dir: generate the dataset, or finish it (kept across runs: a cache)
    train         <run>/checkpoints: the segmenter on the synthetic labels
    pseudo_<r>    <run>/pseudo_<r>: its predictions on the synthetic images (self-training labels)
    selftrain_<r> <run>/selftrain_<r>/checkpoints: a new segmenter on them, r = 1..selftrain.rounds
    test          the final model on the real test split (VOC/COCO: val), plain and with TTA

With real labels only ``train`` and ``test`` run. The run record (``<run>/stages.json``) holds each finished
stage; a resumed chain skips them (``test`` too, for the same weights and settings) and resumes an
interrupted training stage from its ``last.ckpt``.

Protocol: every stage ends with its final weights in ``checkpoints/last.ckpt`` (EMA), and those
pseudo-label and are tested; nothing is chosen by a metric. Validation runs on the tune split, a
labelled split disjoint from the test split, and the test split is used once, by ``test``.
``<run>/metrics.json`` holds ``test/mIoU``, ``test/mIoU_tta``, the tested file (``ckpt_path``,
``ckpt: last``), the final stage's ``tune/mIoU`` (the sweep objective) and every fitted stage's
metrics under ``<stage>/``; a resumed chain merges into it. Disk: each stage keeps its ``last.ckpt``;
``prune_checkpoints=true`` trims a finished run (:func:`prune_finished_run`).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import Logger

from dsdiff.chain.runs import Stages, final_checkpoint, fitted_stages, merge_metrics
from dsdiff.chain.runtime import StageLoggers, load_weights, to_float_dict
from dsdiff.chain.selftrain import pseudo_label
from dsdiff.models.checkpoint import LastCheckpoint, is_pruned, keep_weights_only
from dsdiff.synthetic.dataset import SyntheticDataset
from dsdiff.synthetic.store import SyntheticStore
from dsdiff.utils.errors import SettingError
from dsdiff.utils.io import write_json_atomic
from dsdiff.utils.progress import metric_lines

log = logging.getLogger("dsdiff")


@dataclass(frozen=True)
class SelfTraining:
    """How many self-training rounds, and how the teacher's predictions become labels (dsdiff.chain.selftrain)."""

    rounds: int = 0
    mode: str = "replace"
    threshold: float = 0.9
    tta: bool = False
    batch_size: int = 8
    init: str = "scratch"  # the student starts from scratch (the paper) or from the teacher's final weights


@dataclass(frozen=True)
class ChainSettings:
    """What the chain runs; the entry point builds it from its config."""

    synthetic: bool = False          # the training set is the synthetic dataset: generate before, self-train after
    synthetic_dir: Path | None = None
    synthetic_mode: str = "cached"  # cached: the generate stage writes synthetic_dir | on_the_fly: prompts only
    num_images: int | None = None   # the synthetic samples every stage reads: ids 0..num_images-1
    class_list: str | None = None
    train: bool = True
    test: bool = True
    ckpt_path: str | None = None    # train: start from it (a stage's own last.ckpt wins); test only: test it
    selftrain: SelfTraining = field(default_factory=SelfTraining)
    tune: bool = True               # there is a tune split: validate each stage's final weights on it
    progress: bool = True           # progress lines while pseudo-labelling
    output_dir: Path | None = None  # this invocation's own run dir, which gets a copy of metrics.json
    prune_checkpoints: bool = False  # once the test metrics are written: keep the final weights only


@dataclass(frozen=True)
class Factories:
    """How each stage's objects are made; the entry point builds them (the chain reads no config)."""

    datamodule: Callable[[], L.LightningDataModule]
    model: Callable[[], L.LightningModule]
    trainer: Callable[..., L.Trainer]             # (root, loggers, callbacks=None): checkpoints in root/checkpoints
    predictor: Callable[[Path, list], L.Trainer]  # (out, callbacks): the pseudo-labelling trainer, no logger
    loggers: Callable[[str | None], list[Logger]]  # (stage): None is the train stage
    log_config: Callable[[list[Logger]], None]   # send the run's settings to a fitting stage's loggers
    generate: Callable[[], dict]                  # the generate stage's work: make or finish synthetic_dir
    prompts: Callable[[], None]                   # synthetic_mode=on_the_fly: the prompts stage


@dataclass
class StageResult:
    """A finished training stage: its final checkpoint, step and metrics, and the objects that made them."""

    checkpoint: str | None
    step: int
    metrics: dict[str, float]
    model: L.LightningModule
    datamodule: L.LightningDataModule
    trainer: L.Trainer
    batch: dict[str, int] | None = None  # {"global", "per_device", "devices"}: the training batch and its split

    def record(self) -> dict[str, Any]:
        """The stage's entry in stages.json."""
        batch = {"batch": self.batch} if self.batch else {}
        return {"checkpoint": self.checkpoint, "ckpt": "last", "step": self.step, "metrics": self.metrics, **batch}


@dataclass
class ChainResult:
    """The chain's merged metrics and the objects of its last stage in this invocation (None if none ran)."""

    metrics: dict[str, Any]
    model: L.LightningModule | None = None
    datamodule: L.LightningDataModule | None = None
    trainer: L.Trainer | None = None


def generate_stage(stages: Stages, generate: Callable[[], dict], synthetic_dir: Path, num_images: int) -> None:
    """Generate the synthetic dataset unless a finished generate stage already covers this folder and size."""
    done = stages.get("generate") or {}
    store = SyntheticStore(synthetic_dir)
    if done.get("dir") == str(store.root) and done.get("num_images") == num_images and store.config_path.is_file():
        log.info("stage generate: done in an earlier run (%s)", store.root)
        return
    log.info("stage generate: %d images into %s (resuming what is there)", num_images, store.root)
    summary = generate()
    stages.mark("generate", {**summary, "num_images": int(num_images)})


def fit_stage(name: str, root: Path, datamodule: L.LightningDataModule, model: L.LightningModule,
              make_trainer: Callable[..., L.Trainer], loggers: list[Logger], *, ckpt_path: str | None = None,
              images: Mapping[str, Path] | None = None, tune: bool = True) -> StageResult:
    """Train ``model`` with checkpoints in ``root/checkpoints``, from its own ``last.ckpt``, else ``ckpt_path``.

    ``images`` (key -> PNG) are logged to every logger that takes images, e.g. the synthetic sample grid.
    """
    for key, path in (images or {}).items():
        for logger in loggers:
            if hasattr(logger, "log_image") and Path(path).is_file():
                logger.log_image(key=key, images=[str(path)])
    trainer = make_trainer(root, loggers)
    last = root / "checkpoints" / "last.ckpt"
    ckpt_path = str(last) if last.is_file() else ckpt_path  # the stage's own progress wins over a given start
    if ckpt_path:
        log.info("stage %s: resuming training from %s", name, ckpt_path)
    log.info("stage %s: training; checkpoints go to %s", name, root / "checkpoints")
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    if tune and getattr(model, "tune_step", None) != trainer.global_step:
        # the last validation ran before the final step: measure the final (EMA) weights
        log.info("stage %s: tune split on the final weights (step %d)", name, trainer.global_step)
        trainer.validate(model, datamodule=datamodule, verbose=False)
    return StageResult(_final_checkpoint(trainer), int(trainer.global_step), to_float_dict(trainer.callback_metrics),
                       model, datamodule, trainer, batch=_batch(datamodule, trainer))


def _batch(datamodule: L.LightningDataModule, trainer: L.Trainer) -> dict[str, int] | None:
    """The global training batch, each process's share and the number of processes (None for a datamodule
    without a ``per_device_batch_size``)."""
    if not hasattr(datamodule, "per_device_batch_size"):
        return None
    return {"global": int(datamodule.batch_size), "per_device": int(datamodule.per_device_batch_size),
            "devices": int(trainer.world_size)}


def _final_checkpoint(trainer: L.Trainer) -> str | None:
    """The checkpoint of the final step (``last.ckpt``), or None when none was saved (e.g. fast_dev_run)."""
    for callback in trainer.callbacks:
        if isinstance(callback, LastCheckpoint) and callback.dirpath:
            path = Path(callback.dirpath) / f"{LastCheckpoint.FILENAME}.ckpt"
            if path.is_file():
                return str(path)
    return None


def pseudo_stage(teacher: L.LightningModule, source: Path, out: Path, make_trainer: Callable[[list], L.Trainer],
                 selftrain: SelfTraining, *, checkpoint: str | None, max_samples: int | None, progress: bool = True) -> dict:
    """Label samples 0..max_samples-1 of ``source`` into ``out`` with ``teacher`` (the weights of ``checkpoint``)."""
    log.info("stage %s: pseudo-labels (%s%s) from %s into %s", out.name, selftrain.mode, ", TTA" if selftrain.tta else "",
             checkpoint or "the model in memory", out)
    return pseudo_label(teacher, source, out, make_trainer, mode=selftrain.mode, threshold=selftrain.threshold,
                        tta=selftrain.tta, checkpoint=str(checkpoint), batch_size=selftrain.batch_size,
                        max_samples=max_samples, progress=progress)


def test_stage(model: L.LightningModule, datamodule: L.LightningDataModule, trainer: L.Trainer,
               ckpt: str | Path | None) -> dict[str, float]:
    """Test the final weights of ``ckpt`` (else the weights in ``model``) on the test split; returns the ``test/`` metrics."""
    if ckpt:
        # the checkpoint's state_dict holds the EMA weights; trainer.test(ckpt_path=...) would
        # restore the raw weights through the EMA callback instead
        load_weights(model, ckpt)
    trainer.test(model, datamodule=datamodule, verbose=False)  # the lines below replace Lightning's table
    metrics = {k: v for k, v in to_float_dict(trainer.callback_metrics).items() if k.startswith("test/")}
    for line in metric_lines(metrics):
        log.info("%s", line)
    return metrics


test_stage.__test__ = False  # not a test for pytest to collect where a test module imports it


def run_chain(settings: ChainSettings, make: Factories, work: Path, stages: Stages) -> ChainResult:
    """Run (or resume) the chain in ``work``, recording each stage in ``stages``; writes ``metrics.json``."""
    with StageLoggers(make.loggers) as loggers:
        result = _run(settings, make, work, stages, loggers)
        result.metrics = merge_metrics(work, stages, result.metrics)  # a resumed chain keeps its earlier stages' metrics
        for out in {work, *([settings.output_dir] if settings.output_dir else [])}:
            write_json_atomic(Path(out) / "metrics.json", result.metrics)
        log.info("metrics written to %s", work / "metrics.json")
    if settings.prune_checkpoints and rank_zero_only.rank == 0:
        prune_finished_run(work, stages)
    return result


def prune_finished_run(work: Path, stages: Stages) -> dict[str, Any] | None:
    """Free what a finished run no longer needs: delete the earlier training stages' checkpoints and keep
    the final (and the tested) checkpoint's weights alone. Only once the test stage is recorded, and
    only files inside ``work``. Returns what was done (also noted under ``"pruned"`` in stages.json)."""
    if not stages.get("test"):
        log.info("prune_checkpoints: %s has no test metrics yet; every checkpoint is kept", work)
        return None
    root = Path(work).resolve()

    def ours(path: str | None) -> Path | None:
        p = Path(path).resolve() if path else None
        return p if p is not None and p.is_file() and p.is_relative_to(root) else None

    keep = {p for p in (ours(final_checkpoint(stages)), ours(stages.get("test").get("checkpoint"))) if p}
    removed, freed = [], 0
    for name in fitted_stages(stages):
        path = ours(stages.get(name).get("checkpoint"))
        if path and path not in keep:
            freed += path.stat().st_size
            path.unlink()
            removed.append(str(path))
            if not any(path.parent.iterdir()):
                path.parent.rmdir()
    slimmed = []
    for path in sorted(keep):
        if not is_pruned(path):
            freed += keep_weights_only(path)
            slimmed.append(str(path))
    if not (removed or slimmed):
        return None
    record = {"removed": removed, "weights_only": slimmed, "freed_mb": round(freed / 2**20, 1)}
    stages.note("pruned", record)
    kept = ", ".join(f"{p} ({p.stat().st_size / 2**20:.0f} MB)" for p in sorted(keep)) or "none"
    log.info("prune_checkpoints: freed %.0f MB: removed %d earlier checkpoint(s), kept the final weights only: %s "
             "(enough to evaluate, pseudo-label and start a student from; not to resume its training)",
             freed / 2**20, len(removed), kept)
    return record


def _fit(name: str, root: Path, make: Factories, loggers: StageLoggers, settings: ChainSettings,
         train_set: Callable | None = None, init_weights: str | None = None, **kwargs: Any) -> StageResult:
    """A fresh datamodule (training on ``train_set`` if given), model and loggers for one training stage.

    ``init_weights``: a checkpoint whose final weights the model starts from (the stage's own last.ckpt,
    when resuming, still wins: it holds the weights trained since)."""
    datamodule = make.datamodule()
    if train_set is not None:
        datamodule.factories["train"] = train_set
    model = make.model()
    if init_weights:
        log.info("stage %s: the student starts from the teacher's weights (%s)", name, init_weights)
        load_weights(model, init_weights)
    opened = loggers.open(None if name == "train" else name)
    make.log_config(opened)
    return fit_stage(name, root, datamodule, model, make.trainer, opened, tune=settings.tune, **kwargs)


def _teacher(checkpoint: str | None, trained: L.LightningModule | None, make_model: Callable[[], L.LightningModule]):
    """The model that pseudo-labels: the final weights of ``checkpoint``, else the model just trained."""
    if checkpoint:
        model = make_model()
        load_weights(model, checkpoint)
        return model
    if trained is not None:  # e.g. fast_dev_run, which saves no checkpoint
        return trained
    raise SettingError("self-training needs the trained model's checkpoint, and the train stage saved none: "
                       "keep the last_checkpoint callback, or set selftrain.rounds=0")


def _run(settings: ChainSettings, make: Factories, work: Path, stages: Stages, loggers: StageLoggers) -> ChainResult:
    last: StageResult | None = None  # the latest stage trained in this invocation
    if settings.train and settings.synthetic and settings.synthetic_mode == "cached":
        generate_stage(stages, make.generate, settings.synthetic_dir, settings.num_images)
    elif settings.train and settings.synthetic:
        make.prompts()

    checkpoint = (stages.get("train") or {}).get("checkpoint")
    if settings.train and not stages.get("train"):
        grid = {"synthetic/samples": Path(settings.synthetic_dir) / "grid.png"} if settings.synthetic else None
        last = _fit("train", work, make, loggers, settings, ckpt_path=settings.ckpt_path, images=grid)
        checkpoint = last.checkpoint
        stages.mark("train", last.record())
    elif stages.get("train"):
        log.info("stage train: done in an earlier run (%s)", checkpoint)

    rounds = int(settings.selftrain.rounds) if settings.synthetic and settings.train else 0
    source = Path(settings.synthetic_dir) if rounds else None
    for r in range(1, rounds + 1):
        pseudo_dir = work / f"pseudo_{r}"
        if not stages.get(f"pseudo_{r}"):
            loggers.close()
            teacher = _teacher(checkpoint, last.model if last else None, make.model)
            summary = pseudo_stage(teacher, source, pseudo_dir, partial(make.predictor, pseudo_dir), settings.selftrain,
                                   checkpoint=checkpoint, max_samples=settings.num_images, progress=settings.progress)
            stages.mark(f"pseudo_{r}", summary)
        source = pseudo_dir
        name = f"selftrain_{r}"
        if stages.get(name):
            checkpoint = stages.get(name)["checkpoint"]
            log.info("stage %s: done in an earlier run (%s)", name, checkpoint)
            continue
        train_set = partial(SyntheticDataset, root=str(pseudo_dir), class_list=settings.class_list,
                            max_samples=settings.num_images)
        init = None
        if settings.selftrain.init == "teacher":
            if not checkpoint:
                raise SettingError("selftrain.init=teacher needs the teacher's checkpoint, and its stage saved none: keep "
                                   "the last_checkpoint callback, or use selftrain.init=scratch")
            init = checkpoint
        last = _fit(name, work / name, make, loggers, settings, train_set=train_set, init_weights=init)
        checkpoint = last.checkpoint
        stages.mark(name, last.record())

    result = ChainResult({}, *((last.model, last.datamodule, last.trainer) if last else ()))
    if settings.test:
        ckpt = checkpoint if settings.train else (settings.ckpt_path or final_checkpoint(stages))
        if last is None and stages.tested(ckpt):
            return result  # merge_metrics keeps the recorded test metrics
        if last is None:  # nothing trained in this invocation: the test stage's own objects
            opened = loggers.open("test" if settings.synthetic else None)
            datamodule = make.datamodule()
            model = make.model()
            result = ChainResult({}, model, datamodule, make.trainer(work, opened, []))
        log.info("stage test: the final weights %s", f"of {ckpt}" if ckpt else "in memory (no checkpoint was saved)")
        result.metrics.update({"ckpt_path": str(ckpt)} if ckpt else {})
        result.metrics["ckpt"] = "last" if settings.train else "given"
        tested, digest = test_stage(result.model, result.datamodule, result.trainer, ckpt), (stages.run or {}).get("digest")
        result.metrics.update(tested)
        stages.mark("test", {"checkpoint": ckpt, "ckpt": result.metrics["ckpt"], "metrics": tested, "digest": digest})
    return result

