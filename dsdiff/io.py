"""Files written so that a reader (or a resumed run) never sees half of one; no dsdiff imports.

Every writer goes through :func:`atomic_path`: the data goes to a temporary name in the target's
folder (hidden, with the pid, so concurrent ranks never share one), is flushed to disk, and is
renamed over the target. A kill at any point leaves the old file or the new one, plus at worst a
stale ``.<name>.tmp<pid>`` that :func:`stale_tmp_files` finds.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TMP_GLOB = ".*.tmp*"


def tmp_name(path: Path) -> Path:
    """The temporary sibling of ``path`` that :func:`atomic_path` writes first."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; on success it is synced and renamed over ``path``.

    On an error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Indented, key-sorted JSON (see :func:`atomic_path`)."""
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_image_atomic(image, path: str | Path, **kwargs) -> Path:
    """``PIL.Image.save`` (``kwargs``: format, quality, ...) through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        image.save(tmp, **kwargs)
    return Path(path)


def link_or_copy_atomic(src: str | Path, dst: str | Path) -> Path:
    """A hard link to ``src`` at ``dst`` where the file system allows, else a copy; atomically."""
    with atomic_path(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
    return Path(dst)


def replace_dir(tmp: str | Path, out: str | Path) -> Path:
    """Swap a finished folder ``tmp`` in at ``out``; the old ``out`` (if any) is removed only after the swap."""
    tmp, out = Path(tmp), Path(out)
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def stale_tmp_files(folder: str | Path) -> list[Path]:
    """Temporary files that a killed :func:`atomic_path` left in ``folder``."""
    return sorted(Path(folder).glob(TMP_GLOB))
