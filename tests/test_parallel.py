"""Data-parallel training: data.batch_size is the global batch, SyncBatchNorm on GPUs only, every test image once."""
import json
import logging
import os
import subprocess
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import hydra
import lightning as L
import pytest
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.plugins import TorchSyncBatchNorm

from dsdiff.chain.parallel import batch_split, log_batch, trainer_overrides, world_size
from dsdiff.data.datamodule import SegDataModule
from dsdiff.data.shapes import ShapesDataset
from dsdiff.train import train
from dsdiff.utils.errors import SettingError

FAST = ["+experiment=shapes_real", "debug=fast"]


def test_world_size_is_what_lightning_will_run(monkeypatch):
    for name in ("TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_JOB_NAME"):
        monkeypatch.delenv(name, raising=False)
    assert world_size({"accelerator": "cpu", "devices": 2, "strategy": "ddp"}) == 2
    assert world_size({"accelerator": "cpu", "devices": "3", "num_nodes": 2}) == 6
    assert world_size({"accelerator": "gpu", "devices": [0, 2, 3]}) == 3
    assert world_size({"accelerator": "gpu", "devices": "0,1"}) == 2
    assert world_size({"accelerator": "cpu", "devices": "auto"}) == 1
    assert batch_split(8, {"accelerator": "gpu", "devices": [0, 1], "num_nodes": 2}) == {
        "global": 8, "per_device": 2, "devices": 4}
    monkeypatch.setenv("SLURM_NTASKS", "8")  # an srun job step: Lightning takes its tasks as the processes
    assert world_size({"accelerator": "gpu", "devices": 4, "num_nodes": 2}) == 8
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # Lightning's sign that SLURM did not launch the processes
    assert world_size({"accelerator": "cpu", "devices": 1}) == 1
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert world_size({"accelerator": "gpu", "devices": "auto"}) == 4


def test_a_batch_that_does_not_divide_over_the_processes_is_refused_before_writing(make_cfg, tmp_path):
    out = tmp_path / "out"
    cfg = make_cfg([*FAST, "trainer=ddp_cpu", "trainer.devices=4", "data.batch_size=6"], output_dir=out)
    with pytest.raises(SettingError, match=r"data\.batch_size=6 does not divide over trainer\.devices=4 processes: .*"
                                           r"use data\.batch_size=4 or 8"):
        train(cfg)
    cfg = make_cfg([*FAST, "trainer=ddp_cpu", "trainer.devices=2", "+trainer.num_nodes=2", "data.batch_size=6"], output_dir=out)
    with pytest.raises(SettingError, match=r"trainer\.devices=2 x trainer\.num_nodes=2 = 4 processes"):
        train(cfg)
    # one image per CPU process: plain BatchNorm (no SyncBatchNorm off GPUs) cannot train on it
    cfg = make_cfg([*FAST, "trainer=ddp_cpu", "trainer.devices=2", "data.batch_size=2"], output_dir=out)
    with pytest.raises(SettingError, match=r"gives each process 1 image.*use data\.batch_size=4 or more"):
        train(cfg)
    assert not out.exists() or not any(out.iterdir())


def test_the_datamodule_loads_each_process_its_share_and_every_test_image_once():
    seven = partial(ShapesDataset, split="test", size=7, image_size=32)
    loaders = []
    for rank in (0, 1):
        datamodule = SegDataModule(num_classes=6, train=partial(ShapesDataset, split="train", size=16), tune=seven,
                                   test=seven, batch_size=4, val_batch_size=2, num_workers=0)
        datamodule.trainer = SimpleNamespace(world_size=2, distributed_sampler_kwargs={"num_replicas": 2, "rank": rank})
        datamodule.setup("fit")
        assert datamodule.per_device_batch_size == 2 and datamodule.train_dataloader().batch_size == 2
        loaders.append((datamodule.test_dataloader(), datamodule.val_dataloader()))
    for split in (0, 1):  # test, tune: 4 + 3 images, none repeated (a padding sampler would give 4 + 4)
        names = [[n for batch in pair[split] for n in batch["name"]] for pair in loaders]
        assert isinstance(loaders[0][split].sampler, UnrepeatedDistributedSampler)
        assert [len(n) for n in names] == [4, 3]
        whole = ShapesDataset(split="test", size=7)
        assert sorted(names[0] + names[1]) == sorted(whole[i]["name"] for i in range(7))
    alone = SegDataModule(num_classes=6, train=None, tune=None, test=seven, batch_size=4, val_batch_size=2, num_workers=0)
    alone.setup("test")
    assert alone.per_device_batch_size == 4 and not isinstance(alone.test_dataloader().sampler, UnrepeatedDistributedSampler)


def test_ddp_on_gpus_syncs_batchnorm_and_on_cpus_keeps_it_with_one_log_line(make_cfg, caplog):
    gpu = make_cfg([*FAST, "trainer=ddp", "trainer.devices=2", "data.batch_size=4"])
    assert gpu.trainer.accelerator == "gpu" and gpu.trainer.strategy == "ddp" and gpu.trainer.sync_batchnorm is True
    assert trainer_overrides(gpu.trainer) == {}  # the GPU trainer keeps sync_batchnorm=true
    # what Lightning applies for sync_batchnorm=true (TorchSyncBatchNorm: torch's convert_sync_batchnorm) to our net
    model = hydra.utils.instantiate(gpu.model)
    plain = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    synced = TorchSyncBatchNorm().apply(model)
    assert plain > 0 and sum(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules()) == plain
    assert not any(type(m) is torch.nn.BatchNorm2d for m in synced.modules())

    cpu = make_cfg([*FAST, "trainer=ddp_cpu", "trainer.devices=2", "trainer.sync_batchnorm=true", "data.batch_size=4"])
    assert trainer_overrides(cpu.trainer) == {"sync_batchnorm": False}
    with caplog.at_level(logging.INFO, logger="dsdiff"):
        log_batch(cpu)
    lines = [r.getMessage() for r in caplog.records]
    assert "data.batch_size=4 is the global batch: 2 images on each of 2 processes" in lines
    off = ("trainer.sync_batchnorm=true is off: SyncBatchNorm works on GPUs only (accelerator=cpu here), so each "
           "process keeps plain BatchNorm over its own 2 images")
    assert [line for line in lines if "SyncBatchNorm" in line] == [off]


