"""Results files shared by several benchmarks: each writes its own marked section, keeping the others."""
from __future__ import annotations

from pathlib import Path

from dsdiff.utils.io import write_text_atomic


def write_section(path: Path, name: str, text: str, title: str) -> None:
    """Replace the ``<!-- name:begin -->`` ... ``<!-- name:end -->`` block of ``path`` (append it when
    missing; a new file starts with ``# title``), atomically."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    old = path.read_text() if path.is_file() else f"# {title}\n"
    block = f"{begin}\n{text.strip()}\n{end}"
    if begin in old and end in old:
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    write_text_atomic(path, new)
