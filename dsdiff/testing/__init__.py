"""Kits for tests and benchmarks, never imported by shipped code.

- ``tiny_sd``: tiny random-weight Stable Diffusion / SDXL pipelines, built offline and seeded;
- ``tiny_blip``: a tiny random-weight BLIP captioner folder;
- ``folders``: tiny VOC- and COCO-format dataset folders, each writer returning what it drew.
"""
