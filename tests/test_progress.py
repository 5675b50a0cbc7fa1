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
