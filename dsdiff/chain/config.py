"""Where the Hydra configs live and the resolvers they use (import before composing)."""
from __future__ import annotations

from pathlib import Path

from omegaconf import ListConfig, OmegaConf

from dsdiff.data.classes import get_class_list


def config_dir() -> Path:
    """The `conf/` folder: beside the package in a source checkout, inside it when installed."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package.parent / "conf", package / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"dsdiff's configs were not found next to {package}: reinstall the package "
        "(`pip install .` ships them as dsdiff/conf) or run from a source checkout"
    )


def asset_path(name: str) -> str:
    """A folder shipped inside the package (``dsdiff/assets/<name>``), e.g. the shapes world's model."""
    path = Path(__file__).resolve().parents[1] / "assets" / name
    if not path.exists():
        raise FileNotFoundError(f"no shipped asset {name!r} at {path}: reinstall dsdiff, or rebuild it (`make pretrain`)")
    return str(path)


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("classes"):
        # a ListConfig, not a list: OmegaConf.resolve (`--cfg job --resolve`) only stores config nodes
        OmegaConf.register_new_resolver("classes", lambda name: ListConfig(list(get_class_list(name).classes)))
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", asset_path)


_register_resolvers()
