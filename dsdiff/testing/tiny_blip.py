"""A tiny random-weight BLIP captioner, saved offline as a local folder (tests, smoke runs)."""
from __future__ import annotations

from pathlib import Path

import torch

TINY_VOCAB = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "an", "photo", "picture", "image", "of",
              "dog", "cat", "person", "on", "the", "grass", "in", "room")


def save_tiny_blip(folder: str | Path, image_size: int = 32, seed: int = 0) -> Path:
    """Save a random-weight ``BlipForConditionalGeneration`` + ``BlipProcessor`` (tiny BERT vocab) to ``folder``."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(TINY_VOCAB) + "\n")
    tokenizer = BertTokenizer(str(vocab), model_max_length=64, bos_token="[DEC]")
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": image_size, "width": image_size}),
                              tokenizer=tokenizer)
    text = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id,
                pad_token_id=tokenizer.pad_token_id, sep_token_id=tokenizer.sep_token_id,
                eos_token_id=tokenizer.sep_token_id)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=image_size, patch_size=8)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(BlipConfig(vision_config=vision, text_config=text, projection_dim=16))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
