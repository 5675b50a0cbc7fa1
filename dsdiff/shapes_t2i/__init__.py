"""A tiny text-to-image diffusion model for the built-in shapes world, trained by ``dsdiff.pretrain``.

It is saved as an ordinary diffusers ``StableDiffusionPipeline`` folder without a VAE (the
UNet denoises pixels packed by ``pixel_unshuffle``), so the generator loads it through the
same code path as Stable Diffusion. ``net`` builds the network components, ``system`` is the
LightningModule that trains them on ``data``; ``quality`` and ``scoring`` measure its attention.
``dit`` builds and trains the second model, an SD3-layout diffusion transformer saved as a
``StableDiffusion3Pipeline`` folder without a VAE (``generator=shapes_dit``).
"""
