"""The LightningModule that trains the tiny text-to-image pipeline (v-prediction diffusion loss)."""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import lightning as L
import torch
import torch.nn.functional as F

from dsdiff.diffusion.pixels import pack, packing_factor


class TextToImage(L.LightningModule):
    """Trains a pixel-space ``StableDiffusionPipeline``'s UNet and text encoder; ``to_pipeline()`` exports it.

    Each sample's text is drawn per step from ``text_probs`` over (caption, "caption; classes",
    classes, "") -- the forms the generator uses, plus the empty prompt that classifier-free
    guidance needs.
    """

    TEXT_FORMS = ("caption", "caption_classes", "classes", "empty")

    def __init__(
        self,
        pipeline,
        optimizer: Callable[..., torch.optim.Optimizer],
        warmup_steps: int = 200,
        text_probs: Sequence[float] = (0.4, 0.3, 0.2, 0.1),
    ) -> None:
        super().__init__()
        text_probs = [float(p) for p in text_probs]  # plain types (not ListConfig): checkpoints load weights_only
        warmup_steps = int(warmup_steps)
        if len(text_probs) != len(self.TEXT_FORMS) or min(text_probs) < 0 or sum(text_probs) <= 0:
            raise ValueError(f"text_probs must be {len(self.TEXT_FORMS)} weights >= 0 for {self.TEXT_FORMS}, got {list(text_probs)}")
        if getattr(pipeline, "vae", None) is not None:
            raise ValueError("TextToImage trains pixel-space pipelines: build the pipeline with vae=None")
        self.save_hyperparameters(ignore=["pipeline", "optimizer"], logger=False)
        self.optimizer_factory = optimizer
        self.attach(pipeline)
        self.train_seconds = 0.0  # wall time spent in training steps, kept across resumes
        self._step_started: float | None = None

    def attach(self, pipeline) -> None:
        """Take the pipeline's networks as this module's (their attribute names are the checkpoint's keys)."""
        self.unet = pipeline.unet
        self.text_encoder = pipeline.text_encoder
        self.tokenizer = pipeline.tokenizer
        self.scheduler = pipeline.scheduler
        self.packing = packing_factor(self.unet.config.in_channels)
        self.register_buffer("alphas_cumprod", self.scheduler.alphas_cumprod.clone().float(), persistent=False)
        # diffusers' from_pretrained (a warm start such as contextual_from) leaves its models in eval mode, and
        # Lightning keeps submodules' modes: without this, dropout in a config would silently stay off
        self.unet.train()
        self.text_encoder.train()

    def forward(self, packed: torch.Tensor, timesteps: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """Predicted v for noisy packed images (B, 3 r^2, h, w) at ``timesteps`` (B,) given texts."""
        return self.unet(packed, timesteps, self.encode(texts)).sample

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """(B, L, D) text embeddings, exactly as ``StableDiffusionPipeline.encode_prompt`` computes them."""
        ids = self.tokenizer(list(texts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.device))[0]

    def texts(self, batch: dict) -> list[str]:
        """One text per sample, its form drawn from ``text_probs``."""
        probs = torch.tensor(self.hparams.text_probs, dtype=torch.float)
        forms = torch.multinomial(probs, len(batch["caption"]), replacement=True).tolist()
        out = []
        for form, caption, classes in zip(forms, batch["caption"], batch["classes"]):
            out.append((caption, f"{caption}; {classes}", classes, "")[form])
        return out

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x0 = pack(batch["image"], self.packing)
        noise = torch.randn_like(x0)
        t = torch.randint(0, len(self.alphas_cumprod), (x0.shape[0],), device=self.device)
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * x0  # v
        loss = F.mse_loss(self(noisy, t, self.texts(batch)), target)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self._step_started = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self._step_started is not None:
            self.train_seconds += time.perf_counter() - self._step_started
        self.log("train/minutes", self.train_seconds / 60)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params=params)
        warmup = max(1, int(self.hparams.warmup_steps))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["train_seconds"] = self.train_seconds

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.train_seconds = float(checkpoint.get("train_seconds", 0.0))

    def to_pipeline(self):
        """A ``StableDiffusionPipeline`` (no VAE) sharing this module's UNet and text encoder."""
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=None, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
            scheduler=self.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe
