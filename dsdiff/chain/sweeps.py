"""A sweep's search space against the run it tunes: every knob it samples must be one the run uses.

A run on real labels (``data/train`` is not the synthetic set) generates nothing and does not
self-train, so a search over ``generator.*``, ``synthetic.*``, ``prompts.*`` or ``selftrain.*``
would "tune" settings that change nothing; the shapes world's 16x16 latent has attention grids 16
and 8 only. Both are refused at the first trial, naming the search config to use instead.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

from dsdiff.utils.errors import SettingError

SYNTHETIC_ONLY = ("generator.", "synthetic.", "prompts.", "selftrain.")
SHAPES_GRIDS = (8, 16)


def search_problem(params: Mapping[str, str], synthetic: bool, generator: str | None, search: str | None) -> str | None:
    """What is wrong with a sweep's ``params`` for this run, or None."""
    name = f"hparams_search={search}" if search else "the sweep"
    if not synthetic:
        unused = sorted(k for k in params if str(k).startswith(SYNTHETIC_ONLY))
        if unused:
            return (f"{name} tunes {', '.join(unused)}, which a run on real labels never uses (it generates nothing "
                    "and does not self-train): use hparams_search=real_optuna")
        return None
    if generator == "shapes":
        for key in ("generator.labels.cross_res", "generator.labels.self_res"):
            values = {int(v) for v in re.findall(r"\d+", str(params.get(key, "")))}
            if values - set(SHAPES_GRIDS):
                return (f"{name} tunes {key} over {params[key]}, and the shapes model's 16x16 latent has attention "
                        f"grids {' and '.join(map(str, SHAPES_GRIDS))} only: use hparams_search=shapes_optuna")
    return None


def check_search(synthetic: bool) -> None:
    """Refuse this sweep trial's search space if it samples knobs the run does not use (nothing outside a sweep)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return
    params = hydra_cfg.sweeper.get("params") or {}
    problem = search_problem(params, synthetic, hydra_cfg.runtime.choices.get("generator"),
                             hydra_cfg.runtime.choices.get("hparams_search"))
    if problem:
        raise SettingError(problem)
