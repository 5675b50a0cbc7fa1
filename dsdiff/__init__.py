"""dsdiff: Dataset Diffusion, synthetic segmentation datasets from text-to-image diffusion models."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # lazy: `import dsdiff` stays light; `from dsdiff import Segmenter` loads torch and the models
    if name == "Segmenter":
        from dsdiff.deploy.segmenter import Segmenter

        return Segmenter
    raise AttributeError(f"module 'dsdiff' has no attribute {name!r}")
