"""Where the Hydra configs live and the resolvers they use (import before composing)."""
from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import ListConfig, OmegaConf

from dsdiff.data.classes import get_class_list
from dsdiff.utils.errors import MissingPathError, SettingError, exits_cleanly

F = TypeVar("F", bound=Callable[..., Any])


def config_dir() -> Path:
    """The `conf/` folder: beside the package in a source checkout, inside it when installed."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package.parent / "conf", package / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise MissingPathError(
        f"dsdiff's configs were not found next to {package}: reinstall the package "
        "(`pip install .` ships them as dsdiff/conf) or run from a source checkout"
    )


def asset_path(name: str) -> str:
    """A folder shipped inside the package (``dsdiff/assets/<name>``), e.g. the shapes world's model."""
    path = Path(__file__).resolve().parents[1] / "assets" / name
    if not path.exists():
        raise MissingPathError(f"no shipped asset {name!r} at {path}: reinstall dsdiff, or rebuild it (`make pretrain`)")
    return str(path)


def check_devices(trainer: Any) -> None:
    """Raise, naming the trainer setting, when it asks for more CUDA GPUs than torch finds (before Lightning
    would fail with "No supported gpu backend found" inside a traceback)."""
    import torch

    accelerator = str(trainer.get("accelerator") or "auto")
    if accelerator not in ("gpu", "cuda"):
        return
    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    devices = trainer.get("devices")
    wanted = devices if isinstance(devices, int) and devices > 0 else (len(devices) if isinstance(devices, (list, ListConfig)) else 1)
    if found == 0:
        raise SettingError(f"trainer.accelerator={accelerator} (trainer=gpu / trainer=ddp) needs a CUDA GPU, and torch "
                           "finds none: on a CPU use trainer=cpu or the default trainer (accelerator auto); with GPUs, "
                           "check the driver and that torch is a CUDA build")
    if wanted > found:
        raise SettingError(f"trainer.devices={devices} asks for {wanted} GPUs, and torch finds {found}: "
                           f"use trainer.devices={found} (or fewer)")


def entry_point_of(experiment: str | Path) -> str:
    """The command an experiment file is for: its ``entry_point`` key, ``train`` when it has none."""
    return OmegaConf.load(experiment).get("entry_point") or "train"


def _default_groups(primary: Path) -> set[str]:
    """The config groups a primary config's defaults list selects (``optional local@_global_`` -> ``local``)."""
    groups = set()
    for entry in OmegaConf.load(primary).get("defaults", []):
        if isinstance(entry, str) and (primary.parent / f"{entry}.yaml").is_file():
            groups |= _default_groups(primary.parent / f"{entry}.yaml")  # a primary config built on another
        for key in entry.keys() if hasattr(entry, "keys") else ():
            groups.add(key.removeprefix("optional ").removeprefix("override ").split("@")[0].lstrip("/"))
    return groups


def help_groups(config_name: str, optimized_metric: str | None = None) -> str:
    """The ``--help`` list of config groups, with only those (and the options) a command takes.

    A group is listed when the command's primary config (``config_name``) selects it in its defaults;
    experiments are listed for the entry point they are for (``entry_point``: ``pretrain``'s for
    ``dsdiff.pretrain``, the rest for the other commands), hyperparameter searches only where they
    optimise the command's ``optimized_metric``.
    """
    root = config_dir()
    used = _default_groups(root / f"{config_name}.yaml") | {"experiment"}
    wanted = "pretrain" if config_name == "pretrain" else "train"
    lines = []
    for folder in sorted(p for p in root.rglob("*") if p.is_dir()):
        group = folder.relative_to(root).as_posix()
        options = sorted(folder.glob("*.yaml"))
        if group.split("/")[0] not in used - {"hydra", "local"}:
            continue
        if group == "experiment":
            options = [f for f in options if entry_point_of(f) == wanted]
        elif group == "hparams_search":
            options = [f for f in options if OmegaConf.load(f).get("optimized_metric") == optimized_metric]
        if options:
            lines.append(f"{group}: {', '.join(f.stem for f in options)}")
    return "\n".join(lines)


def experiment_problem(takes: str, argv: Sequence[str]) -> str | None:
    """What is wrong with an ``experiment=NAME`` argument for a command that takes ``takes``'s
    experiments (``train`` or ``pretrain``), or None; Hydra would stop with its own message."""
    root = config_dir() / "experiment"
    names = sorted(f.stem for f in root.glob("*.yaml") if entry_point_of(f) == takes)
    command = "pretrain" if takes == "pretrain" else "train / generate / evaluate / score_labels"
    # another config folder may hold the experiment: leave a name this one lacks to Hydra
    elsewhere = any(a.startswith(("--config-dir", "-cd", "--config-path", "-cp", "hydra.searchpath")) for a in argv)
    for arg in argv:
        match = re.fullmatch(r"\+{0,2}experiment=(.+)", arg)
        if not match:
            continue
        name, path = match.group(1), root / f"{match.group(1)}.yaml"
        if not path.is_file() and elsewhere:
            continue
        if not path.is_file():
            return f"experiment={name}: no such experiment (conf/experiment/{name}.yaml); {command} take: {', '.join(names)}"
        if entry_point_of(path) != takes:
            return (f"experiment={name} is an experiment of `python -m dsdiff.{entry_point_of(path)}`, not of this "
                    f"command: run that command, or pick one of: {', '.join(names)}")
    return None


def checks_experiment(takes: str) -> Callable[[F], F]:
    """Decorate a Hydra entry point: a wrong ``+experiment=NAME`` on the command line is one
    ``dsdiff: error:`` block and exit status 2, before Hydra composes (and fails with a traceback hint)."""

    @exits_cleanly  # reported like every other ConfigError (HYDRA_FULL_ERROR=1 keeps the traceback)
    def check(argv: Sequence[str]) -> None:
        problem = experiment_problem(takes, argv)
        if problem:
            raise SettingError(problem)

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not (args or kwargs):  # called as the command, not with a config
                check(sys.argv[1:])
            return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("classes"):
        # a ListConfig, not a list: OmegaConf.resolve (`--cfg job --resolve`) only stores config nodes
        OmegaConf.register_new_resolver("classes", lambda name: ListConfig(list(get_class_list(name).classes)))
    if not OmegaConf.has_resolver("num_classes"):  # data=folder: the class list file's length
        OmegaConf.register_new_resolver("num_classes", lambda name: get_class_list(name).num_classes)
    if not OmegaConf.has_resolver("dsdiff_help_groups"):
        OmegaConf.register_new_resolver("dsdiff_help_groups", help_groups)
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", asset_path)


_register_resolvers()
