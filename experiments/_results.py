"""Results files shared by several benchmarks: each writes its own marked section, keeping the others.

The tables in ``experiments/results/`` are the shipped ones: a study or benchmark writes there only
with ``--write-results``; without it, into a folder of its own (:func:`run_folder`), named at the end."""
from __future__ import annotations

import time
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


RESULTS_DIR = Path(__file__).parent / "results"
WRITE_RESULTS_HELP = ("write into experiments/results/ (the shipped tables, kept in git); without it the tables "
                      "go to this run's own folder, printed at the end")


def add_write_results(parser) -> None:
    """The ``--write-results`` flag every study and benchmark here shares."""
    parser.add_argument("--write-results", action="store_true", help=WRITE_RESULTS_HELP)


def run_folder(script: str, write_results: bool, work_dir: Path | None = None) -> Path:
    """Where a run of ``script`` writes its tables and pictures: ``experiments/results/`` with
    ``--write-results``; else ``work_dir`` (a study's own folder) or ``outputs/experiments/<script>/<time>/``
    under the current directory. Created."""
    if write_results:
        folder = RESULTS_DIR
    elif work_dir is not None:
        folder = Path(work_dir)
    else:
        folder = Path("outputs") / "experiments" / script / time.strftime("%Y-%m-%d_%H-%M-%S")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


QUALITY_COLUMNS = ("pointing", "right_object", "right_object_n", "mIoU", "uncertain")


def fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def quality_table(rows) -> list[str]:
    """Markdown rows for attention-quality summaries: ``rows`` of (images, setting, summary)."""
    lines = ["| images | setting | " + " | ".join(QUALITY_COLUMNS) + " | drawn | extra |",
             "|---|---|" + "---|" * (len(QUALITY_COLUMNS) + 2)]
    for kind, setting, s in rows:
        cells = [fmt(s[c]) for c in QUALITY_COLUMNS] + [fmt(s.get("drawn", "")), fmt(s.get("extra", ""))]
        lines.append(f"| {kind} | {setting} | " + " | ".join(cells) + " |")
    return lines
