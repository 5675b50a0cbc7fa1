"""Every entry point has a console script in pyproject.toml that points at a callable main()."""
import importlib
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_entry_point_has_a_console_script():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for name in ("dsdiff-train", "dsdiff-evaluate", "dsdiff-generate", "dsdiff-prompts", "dsdiff-pretrain", "dsdiff-score-labels"):
        module, func = scripts[name].split(":")
        assert callable(getattr(importlib.import_module(module), func)), name
    modules = {p.stem for p in (ROOT / "dsdiff").glob("*.py") if "__main__" in p.read_text()}
    assert modules <= {v.split(":")[0].removeprefix("dsdiff.") for v in scripts.values()}, "a module runs as a script without a console script"
