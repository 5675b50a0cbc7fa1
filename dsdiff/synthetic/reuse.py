"""A finished synthetic folder, used as it is: its ``dataset.json`` says what made it.

A folder that already holds every sample of ``synthetic.num_images`` needs neither the diffusion
model nor the captioner, so :func:`finished_folder` loads neither. It compares what the configuration
alone decides (the class names, the sampling and label settings, seed, image format, filters) and
refuses a difference there, naming the settings. The model and the prompts are compared only where
this run names them: a ``generator`` or ``generator.model`` passed on the command line, a
``synthetic.prompts`` file (by its records). Otherwise the folder's own record stands, and one log
line says what made it.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from dsdiff.diffusion.prompts import DEFAULT_TEMPLATE
from dsdiff.synthetic.drops import check_dropped, summarize
from dsdiff.synthetic.export import export_folder
from dsdiff.synthetic.predict import finish_folder
from dsdiff.synthetic.spec import prompt_records, prompts_config, sample_id, settings_config
from dsdiff.synthetic.store import RESTART_HINT, SyntheticStore, setting_diff
from dsdiff.utils.config import to_plain
from dsdiff.utils.errors import SettingError

log = logging.getLogger("dsdiff")


def names_model(passed: Collection[str] | None) -> bool:
    """Whether the command line chose the model (``generator=NAME``, ``generator.model=PATH``); with no
    command line (``passed`` None: a configuration built in Python) every setting counts as chosen."""
    return passed is None or bool({"generator", "generator.model"} & {key.lstrip("+") for key in passed})


def finished_folder(generator: Mapping, synthetic: Mapping, class_names: Sequence[str],
                    passed: Collection[str] | None = None) -> dict[str, Any] | None:
    """The summary of ``synthetic.dir`` if it already holds all ``synthetic.num_images`` samples made with
    these settings, else None (generation has work to do, or the folder is new or forced anew).

    ``passed``: the keys given on the command line (None: no command line). Raises, naming the settings, when a finished
    folder was made with settings other than those asked for.
    """
    generator, synthetic = dict(to_plain(generator)), dict(to_plain(synthetic))
    store = SyntheticStore(Path(synthetic["dir"]).expanduser())
    old = store.read_config()
    if old is None or synthetic.get("overwrite") or "batch_size" not in old.get("generator", {}):
        return None  # new, forced anew, or made by an older dsdiff (generation adopts or refuses it)
    done = store.done_ids()
    if any(sample_id(i) not in done for i in range(int(synthetic["num_images"]))):
        return None
    new = json.loads(json.dumps(settings_config(generator, synthetic, class_names)))
    kept = ""
    if not names_model(passed) and new["generator"]["model"] != old["generator"].get("model"):
        kept = (f"; this config's generator.model {generator.get('model')!r} is not the folder's: pass "
                "generator.model on the command line to have it compared")
        new["generator"]["model"] = old["generator"].get("model")
    if synthetic.get("prompts"):
        records = prompt_records(synthetic["prompts"], class_names, synthetic.get("template") or DEFAULT_TEMPLATE,
                                 synthetic.get("max_classes_per_prompt", 1))
        new["prompts"] = prompts_config(synthetic, records)
    else:  # the prompts stage would make them (captions, a captioner): the folder's record stands
        new["prompts"] = old.get("prompts")
    diff = setting_diff(old, new)
    if diff:
        raise SettingError(
            f"the finished synthetic dataset at {store.root} was made with a different configuration "
            f"({'; '.join(diff[:6])}{'; ...' if len(diff) > 6 else ''}): pass the folder's values (its dataset.json "
            f"lists them) to train on it as it is, or {RESTART_HINT}")
    made_by = old["generator"].get("model")
    made_by = made_by.get("name") if isinstance(made_by, Mapping) else made_by
    prompts = old.get("prompts") or {}
    log.info("%s holds all %d samples (made by %s from %s, %s prompt records): using it as it is; the generator and "
             "the captioner are not loaded%s", store.root, int(synthetic["num_images"]), made_by,
             prompts.get("file") or "the prompts stage", prompts.get("records"), kept)
    is_zero = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0))) == 0
    # a run killed after its last sample may have left shards unmerged and no grid: finish them (rank 0)
    grid = finish_folder(store, synthetic.get("grid_size", 8), class_names) if is_zero else None
    summary = {**summarize(store), "dir": str(store.root), "grid": str(grid) if grid else None}
    check_dropped(store, summary, synthetic.get("max_dropped", 0.5), reset=is_zero)
    if synthetic.get("export") and is_zero:
        summary["export"] = str(export_folder(store.root, synthetic["export"]))
    return summary
