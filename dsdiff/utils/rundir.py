"""A run that fails its checks leaves no run dir: remove the one Hydra made for it if it holds nothing else.

Hydra creates the run dir (``.hydra/``, ``<task>.log``) before dsdiff's checks run. When a check
fails (a :class:`dsdiff.utils.errors.ConfigError`), :func:`discard_unstarted_run` removes that dir
if it holds only those files, and the folders above it up to ``paths.log_dir`` that are then empty.
A dir holding anything else (``stages.json``, checkpoints, metrics) is never touched.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any


def _only_hydra_files(run_dir: Path) -> bool:
    for entry in run_dir.iterdir():
        if entry.name == ".hydra" and entry.is_dir() and not entry.is_symlink():
            if any(not (f.is_file() and f.suffix == ".yaml") for f in entry.iterdir()):
                return False
        elif not (entry.is_file() and entry.suffix == ".log"):
            return False
    return True


def discard_unstarted_run(cfg: Any) -> Path | None:
    """Remove this Hydra job's run dir when it holds nothing but Hydra's files and the log; returns it if removed."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return None
        run_dir = Path(HydraConfig.get().runtime.output_dir)
    except Exception:  # noqa: BLE001 - no Hydra run: nothing to clean
        return None
    if not run_dir.is_dir() or not _only_hydra_files(run_dir):
        return None
    shutil.rmtree(run_dir, ignore_errors=True)
    try:
        stop = Path(cfg.paths.log_dir).resolve()
    except Exception:  # noqa: BLE001 - no paths.log_dir: only the run dir itself
        return run_dir
    parent = run_dir.resolve().parent
    while parent != stop and parent.is_relative_to(stop):
        try:
            parent.rmdir()  # only if empty
        except OSError:
            break
        parent = parent.parent
    return run_dir
