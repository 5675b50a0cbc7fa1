"""Where the demo's time goes: stage times from run logs, with each run's test mIoU, side by side.

Reads the log (``<run dir>/<task>.log``) and ``metrics.json`` of finished ``dsdiff.train`` runs
and writes a table of stage wall times (from the log's timestamps: a stage lasts until the next
one starts) to a section of ``bench_train.md`` in ``outputs/experiments/demo_profile/<time>/`` (printed),
or with ``--write-results`` of the shipped experiments/results/bench_train.md (``--out``: another path):

    python -m dsdiff.train +experiment=shapes_deeplab hydra.run.dir=/tmp/demo_new
    python experiments/demo_profile.py "600 steps, 1000 images=/tmp/demo_old" "300 steps, 500 images=/tmp/demo_new" [--write-results]
"""
from __future__ import annotations

import argparse
import json
import re
from datetime import datetime
from pathlib import Path

from _results import add_write_results, run_folder, write_section  # experiments/_results.py

RESULTS = "bench_train.md"  # in the run's folder
LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]\[[^]]*\]\[INFO\] - (.*)$")
STAGE = re.compile(r"^stage (\w+): ")
END = "metrics written to"
NAMES = {"generate": "generate images + labels", "train": "train (with validation)", "pseudo_1": "pseudo-label the synthetic set",
         "selftrain_1": "self-training (with validation)", "test": "test (plain + TTA)"}


def stage_times(log: Path) -> tuple[dict[str, float], float]:
    """Seconds per stage (first log line of a stage to the next stage's), and first line to the end line."""
    marks: list[tuple[str, datetime]] = []
    for line in log.read_text().splitlines():
        m = LINE.match(line)
        if not m:
            continue
        when, text = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f"), m.group(2)
        s = STAGE.match(text)
        if s and (not marks or marks[-1][0] != s.group(1)):
            marks.append((s.group(1), when))
        elif text.startswith(END):
            marks.append(("end", when))
    if not marks or marks[-1][0] != "end":
        raise ValueError(f"{log} has no '{END}' line: the run did not finish")
    times = {name: (nxt - when).total_seconds() for (name, when), (_, nxt) in zip(marks, marks[1:])}
    return times, (marks[-1][1] - marks[0][1]).total_seconds()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="LABEL=RUN_DIR (a finished dsdiff.train run directory)")
    ap.add_argument("--note", default="", help="conditions of the runs (machine, load), printed under the table")
    ap.add_argument("--out", type=Path, default=None, help=f"the results file (default: {RESULTS} in the run's folder)")
    add_write_results(ap)
    args = ap.parse_args()
    runs = []
    for spec in args.runs:
        label, _, path = spec.rpartition("=")
        run = Path(path)
        logs = sorted(run.glob("*.log"))
        if not label or not logs or not (run / "metrics.json").is_file():
            raise SystemExit(f"{spec!r}: expected LABEL=RUN_DIR with a <task>.log and metrics.json in RUN_DIR")
        times, total = stage_times(logs[0])
        runs.append((label, times, total, json.loads((run / "metrics.json").read_text())))
    stages = list(dict.fromkeys(name for _, times, _, _ in runs for name in times))
    lines = [
        "## Demo profile: `python -m dsdiff.train +experiment=shapes_deeplab`",
        "",
        f"Written by `python experiments/demo_profile.py {' '.join(repr(r) for r in args.runs)}"
        f"{' --write-results' if args.write_results else ''}`: wall seconds per stage "
        "from each run's log timestamps (a stage lasts until the next starts; start-up before the first log line, "
        "about 15 s of imports, is not counted).",
        "",
        "| stage | " + " | ".join(label for label, *_ in runs) + " |",
        "|---|" + "---|" * len(runs),
    ]
    for name in stages:
        cells = [f"{times[name]:.0f} s ({100 * times[name] / total:.0f}%)" if name in times else "" for _, times, total, _ in runs]
        lines.append(f"| {NAMES.get(name, name)} | " + " | ".join(cells) + " |")
    lines.append("| **total** | " + " | ".join(f"**{total / 60:.1f} min**" for _, _, total, _ in runs) + " |")
    for key in ("test/mIoU", "test/mIoU_tta"):
        lines.append(f"| {key} | " + " | ".join(f"{m[key]:.3f}" if key in m else "" for *_, m in runs) + " |")
    if args.note:
        lines += ["", args.note]
    out = args.out or run_folder("demo_profile", args.write_results) / RESULTS
    write_section(out, "demo_profile", "\n".join(lines), "bench_train")
    print("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
