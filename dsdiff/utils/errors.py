"""The user-facing error type: a wrong setting, a missing file, a model that cannot be loaded.

Every check that names a setting, a file or a fix raises a :class:`ConfigError` (or one of its
subclasses, which are also the built-in error a caller would expect: a :class:`SettingError` is a
``ValueError``). Every entry point wraps its work in :func:`exits_cleanly`, which prints such an
error as one block on stderr, without a Python traceback, and exits with status 2.
``HYDRA_FULL_ERROR=1`` (or ``verbose=true``) shows the full traceback instead; any other exception
keeps its traceback.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

EXIT_CODE = 2
F = TypeVar("F", bound=Callable[..., Any])


class ConfigError(Exception):
    """An expected error whose message says what is wrong, the setting or path, and the fix."""


class SettingError(ConfigError, ValueError):
    """A setting with a value that cannot work (wrong type, out of range, unknown name)."""


class MissingPathError(ConfigError, FileNotFoundError):
    """A file or folder that a setting names is missing, empty or unreadable."""


class ModelLoadError(ConfigError, RuntimeError):
    """Weights that cannot be loaded: not on disk, the hub unreachable, not the expected layout."""


class NotAFolderError(ConfigError, NotADirectoryError):
    """A setting names a file (or a path under one) where a folder is needed."""


class NotWritableError(ConfigError, PermissionError):
    """A folder a setting names cannot be written (read-only, another user's)."""


class WriteError(ConfigError, OSError):
    """A write failed midway (typically a full disk); what was finished is kept and a rerun continues."""


def find_config_error(exc: BaseException | None) -> ConfigError | None:
    """The :class:`ConfigError` behind ``exc`` (itself, or one it was raised from: Hydra's instantiate wraps them)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ConfigError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def original_message(error: ConfigError) -> str:
    """``error``'s message; for one raised in a DataLoader worker, the worker's own message.

    torch re-raises a worker's exception in the main process with ``Caught <type> in DataLoader worker
    process N.`` and the worker's whole traceback as the message; its last line, after ``<module>.<type>: ``,
    is the message the reader wrote (a damaged image, a mask with foreign labels).
    """
    text = str(error)
    if not (text.startswith("Caught ") and "DataLoader worker" in text.split("\n", 1)[0]):
        return text
    marker = f"{type(error).__module__}.{type(error).__qualname__}: "
    at = text.rfind(marker)
    return text[at + len(marker):].strip() if at >= 0 else text


def format_error(error: ConfigError) -> str:
    """The block an entry point prints: the message, indented under ``dsdiff: error:``, and how to see more."""
    lines = original_message(error).strip().splitlines() or [type(error).__name__]
    body = "\n".join(["dsdiff: error: " + lines[0], *("  " + line for line in lines[1:])])
    return f"{body}\n  (HYDRA_FULL_ERROR=1 or verbose=true shows the traceback)"


def _wants_traceback(args: tuple) -> bool:
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        return True
    cfg = args[0] if args else None
    try:
        return bool(cfg.get("verbose", False))
    except AttributeError:
        return False


def report(error: ConfigError) -> None:
    """Print ``error``'s block on stderr and write it to the run's log file (the console shows it once)."""
    text = format_error(error)
    print(text, file=sys.stderr, flush=True)
    record = logging.LogRecord("dsdiff", logging.ERROR, __file__, 0, text, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def exits_cleanly(func: F) -> F:
    """Run an entry point; a :class:`ConfigError` ends it with one printed block and exit status 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - only ConfigErrors are handled, the rest re-raised
            error = find_config_error(exc)
            if error is None or _wants_traceback(args):
                raise
            report(error)
            from dsdiff.utils.rundir import discard_unstarted_run

            discard_unstarted_run(args[0] if args else None)  # a run that failed its checks leaves no run dir
            raise SystemExit(EXIT_CODE) from None

    return wrapper  # type: ignore[return-value]
