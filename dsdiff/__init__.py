"""dsdiff: Dataset Diffusion, synthetic segmentation datasets from text-to-image diffusion models."""

__version__ = "0.1.0"
