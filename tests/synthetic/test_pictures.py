"""Every picture a run writes for its user is named in the log: ``picture: <what> -> <path>``."""
import logging

from PIL import Image


def _pictures(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "dsdiff" and r.getMessage().startswith("picture: ")]


def test_the_sample_grid_is_named_in_the_log_when_it_is_drawn(gen_inproc, tmp_path, caplog):
    out = tmp_path / "syn"
    with caplog.at_level(logging.INFO, logger="dsdiff"):
        summary = gen_inproc(out, 2)
    assert _pictures(caplog) == [f"picture: synthetic samples -> {out / 'grid.png'}"]
    assert summary["grid"] == str(out / "grid.png") and Image.open(out / "grid.png").width > 0
    assert not list(out.glob(".grid.png.tmp*")), "written atomically: no temporary file left"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dsdiff"):
        gen_inproc(out, 2)  # nothing new to make: the grid is kept, not drawn again
    assert _pictures(caplog) == []
