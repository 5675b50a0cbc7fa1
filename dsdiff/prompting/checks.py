"""Checks on the prompts and captions files a user passes (docs/prompts.md, "Checks on the input files").

:func:`check_prompts_file` reads a prompts JSONL and refuses, as ``FILE:LINE``, every record that
cannot become a useful sample: an empty prompt, class ids (or class words) this class list cannot
map, and, when ``synthetic.filters.drop_empty`` would drop the sample anyway, an empty class list.
:func:`check_caption_coverage` refuses a captions file that matches none of a dataset's images and
warns when it covers fewer than half (the rest get class templates).
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from dsdiff.data.classes import IGNORE_INDEX, class_words, first_prompt_class
from dsdiff.diffusion.prompts import PromptRecord, image_key, parse_jsonl_line, read_jsonl
from dsdiff.utils.errors import MissingPathError, SettingError

log = logging.getLogger("dsdiff.prompts")

SHOWN = 5  # locations listed in an error; the rest are counted

FIXES = {
    "prompt": "give every record a non-empty \"prompt\" (or delete those lines)",
    "empty": "name the image's classes in \"class_ids\", or pass synthetic.filters.drop_empty=false to keep "
             "background-only images",
    "ids": "\"class_ids\" are indices {lo}..{hi} of this {n}-class list ({example}): was the file made for another "
           "dataset? Rebuild it with `python -m dsdiff.prompts` for this class list",
    "words": "\"class_words\" must be the class list's words for \"class_ids\" (or leave \"class_words\" out)",
}


def _class_index(value: object, class_names: Sequence[str]) -> tuple[int | None, str | None]:
    """(index, None) for a whole number in range, else (None, why it cannot be mapped)."""
    lo = first_prompt_class(class_names)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        names = {n.lower(): i for i, n in enumerate(class_names)} | {class_words(n).lower(): i for i, n in enumerate(class_names)}
        hint = names.get(str(value).strip().lower())
        return None, (f"class id {value!r} is not a class index" + (f" (write {hint} for {value!r})" if hint is not None else ""))
    if not lo <= value < len(class_names):
        what = " (the background, which no prompt names)" if value == 0 and lo == 1 else ""
        return None, f"class id {value}{what} is outside this {len(class_names)}-class list"
    return value, None


def record_problems(row: Mapping, class_names: Sequence[str], drop_empty: bool) -> list[tuple[str, str]]:
    """(kind, what is wrong) for one prompts record (a parsed JSONL line); empty when it is fine."""
    problems = []
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        problems.append(("prompt", f"empty prompt {prompt!r}"))
    ids = row.get("class_ids")
    if not isinstance(ids, list):
        return [*problems, ("ids", f"\"class_ids\" must be a list of class indices, found {ids!r}")]
    if not ids and drop_empty:
        problems.append(("empty", "\"class_ids\": [] names no class, so synthetic.filters.drop_empty=true would drop "
                                  "every sample of it"))
    mapped = [_class_index(c, class_names) for c in ids]
    problems += [("ids", why) for _, why in mapped if why]
    words = row.get("class_words")
    if words and not any(why for _, why in mapped):
        expected = [class_words(class_names[i]) for i, _ in mapped]
        given = words if isinstance(words, list) else [words]
        if len(given) != len(expected) or any(str(w).strip().lower() not in (e.lower(), class_names[i].lower())
                                              for w, e, (i, _) in zip(given, expected, mapped)):
            problems.append(("words", f"\"class_words\" {words!r} do not match \"class_ids\" {ids!r}, which this class "
                                      f"list names {expected!r}"))
    return problems


def check_prompts_file(path: str | Path, class_names: Sequence[str], *, drop_empty: bool = True) -> list[PromptRecord]:
    """The records of the prompts JSONL at ``path``, after refusing (one error, ``FILE:LINE`` each) every
    record that cannot be generated as it stands; see the module docstring."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingPathError(f"no prompts file at {path}: make one with `python -m dsdiff.prompts` or set "
                               "synthetic.prompts=null for class templates")
    bad: list[tuple[int, list[tuple[str, str]]]] = []
    total = 0
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            total += 1
            row = parse_jsonl_line(line, path, n)
            if {"prompt", "class_ids"} <= set(row) and (problems := record_problems(row, class_names, drop_empty)):
                bad.append((n, problems))
    if bad:
        lines = [f"  {path}:{n}: {'; '.join(why for _, why in problems)}" for n, problems in bad[:SHOWN]]
        if len(bad) > SHOWN:
            more = ", ".join(str(n) for n, _ in bad[SHOWN:2 * SHOWN])
            lines.append(f"  ... and {len(bad) - SHOWN} more (line{'s' if len(bad) > SHOWN + 1 else ''} {more}"
                         f"{', ...' if len(bad) > 2 * SHOWN else ''})")
        lo = first_prompt_class(class_names)
        example = ", ".join(f"{class_words(class_names[i])}={i}" for i in range(lo, min(lo + 3, len(class_names))))
        kinds = sorted({kind for _, problems in bad for kind, _ in problems}, key=list(FIXES).index)
        fixes = [FIXES[k].format(lo=lo, hi=len(class_names) - 1, n=len(class_names), example=example) for k in kinds]
        raise SettingError(f"prompts file {path}: {len(bad)} of {total} records cannot be generated:\n"
                           + "\n".join(lines + [f"fix: {f}" for f in fixes]))
    records = read_jsonl(path)  # the lines' other errors (a missing key), as FILE:LINE
    if not records:
        raise SettingError(f"prompts file {path} holds no records")
    return records


def check_caption_coverage(captions: Iterable[tuple[str | None, str]], image_labels: Mapping[str, Sequence[int]],
                           class_names: Sequence[str], source: str | Path, where: str, fix: str) -> None:
    """Refuse captions keyed to images that match none of ``image_labels``' images with a class; warn
    when they cover fewer than half (the rest get class templates). Captions without an image key
    (their classes are read from their words) are not matched, so are not checked."""
    keys = list(dict.fromkeys(k for k, _ in captions if k is not None))
    lo = first_prompt_class(class_names)
    images = sorted(i for i, ids in image_labels.items() if any(lo <= int(c) != IGNORE_INDEX for c in ids))
    if not keys or not images:
        return
    known = set(keys)
    covered = [i for i in images if image_key(i) in known]
    if not covered:
        raise SettingError(
            f"captions file {source} matches none of the {len(images)} images {where}: image {images[0]!r}"
            f"{'' if image_key(images[0]) == images[0] else f' (key {image_key(images[0])!r})'} has no caption, and the "
            f"first caption's image key is {keys[0]!r}. Captions are "
            f"matched by the image's file name without extension (leading zeros dropped): use a captions file made "
            f"for these images, or {fix}")
    if 2 * len(covered) < len(images):
        rest = [i for i in images if image_key(i) not in known]
        log.warning("captions file %s covers %d of the %d images %s; the other %d fall back to class templates "
                    "(e.g. %s)", source, len(covered), len(images), where, len(rest),
                    ", ".join(rest[:SHOWN]) + (", ..." if len(rest) > SHOWN else ""))
