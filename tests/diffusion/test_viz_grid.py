"""The sample picture: image | per-class attention | label map, uncertain pixels white."""
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from dsdiff.data.classes import VOC_CLASSES
from dsdiff.viz.samples import TITLE_HEIGHT, colorize_labels, heatmap, save_sample_grid


def test_label_colours_use_the_voc_palette_with_uncertain_white():
    label = np.array([[0, 1, 255]], dtype=np.uint8)
    assert colorize_labels(label).tolist() == [[[0, 0, 0], [128, 0, 0], [255, 255, 255]]]


def test_heatmap_runs_dark_to_light():
    ramp = heatmap(np.linspace(0, 1, 5)[None])
    assert ramp[0, 0].tolist() == [0, 0, 0] and ramp[0, -1].sum() > 600
    assert (np.diff(ramp[0].astype(int).sum(-1)) > 0).all()


def test_grid_png_has_one_row_per_sample_and_a_panel_per_class(tmp_path):
    label = np.zeros((16, 16), dtype=np.uint8)
    label[:8] = 12
    label[8:, :4] = 255
    one = SimpleNamespace(image=np.full((16, 16, 3), 90, np.uint8), class_maps=np.random.rand(2, 16, 16),
                          label=label, class_ids=[12, 18])
    two = SimpleNamespace(image=one.image, class_maps=one.class_maps[:1], label=label, class_ids=[12])
    png = Image.open(save_sample_grid([one, two], tmp_path / "g.png", VOC_CLASSES))
    assert png.size == (16 * 4, 2 * (16 + TITLE_HEIGHT))
    panel = np.asarray(png.convert("RGB"))[TITLE_HEIGHT:TITLE_HEIGHT + 16, 48:64]
    assert (panel[8:, :4] == 255).all(), "uncertain pixels are white"
    assert panel[0, 8].tolist() == list(colorize_labels(np.uint8([12]))[0])
    with pytest.raises(ValueError):
        save_sample_grid([], tmp_path / "empty.png")
