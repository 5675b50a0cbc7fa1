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
from functools import partial
from pathlib import Path

import hydra
from omegaconf import DictConfig

from dsdiff.config import config_dir
from dsdiff.generation import generate
from dsdiff.io import write_json_atomic
from dsdiff.runtime import StageLoggers, instantiate_loggers, log_config

log = logging.getLogger("dsdiff")


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> None:
    output_dir = Path(cfg.paths.output_dir)
    with StageLoggers(partial(instantiate_loggers, cfg.get("logger"), output_dir)) as loggers:
        opened = loggers.open()
        log_config(cfg, opened)
        summary = generate(cfg, opened)
        write_json_atomic(output_dir / "generation.json", summary)
        log.info("synthetic dataset: %s", summary)


if __name__ == "__main__":
    main()
