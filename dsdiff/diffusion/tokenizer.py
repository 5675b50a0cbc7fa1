"""A real CLIP BPE tokenizer over a small vocabulary, built offline (no download).

The vocabulary is the printable characters plus one merged token per word in ``words``, so
those words are single tokens and any other text still tokenizes (into characters). The shapes
world's text-to-image model and the test kits' tiny pipelines both build theirs here.
"""
from __future__ import annotations

import json
import string
import tempfile
from collections.abc import Sequence
from pathlib import Path


def write_tokenizer_files(out_dir: str | Path, words: Sequence[str]) -> Path:
    """Write a CLIP BPE ``vocab.json`` + ``merges.txt``: printable characters plus merges for ``words``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    merges: list[tuple[str, str]] = []

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    chars = [c for c in string.printable if not c.isspace()]
    for c in chars:
        add(c)
    for c in chars:
        add(c + "</w>")
    for word in words:
        seq = list(word[:-1]) + [word[-1] + "</w>"]
        while len(seq) > 1:
            pair = (seq[0], seq[1])
            if pair not in merges:
                merges.append(pair)
            seq = [seq[0] + seq[1]] + seq[2:]
            add(seq[0])
    add("<|startoftext|>")
    add("<|endoftext|>")
    (out_dir / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (out_dir / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out_dir


def build_tokenizer(words: Sequence[str], max_length: int):
    """A ``CLIPTokenizer`` whose vocabulary is printable characters plus one token per word in ``words``."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer_files(tmp, words)
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=max_length)
