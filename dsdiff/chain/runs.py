"""The run record: which run dir a chain works in, what it is (its identity), which stages are done.

``<run>/stages.json`` holds ``"run"`` (written when the run starts, before its first stage) and one
entry per finished stage::

    {"run": {"task_name": ..., "digest": ..., "config": {...}, "chain": ..., "started": ...,
             "resumes": [...], "changes": [...]},
     "generate": {...}, "train": {"checkpoint": ..., "step": ..., "metrics": {...},
                                  "batch": {"global": 8, "per_device": 2, "devices": 4}}, ...}

(``batch``: each training stage's global ``data.batch_size``, split over its ``devices`` processes.)

The identity is the task name plus a digest of the resolved config without the keys that cannot
change a result (loggers, output paths, resume settings, progress bars, ...: ``NEUTRAL``).
``resume=true`` continues the latest run of the task only if its identity matches; ``resume=DIR``
continues DIR under the same check; ``resume=force`` (latest run) or ``resume_force=true`` (with
``resume=DIR``) continue despite different settings and record the change under ``"changes"``.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from dsdiff.utils.config import config_diff
from dsdiff.utils.errors import MissingPathError, SettingError
from dsdiff.utils.io import write_json_atomic

log = logging.getLogger("dsdiff")
STAGES_FILE = "stages.json"
RUN_KEY = "run"

# dotted keys (fnmatch patterns) that do not change what a run computes: where outputs go, how it
# logs and shows progress, how it is resumed, and which stages this invocation runs
NEUTRAL = (
    "logger", "logger.*", "paths", "paths.*", "hydra", "hydra.*", "resume", "resume_force", "ckpt_path",
    "tags", "train", "test", "verbose", "prune_checkpoints",
    "trainer.log_every_n_steps", "trainer.enable_progress_bar", "trainer.enable_model_summary",
    "trainer.default_root_dir", "trainer.profiler",
    "callbacks.*.dirpath", "callbacks.progress_bar", "callbacks.progress_bar.*", "callbacks.lr_monitor",
    "callbacks.lr_monitor.*", "callbacks.val_panel", "callbacks.val_panel.*",
    # not generator.batch_size: samples are made in aligned groups of it, so it changes the synthetic set
    "data.num_workers", "data.pin_memory", "selftrain.batch_size",
    "synthetic.overwrite", "synthetic.export", "synthetic.grid_size", "synthetic.save_attention",
)


def _neutral(key: str) -> bool:
    """Top-level patterns match top-level keys; dotted ones also match where a node is copied in
    by interpolation (``data.train.synthetic.overwrite`` is ``synthetic.overwrite``)."""
    parts = key.split(".")
    for pattern in NEUTRAL:
        if "." not in pattern:
            if fnmatch.fnmatchcase(key, pattern):
                return True
        elif any(fnmatch.fnmatchcase(".".join(parts[i:]), pattern) for i in range(len(parts))):
            return True
    return False


def job_config(cfg: DictConfig) -> DictConfig:
    """The config without Hydra's own node (which only resolves inside a Hydra run)."""
    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.pop("hydra", None)
    return OmegaConf.create(plain)


def result_config(cfg: DictConfig) -> dict:
    """The resolved config without the keys in ``NEUTRAL``: what decides a run's results."""
    plain = OmegaConf.to_container(job_config(cfg), resolve=True)
    out = {}
    for key, value in plain.items():
        if _neutral(key):
            continue
        out[key] = _strip_nested(value, key)
    return out


def _strip_nested(node: Any, path: str) -> Any:
    if isinstance(node, Mapping):
        return {k: _strip_nested(v, f"{path}.{k}") for k, v in node.items() if not _neutral(f"{path}.{k}")}
    return node


def digest(config: Mapping) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def identity(cfg: DictConfig) -> dict:
    """What a run is: its task and the digest of :func:`result_config` (kept with the config, for diffs)."""
    config = result_config(cfg)
    return {"task_name": str(cfg.task_name), "digest": digest(config), "config": config}


def identity_diff(old: Mapping | None, new: Mapping) -> list[str]:
    """``key: old -> new`` for every result-changing key that differs (task name included)."""
    if not old or "config" not in old:
        return ["<this run recorded no settings: it was made by an older dsdiff>"]
    out = [] if old.get("task_name") == new["task_name"] else [f"task_name: {old.get('task_name')!r} -> {new['task_name']!r}"]
    return out + config_diff(old["config"], new["config"])


