"""Every experiment composes, alone and under debug configs, and its objects instantiate."""
from pathlib import Path

import hydra
import pytest
from omegaconf import OmegaConf

from dsdiff.chain.config import config_dir, entry_point_of as _entry_point, help_groups
from dsdiff.chain.runtime import job_config
from dsdiff.diffusion.pipeline import image_to_latent_factor


_FILES = sorted((config_dir() / "experiment").glob("*.yaml"))
EXPERIMENTS = [p.stem for p in _FILES if _entry_point(p) == "train"]  # composed with train.yaml
PRETRAIN_EXPERIMENTS = [p.stem for p in _FILES if _entry_point(p) == "pretrain"]  # with pretrain.yaml


@pytest.fixture(scope="module")
def data_paths(tmp_path_factory):
    """Overrides an experiment needs to compose: data=folder reads its class count from paths.folder/classes.txt."""
    from dsdiff.testing.folders import write_image_folder

    root = write_image_folder(tmp_path_factory.mktemp("folder"))["root"]
    return lambda experiment: [f"paths.folder={root}"] if experiment.startswith("folder_") else []


def _listed(text: str) -> dict[str, list[str]]:
    return {line.split(": ")[0]: line.split(": ")[1].split(", ") for line in text.splitlines()}


def test_help_lists_only_what_each_command_takes():
    train = _listed(help_groups("train", "tune/mIoU"))
    assert sorted(train["experiment"]) == sorted(EXPERIMENTS) and "shapes_t2i" not in train["experiment"]
    assert train["hparams_search"] == ["real_optuna", "shapes_optuna", "voc_optuna"] and "shapes_t2i" not in train and "score" not in train
    pretrain = _listed(help_groups("pretrain"))
    assert sorted(pretrain["experiment"]) == sorted(PRETRAIN_EXPERIMENTS) and "data" not in pretrain
    score = _listed(help_groups("score_labels", "labels/objective"))
    assert score["hparams_search"] == ["labels_optuna"] and "score" in score


def test_train_help_prints_the_filtered_groups():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "dsdiff.train", "--help"], capture_output=True, text=True, check=True).stdout
    experiments = next(line for line in out.splitlines() if line.startswith("experiment: "))
    assert "shapes_deeplab" in experiments and "shapes_t2i" not in experiments


