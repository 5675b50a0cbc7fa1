"""Loading a diffusers text-to-image pipeline, with the checks that need no weights (docs/method.md).

A hub id or a local ``save_pretrained`` folder; SD 1.x/2.x, SDXL-layout UNets and pixel-space
pipelines without a VAE. Every failure names ``generator.model`` (or the setting to fix).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from dsdiff.data.classes import class_words
from dsdiff.diffusion.attention import attention_layer_sizes
from dsdiff.diffusion.pixels import packing_factor
from dsdiff.diffusion.prompts import class_token_spans
from dsdiff.utils.errors import MissingPathError, SettingError
from dsdiff.utils.hub import model_source

SCHEDULERS: dict[str, str] = {
    "ddim": "DDIMScheduler",
    "dpm-solver": "DPMSolverMultistepScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-ancestral": "EulerAncestralDiscreteScheduler",
    "pndm": "PNDMScheduler",
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """``"auto"`` is fp16 on CUDA and fp32 on CPU; half precision on CPU is refused."""
    on_cpu = torch.device(device).type == "cpu"
    if dtype == "auto":
        return torch.float32 if on_cpu else torch.float16
    resolved = dtype if isinstance(dtype, torch.dtype) else DTYPES.get(str(dtype))
    if resolved is None:
        raise SettingError(f"unknown dtype {dtype!r}: use one of {['auto', *DTYPES]}")
    if on_cpu and resolved != torch.float32:
        raise SettingError(f"dtype {dtype} on CPU is unsupported or very slow: use dtype='fp32' (or 'auto') on CPU")
    return resolved


def set_scheduler(pipe, name: str | None) -> None:
    """Swap the pipeline's scheduler for one named in ``SCHEDULERS``, keeping its noise schedule."""
    if name is None:
        return
    check_scheduler(name)
    key = name.lower().replace("_", "-")
    import diffusers

    cls = getattr(diffusers, SCHEDULERS[key])
    pipe.scheduler = cls.from_config(pipe.scheduler.config)


def is_pixel_space(pipe) -> bool:
    """True for a pipeline without a VAE: its UNet (or transformer) denoises (packed) pixels, see
    :mod:`dsdiff.diffusion.pixels`."""
    return getattr(pipe, "vae", None) is None


def image_to_latent_factor(pipe) -> int:
    """How many image pixels one denoiser input position covers: the VAE's factor, or the pixel packing factor."""
    if is_pixel_space(pipe):
        denoiser = getattr(pipe, "unet", None) or pipe.transformer
        return packing_factor(denoiser.config.in_channels)
    return getattr(pipe, "vae_scale_factor", 1)


def latent_size(pipe, height: int, width: int) -> tuple[int, int]:
    """The UNet's input grid for an image size (a pixel-space pipeline has no VAE: factor 1)."""
    factor = image_to_latent_factor(pipe)
    return height // factor, width // factor


def check_scheduler(name: str | None) -> None:
    """Raise on a scheduler name outside ``SCHEDULERS`` (None keeps the checkpoint's own)."""
    if name is not None and name.lower().replace("_", "-") not in SCHEDULERS:
        raise SettingError(f"unknown scheduler {name!r} (generator.scheduler): use one of {sorted(SCHEDULERS)} or null (the checkpoint's own)")


RECORDED = "UNet pipelines (Stable Diffusion 1.x/2.x, SDXL), StableDiffusion3Pipeline (SD3, SD3.5) and FluxPipeline (FLUX.1)"
PIPELINE_FAMILIES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}


def pipeline_family(config: Mapping, model: object) -> str:
    """``unet``, ``sd3`` or ``flux`` from a ``model_index.json``; any other pipeline is refused, naming itself."""
    if "unet" in config:
        return "unet"
    name = config.get("_class_name")
    if name in PIPELINE_FAMILIES:
        return PIPELINE_FAMILIES[name]
    raise SettingError(f"generator.model={model} is a {name}: dsdiff records the attention of {RECORDED}; "
                       f"{name} is not one of them")


