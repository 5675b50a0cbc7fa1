"""Where a model setting's weights come from, decided at once: a local folder, the local Hugging Face
cache, or the hub, and a clear error when none of them can give it.

Without this check a hub id that cannot be had offline costs tens of seconds to minutes of
retries inside diffusers / transformers before their own error. :func:`model_source` answers in
at most a few seconds: a local-looking path that does not exist is a :class:`MissingPathError`;
a hub id that is neither cached nor downloadable (``HF_HUB_OFFLINE=1``, or the hub endpoint does
not answer within ``timeout`` seconds) is a :class:`ModelLoadError` naming the setting and the fix.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

from dsdiff.utils.errors import MissingPathError, ModelLoadError

_TRUE = {"1", "true", "yes", "on"}


def looks_local(name: str) -> bool:
    """A path rather than a hub id (``org/name``): absolute, relative with ``./`` or ``../``, ``~``, or
    more than one ``/``."""
    text = str(name)
    return text.startswith(("/", "./", "../", "~", ".\\")) or text.count("/") > 1 or (len(text) > 1 and text[1] == ":")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def is_cached(repo_id: str, filename: str) -> bool:
    """Whether ``filename`` of the hub repo ``repo_id`` is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename)
    except Exception:  # noqa: BLE001 - an id the hub would refuse (HFValidationError) is not cached
        return False
    return isinstance(found, str)


@functools.lru_cache(maxsize=None)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub endpoint answers within ``timeout`` seconds (through the proxies huggingface_hub uses)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # noqa: BLE001 - any failure to connect means: not reachable now
        return False
    return True


def model_source(name: str | Path, setting: str, fix: str, probe: str = "config.json", timeout: float = 3.0) -> str:
    """``name`` as a local folder or a hub id that can be had; raises at once otherwise.

    ``setting`` is the config key (or flag) that names the model, ``fix`` what to pass instead,
    ``probe`` a file every such repo has (``model_index.json`` for a diffusers pipeline).
    """
    path = Path(str(name)).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise MissingPathError(f"{setting}={name}: a file, not a model folder; {fix}")
    if looks_local(str(name)):
        raise MissingPathError(f"{setting}={name}: no such folder; {fix}")
    if is_cached(str(name), probe):
        return str(name)
    if hub_offline():
        raise ModelLoadError(f"{setting}={name!r} is not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 "
                             f"forbids downloads: {fix}")
    if not hub_reachable(timeout):
        from huggingface_hub import constants

        raise ModelLoadError(f"{setting}={name!r} is not in the local Hugging Face cache, and the hub "
                             f"({constants.ENDPOINT}) does not answer: {fix}, or connect and retry")
    return str(name)