def test_experiments_exist():
    assert {"voc_deeplab", "coco_deeplab", "shapes_real"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_instantiates(make_cfg, experiment, data_paths):
    cfg = make_cfg([f"+experiment={experiment}", *data_paths(experiment)])
    assert cfg.task_name == experiment
    OmegaConf.to_container(job_config(cfg), resolve=True)  # every interpolation resolves
    assert cfg.trainer.max_steps == cfg.max_steps
    assert len(cfg.model.class_names) == cfg.data.num_classes == cfg.model.net.num_classes
    datamodule = hydra.utils.instantiate(cfg.data)
    assert datamodule.num_classes == cfg.data.num_classes


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_debug_overrides_win_over_the_experiment(make_cfg, experiment, data_paths):
    cfg = make_cfg([f"+experiment={experiment}", "debug=fast", *data_paths(experiment)])
    assert cfg.model.net.encoder_name == "resnet18"
    assert cfg.model.net.encoder_weights is None
    assert cfg.trainer.max_steps == 10 and cfg.trainer.accelerator == "cpu"
    assert "csv" in cfg.logger and "wandb" not in cfg.logger
    model = hydra.utils.instantiate(cfg.model)
    assert model.net.num_classes == cfg.data.num_classes


def test_every_experiment_names_a_known_entry_point():
    assert sorted(EXPERIMENTS + PRETRAIN_EXPERIMENTS) == sorted(p.stem for p in _FILES)
    assert "shapes_t2i" in PRETRAIN_EXPERIMENTS


@pytest.fixture(scope="module")
def stage1_export(tmp_path_factory):
    """What `python -m dsdiff.pretrain +experiment=shapes_t2i` exports (untrained): stage 2's starting point."""
    from dsdiff.shapes_t2i.net import build_pipeline, save_pipeline

    return save_pipeline(build_pipeline(), tmp_path_factory.mktemp("stage1") / "pipeline")


@pytest.mark.parametrize("experiment", PRETRAIN_EXPERIMENTS)
def test_pretrain_experiment_composes_and_instantiates(make_cfg, experiment, request):
    # stage 2 (shapes_t2i_contextual) starts from stage 1's export, which a fresh clone does not have
    init = [f"model.pipeline.init={request.getfixturevalue('stage1_export')}"] if experiment == "shapes_t2i_contextual" else []
    cfg = make_cfg([f"+experiment={experiment}", *init], config_name="pretrain")
    assert cfg.task_name == experiment and cfg.entry_point == "pretrain"
    OmegaConf.to_container(job_config(cfg), resolve=True)
    assert cfg.trainer.max_steps == cfg.max_steps and cfg.callbacks.ema.decay == cfg.ema_decay
    model = hydra.utils.instantiate(cfg.model)
    pipe = model.to_pipeline()  # a UNet (shapes_t2i) or a transformer (shapes_dit) on packed pixels
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    assert denoiser.config.sample_size * image_to_latent_factor(pipe) == cfg.data.image_size
    assert hydra.utils.instantiate(cfg.data).hparams.batch_size == cfg.data.batch_size


def test_paper_recipe_values(make_cfg):
    cfg = make_cfg(["+experiment=voc_deeplab"])
    assert cfg.model.net.arch == "deeplabv3" and cfg.model.net.encoder_name == "resnet101"
    assert cfg.model.net.encoder_weights == "imagenet" and cfg.model.net.output_stride == 8
    assert cfg.model.aux_weight == 0.4 and cfg.model.backbone_lr_mult == 0.1
    assert cfg.model.optimizer.lr == 1e-4 and cfg.model.optimizer.weight_decay == 1e-4
    assert cfg.model.scheduler.power == 0.9 and cfg.trainer.max_steps == 20000
    assert cfg.data.batch_size == 8 and cfg.data.train_transform.crop_size == 512
    assert list(cfg.data.train_transform.scale_range) == [0.5, 2.0]
    assert list(cfg.model.tta_scales) == [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
    assert "ema" in cfg.callbacks and "wandb" in cfg.logger
    coco = make_cfg(["+experiment=coco_deeplab"])
    assert coco.data.num_classes == 81 and coco.trainer.max_steps == 40000
    for paper in (cfg, coco):  # one round of the paper's self-training: replace, a fresh student, no TTA
        assert dict(paper.selftrain) | {"batch_size": 0} == {"rounds": 1, "mode": "replace", "threshold": 0.9, "tta": False,
                                                             "init": "scratch", "batch_size": 0}
    shapes = make_cfg(["+experiment=shapes_deeplab"]).selftrain  # the mode measured best on the shapes world
    assert (shapes.mode, shapes.tta, shapes.init) == ("agree", True, "teacher")


def test_sweep_config_composes(make_cfg):
    cfg = make_cfg(["+experiment=voc_deeplab", "hparams_search=voc_optuna"])
    assert cfg.optimized_metric == "tune/mIoU"
    assert "model.optimizer.lr" in cfg.hydra.sweeper.params


def test_configs_ship_with_the_package():
    """The wheel maps conf/ to dsdiff/conf, which config_dir() falls back to."""
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert '"conf" = "dsdiff/conf"' in pyproject
    assert (config_dir() / "train.yaml").is_file() and (config_dir() / "eval.yaml").is_file()


def _compose(overrides, conf=None, config_name="train"):
    """Compose as the CLI does, paths untouched (make_cfg redirects them into tmp_path)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf or config_dir()), version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    GlobalHydra.instance().clear()
    return cfg


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_debug_fast_is_a_smoke_run_under_logs_debug(experiment, monkeypatch):
    """Issue 11: debug=fast on voc_deeplab kept 40,000 images at 100 steps in the real synthetic cache,
    and its runs landed in logs/<task>/runs, where resume=true of the real task looks."""
    monkeypatch.delenv("DSDIFF_ROOT", raising=False)
    real = _compose([f"+experiment={experiment}"])
    cfg = _compose([f"+experiment={experiment}", "debug=fast"])
    assert cfg.synthetic.num_images <= 8 and cfg.generator.num_inference_steps <= 2
    assert cfg.hydra.run.dir.startswith(f"./logs/debug/{experiment}/runs/")
    assert real.hydra.run.dir.startswith(f"./logs/{experiment}/runs/")
    assert cfg.synthetic.dir == f"./logs/debug/{experiment}/synthetic" != real.synthetic.dir


def test_debug_fast_values_for_voc_deeplab(monkeypatch):
    monkeypatch.delenv("DSDIFF_ROOT", raising=False)
    cfg = _compose(["+experiment=voc_deeplab", "debug=fast"])
    assert cfg.task_name == "voc_deeplab" and cfg.synthetic.dir == "./logs/debug/voc_deeplab/synthetic"
    assert (cfg.synthetic.num_images, cfg.generator.num_inference_steps) == (8, 2)
    assert cfg.model.net.encoder_name == "resnet18" and cfg.trainer.max_steps == 10


def test_cfg_job_resolve_resolves_the_class_names(make_cfg):
    """Issue 11: `--cfg job --resolve` crashed: OmegaConf.resolve (what Hydra runs for --resolve) refused
    the plain list the classes resolver returned."""
    cfg = job_config(make_cfg(["+experiment=voc_deeplab"]))
    OmegaConf.resolve(cfg)
    assert list(cfg.model.class_names)[:2] == ["background", "aeroplane"] and len(cfg.model.class_names) == 21
    assert "${" not in OmegaConf.to_yaml(cfg)


@pytest.mark.parametrize("header", ["", "# @package _global_\n"])
def test_local_config_sets_global_keys_with_or_without_the_package_line(tmp_path, header):
    import shutil

    conf = tmp_path / "conf"
    shutil.copytree(config_dir(), conf)
    (conf / "local").mkdir(exist_ok=True)
    (conf / "local" / "default.yaml").write_text(header + "paths:\n  voc: /data/VOC2012\n")
    for config_name in ("train", "eval"):
        cfg = _compose(["+experiment=voc_real", "ckpt_path=x"] if config_name == "eval" else ["+experiment=voc_real"],
                       conf=conf, config_name=config_name)
        assert cfg.paths.voc == "/data/VOC2012" and "local" not in cfg
    cfg = _compose(["+experiment=voc_real", "paths.voc=/cli"], conf=conf)
    assert cfg.paths.voc == "/cli"  # the command line still wins


def test_stage_2_without_stage_1_says_to_run_stage_1(make_cfg, tmp_path):
    cfg = make_cfg(["+experiment=shapes_t2i_contextual", f"paths.log_dir={tmp_path / 'logs'}"], config_name="pretrain")
    with pytest.raises(Exception, match=r"run stage 1 first \(`python -m dsdiff.pretrain \+experiment=shapes_t2i`"):
        hydra.utils.instantiate(cfg.model)