MODEL_FIX = ("pass generator.model=<local diffusers folder with model_index.json> (for instance one written by "
             "save_pretrained) or a hub id the hub can give")


def generator_source(model: str | Path) -> str:
    """``generator.model`` as a local folder or a hub id that can be had now, else a clear error at once.

    A local folder is checked for its ``model_index.json`` and the component folders it lists
    (:func:`check_components`), without loading anything.
    """
    source = model_source(model, "generator.model", MODEL_FIX, probe="model_index.json")
    if Path(source).is_dir():
        check_components(Path(source), model)
    return source


OPTIONAL_COMPONENTS = ("safety_checker",)  # dsdiff loads pipelines without their safety checker


def check_components(folder: Path, model: str | Path) -> None:
    """Raise, naming the folder, if a local pipeline has no ``model_index.json`` or lacks (or has an empty)
    folder for a component its ``model_index.json`` lists (``unet/``, ``tokenizer/``, ``text_encoder/``, ...)."""
    index = folder / "model_index.json"
    if not index.is_file():
        raise MissingPathError(f"no Stable Diffusion weights at {str(folder)!r} (generator.model={model}): no "
                               f"model_index.json there, so not a diffusers pipeline folder; {MODEL_FIX}")
    try:
        config = json.loads(index.read_text())
    except (OSError, ValueError) as e:
        raise MissingPathError(f"generator.model={model}: unreadable {index} ({e}); {MODEL_FIX}") from e
    needed = [name for name, value in config.items() if not name.startswith("_") and name not in OPTIONAL_COMPONENTS
              and isinstance(value, list) and len(value) == 2 and all(value)]
    missing = [name for name in needed if not (folder / name).is_dir() or not any((folder / name).iterdir())]
    if missing:
        listed = ", ".join(f"{folder / name}/ ({config[name][1]})" for name in missing)
        raise MissingPathError(f"generator.model={model}: the {config.get('_class_name', 'pipeline')} folder lacks "
                               f"{'a component' if len(missing) == 1 else 'components'} its model_index.json lists: "
                               f"{listed}; copy the complete folder again (every subfolder save_pretrained wrote)")


def pipeline_config(model: str | Path) -> dict:
    """``model_index.json`` of a hub id or local diffusers folder (no weights loaded), with clear errors."""
    from diffusers import DiffusionPipeline

    fix = MODEL_FIX
    model = generator_source(model)  # at once when it cannot be had
    try:
        config = dict(DiffusionPipeline.load_config(str(model)))
    except (OSError, ValueError) as e:
        raise MissingPathError(f"no Stable Diffusion weights at {model!r}: {fix}. Cause: {e}") from e
    pipeline_family(config, model)  # a pipeline dsdiff cannot record names itself here
    return config


def load_tokenizer(model: str | Path):
    """The pipeline's (first) tokenizer alone: enough to check that class names can be placed."""
    import transformers

    config = pipeline_config(model)
    entry = config.get("tokenizer")
    if not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
        raise SettingError(f"{model!r} has no tokenizer in its model_index.json: dsdiff needs a text-to-image pipeline")
    cls = getattr(transformers, entry[1], None) or transformers.AutoTokenizer
    try:
        return cls.from_pretrained(str(model), subfolder="tokenizer")
    except (OSError, ValueError) as e:
        raise MissingPathError(f"could not load the tokenizer of {model!r}: pass generator.model=<a complete diffusers folder>. Cause: {e}") from e


def check_class_names(tokenizer, class_names: Sequence[str]) -> None:
    """Raise, naming the class, if the tokenizer cannot place a class name in a class prompt."""
    for name in class_names[1:]:
        try:
            class_token_spans(tokenizer, [class_words(name)])
        except ValueError as e:
            raise SettingError(f"class name {name!r} of data.class_list cannot be placed by this model's tokenizer: {e}") from e


