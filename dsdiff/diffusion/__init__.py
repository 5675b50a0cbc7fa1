"""Stable Diffusion generation with attention capture, and attention-to-label maps.

Names load on first use, so ``python -m dsdiff.prompts --help`` does not import torch or diffusers.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "generator": ("Sample", "SyntheticGenerator"),
    "pipeline": ("load_pipeline", "resolve_dtype", "set_scheduler"),
    "settings": ("LabelSettings",),
    "masks": ("attention_to_labels", "refine"),
    "real_images": ("attention_on_images",),
    "prompts": (
        "PromptRecord", "build_records", "class_prompt", "class_token_spans", "find_class_ids", "fit_prompt",
        "load_captions", "prompt_with_classes", "read_jsonl", "template_prompt", "write_jsonl",
    ),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'dsdiff.diffusion' has no attribute {name!r}")
    return getattr(importlib.import_module(f"dsdiff.diffusion.{_MODULE_OF[name]}"), name)
