"""LogProgress: progress as log lines (done/total, rate, ETA) that reach a log file, for fit and predict."""
import logging

import hydra
import lightning as L
import torch
from torch.utils.data import DataLoader

from dsdiff.utils.progress import LogProgress, format_progress


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch).pow(2).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def predict_step(self, batch, batch_idx):
        return self.layer(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _lines(caplog, prefix):
    return [r.getMessage() for r in caplog.records if r.name == "dsdiff" and r.getMessage().startswith(prefix)]


def test_training_logs_steps_against_max_steps_every_few_percent(caplog):
    bar = LogProgress(percent=20)
    trainer = L.Trainer(max_steps=10, callbacks=[bar], logger=False, enable_checkpointing=False, accelerator="cpu",
                        enable_model_summary=False)
    assert trainer.progress_bar_callback is bar  # the only bar: no Rich/tqdm bar besides it
    with caplog.at_level(logging.INFO, logger="dsdiff"):
        trainer.fit(Tiny(), DataLoader(torch.randn(64, 2), batch_size=4))
    lines = _lines(caplog, "train: ")
    assert [line.split(" steps")[0] for line in lines] == [f"train: {k}/10" for k in (2, 4, 6, 8, 10)]
    assert "(100%)" in lines[-1] and "ETA 0:00:00" in lines[-1] and "train/loss" in lines[-1]


def test_prediction_logs_batches(caplog):
    trainer = L.Trainer(callbacks=[LogProgress(name="pseudo-labels")], logger=False, accelerator="cpu")
    with caplog.at_level(logging.INFO, logger="dsdiff"):
        trainer.predict(Tiny(), DataLoader(torch.randn(40, 2), batch_size=1), return_predictions=False)
    lines = _lines(caplog, "pseudo-labels: ")
    assert len(lines) == 20 and lines[0].startswith("pseudo-labels: 2/40 batches (5%)") and "40/40" in lines[-1]


def test_the_training_config_uses_it(make_cfg):
    cfg = make_cfg(["+experiment=shapes_real", "debug=fast"])
    assert isinstance(hydra.utils.instantiate(cfg.callbacks.progress_bar), LogProgress)


def test_format():
    assert format_progress("generation", 30, 120, 10.0, "batches") == "generation: 30/120 batches (25%), 3.00/s, ETA 0:00:30"
    assert format_progress("train", 150, 200, 10.0, "steps", since=100) == "train: 150/200 steps (75%), 5.00/s, ETA 0:00:10"


def test_pseudo_labelling_uses_it(tmp_path):
    from dsdiff.chain.selftrain import pseudo_label

    seen = []

    class Stop(Exception):
        pass

    def make_trainer(callbacks):
        seen.extend(callbacks)
        raise Stop

    try:
        pseudo_label(Tiny(), tmp_path / "source", tmp_path / "out", make_trainer)
    except Stop:
        pass
    assert any(isinstance(c, LogProgress) for c in seen)


class TinyTest(Tiny):
    def test_step(self, batch, batch_idx):
        self.log("test/mIoU", self.layer(batch).abs().mean())


def test_testing_logs_batches_and_a_device_line(caplog):
    trainer = L.Trainer(callbacks=[LogProgress(percent=25)], logger=False, accelerator="cpu", enable_model_summary=False)
    with caplog.at_level(logging.INFO, logger="dsdiff"):
        trainer.test(TinyTest(), DataLoader(torch.randn(8, 2), batch_size=1), verbose=False)
    assert [line.split(" batches")[0] for line in _lines(caplog, "test: ")] == [f"test: {k}/8" for k in (2, 4, 6, 8)]
    (device,) = _lines(caplog, "device: ")
    assert device.startswith("device: cpu") and "1 process, precision 32-true" in device
    assert device.endswith("TinyTest: 3 parameters (3 trainable)")


def test_the_test_metrics_are_logged_as_dsdiff_lines():
    from dsdiff.utils.progress import metric_lines

    metrics = {"test/mIoU": 0.77796, "test/mIoU_tta": 0.81086, "test/IoU/background": 0.9439, "test/IoU/ball": 0.7824,
               "test/IoU_tta/background": 0.9538, "test/IoU_tta/ball": None}
    assert metric_lines(metrics) == ["test: mIoU 0.7780, mIoU_tta 0.8109", "test IoU: background 0.944, ball 0.782",
                                   "test IoU_tta: background 0.954, ball n/a"]


def test_quiet_libraries_silences_lightning_chatter_and_dependency_deprecations(caplog, recwarn):
    import warnings

    from lightning.fabric.utilities.seed import seed_everything

    from dsdiff.utils.quiet import QuietLibraries

    loggers = ("lightning.fabric.utilities.seed", "lightning.pytorch.utilities.rank_zero")
    levels = {name: logging.getLogger(name).level for name in loggers}
    with warnings.catch_warnings():
        QuietLibraries().on_job_start(config=__import__("omegaconf").OmegaConf.create({"verbose": False}))
        with caplog.at_level(logging.INFO):
            seed_everything(3)
        assert not [r for r in caplog.records if "Seed set to" in r.getMessage()]
        # a dependency's deprecation is dropped, dsdiff's own is kept
        warnings.warn_explicit("old api", FutureWarning, "x.py", 1, module="torch.utils._pytree")
        warnings.warn_explicit("our own", FutureWarning, "y.py", 1, module="dsdiff.chain.stages")
        assert [str(w.message) for w in recwarn] == ["our own"]
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_verbose_keeps_the_libraries_talking(caplog):
    from lightning.fabric.utilities.seed import seed_everything
    from omegaconf import OmegaConf

    from dsdiff.utils.quiet import QuietLibraries

    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.NOTSET)
    QuietLibraries().on_job_start(config=OmegaConf.create({"verbose": True}))
    with caplog.at_level(logging.INFO):
        seed_everything(3)
    assert any("Seed set to 3" in r.getMessage() for r in caplog.records)


def test_the_device_line_gives_no_count_for_a_module_without_parameters():
    from dsdiff.utils.progress import device_line

    trainer = L.Trainer(logger=False, accelerator="cpu", enable_model_summary=False)
    assert device_line(trainer, L.LightningModule()).endswith("1 process, precision 32-true")
