"""Pictures: sample grids of generated data (samples.py) and the validation panel (panel.py)."""
