"""The labelling settings: how recorded attention becomes a label map (docs/method.md).

One frozen dataclass, validated once when it is built. ``conf/generator/*.yaml`` builds it as the
``generator.labels`` node (``_target_: dsdiff.diffusion.settings.LabelSettings``); its
:meth:`LabelSettings.to_dict` goes into ``dataset.json`` and :meth:`LabelSettings.manifest_fields`
into every manifest line, so a folder always says which settings labelled it.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from dsdiff.utils.errors import SettingError

SETTING = "generator.labels"  # where users set these; errors name it


def check_thresholds(tau: float, alpha: float, beta: float, where: str = SETTING) -> None:
    """Raise on a negative ``tau`` or ``alpha < beta`` (``where`` names the settings in the message)."""
    if tau < 0:
        raise SettingError(f"{where}.tau={tau}: the number of self-attention products must be 0 or more")
    if alpha < beta:
        raise SettingError(f"{where}.alpha={alpha} < {where}.beta={beta}: pixels with max map >= alpha are labelled and "
                         "< beta background, so alpha must be >= beta")


def parse_blocks(value: Any, name: str = "blocks") -> tuple[int, ...]:
    """``[3, 5, 7]`` or ``"4-12"`` (inclusive) -> sorted unique block indices, refused naming the setting."""
    if isinstance(value, str) and value.count("-") == 1 and all(p.strip().isdigit() for p in value.split("-")):
        start, end = (int(p) for p in value.split("-"))
        value = range(start, end + 1)
    items = list(value) if isinstance(value, Sequence | range) and not isinstance(value, str) else None
    if not items or any(isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in items):
        raise SettingError(f"{SETTING}.{name}={value!r}: a non-empty list of block indices (>= 0) or a range "
                           "\"START-END\" (inclusive), or null for all blocks")
    return tuple(sorted(set(items)))


@dataclass(frozen=True)
class LabelSettings:
    """tau, alpha, beta, the two attention resolutions, the timestep window and the map source.

    Defaults are the paper's: cross-attention at 16, self-attention at 32, ``refined = S^tau A`` with
    tau 4, label where the max map >= alpha (0.6), background below beta (0.5), uncertain (255) in
    between, maps averaged over all denoising steps (``window``: a fraction range of the sampler's UNet
    calls, which PNDM makes one more of than steps: ``[0, 1]`` records all 101 of 100 PNDM steps, as the original).
    ``class_prompt=False`` takes the maps from the prompt's own class-word tokens (an ablation).
    ``blocks`` picks the joint blocks an SD3 generator records (indices, or ``"START-END"``
    inclusive; None: all of them), ``self_blocks`` those whose self-attention is averaged (None: the same
    blocks); a UNet generator has no blocks to pick and refuses both. ``maps`` is
    ``"attention"`` (image queries against the class prompt's keys) or, for SD3 and FLUX, ``"output"``
    (ConceptAttention's maps: the image tokens' attention outputs against the class tokens').
    """

    tau: int = 4
    alpha: float = 0.6
    beta: float = 0.5
    cross_res: int = 16
    self_res: int = 32
    window: tuple[float, float] = (0.0, 1.0)
    class_prompt: bool = True
    blocks: tuple[int, ...] | None = None
    self_blocks: tuple[int, ...] | None = None
    maps: str = "attention"

    def __post_init__(self) -> None:
        for name in ("blocks", "self_blocks"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, parse_blocks(getattr(self, name), name))
        window = tuple(self.window) if isinstance(self.window, Sequence) and not isinstance(self.window, str) else ()
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in window)
        if len(window) != 2 or not numbers or not 0.0 <= window[0] < window[1] <= 1.0:
            raise SettingError(f"{SETTING}.window={list(self.window) if isinstance(self.window, Sequence) else self.window}: "
                             "use fractions [start, end] with 0 <= start < end <= 1 of the denoising steps")
        object.__setattr__(self, "window", window)
        if isinstance(self.tau, bool) or not isinstance(self.tau, int):
            raise SettingError(f"{SETTING}.tau={self.tau!r}: a whole number of self-attention products (0 = no refinement)")
        for name in ("cross_res", "self_res"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SettingError(f"{SETTING}.{name}={value!r}: an attention grid side, a whole number >= 1")
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                raise SettingError(f"{SETTING}.{name}={value!r}: a threshold on the class maps, a number in [0, 1]")
        if self.maps not in ("attention", "output"):
            raise SettingError(f"{SETTING}.maps={self.maps!r}: \"attention\" (queries against the class prompt's keys) "
                               "or \"output\" (attention outputs, SD3 and FLUX generators only)")
        if not isinstance(self.class_prompt, bool):
            raise SettingError(f"{SETTING}.class_prompt={self.class_prompt!r}: true (maps from the class prompt) or false "
                               "(from the caption's own class-word tokens)")
        check_thresholds(self.tau, self.alpha, self.beta)

    @classmethod
    def of(cls, value: LabelSettings | Mapping[str, Any] | None, **overrides: Any) -> LabelSettings:
        """Settings from a ``LabelSettings``, a (config) mapping (its ``_target_`` is ignored) or None (defaults)."""
        if isinstance(value, cls):
            return replace(value, **overrides) if overrides else value
        known = {f.name for f in fields(cls)}
        given = {k: v for k, v in dict(value or {}).items() if k != "_target_"}
        unknown = sorted(set(given) - known)
        if unknown:
            raise SettingError(f"unknown {SETTING} keys {unknown}: use {sorted(known)}")
        return cls(**{**given, **overrides})

    def record_steps(self, steps: int) -> range:
        """The indices (of the ``steps`` denoising steps, or UNet calls) whose attention is averaged."""
        record = range(math.ceil(self.window[0] * steps), math.ceil(self.window[1] * steps))
        if not record:
            raise SettingError(f"{SETTING}.window={list(self.window)} holds none of {steps} steps: widen it or add steps")
        return record

    def to_dict(self) -> dict[str, Any]:
        """Plain values for ``dataset.json`` (the window as a list, as JSON stores it; ``blocks`` only when set)."""
        out = {**asdict(self), "window": list(self.window)}
        for name in ("blocks", "self_blocks"):  # written only when set, as folders made before they existed
            if out[name] is None:
                del out[name]
            else:
                out[name] = list(out[name])
        if out["maps"] == "attention":  # the default, as folders made before the setting existed
            del out["maps"]
        return out

    def manifest_fields(self) -> dict[str, Any]:
        """What every manifest line records (``maps_from``: the manifest's ``class_prompt`` is the prompt text)."""
        out = self.to_dict()
        out["maps_from"] = "class_prompt" if out.pop("class_prompt") else "prompt_tokens"
        return out
