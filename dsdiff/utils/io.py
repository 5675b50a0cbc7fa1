"""Files written so that a reader (or a resumed run) never sees half of one, and read back after a kill; no dsdiff imports.

Every writer goes through :func:`atomic_path`: the data goes to a temporary name in the target's
folder (hidden, with the pid, so concurrent ranks never share one), is flushed to disk, and is
renamed over the target. A kill at any point leaves the old file or the new one, plus at worst a
stale ``.<name>.tmp<pid>`` that :func:`stale_tmp_files` finds.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from PIL import Image

log = logging.getLogger("dsdiff")
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


# -- reading what a killed writer may have left -------------------------------------------------
_TAILS = {".png": b"IEND\xaeB`\x82", ".jpg": b"\xff\xd9", ".jpeg": b"\xff\xd9"}


def file_problem(path: Path) -> str | None:
    """Why an image file is not a whole image (missing, empty, unreadable header, cut short), or None.

    Cheap: reads the header and the last bytes, not the pixels (PNG must end in IEND, JPEG in EOI).
    """
    try:
        size = path.stat().st_size
    except OSError:
        return "missing"
    if size == 0:
        return "empty (0 bytes)"
    try:
        with Image.open(path) as im:
            im.size  # noqa: B018 - the header parsed
    except Exception as e:  # noqa: BLE001 - any undecodable header
        return f"unreadable ({e})"
    tail = _TAILS.get(path.suffix.lower())
    if tail:
        with path.open("rb") as f:
            f.seek(max(0, size - 16))
            if not f.read().rstrip(b"\0").endswith(tail):
                return "truncated (no end marker)"
    return None


def read_jsonl_lines(path: Path) -> list[dict]:
    """Parsed lines of a JSONL file; a torn or corrupt line (a killed writer) is skipped with a warning."""
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s line %d is not valid JSON (a writer killed mid-line?): ignored", path, n)
    return rows


def repair_tail(path: Path) -> None:
    """Cut a torn last line (no trailing newline) so appending starts on a fresh line."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with path.open("rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        f.truncate(keep)
        log.warning("%s ended in a torn line (a writer killed mid-line): cut it off", path)


class ShardAppender:
    """Appends lines to JSONL shards, each synced to disk (once written, a line survives a kill). Before
    its first append to a shard, a torn last line that a killed writer left is cut off, once per shard."""

    def __init__(self) -> None:
        self._repaired: set[Path] = set()

    def append(self, path: Path, line: str) -> None:
        if path not in self._repaired:
            repair_tail(path)
            self._repaired.add(path)
        with path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
