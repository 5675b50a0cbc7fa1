"""What a debug config (``debug=fast``, ``debug=fdr``) overrides of the user's own command line.

A command-line ``key=value`` always wins over a config file, except where a debug config sets the
key that ``key`` feeds by interpolation: ``max_steps=-1`` feeds ``trainer.max_steps: ${max_steps}``
(conf/trainer/default.yaml), which ``debug=fast`` sets to 10. :func:`debug_overrides` finds those
cases, and :func:`log_debug_overrides` logs one line for each.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dsdiff.chain.config import config_dir

log = logging.getLogger("dsdiff")
_REF = re.compile(r"^\$\{(?:oc\.select:)?([A-Za-z_][\w.]*)\s*[,}]")
_SKIP = {"debug", "experiment", "hparams_search", "hydra", "local"}


def _package(path: Path, group: str) -> str:
    first = path.read_text().split("\n", 1)[0]
    if first.startswith("# @package"):
        package = first.removeprefix("# @package").strip()
        return "" if package == "_global_" else package
    return group.replace("/", ".")


def _flat(node: Any, prefix: str) -> Iterable[tuple[str, Any]]:
    if isinstance(node, Mapping):
        for key, value in node.items():
            if key == "defaults" and not prefix:
                continue
            yield from _flat(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, node


def _load(path: Path) -> Any:
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


def fed_keys(root: Path | None = None) -> dict[str, str]:
    """``{dotted key: top-level knob}`` for every config value that is just the knob (``${max_steps}``)."""
    root = root or config_dir()
    fed = {}
    for path in root.rglob("*.yaml"):
        group = path.parent.relative_to(root).as_posix()
        if group == "." or group.split("/")[0] in _SKIP:
            continue
        prefix = _package(path, group)
        for key, value in _flat(_load(path), prefix):
            match = _REF.match(value) if isinstance(value, str) else None
            if match and "." not in match.group(1):
                fed[key] = match.group(1)
    return fed


def _debug_keys(name: str, root: Path) -> set[str]:
    """The keys ``conf/debug/<name>.yaml`` sets, with those of the debug configs it builds on."""
    path = root / "debug" / f"{name}.yaml"
    if not path.is_file():
        return set()
    data = _load(path)
    keys = {key for key, _ in _flat(data, _package(path, "debug"))}
    for entry in data.get("defaults", []) if isinstance(data, Mapping) else []:
        if isinstance(entry, str) and entry != "_self_":
            keys |= _debug_keys(entry, root)
    return keys


def debug_overrides(cfg: DictConfig, debug: str | None, task_overrides: Iterable[str]) -> list[str]:
    """One line per command-line ``knob=value`` whose effect the ``debug`` config replaces."""
    if not debug:
        return []
    root = config_dir()
    passed = {}
    for override in task_overrides:
        key, sep, value = str(override).partition("=")
        if sep and not key.startswith("~"):
            passed[key.lstrip("+")] = value
    fed = fed_keys(root)
    lines = []
    for key in sorted(_debug_keys(debug, root)):
        knob = fed.get(key)
        if knob in passed and key not in passed:
            value = OmegaConf.select(cfg, key, default=None)
            lines.append(f"debug={debug} sets {key}={value} (you passed {knob}={passed[knob]})")
    return lines


def log_debug_overrides(cfg: DictConfig) -> None:
    """Log :func:`debug_overrides` for this Hydra job (nothing outside a Hydra run)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    for line in debug_overrides(cfg, hydra_cfg.runtime.choices.get("debug"), hydra_cfg.overrides.task):
        log.warning("%s", line)
