"""Where the shipped weights live (package data, so a non-editable install has them too)."""
from pathlib import Path

SHAPES_T2I = Path(__file__).resolve().parents[1] / "assets" / "shapes_t2i"
SHAPES_DIT = Path(__file__).resolve().parents[1] / "assets" / "shapes_dit"