class Stages:
    """``<run>/stages.json``: the run's identity and its finished stages (written atomically, by rank 0)."""

    def __init__(self, work_dir: Path) -> None:
        self.path = Path(work_dir) / STAGES_FILE
        self.data: dict[str, dict] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    @property
    def run(self) -> dict | None:
        return self.data.get(RUN_KEY)

    def finished(self) -> list[str]:
        return [name for name in self.data if name != RUN_KEY]

    def get(self, name: str) -> dict | None:
        return self.data.get(name)

    def mark(self, name: str, info: dict[str, Any]) -> None:
        self.data[name] = info
        self._save()

    def note(self, key: str, info: Any) -> None:
        """Append ``info`` to the list ``key`` of the run's own entry (e.g. ``"pruned"``): about the run, not a stage."""
        run = self.data.setdefault(RUN_KEY, {})
        run[key] = [*run.get(key, []), info]
        self._save()

    def tested(self, ckpt: str | Path | None) -> bool:
        """Whether an earlier run's test stage already tested ``ckpt`` with the same settings (the run's identity
        digest, which holds every test setting); logs the reason when it did not, so a rerun of the test says why."""
        done, digest = self.get("test"), (self.run or {}).get("digest")
        if not done or not done.get("metrics"):
            return False
        if str(done.get("checkpoint")) != str(ckpt):
            log.info("stage test: testing again: the earlier test was of %s, the final weights now are %s",
                     done.get("checkpoint"), ckpt)
            return False
        if done.get("digest") is None or done.get("digest") != digest:
            why = "it recorded no settings (an older dsdiff)" if done.get("digest") is None else "the settings changed since"
            log.info("stage test: testing %s again: %s", ckpt, why)
            return False
        log.info("stage test: done in an earlier run (%s, same settings): metrics kept; delete the \"test\" entry of "
                 "stages.json to test again", ckpt)
        return True

    def _save(self) -> None:
        if rank_zero_only.rank == 0:
            write_json_atomic(self.path, self.data)


def _read(path: Path) -> Stages | None:
    try:
        return Stages(path)
    except (OSError, ValueError):
        return None


def _started(run_dir: Path) -> float:
    stages = _read(run_dir)
    started = ((stages.run or {}).get("started_unix") if stages else None)
    return float(started) if started is not None else (run_dir / STAGES_FILE).stat().st_mtime


def latest_run(cfg: DictConfig, exclude: Path | None = None) -> Path | None:
    """The most recently started run of this task under ``<paths.log_dir>/<task_name>/runs``."""
    runs = Path(cfg.paths.log_dir) / str(cfg.task_name) / "runs"
    found = [p.parent for p in runs.glob(f"*/{STAGES_FILE}")
             if exclude is None or p.parent.resolve() != Path(exclude).resolve()]
    return max(found, key=_started) if found else None


def _resume_setting(cfg: DictConfig) -> tuple[str | None, bool]:
    """(None | "latest" | a run dir, force) from ``resume`` and ``resume_force``."""
    resume, force = cfg.get("resume"), bool(cfg.get("resume_force") or False)
    if resume is None or resume is False or str(resume).lower() in ("false", "null", "none", ""):
        return None, force
    if resume is True or str(resume).lower() == "true":
        return "latest", force
    if str(resume).lower() == "force":
        return "latest", True
    return str(resume), force