WEIGHT_SUFFIXES = (".json", ".txt", ".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".model")
_CHUNK = 1 << 20


def folder_digest(folder: str | Path) -> str:
    """sha256 over a model folder's config and weight files: relative path, size, first and last MiB.

    Cheap for multi-GB checkpoints (2 MiB read per file) and independent of where the folder lives.
    """
    folder = Path(folder)
    h = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    for p in files:
        size = p.stat().st_size
        h.update(f"{p.relative_to(folder).as_posix()}\0{size}\0".encode())
        with p.open("rb") as f:
            h.update(f.read(_CHUNK))
            if size > 2 * _CHUNK:
                f.seek(size - _CHUNK)
            h.update(f.read())
    return "sha256:" + h.hexdigest()[:32]


def model_identity(model: str | Path) -> str | dict:
    """What ``dataset.json`` records of ``generator.model``: a hub id as it is; a local folder as its
    name and :func:`folder_digest` (so moving the folder keeps a cache valid, changing its weights does not)."""
    path = Path(str(model)).expanduser()
    if path.is_dir():
        return {"name": path.resolve().name, "digest": folder_digest(path)}
    return str(model)


def load_pipeline(model: str | Path, *, dtype: torch.dtype, safety_checker: bool = False):
    """A diffusers pipeline from a hub id or a local ``save_pretrained`` folder, with clear errors."""
    from diffusers import DiffusionPipeline

    fix = MODEL_FIX
    config = pipeline_config(model)
    # A component saved as [null, null] (a pixel-space model's vae) must be passed as None
    # explicitly: diffusers only fills in the optional ones (safety checker, feature extractor).
    extra = {name: None for name, value in config.items() if isinstance(value, list) and value == [None, None]}
    if "safety_checker" in config and not safety_checker:
        extra.update({"safety_checker": None, "requires_safety_checker": False})
    from diffusers.pipelines import pipeline_utils

    # diffusers renamed torch_dtype to dtype (and warns on the old name) where it has _resolve_dtype.
    extra["dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"] = dtype
    try:
        return DiffusionPipeline.from_pretrained(str(model), **extra)
    except (OSError, ValueError) as e:
        raise MissingPathError(f"could not load the pipeline at {model!r}: {fix}. Cause: {e}") from e


def unet_calls(scheduler, steps: int) -> int:
    """How many UNet calls (denoising-loop iterations) ``steps`` inference steps make with ``scheduler``:
    its ``timesteps`` after ``set_timesteps`` on a copy (DDIM, DPM-Solver, Euler: ``steps``; PNDM, as SD 2.1-base
    ships it: ``steps + 1``)."""
    copy = type(scheduler).from_config(scheduler.config)
    copy.set_timesteps(steps, device="cpu")
    return len(copy.timesteps)


def check_image_size(pipe, height: int, width: int, native: int, cross_res: int, self_res: int) -> None:
    """Raise, naming generator.height / width, on an image side whose latent has no attention layer at
    ``cross_res`` and ``self_res`` (generator.labels); the message lists the sides that have both."""
    factor = image_to_latent_factor(pipe)

    def fits(side: int) -> bool:
        if side % factor:
            return False
        grids = {hw[0] for hw in attention_layer_sizes(pipe.unet, (side // factor, side // factor)).values()}
        return {cross_res, self_res} <= grids

    for key, side in (("height", height), ("width", width)):
        if not fits(side):
            allowed = [s for s in range(factor, 4 * native + 1, factor) if fits(s)]
            raise SettingError(
                f"generator.{key}={side}: this model (native size {native}) has attention at "
                f"generator.labels.cross_res={cross_res} and self_res={self_res} only for image "
                f"sides {allowed[:8] or 'none up to ' + str(4 * native)}: set generator.{key} to one of them "
                "(or null for the native size)")
