"""Prompts (docs/prompts.md): captions joined with class labels, class prompts, token spans.

A generation prompt is ``"<caption>; <class words>"``; the class prompt is the class
words alone (``"dog dining table"``), and each class's map is the mean over all of
its tokens, found with the tokenizer's offsets.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dsdiff.data.classes import IGNORE_INDEX, class_words, first_prompt_class
from dsdiff.utils.errors import MissingPathError, SettingError
from dsdiff.utils.io import write_text_atomic

log = logging.getLogger(__name__)

CLASS_SEPARATOR = "; "
DEFAULT_TEMPLATE = "a photo of {}"


@dataclass
class PromptRecord:
    """One generation request: a line of the prompts JSONL."""

    id: str
    prompt: str
    class_ids: list[int]
    class_words: list[str] = field(default_factory=list)
    class_prompt: str = ""
    caption: str | None = None
    image_id: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> PromptRecord:
        missing = {"prompt", "class_ids"} - set(d)
        if missing:
            raise SettingError(f"prompt record {dict(d)!r} lacks {sorted(missing)}")
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        known["class_ids"] = [int(c) for c in known["class_ids"]]
        return cls(**{"id": "", **known})


def class_prompt(words: Sequence[str]) -> str:
    """The class prompt: class words joined by spaces (``["dog", "dining table"]`` -> ``"dog dining table"``)."""
    return " ".join(words)


def prompt_with_classes(caption: str, words: Sequence[str]) -> str:
    """``"<caption>; <class words>"``; the caption alone when there are no classes."""
    caption = caption.strip().rstrip(".").strip()
    return f"{caption}{CLASS_SEPARATOR}{class_prompt(words)}" if words else caption


def template_prompt(words: Sequence[str], template: str = DEFAULT_TEMPLATE) -> str:
    """A class-only prompt: ``"a photo of a dog and an aeroplane"``."""
    with_articles = [f"{'an' if w[:1] in 'aeiou' else 'a'} {w}" for w in words]
    return template.format(" and ".join(with_articles))


def find_class_ids(text: str, class_names: Sequence[str]) -> list[int]:
    """Indices of the classes whose words occur in ``text`` as whole words (plural -s/-es too), sorted.

    Longer names match first and use up their words: "hot dog" is not also a "dog".
    """
    found = []
    order = sorted(range(first_prompt_class(class_names), len(class_names)), key=lambda i: -len(class_words(class_names[i])))
    for index in order:  # index 0, where it is background, is never prompted
        words = class_words(class_names[index]).split()
        pattern = r"\b" + r"\s+".join(map(re.escape, words)) + r"(?:s|es)?\b"
        text, hits = re.subn(pattern, " ", text, flags=re.IGNORECASE)
        if hits:
            found.append(index)
    return sorted(found)


# ---- tokens -------------------------------------------------------------------------------

def text_limit(tokenizer) -> int:
    """Content tokens the text encoder sees: model_max_length minus start and end tokens."""
    return int(tokenizer.model_max_length) - 2


def count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def truncate_prompt(tokenizer, text: str, keep_suffix: str = "") -> tuple[str, bool]:
    """Drop trailing words of ``text`` (before ``keep_suffix``) until it fits; returns (text, truncated)."""
    limit = text_limit(tokenizer)
    if count_tokens(tokenizer, text) <= limit:
        return text, False
    if keep_suffix and count_tokens(tokenizer, keep_suffix.strip()) > limit:
        raise SettingError(
            f"the class part {keep_suffix.strip()!r} alone is over the text encoder's {limit} tokens: "
            "prompt fewer classes per image"
        )
    head = text[: len(text) - len(keep_suffix)] if keep_suffix else text
    words = head.split()
    while words and count_tokens(tokenizer, " ".join(words) + keep_suffix) > limit:
        words.pop()
    return (" ".join(words) + keep_suffix).strip(), True


def fit_prompt(tokenizer, prompt: str, words: Sequence[str]) -> str:
    """Truncate an over-long prompt with a warning, keeping a trailing ``"; <class words>"`` whole."""
    suffix = CLASS_SEPARATOR + class_prompt(words) if words else ""
    keep = suffix if suffix and prompt.endswith(suffix) else ""
    fitted, truncated = truncate_prompt(tokenizer, prompt, keep)
    if truncated:
        log.warning("prompt over %d tokens truncated: %r -> %r", text_limit(tokenizer), prompt, fitted)
    return fitted


def _word_token_counts(tokenizer, words: Sequence[str]) -> list[int]:
    # Slow tokenizers have no offsets; CLIP's BPE never merges across spaces, so words tokenize alone.
    return [count_tokens(tokenizer, w) for w in words]


def class_token_spans(tokenizer, words: Sequence[str]) -> tuple[str, list[list[int]]]:
    """The class prompt and, per class word, the positions of all its tokens in the encoded prompt.

    Positions index the text encoder's output (position 0 is the start token), so
    ``embeds[:, span]`` are a class's tokens. Raises ValueError when the class prompt is
    over the encoder's limit or a name has no token or an unknown token.
    """
    text = class_prompt(words)
    starts, pos = [], 0
    for w in words:
        starts.append(pos)
        pos += len(w) + 1
    try:
        enc = tokenizer(text, return_offsets_mapping=True, verbose=False)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        spans = [
            [i for i, (a, b) in enumerate(offsets) if b > a and a >= s and b <= s + len(w)]
            for w, s in zip(words, starts)
        ]
    except NotImplementedError:
        ids = tokenizer(text, verbose=False)["input_ids"]
        spans, cursor = [], 1
        for n in _word_token_counts(tokenizer, words):
            spans.append(list(range(cursor, cursor + n)))
            cursor += n
    if len(ids) > int(tokenizer.model_max_length):
        raise SettingError(
            f"class prompt {text!r} is {len(ids)} tokens, over the text encoder's "
            f"{tokenizer.model_max_length}: prompt fewer classes per image"
        )
    unk = getattr(tokenizer, "unk_token_id", None)
    specials = set(getattr(tokenizer, "all_special_ids", []))
    for w, span in zip(words, spans):
        span_ids = [ids[i] for i in span]
        if not span or any(t == unk or t in specials for t in span_ids):
            raise SettingError(
                f"the tokenizer cannot place class name {w!r} (tokens {span_ids}, unknown id {unk}): "
                "map the class to words it knows in dsdiff.data.classes.CLASS_WORDS"
            )
    return text, spans


def prompt_token_spans(tokenizer, text: str, words: Sequence[str]) -> list[list[int]]:
    """Per class word, the positions of its tokens in the encoded ``text`` itself (its last occurrence).

    For the "caption tokens instead of a class prompt" ablation: the maps then come from the
    generation prompt's own cross-attention. Raises ValueError when a word is not in the prompt.
    """
    ids = tokenizer(text, verbose=False)["input_ids"]
    spans = []
    for w in words:
        wid = tokenizer(w, add_special_tokens=False, verbose=False)["input_ids"]
        starts = [i for i in range(len(ids) - len(wid), 0, -1) if ids[i : i + len(wid)] == wid]
        if not wid or not starts:
            raise SettingError(f"class word {w!r} is not among the tokens of the prompt {text!r}: "
                             "name every class in the prompt, or keep generator.labels.class_prompt=true")
        spans.append(list(range(starts[0], starts[0] + len(wid))))
    return spans


# ---- captions and records --------------------------------------------------------------------

def image_key(image: str | int) -> str:
    """A join key for an image id or file name: basename without extension, leading zeros dropped."""
    stem = Path(str(image)).stem
    return (stem.lstrip("0") or "0") if stem.isdigit() else stem


def parse_jsonl_line(line: str, path: str | Path, n: int) -> dict:
    """One JSONL line as a dict; a ValueError naming ``path:n`` when it is not a JSON object."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise SettingError(f"{path}:{n}: not valid JSON ({e.msg}, column {e.colno}): {line[:80]!r}; "
                         "fix or delete that line") from e
    if not isinstance(row, dict):
        raise SettingError(f"{path}:{n}: expected a JSON object per line, found {type(row).__name__}: {line[:80]!r}")
    return row