class _Stop(Exception):
    """Raised by the probe once it has seen the layers: no training step is needed."""


class _BatchNormProbe(L.Callback):
    """The normalisation layers of the net as Lightning hands it to the training loop."""

    def on_train_start(self, trainer, pl_module):
        self.types = {type(m) for m in pl_module.net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
        raise _Stop


@pytest.mark.parametrize("trainer", [
    pytest.param(["trainer=ddp", "trainer.devices=1"], marks=[
        pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")], id="gpu"),
    pytest.param(["trainer=ddp_cpu", "trainer.devices=1", "trainer.sync_batchnorm=true"], id="cpu"),
])
def test_the_stage_trainer_syncs_batchnorm_on_gpus_only(make_cfg, tmp_path, trainer):
    """dsdiff.train's stage Trainer under DDP: SyncBatchNorm in the net on a GPU, plain BatchNorm on a CPU."""
    from dsdiff.train import make_trainer

    cfg = make_cfg([*FAST, *trainer, "data.batch_size=4", "data.tune.size=2", "data.test.size=2"])
    probe = _BatchNormProbe()
    trainer = make_trainer(cfg, tmp_path, [], callbacks=[probe])
    try:
        with pytest.raises(_Stop):
            trainer.fit(hydra.utils.instantiate(cfg.model), datamodule=hydra.utils.instantiate(cfg.data))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    expected = torch.nn.SyncBatchNorm if cfg.trainer.accelerator == "gpu" else torch.nn.BatchNorm2d
    assert probe.types == {expected}


def test_a_one_process_run_records_its_batch(make_cfg, tmp_path):
    cfg = make_cfg([*FAST, "data.batch_size=4", "trainer.max_steps=2", "trainer.val_check_interval=2", "data.tune.size=4",
                    "data.test.size=3"])
    train(cfg)
    assert json.loads((tmp_path / "stages.json").read_text())["train"]["batch"] == {"global": 4, "per_device": 4, "devices": 1}


def _run(module, *args, cwd):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow  # about 60 s: a 2-process DDP training run and a 1-process evaluation, each in a subprocess
def test_two_process_ddp_trains_on_the_global_batch_and_tests_every_image_once(make_cfg, tmp_path):
    data = ["data.test.size=7", "data.val_batch_size=2", "trainer.limit_test_batches=null"]  # 7 images: 4 + 3 on 2 ranks
    steps = ["data.train_transform.crop_size=32", "trainer.max_steps=40", "trainer.val_check_interval=20"]
    run = tmp_path / "run"
    proc = _run("dsdiff.train", *FAST, "trainer=ddp_cpu", "trainer.devices=2", "trainer.sync_batchnorm=true",
                "data.batch_size=4", *data, *steps, f"hydra.run.dir={run}", cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert "SyncBatchNorm works on GPUs only (accelerator=cpu here)" in log  # and training ran with plain BatchNorm
    assert "resuming the chain" not in log  # the second process joins the fresh run
    stages = json.loads((run / "stages.json").read_text())
    assert stages["train"]["batch"] == {"global": 4, "per_device": 2, "devices": 2}
    trained = json.loads((run / "metrics.json").read_text())
    ckpt = run / "checkpoints" / "last.ckpt"
    assert trained["ckpt_path"] == str(ckpt) and torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 40

    evaluated_dir = tmp_path / "eval"  # the same checkpoint, one process (the run's settings, trainer=cpu)
    _run("dsdiff.evaluate", f"ckpt_path={ckpt}", "trainer=cpu", f"hydra.run.dir={evaluated_dir}", cwd=tmp_path)
    evaluated = json.loads((evaluated_dir / "metrics.json").read_text())
    tested = sorted(k for k in trained if k.startswith("test/"))
    assert tested == sorted(k for k in evaluated if k.startswith("test/")) and "test/mIoU_tta" in tested
    for key in tested:
        assert evaluated[key] == pytest.approx(trained[key], abs=1e-6, nan_ok=True), key
    assert 0.2 < trained["test/mIoU"] < 1  # the network found some objects: the numbers are not all background

    # padding (Lightning's default DistributedSampler: 4 + 4 images, the first twice) would have shown
    from dsdiff.chain.runtime import load_weights
    from dsdiff.models.metrics import iou_metric, mean_iou

    cfg = make_cfg([*FAST, *data, *steps])
    model = hydra.utils.instantiate(cfg.model).eval()
    load_weights(model, ckpt)
    test_set = hydra.utils.instantiate(cfg.data.test)(transform=hydra.utils.instantiate(cfg.data.eval_transform))
    ious = {}
    for name, order in (("once", range(7)), ("padded", [*range(7), 0])):
        metric = iou_metric(6)
        with torch.no_grad():
            for i in order:
                sample = test_set[i]
                metric.update(model(sample["image"][None]).argmax(1), sample["mask"][None])
        ious[name] = float(mean_iou(metric.compute()))
    assert ious["once"] == pytest.approx(trained["test/mIoU"], abs=1e-6)
    assert abs(ious["padded"] - trained["test/mIoU"]) > 1e-4
