"""`python -m dsdiff.generate +experiment=NAME generator.model=ID_OR_DIR synthetic.num_images=N synthetic.dir=DIR`
(or `dsdiff-generate ...`).

Writes (or finishes) the synthetic dataset described by the `generator` and `synthetic` config
groups; kill it at any point and run the same command again to resume, with the same bits as an
uninterrupted run. Several GPUs or nodes: `trainer=ddp trainer.devices=8` (and
`trainer.num_nodes=...`, SLURM or torchrun), with the same samples as one process.
`synthetic.export=voc` also writes a VOC-layout copy, `synthetic.export=hf` a Hugging Face
`datasets` folder.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from dsdiff.chain.config import check_devices, checks_experiment, config_dir
from dsdiff.chain.runtime import job_loggers
from dsdiff.data.classes import get_class_list
from dsdiff.diffusion.pipeline import check_class_names, load_tokenizer
from dsdiff.prompting.checks import check_prompts_file
from dsdiff.prompting.stage import ensure_prompts
from dsdiff.synthetic.predict import generate_dataset
from dsdiff.synthetic.spec import GenerationPlan, check_settings
from dsdiff.synthetic.drops import check_max_dropped
from dsdiff.synthetic.reuse import finished_folder
from dsdiff.synthetic.store import check_output_dir
from dsdiff.utils.config import to_plain
from dsdiff.utils.errors import exits_cleanly
from dsdiff.utils.io import write_json_atomic

log = logging.getLogger("dsdiff")


def check_generation(cfg: DictConfig) -> list[str]:
    """The checks that need no weights (settings, a given prompts file, the output folder, the tokenizer
    placing every class name); returns the class names."""
    generator, synthetic = to_plain(cfg.generator), to_plain(cfg.synthetic)
    class_names = get_class_list(cfg.data.class_list).classes
    check_devices(cfg.trainer)
    check_settings(generator, synthetic)
    check_max_dropped(synthetic.get("max_dropped", 0.5))
    if synthetic.get("prompts"):  # every record FILE:LINE, before the run writes anything
        drop_empty = bool((synthetic.get("filters") or {}).get("drop_empty", True))
        check_prompts_file(synthetic["prompts"], class_names, drop_empty=drop_empty)
    check_output_dir(Path(synthetic["dir"]).expanduser())
    if finished_folder(generator, synthetic, class_names, command_line_keys()) is None:  # a finished one loads nothing
        check_class_names(load_tokenizer(generator["model"]), class_names)  # also: is it a pipeline at all
    return class_names


def command_line_keys() -> list[str] | None:
    """The keys this Hydra job was given on the command line (None outside a Hydra run)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return [str(o).partition("=")[0].lstrip("+") for o in HydraConfig.get().overrides.task if not str(o).startswith("~")]


def generate(cfg: DictConfig, loggers: list | None = None) -> dict[str, Any]:
    """Generate (or finish) the synthetic dataset that ``cfg.synthetic`` describes; returns a summary.

    Everything that can be judged without weights (settings, the output folder, the tokenizer
    placing every class name) is checked before the prompts stage runs and before any file is written.
    A folder that already holds every sample is used as it is (:func:`~dsdiff.synthetic.reuse.finished_folder`):
    neither the model nor the captioner is loaded.
    """
    return generate_checked(cfg, check_generation(cfg), loggers)


def generate_checked(cfg: DictConfig, class_names: list[str], loggers: list | None = None) -> dict[str, Any]:
    """:func:`generate` after :func:`check_generation` passed (it returned ``class_names``)."""
    generator, synthetic = to_plain(cfg.generator), to_plain(cfg.synthetic)
    finished = finished_folder(generator, synthetic, class_names, command_line_keys())
    if finished is not None:
        return finished
    prompts = synthetic.get("prompts") or ensure_prompts(cfg)  # captions + class names, cached: after the cheap checks
    plan = GenerationPlan.from_settings(generator, synthetic, class_names, prompts=prompts)

    def make_trainer(callbacks: list):
        return hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    # Lightning refuses a progress-bar callback when the trainer config turns progress bars off
    return generate_dataset(plan, make_trainer, loggers or (), progress=cfg.trainer.get("enable_progress_bar", True))


@checks_experiment("train")  # a wrong +experiment=NAME: one error block, before Hydra composes
@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
@exits_cleanly  # a ConfigError: one "dsdiff: error:" block and exit status 2, no traceback
def main(cfg: DictConfig) -> None:
    output_dir = Path(cfg.paths.output_dir)
    class_names = check_generation(cfg)  # before the loggers write their first file
    with job_loggers(cfg, output_dir) as loggers:
        summary = generate_checked(cfg, class_names, loggers)
        write_json_atomic(output_dir / "generation.json", summary)
        log.info("synthetic dataset: %s", summary)


if __name__ == "__main__":
    main()
