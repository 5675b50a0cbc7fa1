"""The prompts stage: captions (a captioner or a file) + class names -> prompt records (stage.py, captioner.py)."""
