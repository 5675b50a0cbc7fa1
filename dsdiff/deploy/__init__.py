"""Using what you trained: a segmenter rebuilt from its checkpoint file alone."""
from dsdiff.deploy.segmenter import Segmenter

__all__ = ["Segmenter"]