def open_run(cfg: DictConfig) -> tuple[Path, Stages]:
    """The chain's run dir and its record: a fresh run here, or the run being resumed (identity checked).

    Writes the record's ``"run"`` entry before returning, so a run that dies in its first stage can
    still be found and resumed.
    """
    here = Path(cfg.paths.output_dir)
    which, force = _resume_setting(cfg)
    new = identity(cfg)
    work = here
    if which == "latest":
        found = latest_run(cfg, exclude=here)
        if found is None:
            log.info("resume=true: no earlier run of %s under %s; starting a fresh run in %s",
                     cfg.task_name, Path(cfg.paths.log_dir) / str(cfg.task_name) / "runs", here)
        else:
            work = found
    elif which is not None:
        work = Path(which).expanduser()
        if not (work / STAGES_FILE).is_file():
            raise MissingPathError(f"resume={work}: no {STAGES_FILE} there, so it is not a dsdiff run dir: "
                                    "pass the dir of an earlier run (logs/<task>/runs/<time>), or resume=true")
    stages = Stages(work)
    if work == here and not stages.run:
        stages.data = {RUN_KEY: {**new, "chain": _chain_name(cfg.task_name, here), "dir": str(here), "started": _now(),
                                 "started_unix": time.time()}, **stages.data}
        stages._save()
        return work, stages

    diff = [] if (stages.run or {}).get("digest") == new["digest"] and stages.run.get("task_name") == new["task_name"] \
        else identity_diff(stages.run, new)
    if diff and not force:
        if which is None:  # hydra.run.dir points at an existing run
            raise SettingError(
                f"{work} already holds a run with other settings:\n  " + "\n  ".join(diff)
                + f"\nChoose another hydra.run.dir for a fresh run, or pass resume_force=true to continue that run "
                f"anyway (the change is recorded in its {STAGES_FILE})."
            )
        how = "resume=force" if which == "latest" else f"resume={work} resume_force=true"
        raise SettingError(
            f"refusing to resume {work}: it was run with different settings:\n  " + "\n  ".join(diff)
            + f"\nRun without resume= for a fresh run, or pass {how} to continue it anyway (the change is recorded "
            f"in its {STAGES_FILE})."
        )
    record = dict(stages.run or {})
    record.setdefault("chain", _chain_name(cfg.task_name, work))
    record.setdefault("dir", str(work))
    if work != here:
        record["resumes"] = [*record.get("resumes", []), {"time": _now(), "from": str(here)}]
    if diff:
        log.warning("resume: continuing %s with changed settings (recorded):\n  %s", work, "\n  ".join(diff))
        record["changes"] = [*record.get("changes", []), {"time": _now(), "diff": diff}]
        record.update(new)  # later resumes compare against the settings it now runs with
    stages.data = {RUN_KEY: record, **{k: v for k, v in stages.data.items() if k != RUN_KEY}}
    stages._save()
    if rank_zero_only.rank == 0:  # a DDP process that Lightning started joins its parent's run: no resume to report
        log.info("resuming the chain in %s (finished stages: %s)", work, ", ".join(stages.finished()) or "none")
    return work, stages


def _chain_name(task_name: str, run_dir: Path) -> str:
    """A W&B group name unique to the chain: task and run dir name (``<sweep dir>-<n>`` for a sweep trial)."""
    run_dir = Path(run_dir)
    name = f"{run_dir.parent.name}-{run_dir.name}" if run_dir.name.isdigit() else run_dir.name
    return f"{task_name}-{name}"


def chain_of(run_dir: str | Path) -> str | None:
    """The chain id recorded in ``run_dir``'s stages.json, if it is a chain's run dir."""
    stages = _read(Path(run_dir))
    return (stages.run or {}).get("chain") if stages else None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def fitted_stages(stages: Stages) -> list[str]:
    """The finished training stages in the order they ran: ``train``, ``selftrain_1``, ``selftrain_2``, ...
    (by round: stages.json, written key-sorted, reads back ``selftrain_1`` before ``train``)."""
    def order(name: str) -> tuple[int, int]:
        round_ = name.removeprefix("selftrain_")
        return (0, 0) if name == "train" else (1, int(round_) if round_.isdigit() else 0)

    return sorted((name for name in stages.finished() if name == "train" or name.startswith("selftrain_")), key=order)


def final_checkpoint(stages: Stages) -> str | None:
    """The checkpoint of the chain's last finished training stage (its final weights), if any."""
    fitted = fitted_stages(stages)
    return (stages.get(fitted[-1]) or {}).get("checkpoint") if fitted else None


def merge_metrics(work: Path, stages: Stages, new: Mapping[str, Any]) -> dict[str, Any]:
    """This invocation's metrics over the earlier ones of the chain (its metrics.json and finished stages)."""
    merged: dict[str, Any] = {}
    path = Path(work) / "metrics.json"
    if path.is_file():
        try:
            merged.update(json.loads(path.read_text()))
        except ValueError:
            log.warning("ignoring unreadable %s", path)
    fitted = fitted_stages(stages)
    for name in fitted:  # every fitted stage's metrics under its name
        merged.update({f"{name}/{k}": v for k, v in ((stages.get(name) or {}).get("metrics") or {}).items()})
    if fitted:  # the final stage's also plain: tune/mIoU is the sweep objective
        merged.update((stages.get(fitted[-1]) or {}).get("metrics") or {})
    merged.update((stages.get("test") or {}).get("metrics") or {})
    merged.update(new)
    return merged

