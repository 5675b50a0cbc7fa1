"""Config helpers with no dsdiff imports: plain containers and readable differences."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf


def to_plain(cfg: Any) -> Any:
    """A resolved plain container for a DictConfig; anything else as it is."""
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def config_diff(old: Mapping, new: Mapping, prefix: str = "") -> list[str]:
    """Human-readable differences between two configuration dicts (``key: old -> new``)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def check_number(key: str, value: Any, low: float | None = None, high: float | None = None, whole: bool = False,
                 hint: str = "") -> None:
    """Raise a :class:`~dsdiff.utils.errors.SettingError` naming ``key`` unless ``value`` is a number
    (a whole one if ``whole``) within [``low``, ``high``]; ``hint`` is added to the message."""
    from dsdiff.utils.errors import SettingError

    kinds = int if whole else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or (low is not None and value < low) or (
            high is not None and value > high):
        bounds = " and ".join(b for b in (f">= {low}" if low is not None else "", f"<= {high}" if high is not None else "") if b)
        raise SettingError(f"{key}={value!r}: {'a whole number' if whole else 'a number'} {bounds}{hint}".rstrip())
