"""A quiet log: the libraries' chatter that a dsdiff user cannot act on is silenced.

Every command's log shows dsdiff's own lines (stages, progress, pictures, metrics). Without
``verbose=true`` these go quiet:

- Lightning's info lines: "Seed set to", "GPU available / TPU available" (dsdiff logs one
  ``device:`` line per training stage instead), the "Tip: try installing litlogger / litmodels"
  advertisements and "`Trainer.fit` stopped: `max_steps` reached";
- the model summary table (``trainer.enable_model_summary: false``; the ``device:`` line gives
  the parameter count) and the test metrics table (dsdiff logs a ``test:`` line and writes
  ``metrics.json``);
- alembic's "setup plugin ..." lines when an Optuna sweep starts;
- diffusers' and transformers' "Loading pipeline components / Loading weights" bars;
- deprecation and future warnings raised inside dependencies (the fix is theirs to make; also
  huggingface_hub's "`local_dir_use_symlinks` is deprecated", which diffusers triggers), and
  Lightning's "number of training batches is smaller than the logging interval" (dsdiff logs by
  step, not by epoch).

Warnings that dsdiff itself raises, and every warning or error that is not on that list, still
show. ``verbose=true`` keeps everything. Applied by :class:`QuietLibraries`, a Hydra callback
(``conf/hydra/default.yaml``) that runs before each job (and before a sweep starts).
"""
from __future__ import annotations

import logging
import warnings
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

QUIET_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",  # GPU/TPU available, tips, "Trainer.fit stopped"
    "lightning.fabric.utilities.rank_zero",
    "lightning.fabric.utilities.seed",  # "Seed set to 42"
    "alembic",  # optuna's database layer: "setup plugin alembic..." at the start of a sweep
)
# (message regex, category, module regex) for warnings.filterwarnings
QUIET_WARNINGS = (
    ("", DeprecationWarning, r"^(?!dsdiff)"),
    ("", FutureWarning, r"^(?!dsdiff)"),
    (r"The number of training batches .* is smaller than the logging interval", Warning, ""),
    (r"The `local_dir_use_symlinks` argument is deprecated", UserWarning, ""),  # diffusers -> huggingface_hub
)


def quiet_libraries() -> None:
    """Silence the lines listed in the module docstring (idempotent)."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for message, category, module in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - diffusers is a dependency
        pass
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


class QuietLibraries(Callback):
    """Hydra callback: :func:`quiet_libraries` before each job unless the job's config says ``verbose: true``."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.get("verbose", False):
            quiet_libraries()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.get("verbose", False):
            quiet_libraries()
