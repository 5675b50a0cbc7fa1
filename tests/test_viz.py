"""The validation panel: titled, enlarged columns, a class legend, and its path in the log."""
import logging
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from dsdiff.data.classes import IGNORE_INDEX, SHAPES_CLASSES
from dsdiff.viz.panel import ValidationPanel
from dsdiff.viz.samples import TITLE_HEIGHT, colorize_labels


def _panel_of_32px_images(tmp_path, num_images=3):
    panel = ValidationPanel(num_images=num_images)
    trainer = SimpleNamespace(default_root_dir=str(tmp_path), global_step=12, sanity_checking=False,
                              is_global_zero=True, loggers=[])
    module = SimpleNamespace(class_names=list(SHAPES_CLASSES))
    mask = torch.zeros(num_images, 32, 32, dtype=torch.long)
    mask[:, 8:20, 8:20] = 1
    mask[:, 20:24, :] = IGNORE_INDEX
    pred = torch.zeros(num_images, 32, 32, dtype=torch.long)
    pred[:, 10:22, 6:18] = 2
    panel.on_validation_epoch_start(trainer, module)
    panel.on_validation_batch_end(trainer, module, {"pred": pred}, {"image": torch.randn(num_images, 3, 32, 32), "mask": mask}, 0)
    panel.on_validation_end(trainer, module)
    return tmp_path / "images" / "tune_step000012.png"


def test_the_panel_is_enlarged_titled_has_a_legend_and_is_named_in_the_log(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="dsdiff"):
        out = _panel_of_32px_images(tmp_path)
    lines = [r.getMessage() for r in caplog.records if r.name == "dsdiff" and r.getMessage().startswith("picture: ")]
    assert lines == [f"picture: validation panel -> {out}"]
    png = np.asarray(Image.open(out).convert("RGB"))
    rows_height = 3 * (3 * 32 + TITLE_HEIGHT)  # 32 px cells enlarged 3x (min_side 96), each under its title
    assert png.shape[1] == 3 * 96 > 3 * 32, "the old panel had 32 px cells, three to a row, untitled"
    assert png.shape[0] > rows_height
    assert not list(tmp_path.glob("images/.*")), "no temporary file left behind"
    # A title strip (white with black text) above the first row's cells.
    assert (png[:TITLE_HEIGHT] == 255).mean() > 0.5 and (png[:TITLE_HEIGHT] < 100).any()
    # The legend under the rows: a swatch for each class present (background, ball, box, and the white ignore).
    legend = png[rows_height:]
    for class_id in (0, 1, 2):
        colour = colorize_labels(np.uint8([[class_id]]))[0, 0]
        assert (legend == colour).all(-1).sum() >= 8 * 8, f"no swatch for class {class_id}"
    tent = colorize_labels(np.uint8([[4]]))[0, 0]
    assert not (legend == tent).all(-1).any(), "a class absent from the panel is not in the legend"


def test_no_panel_during_the_sanity_check(tmp_path):
    panel = ValidationPanel(num_images=1)
    trainer = SimpleNamespace(default_root_dir=str(tmp_path), global_step=0, sanity_checking=True, is_global_zero=True, loggers=[])
    module = SimpleNamespace(class_names=list(SHAPES_CLASSES))
    batch = {"image": torch.randn(1, 3, 8, 8), "mask": torch.zeros(1, 8, 8, dtype=torch.long)}
    panel.on_validation_epoch_start(trainer, module)
    panel.on_validation_batch_end(trainer, module, {"pred": torch.zeros(1, 8, 8, dtype=torch.long)}, batch, 0)
    panel.on_validation_end(trainer, module)
    assert not (tmp_path / "images").exists()