def load_captions(path: str | Path) -> list[tuple[str | None, str]]:
    """(image key or None, caption) pairs from COCO captions JSON, JSONL, or plain text.

    JSONL lines are ``{"image": ..., "caption": ...}`` (caption may be a list); a text
    line is ``<image>\\t<caption>`` or a caption alone (its classes are then found in it).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"no captions file at {path}: pass --captions <COCO JSON, JSONL or text file>")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SettingError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno}); "
                             "expected a COCO captions file (captions_<split>2017.json)") from e
        if not isinstance(data, dict) or "annotations" not in data:
            raise SettingError(f"{path} is not a COCO captions file (no 'annotations' list)")
        names = {img["id"]: img.get("file_name", img["id"]) for img in data.get("images", [])}
        return [(image_key(names.get(a["image_id"], a["image_id"])), a["caption"].strip()) for a in data["annotations"]]
    pairs: list[tuple[str | None, str]] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            row = parse_jsonl_line(line, path, n)
            if "image" not in row or "caption" not in row:
                raise SettingError(f"{path}:{n}: expected {{\"image\", \"caption\"}}, found keys {sorted(row)}")
            caps = row["caption"] if isinstance(row["caption"], list) else [row["caption"]]
            if not all(isinstance(c, str) for c in caps):
                raise SettingError(f"{path}:{n}: \"caption\" must be a string or a list of strings, found {row['caption']!r}")
            pairs += [(image_key(row["image"]), c.strip()) for c in caps]
        elif "\t" in line:
            image, caption = line.split("\t", 1)
            pairs.append((image_key(image), caption.strip()))
        else:
            pairs.append((None, line.strip()))
    return pairs


def _record(rid, text, ids, class_names, caption, image_id, append) -> PromptRecord:
    words = [class_words(class_names[i]) for i in ids]
    prompt = prompt_with_classes(text, words) if append else text
    return PromptRecord(rid, prompt, list(ids), words, class_prompt(words), caption, image_id)


def build_records(
    image_labels: Mapping[str, Sequence[int]],
    class_names: Sequence[str],
    captions: Iterable[tuple[str | None, str]] = (),
    *,
    template: str = DEFAULT_TEMPLATE,
    append_classes: bool = True,
    max_captions: int | None = None,
) -> list[PromptRecord]:
    """Prompt records: each image's captions (or a class template) joined with its class labels.

    ``image_labels`` maps image id -> class indices present (background and 255 excluded); images
    without classes are skipped. Captions with no image id get the classes named in them.
    """
    by_image: dict[str, list[str]] = {}
    free: list[str] = []
    for key, caption in captions:
        (free.append(caption) if key is None else by_image.setdefault(key, []).append(caption))
    records, skipped = [], 0
    for image_id in sorted(image_labels):
        ids = sorted({int(c) for c in image_labels[image_id] if first_prompt_class(class_names) <= int(c) != IGNORE_INDEX})
        if not ids:
            skipped += 1
            continue
        caps = by_image.get(image_key(image_id), [])[:max_captions]
        if not caps:
            words = [class_words(class_names[i]) for i in ids]
            records.append(_record(f"{image_id}_t", template_prompt(words, template), ids, class_names, None, image_id, append_classes))
        for n, cap in enumerate(caps):
            records.append(_record(f"{image_id}_{n}", cap, ids, class_names, cap, image_id, append_classes))
    for n, cap in enumerate(free):
        ids = find_class_ids(cap, class_names)
        if ids:
            records.append(_record(f"caption_{n}", cap, ids, class_names, cap, None, append_classes))
        else:
            skipped += 1
    if skipped:
        log.info("skipped %d images/captions with no class to prompt", skipped)
    return records


def write_jsonl(records: Iterable[PromptRecord], path: str | Path) -> Path:
    """Write records one JSON object per line, atomically (temp file then rename)."""
    return write_text_atomic(path, "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in records))


def read_jsonl(path: str | Path) -> list[PromptRecord]:
    """Records written by :func:`write_jsonl` (or any JSONL with id, prompt, class_ids)."""
    records = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                record = PromptRecord.from_dict(parse_jsonl_line(line, path, n))
            except (TypeError, ValueError) as e:
                raise SettingError(str(e) if str(e).startswith(f"{path}:") else f"{path}:{n}: {e}") from e
            if not isinstance(record.prompt, str) or not record.prompt.strip():
                raise SettingError(f"{path}:{n}: empty prompt {record.prompt!r}: write the text to generate, or delete the line")
            records.append(record)
    return records
